"""Where metrics go: metrics.jsonl (one JSON object per logged step), TensorBoard
event files under DIR/tb (browse runs live with `tensorboard --logdir runs`),
and a one-line console summary.  Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moe_lab.train.run_dir import TENSORBOARD, metrics_path


def _scalarize(v):
    a = np.asarray(v)
    if a.ndim == 0:
        return float(a) if a.dtype.kind == "f" else int(a)
    return a.astype(np.float64).round(6).tolist()


class MetricsWriter:
    def __init__(
        self, workdir: str, *, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.path = metrics_path(workdir)
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif os.path.exists(self.path):
            truncate_after(self.path, 0)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, TENSORBOARD), flush_secs=10)
            except ImportError:  # optional: metrics.jsonl is the record
                self.tb = None

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _scalarize(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        return row

    def close(self):
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: str, step: int) -> None:
    """Drops rows logged after `step`: a resumed run re-logs them, no duplicates."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
    path = metrics_path(workdir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
