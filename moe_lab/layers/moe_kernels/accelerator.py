"""Accelerator kernels: tokamax / XLA ragged_dot, block-padded experts, [E, C, D] buffers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from moe_lab.layers.base import import_tokamax


def grouped_swiglu_ragged(x_SD, group_sizes_E, gate_EDF, up_EDF, down_EFD):
    """Grouped matmul with `jax.lax.ragged_dot`: groups are contiguous from row 0."""
    g_SF = lax.ragged_dot(x_SD, gate_EDF, group_sizes_E)
    u_SF = lax.ragged_dot(x_SD, up_EDF, group_sizes_E)
    return lax.ragged_dot(jax.nn.silu(g_SF) * u_SF, down_EFD, group_sizes_E)


def grouped_swiglu_tokamax(x_SD, group_sizes_E, gate_EDF, up_EDF, down_EFD):
    """The same grouped matmuls with `tokamax.ragged_dot` (its Pallas kernels where
    they run, else its XLA ragged_dot); tokamax is imported only here."""
    tokamax = import_tokamax()
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    g_SF = tokamax.ragged_dot(x_SD, gate_EDF, group_sizes_E)
    u_SF = tokamax.ragged_dot(x_SD, up_EDF, group_sizes_E)
    return tokamax.ragged_dot(jax.nn.silu(g_SF) * u_SF, down_EFD, group_sizes_E)


def grouped_swiglu_blocks(x_SD, block_expert_J, gate_EDF, up_EDF, down_EFD):
    """SwiGLU on [J, b, D] blocks, block j with expert block_expert_J[j]'s weights.

    Weights are gathered per block ([J, D, F]; autodiff turns the gather into a
    segment sum for the weight gradients): FLOPs ~ rows * D * F and weight
    traffic ~ J * D * F, neither a multiple of E.
    """
    j = block_expert_J.shape[0]
    x_JbD = x_SD.reshape(j, -1, x_SD.shape[-1])
    g_JbF = jnp.einsum("jbd,jdf->jbf", x_JbD, gate_EDF[block_expert_J])
    u_JbF = jnp.einsum("jbd,jdf->jbf", x_JbD, up_EDF[block_expert_J])
    y_JbD = jnp.einsum("jbf,jfd->jbd", jax.nn.silu(g_JbF) * u_JbF, down_EFD[block_expert_J])
    return y_JbD.reshape(x_SD.shape)


def buffer_swiglu(x_ECD, gate_EDF, up_EDF, down_EFD):
    """Batched expert SwiGLU on explicit per-expert buffers."""
    h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, gate_EDF)) * jnp.einsum(
        "ecd,edf->ecf", x_ECD, up_EDF
    )
    return jnp.einsum("ecf,efd->ecd", h_ECF, down_EFD)
