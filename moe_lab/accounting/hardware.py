"""Peak FLOP/s of the machine, for MFU.

Accelerators: the chip's datasheet dense peak for the compute dtype.  CPU: the
matmul throughput this process measures (the attainable peak of these cores;
the datasheet number of a CPU says little about what XLA reaches).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_lab.accounting.timing import time_fn
from moe_lab.parallel.topology import tpu_generation_of

# dense bf16 peak FLOP/s per GPU (datasheets); TPUs: parallel/topology.py's table
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def tpu_peak_bf16(device_kind: str) -> float | None:
    """A TPU device's dense bf16 peak (its chip's over the devices a chip shows)."""
    gen = tpu_generation_of(device_kind)
    return gen.bf16_tflops_per_chip * 1e12 / gen.devices_per_chip if gen else None


@functools.cache
def peak_flops_per_device(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    dev = jax.devices()[0]
    tpu = tpu_peak_bf16(dev.device_kind) if dev.platform == "tpu" else None
    if tpu:  # "TPU v5" (v5p) matched no name of the old table: it fell to a measurement
        return (tpu if dtype == "bfloat16" else tpu / 2), f"datasheet {dev.device_kind}"
    if dev.platform != "cpu":
        for name, peak in _GPU_PEAK_BF16.items():
            if name.lower() in dev.device_kind.lower():
                return (peak if dtype == "bfloat16" else peak / 2), f"datasheet {name}"
    n = len(jax.devices())
    # fake CPU devices share the same cores: measure on one, divide by the count
    return matmul_peak_flops(1024) / n, "measured matmul (cpu)"


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """FLOP/s of a large square matmul on the default backend, measured now.

    MFU on CPU is reported against this (the machine's own attainable peak), on
    accelerators against the chip's datasheet peak where known.
    """
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = time_fn(f, a, b, warmup=2, iters=5)
    return 2 * n**3 / t
