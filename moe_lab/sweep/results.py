"""The sweep results store: SWEEP/results.jsonl (one row per finished run, deduplicated
by run name under a file lock), SWEEP/failures.jsonl, and `load_results` -> DataFrame,
the one entry point notebooks use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time

from moe_lab.accounting import flops
from moe_lab.config.load import config_from_json
from moe_lab.eval.evaluate import read_eval
from moe_lab.sweep.points import Point
from moe_lab.train.metrics import read_metrics
from moe_lab.train.run_dir import config_path, lineage_path, stage_path

RESULTS, FAILURES = "results.jsonl", "failures.jsonl"


def _stage_path(run_dir: str, i: int, spec: dict) -> str:
    kind = re.sub(r"[^A-Za-z0-9_.-]", "_", spec["kind"])
    return stage_path(run_dir, i, kind)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def results_row(point: Point, run_dir: str) -> dict:
    """One flat row: swept values, sizes, FLOPs, losses, task losses, accuracies."""
    cfg = config_from_json(config_path(run_dir))
    ev = read_eval(run_dir, cfg.train.steps) or {}
    m = cfg.model
    row = {
        "run": point.name,
        "sweep_index": point.index,
        **point.swept,
        "d_model": m.d_model,
        "num_layers": m.num_layers,
        "ffn": m.ffn,
        "num_experts": m.moe.num_experts if m.ffn == "moe" else 1,
        "top_k": m.moe.top_k if m.ffn == "moe" else 1,
        "expert_hidden": m.resolved_expert_hidden if m.ffn == "moe" else m.resolved_mlp_hidden,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
    }
    summary = flops.run_summary(cfg)
    row.update(
        {
            k: summary[k]
            for k in (
                "params_total",
                "params_active",
                "params_total_non_embedding",
                "params_active_non_embedding",
                "sparsity",
                "tpp",
                "train_tokens",
                "train_flops",
            )
        }
    )
    metrics = read_metrics(run_dir)
    losses = [r for r in metrics if "loss" in r]
    if losses:
        row["train_loss"] = losses[-1]["loss"]
        row["flops_spent"] = losses[-1].get("flops_spent")
    lineage = _read_json(lineage_path(run_dir))
    row["sunk_flops"] = float(lineage["sunk_flops"]) if lineage else 0.0
    row["total_flops"] = row["sunk_flops"] + row["train_flops"]
    if lineage:
        row.update(
            parent_run=point.parent,
            parent_step=lineage["parent_step"],
            grow=json.dumps(lineage["transforms"]),
            sunk_chinchilla_ratio=lineage.get("sunk_chinchilla_ratio"),
        )
    tasks = ev.get("tasks", {})
    eval_losses = [
        t["eval_loss"] for n, t in tasks.items() if n != "arith_long" and t.get("eval_loss") is not None
    ]
    row["eval_loss"] = sum(eval_losses) / len(eval_losses) if eval_losses else None
    for name, t in tasks.items():
        for k in ("eval_loss", "task_loss_bits", "accuracy", "num_steps"):
            if t.get(k) is not None:
                row[f"{name}_{k}"] = t[k]
    for group, g in ev.get("groups", {}).items():
        for k, v in g.items():
            row[f"{group}_{k}"] = v
    for i, spec in enumerate(point.post):
        stage = _read_json(_stage_path(run_dir, i, spec))
        if stage:
            row.update(stage.get("columns") or {})
    row.update(point.tags)
    row["eval_step"] = ev.get("step")
    return row


@contextlib.contextmanager
def _locked(sweep_dir: str):
    with open(os.path.join(sweep_dir, ".results.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_rows(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line of a killed writer
                    continue
    return rows


def record_result(sweep_dir: str, row: dict) -> None:
    """Appends `row` to results.jsonl unless an identical row of that run is
    there; a changed row replaces the old one (file rewritten atomically)."""
    path = os.path.join(sweep_dir, RESULTS)
    line = json.dumps(row, sort_keys=True)
    with _locked(sweep_dir):
        rows = _read_rows(path)
        old = [r for r in rows if r.get("run") == row["run"]]
        if old and json.dumps(old[-1], sort_keys=True) == line and len(old) == 1:
            return
        if old:
            rows = [r for r in rows if r.get("run") != row["run"]] + [row]
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            os.replace(tmp, path)
        else:
            with open(path, "a") as f:
                f.write(line + "\n")


def record_failure(sweep_dir: str, point: Point, error: str, log_path: str | None = None) -> None:
    row = {"run": point.name, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "log": log_path}
    with _locked(sweep_dir), open(os.path.join(sweep_dir, FAILURES), "a") as f:
        f.write(json.dumps(row) + "\n")


def load_results(path: str):
    """results.jsonl (or a sweep dir holding one) -> pandas DataFrame, one row
    per run (the last row of a run wins), in sweep order."""
    import pandas as pd

    if os.path.isdir(path):
        path = os.path.join(path, RESULTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results file at {path} (run `moe-lab sweep` first)")
    rows = {}
    for r in _read_rows(path):
        if "run" in r:
            rows.pop(r["run"], None)
            rows[r["run"]] = r
    df = pd.DataFrame(list(rows.values()))
    if "sweep_index" in df:
        df = df.sort_values("sweep_index", kind="stable").reset_index(drop=True)
    return df


def format_results(df, columns: list[str] | None = None) -> str:
    cols = columns or [
        c
        for c in (
            "run",
            "params_total",
            "params_active",
            "sparsity",
            "tpp",
            "train_loss",
            "eval_loss",
            "memorization_accuracy",
            "reasoning_accuracy",
            "reasoning_task_loss_bits",
        )
        if c in df
    ]
    return df[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")
