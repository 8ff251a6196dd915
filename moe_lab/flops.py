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
"""

from __future__ import annotations

from moe_lab.config import Config, ModelConfig


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
        routed = e.top_k  # on average each token is taken by k experts (capacity = k N / E)
    return 3 * D * F * (routed + e.num_shared_experts) + D * e.num_experts


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Exact parameter counts (norm scales included) for total and active params."""
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


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: active matmuls + causal attention at length seq_len."""
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
        "train_flops_per_token": fpt,
        "train_tokens": tokens,
        "train_flops": fpt * tokens,
        "tpp": tokens / counts["total"],
        # Chinchilla-style 1x compute for the active size (2510.08008 growth rule of thumb)
        "chinchilla_flops_active": 6.0 * counts["active"] * 20 * counts["active"],
    }
