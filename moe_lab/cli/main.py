"""`moe-lab` command line: train, eval, info, compile, grow, sweep, rl, bench, tokenizer, prepare,
import, export.

One thin file per command (moe_lab/cli/<command>.py: its parser and what it
runs); this one dispatches.  Every command validates its input before anything
compiles and reports bad input as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys

from moe_lab.cli.bench import add_bench_parser
from moe_lab.cli.compile import add_compile_parser
from moe_lab.cli.eval import add_eval_parser
from moe_lab.cli.grow import add_grow_parser
from moe_lab.cli.info import add_info_parser
from moe_lab.cli.interop import add_export_parser, add_import_parser
from moe_lab.cli.prepare import add_prepare_parser, add_tokenizer_parser
from moe_lab.cli.rl import add_rl_parser
from moe_lab.cli.sweep import add_sweep_parser
from moe_lab.cli.train import add_train_parser
from moe_lab.config.load import parse_override_args
from moe_lab.config.schema import ConfigError
from moe_lab.parallel.host_allocator import tune_host_allocator
from moe_lab.parallel.topology import quiet_libtpu_on_cpu_host

COMMANDS = (
    add_train_parser,
    add_info_parser,
    add_compile_parser,
    add_grow_parser,
    add_eval_parser,
    add_sweep_parser,
    add_rl_parser,
    add_bench_parser,
    add_tokenizer_parser,
    add_prepare_parser,
    add_import_parser,
    add_export_parser,
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the README's promise: a usage error is one line (and exit 2), with a
    pointer to --help instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="moe-lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


# Commands that only tokenize on the host: one malloc arena would serialise the
# tokenizer's threads (measured: HF batch encode 0.58M vs 1.3-1.6M tok/s on 2 cores).
# `bench` tunes per benchmark (moe_lab/bench/__init__.py).
HOST_ONLY = ("prepare", "tokenizer", "bench")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libtpu_on_cpu_host()  # before jax starts its backends (parallel/topology.py)
    try:
        overrides, rest = parse_override_args(argv)
        args = build_parser().parse_args(rest)
        if args.command not in HOST_ONLY:
            tune_host_allocator()  # before jax starts its thread pools (host_allocator.py)
        if overrides and args.command == "bench":
            raise ConfigError("bench takes no --config overrides")
        return args.fn(args, overrides)
    except ConfigError as e:
        print(f"moe-lab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-lab: interrupted", file=sys.stderr)
        return 130
