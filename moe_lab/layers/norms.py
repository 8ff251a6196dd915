"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * scale, computed in f32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.layers.base import param


class RMSNorm(nnx.Module):
    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        axis: str | None = "embed",
    ):
        """axis: the scale's logical axis (None: replicated, e.g. a head-dim norm)."""
        self.scale_D = param(None, (dim,), (axis,), init="ones", dtype=dtype)
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv_rms * self.scale_D[...].astype(jnp.float32)).astype(x_BTD.dtype)
