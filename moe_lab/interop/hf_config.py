"""HF transformers config.json <-> moe_lab ModelConfig, for the architectures that map
exactly (every option here is tested against transformers' own forward in
tests/test_interop.py).

    LlamaForCausalLM        dense; attention_bias -> attn_bias="qkvo"; llama3 RoPE scaling
    MixtralForCausalLM      top-k softmax MoE (softmax over the k chosen logits)
    Qwen2MoeForCausalLM     q/k/v biases, softmax-then-top-k (norm_topk_prob), one
                            sigmoid-gated shared expert of its own size
    Qwen3MoeForCausalLM     per-head QK-norm, softmax-then-top-k
    OlmoeForCausalLM        QK-norm over all heads at once, softmax-then-top-k

Anything else, or an option these classes have that moe_lab does not compute the same
way (sliding windows, clip_qkv, other RoPE scalings, sparse-step layouts, ...), is a
one-line HFConfigError naming the HF field.  The export direction is the inverse
(`hf_config_of`), refusing what no HF class can represent (MoR, expert choice, the
loss-free sigmoid router, post-norm, ...).
"""

from __future__ import annotations

from moe_lab.config.schema import ConfigError, ModelConfig, MoEConfig

LLAMA, MIXTRAL = "LlamaForCausalLM", "MixtralForCausalLM"
QWEN2_MOE, QWEN3_MOE, OLMOE = "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"
ARCHITECTURES = (LLAMA, MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE)
MODEL_TYPES = {
    LLAMA: "llama",
    MIXTRAL: "mixtral",
    QWEN2_MOE: "qwen2_moe",
    QWEN3_MOE: "qwen3_moe",
    OLMOE: "olmoe",
}
# What each class computes that is not a config field: q/k/v biases and the QK-norm.
FIXED_ATTENTION = {QWEN2_MOE: ("qkv", "none"), QWEN3_MOE: (None, "head"), OLMOE: (None, "full")}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


class HFConfigError(ConfigError):
    """An HF config moe_lab cannot represent exactly (the message names the field)."""


def _refuse_if(hf: dict, arch: str, field: str, ok) -> None:
    """Refuses hf[field] unless ok(value) (a missing field counts as its HF default)."""
    if field in hf and not ok(hf[field]):
        raise HFConfigError(
            f"{arch}: {field}={hf[field]!r} is not supported (moe_lab computes "
            f"no such variant; see moe_lab/interop/hf_config.py)"
        )


def _rope(hf: dict, arch: str) -> dict:
    scaling = hf.get("rope_scaling")
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return {}
    if kind != "llama3":
        raise HFConfigError(f"{arch}: rope_scaling type {kind!r} is not supported (llama3 is)")
    return {
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(scaling["factor"]),
        "rope_low_freq_factor": float(scaling["low_freq_factor"]),
        "rope_high_freq_factor": float(scaling["high_freq_factor"]),
        "rope_original_max_len": int(scaling["original_max_position_embeddings"]),
    }


def _moe_layers(hf: dict, arch: str) -> int:
    """first_dense_layers of a Qwen-MoE layout: mlp_only_layers must be [0, N) and
    decoder_sparse_step 1 (every later layer sparse)."""
    _refuse_if(hf, arch, "decoder_sparse_step", lambda v: v == 1)
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise HFConfigError(
            f"{arch}: mlp_only_layers={dense} is not supported (only the first N layers may be dense)"
        )
    return len(dense)


def model_config_of(hf: dict) -> ModelConfig:
    """The moe_lab ModelConfig computing what the HF config describes."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise HFConfigError(f"config.json architectures={archs}: supported are {', '.join(ARCHITECTURES)}")
    for field, ok in (
        ("hidden_act", lambda v: v == "silu"),
        ("mlp_bias", lambda v: not v),
        ("sliding_window", lambda v: v is None or arch in (QWEN2_MOE, QWEN3_MOE)),
        ("use_sliding_window", lambda v: not v),
        ("clip_qkv", lambda v: v is None),
        ("pretraining_tp", lambda v: v == 1),
        ("partial_rotary_factor", lambda v: v == 1.0),
    ):
        _refuse_if(hf, arch, field, ok)
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or D // H)
    bias, qk_norm = FIXED_ATTENTION.get(arch, (None, "none"))
    if bias is None:
        bias = "qkvo" if hf.get("attention_bias") else "none"
    m = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=D,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=H,
        num_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=head_dim if head_dim != D // H else 0,
        mlp_hidden=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=bias,
        qk_norm=qk_norm,
        param_dtype=DTYPES.get(str(hf.get("torch_dtype", hf.get("dtype", "float32"))), "float32"),
        **_rope(hf, arch),
    )
    if arch == LLAMA:
        return ModelConfig(**m)
    E = int(hf["num_local_experts"] if arch == MIXTRAL else hf["num_experts"])
    k = int(hf["num_experts_per_tok"])
    # HF's aux-loss coefficient counts the load per choice (K times ours: routing.router_aux)
    aux = float(hf.get("router_aux_loss_coef", 0.01)) / k
    if arch == MIXTRAL:
        moe = MoEConfig(
            num_experts=E,
            top_k=k,
            router="topk_softmax",
            aux_loss_weight=aux,
            expert_hidden=int(hf["intermediate_size"]),
            z_loss_weight=0.0,
        )
        return ModelConfig(**m, ffn="moe", moe=moe)
    renorm = bool(hf.get("norm_topk_prob", arch == QWEN3_MOE))
    if renorm and k == 1:
        raise HFConfigError(
            f"{arch}: norm_topk_prob=True with num_experts_per_tok=1 (gate 1 "
            f"for every token) is not supported"
        )
    moe = dict(
        num_experts=E,
        top_k=k,
        router="softmax_topk",
        renormalize=renorm,
        aux_loss_weight=aux,
        z_loss_weight=0.0,
    )
    if arch == OLMOE:
        moe["expert_hidden"] = int(hf["intermediate_size"])
        moe["z_loss_weight"] = float(hf.get("router_z_loss_coef", 0.0))
        return ModelConfig(**m, ffn="moe", moe=MoEConfig(**moe))
    moe["expert_hidden"] = int(hf["moe_intermediate_size"])
    moe["first_dense_layers"] = _moe_layers(hf, arch)
    if arch == QWEN2_MOE and int(hf.get("shared_expert_intermediate_size", 0)):
        moe.update(
            num_shared_experts=1, shared_gate=True, shared_hidden=int(hf["shared_expert_intermediate_size"])
        )
    return ModelConfig(**m, ffn="moe", moe=MoEConfig(**moe))


# --------------------------------------------------------------------------- export


def architecture_for(m: ModelConfig) -> str:
    """The HF class that computes what `m` does, or a ConfigError saying why none can."""
    why = None
    if m.stack != "plain":
        why = "a recursive (MoR) stack"
    elif m.norm_placement != "pre":
        why = "post-norm blocks"
    elif m.ffn == "moe" and m.moe.router in ("expert_choice", "sigmoid"):
        why = (
            f"router={m.moe.router!r} ("
            + ("experts choose tokens" if m.moe.router == "expert_choice" else "the loss-free selection bias")
            + ")"
        )
    elif m.ffn == "moe" and m.moe.routed_scale != 1.0:
        why = "moe.routed_scale != 1"
    if why:
        raise ConfigError(f"export: no HF class can represent {why}")
    if m.ffn == "dense":
        if m.qk_norm != "none" or m.attn_bias == "qkv":
            raise ConfigError(
                f"export: a dense model with qk_norm={m.qk_norm!r} / "
                f"attn_bias={m.attn_bias!r} has no HF class here"
            )
        return LLAMA
    e = m.moe
    shared = e.num_shared_experts > 0
    if shared and not e.shared_gate:
        raise ConfigError(
            "export: shared experts map only to Qwen2-MoE's one sigmoid-gated "
            "shared expert (moe.shared_gate=True)"
        )
    if m.attn_bias == "qkvo" or m.rope_scaling != "none":
        raise ConfigError(
            f"export: attn_bias={m.attn_bias!r} / rope_scaling={m.rope_scaling!r} "
            f"with an MoE has no HF class here"
        )
    if shared or m.attn_bias == "qkv":
        if m.qk_norm != "none" or m.attn_bias != "qkv" or not shared:
            raise ConfigError("export: Qwen2-MoE needs attn_bias='qkv', no qk_norm and a gated shared expert")
        return QWEN2_MOE
    if m.qk_norm == "head":
        return QWEN3_MOE
    if m.qk_norm == "full":
        if e.first_dense_layers:
            raise ConfigError("export: OLMoE has no dense first layers")
        return OLMOE
    if e.router == "topk_softmax" or (e.router == "softmax_topk" and e.renormalize and e.top_k > 1):
        if e.first_dense_layers:  # Mixtral has none; Qwen3-MoE (no QK-norm) would differ
            raise ConfigError("export: Mixtral has no dense first layers")
        return MIXTRAL
    raise ConfigError(
        "export: softmax_topk without renormalisation and without QK-norm has "
        "no HF class here (Qwen3-MoE / OLMoE also need their QK-norm)"
    )


def hf_config_of(m: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int | None) -> dict:
    """config.json for transformers' from_pretrained of the class architecture_for(m)."""
    arch = architecture_for(m)
    hf = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.resolved_head_dim,
        "intermediate_size": m.resolved_mlp_hidden,
        "max_position_embeddings": m.max_seq_len,
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "torch_dtype": m.param_dtype,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if m.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len,
        }
    if arch == LLAMA:
        hf.update(attention_bias=m.attn_bias == "qkvo", mlp_bias=False, pretraining_tp=1)
        return hf
    e = m.moe
    k = e.top_k
    hf.update(num_experts_per_tok=k, router_aux_loss_coef=e.aux_loss_weight * k, output_router_logits=False)
    if arch == MIXTRAL:
        hf.update(
            num_local_experts=e.num_experts,
            intermediate_size=m.resolved_expert_hidden,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
        return hf
    hf.update(num_experts=e.num_experts, norm_topk_prob=bool(e.renormalize and k > 1))
    if arch == OLMOE:
        hf.update(
            intermediate_size=m.resolved_expert_hidden,
            clip_qkv=None,
            router_z_loss_coef=e.z_loss_weight,
            attention_bias=False,
        )
        return hf
    hf.update(
        moe_intermediate_size=m.resolved_expert_hidden,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(e.first_dense_layers)),
        use_sliding_window=False,
        sliding_window=None,
        attention_bias=False,
    )
    if arch == QWEN2_MOE:
        # the shared experts run as one SwiGLU of this width (layers/moe.py)
        hf["shared_expert_intermediate_size"] = (
            e.shared_hidden or e.num_shared_experts * m.resolved_expert_hidden
        )
    return hf
