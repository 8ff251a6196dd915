"""Shared benchmark helpers: timing, the machine's own matmul peak, targets.

Every `moe-lab bench NAME` returns a dict of measurements plus `targets`: a list of
{name, value, limit, ok} where ratios come from the same run (never hard-coded).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
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


def paired_ratio(num: tuple[Callable, tuple], den: tuple[Callable, tuple], pairs: int = 7) -> float:
    """Median over `pairs` back-to-back (num, den) calls of time(num) / time(den).

    For ratio targets on a shared machine: both cases of a pair see the same load,
    so drift over minutes cancels (a ratio of medians taken minutes apart does
    not).  Both functions must already be compiled and warm.
    """
    ratios = []
    for i in range(pairs):
        order = (num, den) if i % 2 == 0 else (den, num)  # alternate who goes first
        t = {}
        for which, (fn, args) in zip(("first", "second"), order):
            t0 = time.perf_counter()
            block(fn(*args))
            t[which] = time.perf_counter() - t0
        t_num, t_den = (t["first"], t["second"]) if i % 2 == 0 else (t["second"], t["first"])
        ratios.append(t_num / t_den)
    return float(np.median(ratios))


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


def target(name: str, value: float, limit: float, *, at_least: bool = False) -> dict:
    ok = value >= limit if at_least else value <= limit
    return {"name": name, "value": round(float(value), 4), "limit": limit,
            "op": ">=" if at_least else "<=", "ok": bool(ok)}


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        mark = "OK  " if t["ok"] else "MISS"
        print(f"  [{mark}] {t['name']}: {t['value']} (target {t['op']} {t['limit']})")
