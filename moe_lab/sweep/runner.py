"""Sweeps: grid expansion, a resumable and shardable runner, and the results store.

    moe-lab sweep --config configs/sparsity_sweep.py[:ARG] --workdir SWEEP
                  [--shard I/N] [--dry-run] [--isolate subprocess|inprocess]
                  [--point NAME] [--config.a.b=V ...]

A config file's `get_sweep(arg)` returns a list of points; each point is a dict
of `--config` overrides (dotted keys, applied on top of `get_config(arg)` and
the command line's overrides) plus optional special keys:

    "name":   run name (default: from the swept values, e.g. "e8_k2")
    "from":   {"run": NAME, "step": N, "grow": {"depth": {...}, "width": {...},
               "order": "depth,width", "opt_state": "reset", "seed": 0}}
              start from point NAME's checkpoint at step N (default: its last),
              growth transforms applied (moe_lab.growth.grow.grow_run; "grow" may be
              omitted: a plain continuation).  "kind": "module:function" plugs in
              another way to make the run dir from the parent (e.g. for RL).
              The point's config is then the grown config.json + its overrides.
    "budget_flops":        train.steps = round(budget / training FLOPs per step of
                           this point's (grown) model)
    "budget_flops_total":  the same with the parent's sunk FLOPs subtracted
    "trainer": "module:function"   fn(cfg, workdir) instead of moe_lab's train()
    "post":   [{"kind": "harness", "data": F, "shots": K} | {"kind": "module:fn", ...}]
              stages after the final evaluation; fn(run_dir, spec) -> dict of
              columns for results.jsonl, saved in RUN/stages/<i>-<kind>.json
    "tags":   {column: value} copied into the results row

Each point runs in SWEEP/<name>/ as an ordinary run (train, then evaluate at
the last step).  A point is *finished* when RUN/eval/<last step>.json (and every
post stage's json) exists: finished points are skipped, interrupted ones resume
through train()'s own checkpoint resume.  Points run in topological order of
their "from" dependencies; `--shard I/N` takes every N-th point of that order,
and a point whose parent is not finished yet is skipped with a message (a later
invocation picks it up).  A failing point is appended to SWEEP/failures.jsonl
and does not stop the others.  Every finished point has one row in
SWEEP/results.jsonl (appended under a file lock, deduplicated by run name;
`load_results` also dedupes, keeping the last row).

Isolation: by default every point runs in a child process
(`python -m moe_lab.cli.sweep ... --point NAME`): a crash, an OOM or a leak of one
point cannot take the sweep down, and each point starts with fresh device
memory.  It costs a few seconds of imports per point; `--isolate inprocess`
avoids that (the tests use it).  The child's output goes to the console and
SWEEP/logs/<name>.log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback

from moe_lab.accounting import flops
from moe_lab.config.load import apply_overrides, from_dict, run_config_dict
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate
from moe_lab.eval.evaluate import eval_path, evaluate
from moe_lab.eval.harness import run_harness
from moe_lab.growth import transforms as growth
from moe_lab.growth.grow import grow_run
from moe_lab.growth.options import GrowOptions
from moe_lab.sweep.points import Point, load_sweep, shard_points
from moe_lab.sweep.results import RESULTS, _read_json, _stage_path, record_failure, record_result, results_row
from moe_lab.train.loop import train
from moe_lab.train.run_dir import config_path, lineage_path, write_json_atomic
from moe_lab.train.state import resolve_config

# -------------------------------------------------------------- configuration


def resolved_config(raw: dict) -> Config:
    """A point's raw config dict -> the validated, resolved Config it runs with."""
    return resolve_config(validate(from_dict(Config, raw)))


def flops_per_step(cfg: Config) -> float:
    """Training FLOPs of one step of `cfg` (the unit of a point's FLOP budget)."""
    return flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.batch_size * cfg.data.seq_len


def _apply_budget(cfg: Config, point: Point, sunk: float) -> Config:
    budget = point.budget_flops
    if point.budget_flops_total is not None:
        budget = point.budget_flops_total - sunk
    if budget is None:
        return cfg
    if budget <= 0:
        raise ConfigError(
            f"sweep point {point.name}: FLOP budget {budget:.3g} <= 0 (total budget minus sunk {sunk:.3g})"
        )
    steps = max(1, round(budget / flops_per_step(cfg)))
    return cfg.replace(train=dataclasses.replace(cfg.train, steps=steps))


def planned_config(point: Point, base: dict, by_name: dict[str, Point]) -> tuple[Config, float]:
    """(config, sunk FLOPs) a point will run with, computed without any run
    (growth plans are pure functions of the config); used by --dry-run."""
    if point.source is None:
        cfg = resolved_config(apply_overrides(base, point.overrides))
        return _apply_budget(cfg, point, 0.0), 0.0

    parent_cfg, _ = planned_config(by_name[point.parent], base, by_name)
    step = point.source.get("step", parent_cfg.train.steps)
    sunk = flops_per_step(parent_cfg) * step
    cfg = parent_cfg
    transforms = GrowOptions.from_spec(point.source.get("grow")).transforms()
    for what, kw in transforms:
        kw = {k: v for k, v in kw.items() if k not in ("zero_copies", "noise")}
        cfg = (growth.depth_plan if what == "depth" else growth.width_plan)(cfg, **kw).cfg
    cfg = resolved_config(apply_overrides(cfg.to_dict(), point.overrides))
    return _apply_budget(cfg, point, sunk), sunk


# ------------------------------------------------------------------- run state


def final_step(run_dir: str) -> int | None:
    path = config_path(run_dir)
    if not os.path.isfile(path):
        return None
    return int(run_config_dict(path)["train"]["steps"])


def is_finished(run_dir: str, point: Point | None = None) -> bool:

    step = final_step(run_dir)
    if step is None or not os.path.isfile(eval_path(run_dir, step)):
        return False
    return all(os.path.isfile(_stage_path(run_dir, i, s)) for i, s in enumerate(point.post if point else ()))


def _resolve_fn(spec: str, default_module: str | None = None):
    mod, _, fn = spec.rpartition(":")
    mod = mod or default_module
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"sweep: cannot load {spec!r} ({e})") from None


def _post_harness(run_dir: str, spec: dict) -> dict:

    r = run_harness(
        run_dir, spec["data"], shots=int(spec.get("shots", 0)), limit=spec.get("limit"), print_table=True
    )
    stem = spec.get("label") or os.path.splitext(os.path.basename(spec["data"]))[0]
    return {f"{stem}_{k}": v for k, v in r.items() if k.startswith("accuracy") or k == "task_loss_bits"}


POST_STAGES = {"harness": _post_harness}  # kind -> fn(run_dir, spec) -> row columns


def run_point(point: Point, base: dict, sweep_dir: str, by_name: dict[str, Point], log=print) -> dict:
    """Runs one point to completion in this process (grow/train/eval/post as
    needed); returns its results row."""

    run_dir = os.path.join(sweep_dir, point.name)
    sunk = 0.0
    if point.source is None:
        cfg = _apply_budget(resolved_config(apply_overrides(base, point.overrides)), point, 0.0)
    else:
        parent_dir = os.path.join(sweep_dir, point.parent)
        if not os.path.isfile(config_path(run_dir)):
            if not is_finished(parent_dir, by_name[point.parent]):
                raise ConfigError(f"parent run {point.parent!r} is not finished")
            kind = point.source.get("kind", "grow")
            if kind == "grow":
                grow_run(
                    parent_dir,
                    run_dir,
                    GrowOptions.from_spec(point.source.get("grow")),
                    step=point.source.get("step"),
                    log=log,
                )
            else:
                _resolve_fn(kind)(parent_dir, point.source.get("step"), run_dir, point.source)
        raw = run_config_dict(config_path(run_dir))
        lineage = _read_json(lineage_path(run_dir)) or {}
        sunk = float(lineage.get("sunk_flops", 0.0))
        cfg = _apply_budget(resolved_config(apply_overrides(raw, point.overrides)), point, sunk)
        # the sweep made this dir: the point's overrides become its config
        write_json_atomic(config_path(run_dir), cfg.to_dict())
    cfg = cfg.replace(name=point.name)
    steps = cfg.train.steps
    if not os.path.isfile(eval_path(run_dir, steps)):
        trainer = _resolve_fn(point.trainer) if point.trainer else train
        summary = trainer(cfg, run_dir)
        if summary and summary.get("step", steps) < steps:
            raise RuntimeError(
                f"training stopped at step {summary['step']} of {steps} "
                "(preempted?); rerun the sweep to resume"
            )
        if not os.path.isfile(eval_path(run_dir, steps)):  # training, then evaluation
            evaluate(run_dir, steps)
    for i, spec in enumerate(point.post):
        path = _stage_path(run_dir, i, spec)
        if os.path.isfile(path):
            continue
        fn = POST_STAGES.get(spec["kind"]) or _resolve_fn(spec["kind"])
        cols = fn(run_dir, spec)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"spec": spec, "columns": cols})
    return results_row(point, run_dir)


# --------------------------------------------------------------------- runner


def point_commands(
    point: Point, base: dict, config_arg: str, sweep_dir: str, by_name: dict[str, Point], cli_overrides: dict
) -> list[str]:
    """The `moe-lab` commands equivalent to running this point."""
    run_dir = os.path.join(sweep_dir, point.name)
    try:
        cfg, _ = planned_config(point, base, by_name)
        steps = cfg.train.steps
    except ConfigError as e:
        return [f"# {point.name}: invalid point: {e}"]
    flags = [f"--config.{k}={v}" for k, v in {**cli_overrides, **point.overrides}.items()]
    if point.budget_flops is not None or point.budget_flops_total is not None:
        flags.append(f"--config.train.steps={steps}")
    q = shlex.quote
    cmds = []
    if point.source is None:
        cmds.append(
            " ".join(["moe-lab train", "--config", q(config_arg), "--workdir", q(run_dir), *map(q, flags)])
        )
    else:
        src = point.source
        parent = os.path.join(sweep_dir, point.parent)
        g = ["moe-lab grow", "--from", q(parent), "--to", q(run_dir)]
        if "step" in src:
            g += ["--step", str(src["step"])]
        g += GrowOptions.from_spec(src.get("grow")).cli_flags()
        if src.get("kind", "grow") != "grow":
            g = [f"# {src['kind']}(from={parent}, step={src.get('step')}, to={run_dir})"]
        cmds.append(" ".join(g))
        cmds.append(" ".join(["moe-lab train", "--workdir", q(run_dir), *map(q, flags)]))
    if point.trainer:
        cmds[-1] = f"# trainer {point.trainer}: " + cmds[-1]
    cmds.append(f"moe-lab eval --workdir {q(run_dir)} --step {steps}")
    for spec in point.post:
        if spec["kind"] == "harness":
            cmds.append(
                f"moe-lab eval --workdir {q(run_dir)} --data {q(spec['data'])} --shots {spec.get('shots', 0)}"
            )
        else:
            cmds.append(f"# post stage {spec['kind']}({run_dir}, {spec})")
    return cmds


FAILED_MARK = "moe-lab sweep: point failed: "


def _log_path(sweep_dir: str, point: Point) -> str:
    return os.path.join(sweep_dir, "logs", f"{point.name}.log")


def _run_child(point: Point, config_arg: str, sweep_dir: str, cli_overrides: dict, log) -> str | None:
    """Runs the point in a child process; returns None or the error line."""
    log_path = _log_path(sweep_dir, point)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "moe_lab.cli.sweep",
        "--config",
        config_arg,
        "--workdir",
        sweep_dir,
        "--point",
        point.name,
        "--child",
        *[f"--config.{k}={v}" for k, v in cli_overrides.items()],
    ]
    error = None
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                f.write(line)
                log(f"[{point.name}] {line.rstrip()}")
                if line.startswith(FAILED_MARK):
                    error = line.rstrip()[len(FAILED_MARK) :]
            rc = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM of the sweep: let the child checkpoint
            proc.terminate()
            proc.wait()
            raise
    if rc != 0 or error:
        return error or f"child exited with code {rc} (see {log_path})"
    return None


def run_sweep(
    config_arg: str,
    sweep_dir: str,
    *,
    overrides: dict | None = None,
    shard: tuple[int, int] = (0, 1),
    dry_run: bool = False,
    isolate: str = "subprocess",
    only: str | None = None,
    child: bool = False,
    log=print,
) -> dict:
    """Runs (or with dry_run prints) this shard's unfinished points; returns
    {"done": [...], "ran": [...], "skipped": [...], "failed": [...]} (run names)."""
    overrides = dict(overrides or {})
    base, points = load_sweep(config_arg, overrides)
    by_name = {p.name: p for p in points}
    mine = shard_points(points, shard)
    if only is not None:
        if only not in by_name:
            raise ConfigError(f"sweep: no point named {only!r} (have {', '.join(by_name)})")
        mine = [by_name[only]]
    status = {"done": [], "ran": [], "skipped": [], "failed": []}
    if dry_run:
        for k, p in enumerate(mine):
            log(f"# [{k + 1}/{len(mine)}] {p.name}" + (f"  (after {p.parent})" if p.parent else ""))
            for c in point_commands(p, base, config_arg, sweep_dir, by_name, overrides):
                log(c)
        return status
    os.makedirs(sweep_dir, exist_ok=True)
    if isolate == "subprocess" and only is None:
        with _sigterm_as_interrupt():  # so a killed sweep stops (and checkpoints) its child
            return _run_points(
                mine, base, config_arg, sweep_dir, by_name, overrides, status, isolate, only, child, log
            )
    return _run_points(
        mine, base, config_arg, sweep_dir, by_name, overrides, status, isolate, only, child, log
    )


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def handler(*_):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _run_points(
    mine, base, config_arg, sweep_dir, by_name, overrides, status, isolate, only, child, log
) -> dict:
    failed = set()
    t_start = time.perf_counter()
    for k, p in enumerate(mine):
        run_dir = os.path.join(sweep_dir, p.name)
        head = f"sweep [{k + 1}/{len(mine)}] {p.name}"
        if is_finished(run_dir, p):
            try:
                record_result(sweep_dir, results_row(p, run_dir))
            except Exception as e:
                log(f"{head}: finished, but its results row failed: {type(e).__name__}: {e}")
            status["done"].append(p.name)
            log(f"{head}: finished earlier, skipped")
            continue
        if p.parent is not None and not is_finished(os.path.join(sweep_dir, p.parent), by_name[p.parent]):
            why = "failed" if p.parent in failed else "is not finished yet"
            log(f"{head}: skipped, its parent {p.parent!r} {why} (rerun the sweep later)")
            status["skipped"].append(p.name)
            continue
        log(f"{head}: running in {run_dir}")
        t0 = time.perf_counter()
        if isolate == "subprocess" and only is None:
            error = _run_child(p, config_arg, sweep_dir, overrides, log)
        else:
            try:
                run_point(p, base, sweep_dir, by_name, log=log)
                error = None
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # recorded; the sweep goes on
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                error = f"{type(e).__name__}: {first}"
                if not isinstance(e, ConfigError):  # unexpected: its traceback, in the log
                    path = _log_path(sweep_dir, p)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "a") as f:
                        traceback.print_exc(file=f)
                    error += f" (traceback in {path})"
        if error is None and is_finished(run_dir, p):
            try:
                record_result(sweep_dir, results_row(p, run_dir))
            except Exception as e:  # e.g. a config.json this process can't read
                error = f"results row: {type(e).__name__}: {e}"
        if error is None and is_finished(run_dir, p):
            status["ran"].append(p.name)
            log(f"{head}: done in {time.perf_counter() - t0:.0f}s")
        else:
            error = error or "run did not reach its final evaluation"
            failed.add(p.name)
            status["failed"].append(p.name)
            if child:  # the parent sweep process records it
                print(f"{FAILED_MARK}{error}", flush=True)
            else:
                record_failure(sweep_dir, p, error, _log_path(sweep_dir, p))
            log(f"{head}: FAILED: {error}")
    if only is None:
        log(
            f"sweep: {len(status['ran'])} ran, {len(status['done'])} already done, "
            f"{len(status['skipped'])} waiting, {len(status['failed'])} failed "
            f"in {time.perf_counter() - t_start:.0f}s; results: {os.path.join(sweep_dir, RESULTS)}"
        )
    return status
