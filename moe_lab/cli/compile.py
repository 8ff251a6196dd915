"""`moe-lab compile`: compile a run for a TPU pod (or this host's devices) before booking it.

    moe-lab compile --config configs/paper/sparsity.py:1024,64,16@tpu-v5p-256 --topology v5p-256
    moe-lab compile --config configs/moe_tiny.py --topology v5p:2x2x1 --json

Compiles what `moe-lab train` runs (the same jitted train step, the eval step, a
KV-cache decode step, and one MoE layer's forward alone for its FLOPs) for the topology's
devices with libtpu, on any host (moe_lab/aot/compile.py), and prints per device:
the compiler's memory against the chip's HBM beside `info`'s analytic plan,
compile seconds, the collectives and kernel calls in the HLO, and the MoE layer's
FLOPs against the analytic FLOPs / devices.  A train step that does not compile
or does not fit is one line on stderr and exit 2 (after the report).
"""

from __future__ import annotations

import json
import sys

import jax

from moe_lab.aot.compile import PROGRAMS, CompileResult, compile_run
from moe_lab.aot.report import failure_line, format_report, resize_error, slices_error
from moe_lab.cli.args import config_from_args
from moe_lab.config.schema import ConfigError
from moe_lab.parallel.topology import compile_devices, parse_topology


def add_compile_parser(subparsers):
    c = subparsers.add_parser(
        "compile", help="AOT-compile a run for a TPU topology: memory, collectives, kernels, FLOPs per chip"
    )
    c.add_argument("--config")
    c.add_argument("--workdir", help="compile the run in DIR (its config.json)")
    c.add_argument("--topology", help="v5p:4x4x8, v5p-256, v6e:16x16, ... (default: this host's devices)")
    c.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN")
    c.add_argument(
        "--allow-resize",
        action="store_true",
        help="compile for a topology whose device count differs from the config's mesh.plan_devices",
    )
    c.add_argument(
        "--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {','.join(PROGRAMS)}"
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(fn=cmd_compile)
    return c


def target_devices(cfg, topology: str | None, num_slices: int, allow_resize: bool):
    """(devices, a description) for cfg: the topology's compile-only devices, checked
    against what the config states (mesh.plan_devices, plan_hardware), else this host's."""
    if topology is None:
        if num_slices != 1:
            raise ConfigError("--num-slices needs --topology")
        return jax.devices(), f"this host's {jax.device_count()} {jax.default_backend()} device(s)"
    topo = parse_topology(topology, num_slices)
    why = slices_error(cfg, num_slices)
    if why:
        raise ConfigError(why)
    why = resize_error(cfg, topo)
    if why and not allow_resize:
        raise ConfigError(why)
    return compile_devices(topo), topo.describe()


def cmd_compile(args, overrides) -> int:
    cfg = config_from_args(args, overrides)
    programs = tuple(p for p in args.programs.split(",") if p)
    if not programs or set(programs) - set(PROGRAMS):
        raise ConfigError(f"--programs {args.programs!r}: a comma-separated subset of {','.join(PROGRAMS)}")
    devices, where = target_devices(cfg, args.topology, args.num_slices, args.allow_resize)
    result: CompileResult = compile_run(cfg, devices, programs)
    if args.json:
        print(json.dumps({"target": where, **result.to_dict()}, indent=1, default=str))
    else:
        print(format_report(result, where))
    why = failure_line(result)
    if why:
        print(f"moe-lab: error: {why}", file=sys.stderr)
        return 2
    return 0
