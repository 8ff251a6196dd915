"""Wall-clock timing of jitted functions (compilation excluded): benchmarks and the CPU peak."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 5, min_time: float = 0.0) -> float:
    """Median wall time (seconds) of fn(*args) after warm-up (compilation excluded)."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    start_all = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) > 100 * iters:
            break
    return float(np.median(times))
