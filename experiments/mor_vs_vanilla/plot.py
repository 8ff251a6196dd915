"""Table and figure of the MoR-vs-vanilla sweep (configs/mor_study.py).

    python experiments/mor_vs_vanilla/plot.py runs/mor_study [--out DIR]

Reads SWEEP/results.jsonl through moe_lab.sweep.results.load_results and each run's
config.json (for the FLOPs in 2507.10524's convention); prints a markdown table of
mean and standard error over seeds per arm, and writes mor_vs_vanilla.png.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from moe_lab.accounting import flops
from moe_lab.config.load import config_from_json
from moe_lab.sweep.results import load_results

METRICS = [
    ("eval_loss", "eval loss (nats)"),
    ("memorization_accuracy", "facts acc"),
    ("reasoning_accuracy", "arith acc"),
    ("reasoning_long_accuracy", "arith@3 acc"),
]


def paper_train_flops(sweep_dir: str, run: str, tokens: float) -> float:
    cfg = config_from_json(os.path.join(sweep_dir, run, "config.json"))
    return 3 * flops.forward_flops_per_token(cfg.model, cfg.data.seq_len, "mor_paper") * tokens


def summarise(sweep_dir: str):
    df = load_results(sweep_dir)
    df["paper_train_flops"] = [
        paper_train_flops(sweep_dir, r, t) for r, t in zip(df["run"], df["train_tokens"])
    ]
    arms = list(dict.fromkeys(df["arm"]))
    rows = []
    for arm in arms:
        d = df[df["arm"] == arm]
        row = {
            "arm": arm,
            "seeds": len(d),
            "params": int(d["params_total_non_embedding"].iloc[0]),
            "steps": int(d["steps"].iloc[0]),
            "paper_flops": float(d["paper_train_flops"].mean()),
            "exact_flops": float(d["train_flops"].mean()),
        }
        for key, _ in METRICS:
            v = d[key].to_numpy(float)
            row[key] = (v.mean(), v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)
        rows.append(row)
    return df, rows


def markdown(rows) -> str:
    head = (
        "| arm | seeds | non-embedding params | steps | train FLOPs (paper conv.) | "
        "train FLOPs (exact) | " + " | ".join(n for _, n in METRICS) + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(METRICS))]
    for r in rows:
        cells = [
            r["arm"],
            str(r["seeds"]),
            f"{r['params']:,}",
            str(r["steps"]),
            f"{r['paper_flops']:.3g}",
            f"{r['exact_flops']:.3g}",
        ]
        cells += [
            f"{r[k][0]:.4f} ± {r[k][1]:.4f}" if k == "eval_loss" else f"{r[k][0]:.3f} ± {r[k][1]:.3f}"
            for k, _ in METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, out: str) -> str:
    import matplotlib  # plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (key, name) in zip(axes, METRICS):
        for r in rows:
            mean, se = r[key]
            ax.errorbar(r["params"] / 1e3, mean, yerr=se, fmt="o", capsize=4, label=r["arm"])
            ax.annotate(
                r["arm"], (r["params"] / 1e3, mean), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax.set_xlabel("non-embedding params (k)")
        ax.set_title(name)
    fig.suptitle("MoR vs vanilla at equal training FLOPs (2507.10524 convention); mean ± s.e. over seeds")
    fig.tight_layout()
    path = os.path.join(out, "mor_vs_vanilla.png")
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    _, rows = summarise(args.sweep_dir)
    print(markdown(rows))
    print(f"figure: {plot(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
