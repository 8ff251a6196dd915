"""Table and figure of the sparsity sweep (configs/sparsity_sweep.py:tiny, 3 seeds).

    python experiments/sparsity_vs_reasoning/plot.py runs/sparsity_tiny [--out DIR]

Reads SWEEP/results.jsonl through moe_lab.sweep.results.load_results; prints a
markdown table of mean and standard error over seeds per (top-k, E) and writes
sparsity_vs_reasoning.png: each metric against total parameters, one line per
top-k (fixed active parameters), error bars = standard error over seeds.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from moe_lab.sweep.results import load_results

METRICS = [
    ("eval_loss", "eval loss (nats/token)"),
    ("memorization_accuracy", "facts accuracy"),
    ("memorization_task_loss_bits", "facts answer loss (bits/token)"),
    ("reasoning_accuracy", "arith accuracy (3 steps)"),
    ("reasoning_long_accuracy", "arith@5 accuracy (longer than trained)"),
]


def summarise(sweep_dir: str, metrics=METRICS, by=("top_k", "num_experts")) -> list[dict]:
    """One row per group of `by` (the seeds of a grid point): sizes, and (mean, standard
    error over seeds) of each metric; a metric missing from a run counts as NaN."""
    df = load_results(sweep_dir)
    rows = []
    for keys, d in df.groupby(list(by), sort=True):
        row = {name: int(v) for name, v in zip(by, keys)}
        row.update(
            {
                "seeds": len(d),
                "params_total": int(d["params_total"].iloc[0]),
                "params_active": int(d["params_active"].iloc[0]),
                "tpp": float(d["tpp"].iloc[0]),
                "sparsity": float(d["sparsity"].iloc[0]),
            }
        )
        for key, _ in metrics:
            v = d[key].to_numpy(float) if key in d else np.full(len(d), np.nan)
            v = v[~np.isnan(v)]
            row[key] = (
                (v.mean(), v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0)
                if len(v)
                else (np.nan, np.nan)
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| k | E | seeds | total params | active params | sparsity | TPP | "
        + " | ".join(n for _, n in METRICS)
        + " |"
    )
    lines = [head, "|" + "---|" * (7 + len(METRICS))]
    for r in rows:
        cells = [
            str(r["top_k"]),
            str(r["num_experts"]),
            str(r["seeds"]),
            f"{r['params_total']:,}",
            f"{r['params_active']:,}",
            f"{r['sparsity']:.3g}",
            f"{r['tpp']:.3g}",
        ]
        cells += [
            f"{r[key][0]:.4f} ± {r[key][1]:.4f}" if "loss" in key else f"{r[key][0]:.3f} ± {r[key][1]:.3f}"
            for key, _ in METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> str:
    import matplotlib  # plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    for ax, (key, name) in zip(axes, METRICS):
        for k in sorted({r["top_k"] for r in rows}):
            sub = [r for r in rows if r["top_k"] == k]
            ax.errorbar(
                [r["params_total"] / 1e3 for r in sub],
                [r[key][0] for r in sub],
                yerr=[r[key][1] for r in sub],
                fmt="o-",
                capsize=3,
                label=f"k={k} (active {sub[0]['params_active'] / 1e3:.0f}k)",
            )
            for r in sub:
                ax.annotate(
                    f"E{r['num_experts']}",
                    (r["params_total"] / 1e3, r[key][0]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        ax.set_xscale("log")
        ax.set_xlabel("total params (k)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Sparsity at fixed active parameters (2508.18672), CPU scale; mean ± s.e. over seeds")
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "sparsity_vs_reasoning.png")
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    rows = summarise(args.sweep_dir)
    print(markdown(rows))
    print(f"figure: {plot(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
