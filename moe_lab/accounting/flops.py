"""Parameter and FLOP accounting: total vs active parameters, FLOPs per token, TPP.

Conventions (2508.18672 section 2; Kaplan et al. 2020; Hoffmann et al. 2022):
- total parameters count everything, embeddings included; active parameters
  replace the E routed experts by the k a token uses (shared experts and the
  router are always active). The paper's sparsity is 1 - k/E.
- forward FLOPs per token = 2 x (active matmul parameters, LM head included,
  embedding lookup excluded) + causal attention 2 x 2 x H x K x (T+1)/2 per
  layer; training FLOPs = 3 x forward (remat recomputation is not counted, so
  MFU stays comparable across remat settings).
- TPP (tokens per parameter) = training tokens / TOTAL parameters.
- recursive (MoR) stacks: the shared pool's parameters count once; forward FLOPs
  count each recursion step on the tokens it keeps (per-recursion token counts,
  causal attention among them; arXiv 2507.10524 sec. 3), so iso-FLOP step
  counts against vanilla are honest. Token choice's dense implementation costs
  more than this (see models/recursive.py); the count is the algorithm's.

Two counts (`convention`):
- "exact" (the default, every logged number): the above, LM head included, K/V
  projections at their GQA size.
- "mor_paper": the convention behind 2507.10524's iso-FLOP step counts, recovered
  from the released configs' hard-coded steps at the 360M shape (vanilla 9438;
  MoR expert choice N_r = 2, 3, 4: 12619, 14161, 14216; KV sharing N_r = 3: 14672):
  forward FLOPs without the LM head, and the K/V projections counted at d x d, as
  if every head had its own K/V (SmolLM-360M has 5 of 15).  With both, moe_lab's
  formula gives 12619, 14163, 14215 and 14674 (tests/test_mor.py); dropping only
  the head gives 1.505x vanilla at N_r = 3 (the paper: 1.500x) but 1.490x for KV
  sharing (the paper: 1.555x), because sharing's saving is the K/V projections,
  3x larger when they are counted at d x d.  KV sharing's steps >= 2 attend to all
  of step 1's keys in both counts (that is what they compute).
"""

from __future__ import annotations

import dataclasses

from moe_lab.config.schema import Config, ModelConfig, mor_capacities
from moe_lab.layers.recursion_routing import capacity_tokens, router_hidden
from moe_lab.models.recursive import recursion_schedule


def _attention_params(m: ModelConfig) -> int:
    D, H, G, K = m.d_model, m.num_heads, m.num_kv_heads, m.resolved_head_dim
    return D * H * K * 2 + D * G * K * 2  # q, o and k, v


def _ffn_params(m: ModelConfig, kind: str, active: bool) -> int:
    D = m.d_model
    if kind == "dense":
        return 3 * D * m.resolved_mlp_hidden
    e, F = m.moe, m.resolved_expert_hidden
    routed = e.top_k if active else e.num_experts
    if e.router == "expert_choice" and active:
        # every expert takes C = cf * N * k / E tokens, so a token is processed by
        # E * C / N = cf * k experts on average (Zhou et al. 2022: "c" experts per token)
        routed = e.capacity_factor * e.top_k
    shared_F = e.shared_hidden or e.num_shared_experts * F if e.num_shared_experts else 0
    gate = D if e.num_shared_experts and e.shared_gate else 0  # Qwen2-MoE's shared gate
    return round(3 * D * F * routed) + 3 * D * shared_F + gate + D * e.num_experts


def moe_layer_train_flops_per_token(m: ModelConfig) -> float:
    """Forward + backward FLOPs per token of one MoE layer: router, the k routed
    experts (expert choice: cf * k on average), shared experts; 3x the forward."""
    return 3.0 * 2.0 * _ffn_params(m, "moe", True)


def _mor_router_params(m: ModelConfig) -> int:
    r = m.mor
    D, R = m.d_model, r.num_recursions
    H = router_hidden(D)
    if r.routing == "none":
        return 0
    if r.routing == "token_choice":
        return D * R if r.router_type == "linear" else D * H + H * R
    one = R * D if r.router_type == "linear" else R * (D * H + H)
    return one * (2 if r.causal_aux == "aux_router" else 1)


def _mor_layers(m: ModelConfig) -> tuple[int, int, str]:
    """(unique first/last layers, shared pool layers, ffn kind of the first layer)."""

    s = recursion_schedule(m.num_layers, m.mor.num_recursions, m.mor.sharing)
    first_ffn = "dense" if (m.ffn == "moe" and m.moe.first_dense_layers) else m.ffn
    return 2 if s.first else 0, s.pool, first_ffn


def _mor_param_counts(m: ModelConfig) -> dict[str, int]:
    """Recursive stack: each distinct layer (the shared pool once) plus the routers."""
    D, V = m.d_model, m.vocab_size
    norms = 2 * D
    n_unique, pool, first_ffn = _mor_layers(m)
    embed = V * D * (1 if m.tie_embeddings else 2)
    out = {}
    for name, active in (("total", False), ("active", True)):
        layer = _attention_params(m) + _ffn_params(m, m.ffn, active) + norms
        layers = pool * layer + _mor_router_params(m)
        if n_unique:
            layers += layer + _attention_params(m) + _ffn_params(m, first_ffn, active) + norms
        out[name] = layers + embed + D
        out[f"{name}_non_embedding"] = layers + D
    out["embedding"] = embed
    return out


def recursion_token_fractions(m: ModelConfig, seq_len: int) -> list[float]:
    """Share of the tokens that take each recursion step (k_r / T).

    expert choice: floor(cap_r T) / T exactly (recursion_routing.capacity_tokens);
    token choice: the balanced target (each depth 1/N_r, so (N_r - r + 1)/N_r take
    step r); none: 1.
    """

    R = m.mor.num_recursions
    if m.mor.routing == "expert_choice":
        return [capacity_tokens(c, seq_len) / seq_len for c in mor_capacities(m)]
    if m.mor.routing == "token_choice":
        return [(R - r) / R for r in range(R)]
    return [1.0] * R


def _mor_forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a recursive model: unique layers on every token,
    step r's shared layers on the k_r = f_r T tokens it keeps, with causal attention
    among those k_r tokens (recursion-wise) or over step 1's keys (KV sharing:
    steps >= 2 also skip the k/v projections). Routers and the LM head included."""

    D, H, G, K, T = m.d_model, m.num_heads, m.num_kv_heads, m.resolved_head_dim, seq_len
    n_unique, _, first_ffn = _mor_layers(m)
    attn_mm = _attention_params(m)
    layer_mm = attn_mm + _ffn_params(m, m.ffn, True)
    causal = 2 * 2 * H * K  # per (query, key) pair
    flops = 0.0
    if n_unique:
        flops += 2.0 * (layer_mm + attn_mm + _ffn_params(m, first_ffn, True))
        flops += 2 * causal * (T + 1) / 2
    n = len(recursion_schedule(m.num_layers, m.mor.num_recursions, m.mor.sharing).steps[0])
    shared_kv = m.mor.kv_cache == "shared"
    for r, f in enumerate(recursion_token_fractions(m, T)):
        k = f * T
        mm = layer_mm - (2 * D * G * K if shared_kv and r > 0 else 0)
        keys = (T + 1) / 2 if shared_kv and r > 0 else (k + 1) / 2
        flops += n * f * (2.0 * mm + causal * keys)
    flops += 2.0 * _mor_router_params(m)
    flops += 2.0 * m.vocab_size * D  # LM head (tied or not)
    return flops


def layer_applications(m: ModelConfig, seq_len: int) -> float:
    """Layer applications per token that hold activations: num_layers for a plain
    stack; a recursive stack's unique layers plus each recursion step's shared layers,
    weighted by the share of tokens the step computes: expert choice gathers the k_r
    tokens it keeps, token choice computes every token at every step (masked; the
    FLOP count takes its balanced target instead)."""
    if m.stack != "recursive":
        return float(m.num_layers)
    n_unique, _, _ = _mor_layers(m)
    per_step = len(recursion_schedule(m.num_layers, m.mor.num_recursions, m.mor.sharing).steps[0])
    if m.mor.routing == "expert_choice":
        return n_unique + per_step * sum(recursion_token_fractions(m, seq_len))
    return n_unique + per_step * m.mor.num_recursions


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Exact parameter counts (norm scales included) for total and active params."""
    if m.stack == "recursive":
        return _mor_param_counts(m)
    D, V = m.d_model, m.vocab_size
    norms = 2 * D
    n_dense = m.moe.first_dense_layers if m.ffn == "moe" else 0
    n_ffn = m.num_layers - n_dense
    embed = V * D * (1 if m.tie_embeddings else 2)
    out = {}
    for name, active in (("total", False), ("active", True)):
        layers = n_dense * (_attention_params(m) + _ffn_params(m, "dense", active) + norms)
        layers += n_ffn * (_attention_params(m) + _ffn_params(m, m.ffn, active) + norms)
        out[name] = layers + embed + D  # + final norm
        out[f"{name}_non_embedding"] = layers + D
    out["embedding"] = embed
    return out


def sparsity(m: ModelConfig) -> float:
    return 1.0 - m.moe.top_k / m.moe.num_experts if m.ffn == "moe" else 0.0


CONVENTIONS = ("exact", "mor_paper")


def forward_flops_per_token(m: ModelConfig, seq_len: int, convention: str = "exact") -> float:
    """Forward FLOPs per token: active matmuls + causal attention at length seq_len,
    in one of the CONVENTIONS (module docstring)."""
    if convention == "mor_paper":
        mha = dataclasses.replace(m, num_kv_heads=m.num_heads)  # K/V counted at d x d
        return forward_flops_per_token(mha, seq_len) - 2.0 * m.vocab_size * m.d_model
    if convention != "exact":
        raise ValueError(f"FLOP convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    if m.stack == "recursive":
        return _mor_forward_flops_per_token(m, seq_len)
    counts = param_counts(m)
    lookup = m.vocab_size * m.d_model  # the embedding gather is not a matmul
    # active matmul params: everything but the lookup table and the norm scales
    norms = m.num_layers * 2 * m.d_model + m.d_model
    matmul_params = counts["active"] - norms - (0 if m.tie_embeddings else lookup)
    if m.tie_embeddings:
        matmul_params = counts["active"] - norms  # the tied table is used once, as LM head
    H, K = m.num_heads, m.resolved_head_dim
    attention = m.num_layers * 2 * 2 * H * K * (seq_len + 1) / 2
    return 2.0 * matmul_params + attention


def train_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(m, seq_len)


def iso_flop_steps(
    m: ModelConfig, base: ModelConfig, base_steps: int, seq_len: int, convention: str = "exact"
) -> int:
    """Train steps of m that spend base_steps of base's FLOPs (same batch and length)."""
    ratio = forward_flops_per_token(base, seq_len, convention) / forward_flops_per_token(
        m, seq_len, convention
    )
    return round(base_steps * ratio)


def run_summary(cfg: Config) -> dict:
    m = cfg.model
    counts = param_counts(m)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    fpt = train_flops_per_token(m, cfg.data.seq_len)
    return {
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_total_non_embedding": counts["total_non_embedding"],
        "params_active_non_embedding": counts["active_non_embedding"],
        "sparsity": sparsity(m),
        "forward_flops_per_token": forward_flops_per_token(m, cfg.data.seq_len),
        "forward_flops_per_token_mor_paper": forward_flops_per_token(m, cfg.data.seq_len, "mor_paper"),
        "train_flops_per_token": fpt,
        "train_tokens": tokens,
        "train_flops": fpt * tokens,
        "tpp": tokens / counts["total"],
        # Chinchilla-style 1x compute for the active size (2510.08008 growth rule of thumb)
        "chinchilla_flops_active": 6.0 * counts["active"] * 20 * counts["active"],
    }
