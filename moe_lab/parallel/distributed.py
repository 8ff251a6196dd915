"""Multi-host start-up: jax.distributed.initialize from flags or the environment.

On a TPU pod slice or under SLURM, `jax.distributed.initialize()` with no
arguments detects the coordinator, process count and id itself (`--distributed
auto`). Elsewhere (several GPU hosts, or several local CPU processes in tests)
pass them explicitly, by flags or by the MOE_LAB_COORDINATOR /
MOE_LAB_NUM_PROCESSES / MOE_LAB_PROCESS_ID environment variables.
"""

from __future__ import annotations

import os

import jax

from moe_lab.config.schema import ConfigError

_ENV = ("MOE_LAB_COORDINATOR", "MOE_LAB_NUM_PROCESSES", "MOE_LAB_PROCESS_ID")


def add_flags(parser) -> None:
    parser.add_argument(
        "--distributed",
        choices=("off", "auto", "explicit"),
        default=None,
        help="multi-host init: auto (TPU/SLURM detection) or explicit",
    )
    parser.add_argument("--coordinator", help="host:port of process 0 (explicit mode)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)


def settings(args) -> dict | None:
    """The initialize() kwargs the flags/environment ask for; None for single-process."""
    coordinator = getattr(args, "coordinator", None) or os.environ.get(_ENV[0])
    nproc = getattr(args, "num_processes", None) or os.environ.get(_ENV[1])
    pid = getattr(args, "process_id", None)
    pid = pid if pid is not None else os.environ.get(_ENV[2])
    mode = getattr(args, "distributed", None) or ("explicit" if coordinator else "off")
    if mode == "off":
        return None
    if mode == "auto":
        return {}
    if not coordinator or nproc is None or pid is None:
        raise ConfigError(
            "--distributed explicit needs --coordinator, --num-processes and "
            "--process-id (or MOE_LAB_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID)"
        )
    nproc, pid = int(nproc), int(pid)
    if not 0 <= pid < nproc:
        raise ConfigError(f"--process-id {pid} must be in [0, {nproc})")
    return {"coordinator_address": coordinator, "num_processes": nproc, "process_id": pid}


def initialize(args) -> None:
    kwargs = settings(args)
    if kwargs is None:
        return

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # cross-process collectives on CPU (tests, laptops) go through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
