"""Parameter creation: the one place that attaches sharding metadata.

Modules carry *logical* axis names only ("embed", "mlp", "heads", ...); the
rule table in the config maps them to mesh axes (moe_lab/parallel/sharding.py).  The
metadata key lives here alone because Flax renamed its own sharding keyword
twice in a year (sharding -> sharding_names -> out_sharding); we keep ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.absl_flags import parse_absl_flags_once
from moe_lab.parallel.sharding import LOGICAL_AXES_KEY

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
    return DTYPES[name]


def router_matmul(x, w):
    """x @ w in real float32, for router logits (MoE experts, MoR depths).

    Precision HIGHEST: the default float32 matmul is bf16 passes on TPU and
    TF32 on recent GPUs, and near-tied logits decide the routing (top-k,
    thresholds).  No change on CPU, where float32 dots are float32.
    """
    return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    logical_axes: tuple[str | None, ...],
    *,
    init: str = "normal",
    std: float = 0.02,
    dtype=jnp.float32,
) -> nnx.Param:
    """An nnx.Param with `logical_axes` metadata (one name per dimension)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        raise ValueError(f"unknown init {init}")
    return nnx.Param(value, **{LOGICAL_AXES_KEY: tuple(logical_axes)})


def import_tokamax():
    """tokamax, imported on first use (layers/attention_kernels.py, moe_kernels), with
    the absl flags it reads parsed (config/absl_flags.py)."""
    parse_absl_flags_once()
    import tokamax

    return tokamax
