"""The slow, obviously correct MoE: every expert on every token, weighted by dense gates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# ----------------------------------------------------------------- reference


def reference_moe(x_ND, gates_NE, gate_EDF, up_EDF, down_EFD):
    """y_n = sum_e gates_NE[n, e] * SwiGLU_e(x_n) over ALL experts (scan over E)."""

    def step(y_ND, inputs):
        g_DF, u_DF, d_FD, w_N = inputs
        h_NF = jax.nn.silu(x_ND @ g_DF) * (x_ND @ u_DF)
        return y_ND + w_N[:, None] * (h_NF @ d_FD), None

    y_ND, _ = lax.scan(step, jnp.zeros_like(x_ND), (gate_EDF, up_EDF, down_EFD, gates_NE.T))
    return y_ND


def dense_gates(expert_NK, gate_NK, num_experts):
    """The [N, E] gate matrix of a token-choice routing (zeros where unselected)."""
    return jnp.sum(jax.nn.one_hot(expert_NK, num_experts, dtype=gate_NK.dtype) * gate_NK[..., None], 1)
