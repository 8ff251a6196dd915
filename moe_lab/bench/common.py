"""Shared benchmark helpers: timing, the machine's own matmul peak, targets.

Every `moe-lab bench NAME` returns a dict of measurements plus `targets`: a list of
{name, value, limit, ok} where ratios come from the same run (never hard-coded).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moe_lab.accounting.timing import block, time_fn


def paired_ratios(num: tuple[Callable, tuple], den: tuple[Callable, tuple], pairs: int = 7) -> list[float]:
    """time(num) / time(den) of each of `pairs` back-to-back (num, den) calls.

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
    return ratios


def paired_ratio(num: tuple[Callable, tuple], den: tuple[Callable, tuple], pairs: int = 7) -> float:
    """Median of `paired_ratios`."""
    return float(np.median(paired_ratios(num, den, pairs)))


def spread(ratios: list[float], scale: float = 1.0) -> dict:
    """Median and interquartile range of paired ratios (times `scale`), for reports:
    on a shared machine one run's pairs disagree by tens of percent, and a reader
    should see how far before trusting the median against a target."""
    q25, q50, q75 = (scale * float(q) for q in np.percentile(ratios, [25, 50, 75]))
    return {"median": q50, "q25": q25, "q75": q75, "pairs": len(ratios)}


def copy_bandwidth_gbs(mib: int = 256) -> float:
    """Effective memory bandwidth now (GB/s, bytes read + written by an array copy
    far larger than any cache).  Printed by memory-bound benchmarks at their start
    and end: neighbours on a shared host take bandwidth, and the E=256 MoE layer,
    which streams 400 MB of expert weights three times per step, slows down with it."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    t = min(time_fn(f, x, warmup=2, iters=3) for _ in range(2))
    return 2 * x.nbytes / t / 1e9


def target(name: str, value: float | dict, limit: float, *, at_least: bool = False) -> dict:
    """A target judged on `value` (a number, or a `spread` dict: judged on its median,
    the interquartile range is kept for the report)."""
    stats = value if isinstance(value, dict) else None
    value = stats["median"] if stats else value
    ok = value >= limit if at_least else value <= limit
    out = {
        "name": name,
        "value": round(float(value), 4),
        "limit": limit,
        "op": ">=" if at_least else "<=",
        "ok": bool(ok),
    }
    if stats:
        out["iqr"] = [round(stats["q25"], 4), round(stats["q75"], 4)]
        out["pairs"] = stats["pairs"]
    return out


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        mark = "OK  " if t["ok"] else "MISS"
        iqr = f", middle half of {t['pairs']} pairs {t['iqr'][0]}-{t['iqr'][1]}" if "iqr" in t else ""
        print(f"  [{mark}] {t['name']}: {t['value']} (target {t['op']} {t['limit']}{iqr})")


def host_cores() -> int:
    """The cores this process may run on: what XLA:CPU's thread pool uses."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def provenance() -> dict:
    """What a result was measured on: the commit (and whether the tree had changes),
    the UTC date, jax's version and backend, and the host's cores.  Every bench's JSON
    carries it, so that a regression can be traced to the commit that brought it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit or "unknown (not a git checkout)",
        "dirty": bool(status),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "host_cores": host_cores(),
    }
