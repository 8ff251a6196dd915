"""Compiles every configs/paper/ config at its pod with libtpu (on any host) and writes
experiments/pod_plans/results.jsonl and the table in README.md.

    python experiments/pod_plans/run.py                 # all rows (~20-40 min on 2 cores)
    python experiments/pod_plans/run.py --only growth   # rows whose label contains 'growth'
    python experiments/pod_plans/run.py --replan        # the stored rows' plans, recomputed

Each row is one `moe-lab compile` (moe_lab/aot/compile.py: the train step and one
MoE layer alone); a row that fails records the compiler's first error line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from moe_lab.accounting.plan import memory_plan
from moe_lab.aot.compile import compile_run
from moe_lab.aot.report import GIB, flops_ratio, hbm_bytes_per_device, plan_total
from moe_lab.config.load import load_config
from moe_lab.config.schema import ConfigError
from moe_lab.parallel import sharding
from moe_lab.parallel.topology import compile_devices, parse_topology
from moe_lab.train.state import make_setup, resolve_config

HERE = os.path.dirname(os.path.abspath(__file__))
# (label, config, topology, overrides)
ROWS = [
    (
        "sparsity E64 k16 (F 2048), auto kernels",
        "configs/paper/sparsity.py:1024,64,16@tpu-v5p-256",
        "v5p-256",
        {},
    ),
    # equal active parameters: E8 / k2 with expert hidden 8x (the dispatch-memory target)
    (
        "sparsity E8 k2 (F 16384), auto kernels",
        "configs/paper/sparsity.py:1024,8,2@tpu-v5p-256",
        "v5p-256",
        {"model.moe.expert_hidden": 16384},
    ),
    # lax.ragged_dot: FLOPs the cost analysis counts (the replication check)
    (
        "sparsity E64 k16, ragged_dot (XLA)",
        "configs/paper/sparsity.py:1024,64,16@tpu-v5p-256",
        "v5p-256",
        {"model.moe.kernel": "ragged"},
    ),
    (
        "sparsity E64 k16 on v6e-256, auto kernels",
        "configs/paper/sparsity.py:1024,64,16@tpu-v6e-256",
        "v6e-256",
        {},
    ),
    ("growth_3b, auto kernels", "configs/paper/growth_3b.py", "v5p-256", {}),
    ("growth_3b grown (40 layers), auto kernels", "configs/paper/growth_3b.py:grown", "v5p-256", {}),
    ("mor_360m N_r=3 expert choice", "configs/paper/mor_360m.py:3", "v5p-128", {}),
    ("mor_360m N_r=3 token choice", "configs/paper/mor_360m.py:3,token_choice", "v5p-128", {}),
    ("mor_360m vanilla", "configs/paper/mor_360m.py:vanilla", "v5p-128", {}),
    ("mor_135m N_r=3 expert choice", "configs/paper/mor_135m.py:3", "v5p-128", {}),
]


def compile_row(label, config, topology, overrides) -> dict:
    topo = parse_topology(topology)
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    res = compile_run(cfg, compile_devices(topo), programs=("train", "moe_layer"))
    train = res.programs["train"]
    layer = res.programs.get("moe_layer")
    hbm = hbm_bytes_per_device(res)
    row = {
        "label": label,
        "config": config,
        "topology": topo.libtpu_name,
        "chips": topo.chips,
        "overrides": overrides,
        "mesh": res.mesh_shape,
        "compiles": train.ok,
        "error": train.error,
        "compile_s": round(train.seconds, 1),
        "plan_gib": plan_total(res.plan) / GIB,
        "hbm_gib": hbm / GIB,
        "kernel_notes": list(res.kernel_notes),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if train.ok:
        row.update(
            compiler_gib=train.memory["total"] / GIB,
            peak_gib=train.memory.get("peak", 0) / GIB,
            temp_gib=train.memory["temporaries"] / GIB,
            kernels=train.kernels,
            collectives={k: v["count"] for k, v in train.collectives.items()},
        )
    if layer is not None:
        row.update(
            moe_layer_ok=layer.ok,
            moe_layer_error=layer.error,
            moe_flops_ratio=flops_ratio(layer),
            moe_layer_kernels=layer.kernels,
        )
    return row


def replan(config: str, topology: str, overrides: dict) -> float:
    """`moe-lab info`'s analytic plan (GiB per device) of a row, without compiling."""
    cfg = resolve_config(load_config(config, overrides))
    mesh = sharding.make_abstract_mesh(cfg.mesh, parse_topology(topology).devices)
    return plan_total(memory_plan(cfg, make_setup(cfg, mesh), mesh)) / GIB


def table(rows: list[dict]) -> str:
    out = [
        "| config @ pod | mesh | compiles | compiler GiB/chip | plan GiB | compiler/plan "
        "| fits (HBM) | kernels in train step | MoE layer FLOPs / analytic | compile s |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
        if r["compiles"]:
            ratio = r["compiler_gib"] / r["plan_gib"]
            fits = f"{'yes' if r['compiler_gib'] <= r['hbm_gib'] else 'NO'} ({r['hbm_gib']:g})"
            kern = ", ".join(f"{k.split(':')[-1]} x{v}" for k, v in r["kernels"].items()) or "XLA only"
            cells = [f"{r['compiler_gib']:.1f}", f"{r['plan_gib']:.1f}", f"{ratio:.2f}", fits, kern]
        else:
            cells = ["-", f"{r['plan_gib']:.1f}", "-", "-", "-"]
        mf = r.get("moe_flops_ratio")
        mf = f"{mf:.2f}" if mf else ("(kernel)" if r.get("moe_layer_ok") else "-")
        status = "yes" if r["compiles"] else f"no: {r['error'][:140]}"
        out.append(
            f"| {r['label']} @ {r['topology']} | {mesh} | {status} | "
            + " | ".join(cells)
            + f" | {mf} | {r['compile_s']} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results.jsonl"))
    ap.add_argument(
        "--replan", action="store_true", help="recompute the analytic plan of the stored rows (no compiles)"
    )
    args = ap.parse_args()
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {r["label"]: r for r in map(json.loads, f)}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    for label, config, topology, overrides in ROWS:
        if args.replan and label in done:
            done[label]["plan_gib"] = replan(config, topology, overrides)
            continue
        if args.only not in label or args.replan:
            continue
        print(f"--- {label} ({config} @ {topology})", flush=True)
        try:
            row = compile_row(label, config, topology, overrides)
        except ConfigError as e:  # refused before compiling (a mesh that cannot be laid out)
            row = {
                "label": label,
                "config": config,
                "topology": topology,
                "compiles": False,
                "error": f"refused: {e}",
                "mesh": {},
                "plan_gib": float("nan"),
                "compile_s": 0.0,
            }
        row.update(commit=commit, date=datetime.date.today().isoformat())
        print(json.dumps(row), flush=True)
        done[label] = row
        with open(args.out + ".tmp", "w") as f:
            for r in done.values():
                f.write(json.dumps(r) + "\n")
        os.replace(args.out + ".tmp", args.out)
    rows = [done[label] for label, *_ in ROWS if label in done]
    if args.replan:
        with open(args.out + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(args.out + ".tmp", args.out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
