"""`moe-lab` command line: train, eval, info, grow, sweep, rl, bench.

Every command validates its input before anything compiles and reports bad
input as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from moe_lab.bench import run_benchmark
from moe_lab.cli.eval import add_eval_parser
from moe_lab.cli.grow import add_grow_parser
from moe_lab.cli.info import print_info
from moe_lab.cli.rl import add_rl_parser
from moe_lab.cli.sweep import add_sweep_parser
from moe_lab.config.load import apply_overrides, from_dict, load_config, parse_override_args
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate
from moe_lab.eval.evaluate import evaluate
from moe_lab.parallel import distributed
from moe_lab.parallel.host_allocator import tune_host_allocator
from moe_lab.train.loop import train
from moe_lab.train.run_dir import config_path


def _config_from_args(args, overrides: dict) -> Config:
    if args.config:
        return load_config(args.config, overrides)
    workdir = getattr(args, "workdir", None)
    path = config_path(workdir) if workdir else None
    if not path or not os.path.isfile(path):
        raise ConfigError("--config is required (or a --workdir that holds config.json)")
    with open(path) as f:
        raw = json.load(f)
    return validate(from_dict(Config, apply_overrides(raw, overrides)))


def cmd_train(args, overrides) -> int:
    cfg = _config_from_args(args, overrides)

    distributed.initialize(args)

    summary = train(cfg, args.workdir)
    if cfg.eval.at_end and summary["step"] == cfg.train.steps:  # training, then evaluation
        res = evaluate(args.workdir, summary["step"],
                       devices="one" if jax.process_count() == 1 else "all")
        summary.update({f"{g}/{k}": v for g, d in res["groups"].items() for k, v in d.items()})
    if summary.get("process_index", 0) != 0:
        return 0
    print("summary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in summary.items()}))
    return 0


def cmd_info(args, overrides) -> int:
    cfg = _config_from_args(args, overrides)

    print_info(cfg, workdir=getattr(args, "workdir", None), devices=args.devices,
               hardware=args.hardware)
    return 0


def cmd_bench(args, overrides) -> int:

    result = run_benchmark(args.name, quick=args.quick, as_json=args.json)
    if args.json:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train or resume a run (overrides: --config.a.b=V)")
    t.add_argument("--config", help="config file, path.py[:arg]")
    t.add_argument("--workdir", required=True)

    distributed.add_flags(t)
    t.set_defaults(fn=cmd_train)
    i = sub.add_parser("info", help="params, FLOPs, TPP, memory, mesh rules of a config")
    i.add_argument("--config")
    i.add_argument("--workdir")
    i.add_argument("--devices", type=int, help="plan for this many devices (abstract mesh)")
    i.add_argument("--hardware", help="chip kind for the memory plan: tpu-v5p, tpu-v6e, h100, ...")
    i.set_defaults(fn=cmd_info)

    add_grow_parser(sub)

    add_eval_parser(sub)
    add_sweep_parser(sub)

    add_rl_parser(sub)
    b = sub.add_parser("bench", help="benchmarks: train-step, moe, decode, growth")
    b.add_argument("name")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    tune_host_allocator()  # before jax starts its thread pools (parallel/host_allocator.py)
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides, rest = parse_override_args(argv)
        args = build_parser().parse_args(rest)
        if overrides and args.command == "bench":
            raise ConfigError("bench takes no --config overrides")
        return args.fn(args, overrides)
    except ConfigError as e:
        print(f"moe-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-lab: interrupted", file=sys.stderr)
        return 130
