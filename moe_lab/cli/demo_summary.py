"""Prints what `make demo` produced: the loss curve's milestones and the eval table,
and saves a loss plot next to the run (DIR/loss.png)."""

from __future__ import annotations

import json
import os
import sys

from moe_lab.train.metrics import read_metrics


def summarize(workdir: str) -> str:
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train_rows:
        raise SystemExit(f"no metrics in {workdir}")
    lines = [
        f"run {workdir}: {train_rows[-1]['step']} steps, "
        f"{train_rows[-1]['tokens_seen']:.3g} tokens, {train_rows[-1]['flops_spent']:.3g} FLOPs"
    ]
    for r in (train_rows[0], train_rows[len(train_rows) // 2], train_rows[-1]):
        tasks = " ".join(f"{k[5:]}={v:.3f}" for k, v in r.items() if k.startswith("loss/"))
        lines.append(
            f"  step {r['step']:>5}: loss {r['loss']:.4f} ({tasks}) "
            f"{r['tokens_per_sec']:.0f} tok/s MFU {100 * r['mfu']:.1f}%"
        )
    if eval_rows:
        last = eval_rows[-1]
        lines.append(
            f"  eval @ {last['step']}: "
            + json.dumps({k[5:]: round(v, 3) for k, v in last.items() if k.startswith("eval/")})
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in train_rows]
        for key in sorted({k for r in train_rows for k in r if k.startswith("loss/")}):
            ax.plot(steps, [r.get(key) for r in train_rows], label=key[5:])
        ax.plot(steps, [r["loss"] for r in train_rows], label="all", color="k")
        ax.set(xlabel="step", ylabel="train loss (nats/token)", yscale="log", title=workdir)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, "loss.png")
        fig.savefig(path, dpi=100)
        lines.append(f"  loss plot: {path}")
    except ImportError:
        pass
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
