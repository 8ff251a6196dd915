"""SwiGLU feed-forward (Shazeer 2020): down(silu(x W_gate) * (x W_up)).

Dimension legend: B batch, T time, D d_model, F hidden.
"""

from __future__ import annotations

import jax
from flax import nnx

from moe_lab.layers.base import dtype_of, param


def swiglu(x_BTD, gate_DF, up_DF, down_FD):
    """The SwiGLU function on explicit weights (also the MoE experts' reference).

    Tokens are flattened to one [N, D] matrix first: XLA:CPU runs a 2-D matmul
    1.5-2x faster than the same product with a batch dimension (measured here).
    """
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    h_NF = jax.nn.silu(x_ND @ gate_DF) * (x_ND @ up_DF)
    return (h_NF @ down_FD).reshape(*x_BTD.shape[:-1], down_FD.shape[-1])


class SwiGLU(nnx.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        init_std: float = 0.02,
        param_dtype: str = "float32",
        compute_dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        pd = dtype_of(param_dtype)
        self.gate_DF = param(rngs, (d_model, hidden), ("embed", "mlp"), std=init_std, dtype=pd)
        self.up_DF = param(rngs, (d_model, hidden), ("embed", "mlp"), std=init_std, dtype=pd)
        self.down_FD = param(rngs, (hidden, d_model), ("mlp", "embed"), std=init_std, dtype=pd)
        self.compute_dtype = dtype_of(compute_dtype)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cd = self.compute_dtype
        return swiglu(
            x_BTD.astype(cd),
            self.gate_DF[...].astype(cd),
            self.up_DF[...].astype(cd),
            self.down_FD[...].astype(cd),
        )
