"""Evaluation of a trained run: `evaluate(workdir, step)` / `moe-lab eval --workdir DIR`.

Three tiers per task, measured separately as in arXiv 2508.18672 (sec. 3):

    eval_loss       mean next-token NLL (nats) over whole eval documents
                    (the "pre-training loss" tier)
    task_loss_bits  NLL of the answer tokens only, in bits/token
    accuracy        exact match of greedy generations (KV cache, batched),
                    scored by `Task.check` on the decoded continuation

Tasks are grouped into memorization (`facts`, the TriviaQA analogue) and
reasoning (`arith`, the GSM8K analogue, at `data.arith_eval_num_steps`; with
`eval.longer_chains = N > 0` also `arith_long`, chains of N steps, to probe
length generalisation).  Generation starts right after the prompt: the model
must itself write the working (<think>...</think>), the <answer> marker and the
answer, exactly as the training documents do.

The result is written atomically to DIR/eval/<step>.json and printed as a table.
Evaluation runs on one device by default (tiny models; no mesh collectives on
fake CPU devices); `devices="all"` uses the run's own mesh layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from moe_lab.config.load import config_from_json
from moe_lab.config.schema import Config, ConfigError, parse_mixture
from moe_lab.data import pipeline
from moe_lab.data.tasks.registry import make_task
from moe_lab.eval.generate import generate_batched, generation_budget
from moe_lab.parallel import sharding
from moe_lab.train.checkpoint import Checkpointer, resolve_step
from moe_lab.train.jit_cache import cached_for
from moe_lab.train.loop import evaluate_losses
from moe_lab.train.run_dir import (
    config_path,
    eval_dir,
    eval_file,
    run_tokenizer,
    write_json_atomic,
)
from moe_lab.train.state import resolve_config, setup_on_devices
from moe_lab.train.step import make_eval_step

MEMORIZATION, REASONING = "memorization", "reasoning"
TASK_KIND = {"facts": MEMORIZATION, "arith": REASONING, "arith_long": REASONING, "file": "file"}
GROUPS = {MEMORIZATION: ("facts",), REASONING: ("arith",), "reasoning_long": ("arith_long",)}


# ------------------------------------------------------------------- loading


def load_run(workdir: str, step: int | None = None, *, devices: str = "one"):
    """(cfg, setup, state, step) of a checkpoint; `devices`: "one" or "all"."""
    cfg_path = config_path(workdir)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"eval: --workdir {workdir} holds no run (no config.json)")
    raw_cfg = config_from_json(cfg_path)
    tok = run_tokenizer(workdir, raw_cfg)
    cfg = resolve_config(raw_cfg, tok)
    step = resolve_step(workdir, step, "eval")
    cfg, setup = setup_on_devices(cfg, devices, tok)
    with Checkpointer(workdir, create=False) as ckpt:
        state, _ = ckpt.restore(step, setup.abstract_state)
    return cfg, setup, state, int(step)


# --------------------------------------------------------------------- tasks


def eval_tasks(cfg: Config) -> list[tuple[str, object]]:
    """[(name, Task)] evaluated for this config, in mixture order (+ arith_long); the
    corpus entry's Task is None (held-out loss only, nothing to generate)."""
    names = [name for name, _ in parse_mixture(cfg.data.mixture)]
    out = list(zip(names, pipeline.make_tasks(cfg.data)))
    n = cfg.eval.longer_chains
    if n > 0:
        if n > 25:
            raise ConfigError(f"eval.longer_chains={n} must be <= 25")
        long_data = dataclasses.replace(cfg.data, arith_eval_num_steps=n)
        out.append(("arith_long", make_task("arith", long_data)))
    return out


def score_predictions(task, examples, predictions: list[str]) -> list[bool]:
    """Exact match of each decoded continuation against its example (Task.check)."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    return [bool(task.check(p, ex)) for p, ex in zip(predictions, examples)]


# ------------------------------------------------------------------ evaluate


_EVAL_STEPS: dict = {}  # the latest model's jitted eval step (cached_for)


def task_losses(setup, state, batches, task_names: list[str]) -> dict:
    """{"eval/<task>/loss", "eval/<task>/task_loss_bits", ...} over `batches` (a batch's
    task_index is its task's position in task_names), with the latest model's jitted
    eval step."""
    n = len(task_names)
    eval_step = cached_for(
        _EVAL_STEPS, (setup.graphdef, n), "eval", lambda: jax.jit(make_eval_step(setup.graphdef, n))
    )
    return evaluate_losses(eval_step, state, batches, setup.batch_sharding, task_names)


def _loss_tier(cfg, setup, state, tasks) -> dict:
    e = cfg.eval
    bs = max(1, min(e.batch_size, e.num_examples))
    num_batches = max(1, math.ceil(e.num_examples / bs))
    data = cfg.data
    if e.longer_chains > 0:  # documents of N-step chains need room; one length for all tasks
        data = dataclasses.replace(data, seq_len=max(data.seq_len, 8 * e.longer_chains + 48))
    batches = pipeline.mixture_eval_batches(data, bs, num_batches, tokenizer=setup.tokenizer, tasks=tasks)
    return task_losses(setup, state, batches, [name for name, _ in tasks])


def _summary(per_task: dict) -> dict:
    groups = {}
    for group, names in GROUPS.items():
        rows = [per_task[n] for n in names if n in per_task]
        if not rows:
            continue
        g = {}
        for key in ("accuracy", "task_loss_bits", "eval_loss"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                g[key] = float(np.mean(vals))
        groups[group] = g
    return groups


def evaluate(
    workdir: str,
    step: int | None = None,
    *,
    write: bool = True,
    print_table: bool = True,
    devices: str = "one",
    num_examples: int | None = None,
    num_samples: int = 3,
    eval_cfg=None,
) -> dict:
    """Evaluates checkpoint `step` (default: latest) of the run in `workdir`.

    Returns {"step", "tasks": {name: {kind, eval_loss, task_loss_bits, accuracy,
    num_examples, max_new_tokens, ...}}, "groups": {memorization|reasoning|
    reasoning_long: {...}}, "samples", ...} and writes DIR/eval/<step>.json.
    `eval_cfg` (an EvalConfig) replaces the run's eval section.
    """
    t0 = time.perf_counter()
    cfg, setup, state, step = load_run(workdir, step, devices=devices)
    if eval_cfg is not None:
        cfg = cfg.replace(eval=eval_cfg)
    if num_examples is not None:
        cfg = cfg.replace(eval=dataclasses.replace(cfg.eval, num_examples=num_examples))
    tasks = eval_tasks(cfg)
    e = cfg.eval
    per_task: dict[str, dict] = {}
    samples: dict[str, list] = {}
    with jax.set_mesh(setup.mesh), sharding.use_rules(cfg.mesh.rules, setup.mesh):
        losses = _loss_tier(cfg, setup, state, tasks)
        # every task's prompts in one list: one prompt width and one budget, so the
        # decoder compiles once per model (tiny models: compile time dominates)
        examples = {
            name: [ex for ex in pipeline.eval_prompts(task, min(e.num_examples, task.num_eval)) if ex.answer]
            for name, task in tasks
            if task is not None
        }
        flat = [ex for exs in examples.values() for ex in exs]
        preds: list[str] = []
        budget = 0
        if flat:
            tok = setup.tokenizer
            budget = generation_budget(flat, e.max_new_tokens, tok)
            prompts = [tok.encode(ex.prompt, add_bos=True) for ex in flat]
            out = generate_batched(
                setup.graphdef,
                state["params"],
                state["model_state"],
                prompts,
                budget,
                batch_size=min(e.batch_size, len(prompts)),
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
            )
            preds = [tok.decode(o) for o in out]
    offset = 0
    for name, task in tasks:
        row = {
            "kind": TASK_KIND.get(name, name),
            "eval_loss": losses.get(f"eval/{name}/loss"),
            "task_loss_bits": losses.get(f"eval/{name}/task_loss_bits"),
        }
        if name in ("arith", "arith_long"):
            row["num_steps"] = task.eval_num_steps
        exs = examples.get(name)
        if exs:
            p = preds[offset : offset + len(exs)]
            offset += len(exs)
            correct = score_predictions(task, exs, p)
            row.update(accuracy=float(np.mean(correct)), num_examples=len(exs), max_new_tokens=budget)
            samples[name] = [
                {"prompt": ex.prompt, "answer": ex.answer, "prediction": q, "correct": c}
                for ex, q, c in list(zip(exs, p, correct))[:num_samples]
            ]
        per_task[name] = row
    result = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "tasks": per_task,
        "groups": _summary(per_task),
        "samples": samples,
        "eval_config": dataclasses.asdict(cfg.eval),
        "seconds": time.perf_counter() - t0,
    }
    return report(result, eval_path(workdir, step), format_table, write=write, print_table=print_table)


def save_result(path: str, result: dict) -> None:
    """Writes an evaluation result json atomically (directories made; process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, result)


def report(result: dict, path: str, fmt, *, write: bool, print_table: bool) -> dict:
    """Saves `result` to `path` (write) and prints fmt(result) (print_table); returns it."""
    if write:
        save_result(path, result)
    if print_table:
        print(fmt(result))
    return result


def eval_path(workdir: str, step: int) -> str:
    return eval_file(workdir, str(int(step)))


def read_eval(workdir: str, step: int | None = None) -> dict | None:
    """The eval json of `step` (default: the highest step evaluated), or None."""
    d = eval_dir(workdir)
    if step is None:
        steps = (
            [int(f[:-5]) for f in os.listdir(d) if f[:-5].isdigit() and f.endswith(".json")]
            if os.path.isdir(d)
            else []
        )
        if not steps:
            return None
        step = max(steps)
    path = eval_path(workdir, step)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict) -> str:
    lines = [
        f"eval @ step {result['step']}  ({result['workdir']})",
        f"{'task':<12} {'kind':<13} {'eval loss':>9} {'task bits':>9} {'accuracy':>8} {'n':>5}",
    ]
    for name, r in result["tasks"].items():
        label = name + (f"@{r['num_steps']}" if "num_steps" in r else "")
        lines.append(
            f"{label:<12} {r['kind']:<13} {_fmt(r.get('eval_loss'), '9.4f')} "
            f"{_fmt(r.get('task_loss_bits'), '9.4f')} {_fmt(r.get('accuracy'), '8.3f')} "
            f"{r.get('num_examples', 0):>5}"
        )
    for group, g in result.get("groups", {}).items():
        lines.append(
            f"{'[' + group + ']':<26} {_fmt(g.get('eval_loss'), '9.4f')} "
            f"{_fmt(g.get('task_loss_bits'), '9.4f')} {_fmt(g.get('accuracy'), '8.3f')}"
        )
    return "\n".join(lines)
