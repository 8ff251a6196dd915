"""`moe-lab sweep --compile TOPOLOGY`: every point of a sweep compiled for a pod before
it runs (moe_lab/aot/compile.py), growth stages at their grown shapes.

Writes SWEEP/compile_plan.jsonl (one row per point: fits or not, the compiler's
GiB per device against HBM, the kernels in the train step, compile seconds, the
first error line) and prints the table.  Nothing trains, and no run directory is
made: a researcher sees which points fit before booking the pod.
"""

from __future__ import annotations

import json
import os

from moe_lab.aot.compile import compile_run
from moe_lab.aot.report import (
    GIB,
    failure_line,
    hbm_bytes_per_device,
    plan_total,
    resize_error,
    slices_error,
)
from moe_lab.config.schema import ConfigError
from moe_lab.parallel.topology import compile_devices, parse_topology
from moe_lab.sweep.points import load_sweep
from moe_lab.sweep.runner import planned_config

PLAN = "compile_plan.jsonl"


def compile_point(cfg, devices) -> dict:
    res = compile_run(cfg, devices, programs=("train",))
    train = res.programs["train"]
    row = {
        "compiles": train.ok,
        "fits": train.ok and not failure_line(res),
        "error": train.error or failure_line(res),
        "compile_s": round(train.seconds, 2),
        "plan_gib": plan_total(res.plan) / GIB,
        "mesh": res.mesh_shape,
        "kernel_notes": list(res.kernel_notes),
    }
    hbm = hbm_bytes_per_device(res)
    if hbm:
        row["hbm_gib"] = hbm / GIB
    if train.ok:
        row.update(
            gib_per_device=train.memory["total"] / GIB,
            peak_gib_per_device=train.memory.get("peak", 0) / GIB,
            kernels=train.kernels,
        )
    return row


def compile_sweep(
    config_arg: str,
    sweep_dir: str,
    topology: str,
    *,
    num_slices: int = 1,
    overrides: dict | None = None,
    allow_resize: bool = False,
    log=print,
) -> list[dict]:
    """Compiles every point for `topology`; returns the rows written to compile_plan.jsonl."""
    base, points = load_sweep(config_arg, dict(overrides or {}))
    by_name = {p.name: p for p in points}
    topo = parse_topology(topology, num_slices)
    planned = {p.name: planned_config(p, base, by_name)[0] for p in points}  # all checked first
    for name, cfg in planned.items():
        why = slices_error(cfg, num_slices) or ("" if allow_resize else resize_error(cfg, topo))
        if why:
            raise ConfigError(f"sweep point {name}: {why}")
    devices = compile_devices(topo)
    rows = []
    os.makedirs(sweep_dir, exist_ok=True)
    for k, (name, cfg) in enumerate(planned.items()):
        log(f"[{k + 1}/{len(planned)}] compiling {name} for {topo.libtpu_name}")
        rows.append(
            {
                "point": name,
                "topology": topo.libtpu_name,
                "devices": topo.devices,
                **compile_point(cfg, devices),
            }
        )
        path = os.path.join(sweep_dir, PLAN)
        with open(path + ".tmp", "w") as f:  # rewritten whole after each point: atomic
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    log(format_plan(rows))
    return rows


def format_plan(rows: list[dict]) -> str:
    lines = [f"{'point':<28} {'fits':<5} {'GiB/device':>10} {'HBM':>6} {'compile s':>9}  kernels / error"]
    for r in rows:
        gib = f"{r['gib_per_device']:.3f}" if "gib_per_device" in r else "-"
        hbm = f"{r['hbm_gib']:g}" if "hbm_gib" in r else "-"
        what = (
            (", ".join(f"{k.split(':')[-1]} x{v}" for k, v in r.get("kernels", {}).items()) or "XLA only")
            if r["fits"]
            else r["error"][:120]
        )
        lines.append(
            f"{r['point']:<28} {'yes' if r['fits'] else 'NO':<5} {gib:>10} {hbm:>6} "
            f"{r['compile_s']:>9}  {what}"
        )
    return "\n".join(lines)
