"""`moe-lab bench NAME [--json] [--quick]`: the benchmarks of moe_lab/bench (ratios
measured in one run, each printed with its target)."""

from __future__ import annotations

import json

from moe_lab.bench import run_benchmark


def add_bench_parser(subparsers):
    b = subparsers.add_parser(
        "bench", help="benchmarks: train-step, moe, decode, growth, data, interop, attention"
    )
    b.add_argument("name")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    b.set_defaults(fn=cmd_bench)
    return b


def cmd_bench(args, overrides) -> int:
    result = run_benchmark(args.name, quick=args.quick, as_json=args.json)
    if args.json:
        print(json.dumps(result))
    return 0
