"""Table and figure of the reasoning study (configs/sparsity_sweep.py:reason, issue 33).

    python experiments/sparsity_vs_reasoning/plot_reasoning.py runs/sparsity_reason [--out DIR]

Reads SWEEP/results.jsonl through moe_lab.sweep.results.load_results; prints a markdown
table (mean ± standard error over seeds per data budget, top-k and E) and writes
reasoning.png, the views finding (b) of arXiv 2508.18672 needs:
  - reasoning accuracy and answer loss against total parameters, one line per (k, budget);
  - memorization against total parameters, the same lines;
  - reasoning and memorization against the eval loss (the paper's Figure 1 view: at
    equal pre-training loss, does the sparser model reason worse?);
  - what GRPO and majority@16 add over greedy decoding, against total parameters.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import summarise  # this folder's plot.py, not a package

METRICS = [
    ("eval_loss", "eval loss (nats/token)"),
    ("memorization_accuracy", "facts accuracy"),
    ("memorization_task_loss_bits", "facts answer loss (bits/token)"),
    ("reasoning_accuracy", "arith accuracy (2 steps)"),
    ("reasoning_task_loss_bits", "arith answer loss (bits/token)"),
    ("reasoning_long_accuracy", "arith@3 accuracy (longer than trained)"),
    ("majority@16", "majority@16 (64 prompts)"),
    ("greedy_accuracy", "greedy (the same 64 prompts)"),
    ("grpo_accuracy_before", "greedy before GRPO (128 prompts)"),
    ("grpo_accuracy", "greedy after 40 GRPO steps"),
]
BY = ("budget_steps", "top_k", "num_experts")


def markdown(rows: list[dict]) -> str:
    head = "| steps | k | E | seeds | total params | TPP | " + " | ".join(n for _, n in METRICS) + " |"
    lines = [head, "|" + "---|" * (6 + len(METRICS))]
    for r in rows:
        cells = [
            str(r["budget_steps"]),
            str(r["top_k"]),
            str(r["num_experts"]),
            str(r["seeds"]),
            f"{r['params_total']:,}",
            f"{r['tpp']:.3g}",
        ]
        for key, _ in METRICS:
            m, se = r[key]
            cells.append(
                "-" if np.isnan(m) else f"{m:.4f} ± {se:.4f}" if "loss" in key else f"{m:.3f} ± {se:.3f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lines(rows):
    """(label, rows of one top-k and budget, ordered by E)."""
    for budget in sorted({r["budget_steps"] for r in rows}, reverse=True):
        for k in sorted({r["top_k"] for r in rows}):
            sub = [r for r in rows if r["top_k"] == k and r["budget_steps"] == budget]
            tpp = f"TPP {sub[0]['tpp']:.0f}-{sub[-1]['tpp']:.0f}"
            yield f"k={k}, {budget} steps ({tpp})", sub


def _largest(rows) -> int:
    return max(r["budget_steps"] for r in rows)


def _against_params(ax, rows, key, name):
    for label, sub in _lines(rows):
        x = [r["params_total"] / 1e3 for r in sub]
        ax.errorbar(
            x,
            [r[key][0] for r in sub],
            yerr=[r[key][1] for r in sub],
            fmt="o",
            capsize=3,
            label=label,
            ls="-" if f"{_largest(rows)} steps" in label else "--",
        )
    ax.set_xscale("log")
    ax.set_xlabel("total params (k)")
    ax.set_title(name, fontsize=10)


def plot(rows: list[dict], out: str) -> str:
    import matplotlib  # plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4))
    _against_params(axes[0, 0], rows, "reasoning_accuracy", "arith accuracy (2 steps, greedy)")
    _against_params(axes[0, 1], rows, "reasoning_task_loss_bits", "arith answer loss (bits/token)")
    _against_params(axes[0, 2], rows, "memorization_accuracy", "facts accuracy")
    axes[0, 0].legend(fontsize=7)
    for ax, key, name in (
        (axes[1, 0], "memorization_accuracy", "facts accuracy"),
        (axes[1, 1], "reasoning_accuracy", "arith accuracy"),
    ):
        for label, sub in _lines(rows):
            ax.errorbar(
                [r["eval_loss"][0] for r in sub],
                [r[key][0] for r in sub],
                xerr=[r["eval_loss"][1] for r in sub],
                yerr=[r[key][1] for r in sub],
                fmt="o",
                capsize=2,
                label=label,
            )
            for r in sub:
                ax.annotate(
                    f"E{r['num_experts']}",
                    (r["eval_loss"][0], r[key][0]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                )
        ax.set_xlabel("eval loss (nats/token)")
        ax.set_title(f"{name} at equal pre-training loss", fontsize=10)
        ax.invert_xaxis()
    ax = axes[1, 2]
    big = [r for r in rows if r["budget_steps"] == _largest(rows)]
    for k in sorted({r["top_k"] for r in big}):
        sub = [r for r in big if r["top_k"] == k]
        x = [r["params_total"] / 1e3 for r in sub]
        for key, base, name, fmt in (
            ("grpo_accuracy", "grpo_accuracy_before", "GRPO", "o-"),
            ("majority@16", "greedy_accuracy", "majority@16", "s--"),
        ):
            ax.plot(x, [r[key][0] - r[base][0] for r in sub], fmt, label=f"{name} gain, k={k}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("total params (k)")
    ax.set_title("accuracy added over greedy (largest budget)", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(
        "Sparsity vs reasoning at fixed active parameters (2508.18672), CPU scale; mean ± s.e. over seeds"
    )
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "reasoning.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    rows = summarise(args.sweep_dir, METRICS, BY)
    print(markdown(rows))
    print(f"figure: {plot(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
