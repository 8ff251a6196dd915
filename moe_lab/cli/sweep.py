"""`moe-lab sweep` (and `python -m moe_lab.cli.sweep`, the sweep's child processes)."""

from __future__ import annotations

import argparse
import os
import sys

from moe_lab.config.load import parse_override_args
from moe_lab.config.schema import ConfigError
from moe_lab.parallel.host_allocator import tune_host_allocator
from moe_lab.sweep.compile_plan import compile_sweep
from moe_lab.sweep.points import parse_shard
from moe_lab.sweep.results import RESULTS, format_results, load_results
from moe_lab.sweep.runner import FAILED_MARK, run_sweep

# ------------------------------------------------------------------------ CLI


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sweep", help="run a config's get_sweep() grid, resumably")
    s.add_argument("--config", required=True, help="config file with get_sweep, path.py[:arg]")
    s.add_argument("--workdir", required=True, help="sweep directory")
    s.add_argument("--shard", default=None, help="I/N: run every N-th point starting at I")
    s.add_argument("--dry-run", action="store_true", help="print the equivalent commands")
    s.add_argument(
        "--isolate",
        choices=("subprocess", "inprocess"),
        default="subprocess",
        help="run each point in a child process (default) or in this one",
    )
    s.add_argument("--point", default=None, help="run only this point, in this process")
    s.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    s.add_argument(
        "--compile",
        metavar="TOPOLOGY",
        default=None,
        help="compile every point for this TPU topology (v5p-256, v6e:16x16, ...) "
        "and write SWEEP/compile_plan.jsonl instead of running",
    )
    s.add_argument("--num-slices", type=int, default=1, help="with --compile: slices over DCN")
    s.add_argument(
        "--allow-resize",
        action="store_true",
        help="with --compile: points whose mesh.plan_devices differ from the topology",
    )
    s.set_defaults(fn=cmd_sweep)
    return s


def cmd_sweep(args, overrides) -> int:
    if args.compile:
        rows = compile_sweep(
            args.config,
            args.workdir,
            args.compile,
            num_slices=args.num_slices,
            overrides=overrides,
            allow_resize=args.allow_resize,
        )
        return 0 if all(r["fits"] for r in rows) else 1
    status = run_sweep(
        args.config,
        args.workdir,
        overrides=overrides,
        shard=parse_shard(args.shard),
        dry_run=args.dry_run,
        isolate=args.isolate,
        only=args.point,
        child=args.child,
    )
    if not args.dry_run and args.point is None and os.path.isfile(os.path.join(args.workdir, RESULTS)):
        print(format_results(load_results(args.workdir)))
    return 1 if status["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    tune_host_allocator()  # as `moe-lab` does: the sweep's child processes start here
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m moe_lab.cli.sweep")
    sub = p.add_subparsers(dest="command")
    add_sweep_parser(sub)
    try:
        overrides, rest = parse_override_args(argv)
        args = p.parse_args(["sweep", *rest])
        return args.fn(args, overrides)
    except ConfigError as e:
        if "--child" in argv:  # the parent sweep process records it
            print(f"{FAILED_MARK}ConfigError: {e}", flush=True)
        print(f"moe-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
