"""Attention implementations behind one signature: q, k, v and a [B, T, S] mask.

Dimension legend: B batch, T query time, S key time, H query heads, G kv heads, K
head dim.  The mask is the one moe_lab builds everywhere (causal by position, same
segment, valid cache slots: layers/attention.py), so packed rows, GQA, MoR's
gathered tokens and KV caches work the same way under every implementation.

  xla      moe_lab's einsum attention (`gqa`): the [B, G, R, T, S] scores
           in f32 and, under autodiff, kept for the backward pass (~1 GiB per layer
           per 4096 tokens at T = 1024).  The reference of the others.
  chunked  tokamax's `xla_chunked` (Rabe & Staats 2021, arXiv 2112.05682): keys in
           chunks with a running softmax, memory linear in T on every backend, CPU
           included (compiled fwd+bwd temporaries at T = 8192, 8 heads: 461 MiB
           against 8208 MiB for xla; `moe-lab bench attention`).
  tokamax  tokamax.dot_product_attention's own choice: its Pallas flash kernels
           (mosaic on GPU / TPU, triton), the first that accepts the call, else its
           XLA attention (which is what CPU gets).
  cudnn    cuDNN flash attention through jax.nn.dot_product_attention (GPU, bf16 /
           fp16; KV-cache decoding uses xla: cuDNN's fused kernel is a training /
           prefill kernel).
  splash   the TPU splash (flash) kernel on packed rows by causal mask and segment
           ids (layers/splash.py), forward and backward; the plain stack's self-
           attention only: MoR's gathered-token attention and KV-cache decoding take
           xla (a start-up line says so).  On CPU it runs in Pallas' interpreter.
  auto     cudnn on GPU (xla where cuDNN does not take the dtype / head dim), splash
           on TPU, xla on CPU.  Not tokamax on TPU: its TPU flash kernel refuses the
           dense [B, 1, T, S] mask and tokamax would fall back to XLA attention without
           a word (seen in the compiled HLO: no kernel call).  Asked for explicitly on
           TPU, `tokamax` calls the Mosaic kernel alone ("tokamax:mosaic"), so a
           refusal is a compile error, never a silent fallback.

Only [B, 1, T, S] booleans (the mask, one byte a pair, shared by the heads) are
formed for the library kernels, never [B, H, T, S] scores.  tokamax is imported
here, only when one of its implementations is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_lab.layers.base import import_tokamax

ATTENTION_IMPLS = ("auto", "xla", "chunked", "tokamax", "cudnn", "splash")


def gqa(q_BTHK, k_BSGK, v_BSGK, mask_BTS) -> jax.Array:
    """Softmax attention with G kv heads shared by groups of R query heads (f32 softmax)."""
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK).astype(jnp.float32)
    scores_BGRTS *= K**-0.5
    scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS, -1e30)
    probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGK.dtype)
    out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
    return out_BTGRK.reshape(B, T, H, K)


def resolve_attention_impl(
    impl: str, backend: str | None = None, *, compute_dtype: str = "bfloat16", head_dim: int = 128
) -> str:
    """The implementation `impl` means on `backend` (default: the host's) for this
    compute dtype and head dim: 'auto' is cudnn on GPU where cuDNN's flash kernel takes
    the call (bf16 / fp16, head dim <= 128 divisible by 8), else xla; 'tokamax' on TPU
    is its Mosaic kernel alone ("tokamax:mosaic", see the module doc)."""
    backend = backend or jax.default_backend()
    if impl == "tokamax" and backend == "tpu":
        return "tokamax:mosaic"
    if impl != "auto":
        return impl
    if backend in ("gpu", "cuda"):
        return "cudnn" if _cudnn_error(compute_dtype, head_dim) is None else "xla"
    return "splash" if backend == "tpu" else "xla"


def splash_note(seq_len: int | None) -> str:
    """What the splash kernel covers, and what it leaves to xla, for a start-up line."""
    short = (
        f"; data.seq_len={seq_len} is not a multiple of 128: xla attention"
        if seq_len and seq_len % 128
        else ""
    )
    return (
        "the plain stack's self-attention by segment ids; MoR's gathered-token "
        f"attention and KV-cache decoding run xla{short}"
    )


def auto_attention_note(backend: str, compute_dtype: str, head_dim: int, seq_len: int | None = None) -> str:
    """Why 'auto' resolved as it did on `backend` (a start-up line)."""
    impl = resolve_attention_impl("auto", backend, compute_dtype=compute_dtype, head_dim=head_dim)
    if backend == "tpu":
        why = (
            "the TPU flash kernel on packed rows: " + splash_note(seq_len) + "; not "
            "tokamax: its TPU kernel takes no dense [B,1,T,S] mask and would fall back "
            "to XLA silently"
        )
    elif backend in ("gpu", "cuda") and impl == "xla":
        why = _cudnn_error(compute_dtype, head_dim)
    else:
        why = "the reference einsum attention"
    return f"attention: auto -> {impl} on {backend} ({why})"


def _cudnn_error(compute_dtype: str, head_dim: int) -> str | None:
    if compute_dtype not in ("bfloat16", "float16"):
        return f"model.attention_impl='cudnn' runs in bf16 / fp16; model.compute_dtype is {compute_dtype}"
    if head_dim % 8 or head_dim > 128:
        return f"model.attention_impl='cudnn' needs a head dim <= 128 divisible by 8, got {head_dim}"
    return None


def attention_impl_error(
    impl: str, compute_dtype: str, head_dim: int, backend: str | None = None
) -> str | None:
    """Why `impl` cannot run here (a one-line reason), or None."""
    impl = resolve_attention_impl(impl, backend, compute_dtype=compute_dtype, head_dim=head_dim)
    backend = backend or jax.default_backend()
    if impl == "cudnn":
        if backend not in ("gpu", "cuda"):
            return (
                f"model.attention_impl='cudnn' needs an NVIDIA GPU (this backend is "
                f"{backend}); use xla, chunked or tokamax"
            )
        return _cudnn_error(compute_dtype, head_dim)
    return None


def attend(q_BTHK, k_BSGK, v_BSGK, mask_BTS, impl: str, *, decoding: bool = False):
    """Softmax attention of q over (k, v) where mask_BTS allows -> [B, T, H, K]."""
    impl = resolve_attention_impl(impl)
    if impl == "cudnn" and decoding:
        impl = "xla"
    if impl == "splash":  # masks it does not take (MoR's gathered tokens, KV caches)
        impl = "xla"
    if impl == "xla":
        return gqa(q_BTHK, k_BSGK, v_BSGK, mask_BTS)
    mask_B1TS = mask_BTS[:, None]
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_B1TS, implementation="cudnn")
    tokamax = import_tokamax()  # only where it is used
    which = {"chunked": "xla_chunked", "tokamax:mosaic": "mosaic"}.get(impl)
    out = tokamax.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_B1TS, implementation=which)
    return out.astype(v_BSGK.dtype)
