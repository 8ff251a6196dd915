"""`moe-lab bench NAME`: benchmarks that report ratios measured in one run.

Each returns {"name", ..., "targets": [{name, value, limit, op, ok}]}.
"""

from __future__ import annotations

import importlib

from moe_lab.bench.common import provenance
from moe_lab.config.schema import ConfigError
from moe_lab.parallel.host_allocator import tune_host_allocator

BENCHMARKS = {
    "train-step": "moe_lab.bench.train_step",
    "moe": "moe_lab.bench.moe",
    "decode": "moe_lab.bench.decode",
    "growth": "moe_lab.bench.growth",
    "data": "moe_lab.bench.data",
    "interop": "moe_lab.bench.interop",
    "attention": "moe_lab.bench.attention",
}


def run_benchmark(name: str, *, quick: bool = False, as_json: bool = False) -> dict:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (available: {', '.join(BENCHMARKS)})")
    if name != "data":  # data: host tokenization, which one malloc arena serialises
        tune_host_allocator()  # before the benchmark's jax work: see parallel/host_allocator.py
    module = importlib.import_module(BENCHMARKS[name])
    result = module.run(quick=quick)
    result["provenance"] = provenance()  # the commit it ran on: regressions are traceable
    if not as_json:
        module.main_print(result)
    return result
