"""Table and figure of the strategy-selection study (experiments/grpo_arith/README.md,
"2026-12-07"): test-time compute of the base and GRPO over seeds.

    python experiments/grpo_arith/plot_direct.py --ttc BASE/eval/STEP-ttc.json \
        --grpo RUN_S0 RUN_S1 RUN_S2 [--out DIR]

Reads the base's test-time compute result (coverage@k, majority@k, greedy accuracy)
and each GRPO run's metrics.jsonl (moe_lab.train.metrics.read_metrics: greedy eval
accuracy every eval_every steps, sampled reward every step); prints markdown tables
(mean and standard error over the GRPO seeds) and writes direct_ttc_grpo.png.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from moe_lab.train.metrics import read_metrics


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def eval_series(run: str) -> dict[int, float]:
    return {int(r["step"]): float(r["eval_accuracy"]) for r in read_metrics(run) if "eval_accuracy" in r}


def reward_windows(run: str, width: int) -> dict[int, float]:
    """Mean sampled reward over consecutive windows of `width` steps, keyed by the last."""
    rows = [(int(r["step"]), float(r["reward"])) for r in read_metrics(run) if "reward" in r]
    out: dict[int, list[float]] = {}
    for step, reward in rows:
        out.setdefault(((step - 1) // width + 1) * width, []).append(reward)
    return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ttc", required=True, help="the base's eval/<step>-ttc.json")
    p.add_argument("--grpo", nargs="+", required=True, help="GRPO run directories (seeds)")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--window", type=int, default=50, help="reward window (steps)")
    a = p.parse_args(argv)

    with open(a.ttc) as f:
        ttc = json.load(f)
    ks = sorted(int(k) for k in ttc["coverage"])
    print(
        f"base: greedy accuracy {ttc['greedy_accuracy']:.3f} on {ttc['num_prompts']} prompts,"
        f" n = {ttc['n']} samples at T = {ttc['ttc_config']['temperature']}\n"
    )
    print("| k | coverage@k | majority@k |\n|---:|---:|---:|")
    for k in ks:
        print(f"| {k} | {ttc['coverage'][str(k)]:.3f} | {ttc['majority'][str(k)]:.3f} |")

    series = [eval_series(r) for r in a.grpo]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    acc = {s: mean_se([x[s] for x in series]) for s in steps}
    print(f"\nGRPO greedy eval accuracy, mean +- s.e. over {len(a.grpo)} seeds\n")
    print(
        "| step | "
        + " | ".join(os.path.basename(os.path.normpath(r)) for r in a.grpo)
        + " | mean +- s.e. |\n|---:|"
        + "---:|" * (len(a.grpo) + 1)
    )
    for s in steps:
        print(
            f"| {s} | "
            + " | ".join(f"{x[s]:.3f}" for x in series)
            + f" | {acc[s][0]:.3f} +- {acc[s][1]:.3f} |"
        )
    gains = [x[steps[-1]] - x[steps[0]] for x in series]
    g, se = mean_se(gains)
    print(
        f"\ngain step {steps[0]} -> {steps[-1]}: {g:+.3f} +- {se:.3f} (s.e., "
        f"{len(gains)} seeds; per seed {', '.join(f'{x:+.3f}' for x in gains)})"
    )

    windows = [reward_windows(r, a.window) for r in a.grpo]
    wsteps = sorted(set.intersection(*(set(w) for w in windows)))
    rew = {s: mean_se([w[s] for w in windows]) for s in wsteps}

    import matplotlib  # the figure only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ks, [ttc["coverage"][str(k)] for k in ks], "o-", label="coverage@k")
    ax[0].plot(ks, [ttc["majority"][str(k)] for k in ks], "s-", label="majority@k")
    ax[0].axhline(ttc["greedy_accuracy"], color="gray", ls="--", label="greedy")
    ax[0].set(
        xscale="log", xlabel="k (samples)", ylabel="accuracy", ylim=(0, 1.02), title="base: test-time compute"
    )
    ax[0].set_xticks(ks, [str(k) for k in ks])
    ax[0].legend()
    m = np.array([acc[s][0] for s in steps])
    e = np.array([acc[s][1] for s in steps])
    for x in series:
        ax[1].plot(steps, [x[s] for s in steps], color="C0", alpha=0.3, lw=1)
    ax[1].errorbar(steps, m, yerr=e, fmt="o-", color="C0", capsize=3, label="mean +- s.e.")
    ax[1].set(
        xlabel="GRPO step",
        ylabel="greedy accuracy (held-out prompts)",
        ylim=(0, 1.02),
        title=f"GRPO: greedy accuracy ({len(series)} seeds)",
    )
    ax[1].legend()
    ax[2].errorbar(
        wsteps, [rew[s][0] for s in wsteps], yerr=[rew[s][1] for s in wsteps], fmt="o-", color="C2", capsize=3
    )
    ax[2].set(
        xlabel=f"GRPO step (window of {a.window})",
        ylabel="sampled reward",
        ylim=(0, 1.02),
        title="GRPO: reward of the rollouts",
    )
    fig.tight_layout()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "direct_ttc_grpo.png")
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
