"""Pre-training: workdir handling, resume, and the train step on the shared Trainer.

`train(cfg, workdir)` is what `moe-lab train` runs.  A workdir with checkpoints
resumes from the newest one (model, optimizer, data-iterator state and
counters), so an interrupted and resumed run reproduces the losses of an
uninterrupted one.  SIGTERM (preemption) saves a checkpoint and returns.  The
step loop, logging, eval, checkpoints and preemption are train/trainer.py's;
`PretrainSteps` is what a pre-training step computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_lab.accounting import flops
from moe_lab.accounting.hardware import peak_flops_per_device
from moe_lab.config.load import config_from_json
from moe_lab.config.schema import Config, ConfigError, parse_mixture
from moe_lab.config.validate import validate_for_devices
from moe_lab.data import pipeline
from moe_lab.data.corpus import describe_corpora
from moe_lab.data.tokenizer import BYTE, Tokenizer, load_tokenizer
from moe_lab.layers import expert_parallel
from moe_lab.parallel import sharding
from moe_lab.train.checkpoint import DATA, checkpoint_steps, grown_steps
from moe_lab.train.init_from import initial_state, source_config
from moe_lab.train.phases import PhasedStep, capacity_warmup_config, warmup_graphdef
from moe_lab.train.run_dir import (
    checkpoint_path,
    config_path,
    keep_tokenizer,
    run_tokenizer,
    write_json_atomic,
)
from moe_lab.train.run_lock import lock_path_beside, locked
from moe_lab.train.state import make_setup, resolve_config
from moe_lab.train.step import jit_eval_step, jit_train_step
from moe_lab.train.trainer import Trainer, cached_jit, fmt_time, local_values, log0

# What a resumed run may not change: the model, what it trains on and in what
# batches (the saved data iterator state only means something for the same
# pipeline and shuffle seed).  Steps, schedule, eval and checkpoint settings may
# change (the demo extends train.steps on resume).
_RESUME_FIXED = {"train": ("batch_size", "seed")}
_EVAL_ONLY = {"data": ("arith_eval_num_steps",)}


def _resume_diffs(old, new, section: str) -> list[str]:
    keys = _RESUME_FIXED.get(section) or [
        f.name for f in dataclasses.fields(old) if f.name not in _EVAL_ONLY.get(section, ())
    ]
    return [
        f"{section}.{k}: {getattr(old, k)} -> {getattr(new, k)}"
        for k in keys
        if getattr(old, k) != getattr(new, k)
    ]


def _latest_has_data_state(workdir: str) -> bool:

    steps = checkpoint_steps(workdir)
    return bool(steps) and os.path.isdir(checkpoint_path(workdir, steps[-1], DATA))


def check_workdir(cfg: Config, workdir: str) -> bool:
    """Refuses a workdir whose run has another model, data or batches (`_resume_diffs`),
    or a non-empty one that holds no run; writes nothing.  True if it holds a run."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")
    cfg_path = config_path(workdir)
    if os.path.exists(cfg_path):
        old = resolve_config(config_from_json(cfg_path))  # runs older than the fingerprint
        # data and batches matter only where a checkpoint holds a data iterator state
        # (not a fresh workdir, nor the checkpoint `grow` wrote, whose config.json
        # the user is told to override)
        fixed = (("model", "model"), ("data", "data"), ("train", "batch"))
        if not _latest_has_data_state(workdir):
            fixed = fixed[:1]
        was, now = old.data.tokenizer_fingerprint, cfg.data.tokenizer_fingerprint
        if was != now:
            raise ConfigError(
                f"workdir {workdir} holds a run made with tokenizer {was} "
                f"({old.data.tokenizer}); this config's is {now} "
                f"({cfg.data.tokenizer}); use a new --workdir"
            )
        for section, what in fixed:
            diffs = _resume_diffs(getattr(old, section), getattr(cfg, section), section)
            if diffs:
                raise ConfigError(
                    f"workdir {workdir} holds a run with a different {what} "
                    f"({'; '.join(diffs)[:200]}); use a new --workdir"
                )
        return True
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ConfigError(f"workdir {workdir} is not empty and holds no moe_lab run (no config.json)")
    return False


def write_workdir_config(cfg: Config, workdir: str, tok: Tokenizer) -> None:
    """Creates the workdir (if new) and writes its config.json and a copy of its
    tokenizer, once every host checked it."""
    _barrier("moe_lab_workdir_checked")  # every host checked before anyone writes
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        keep_tokenizer(workdir, tok)
        write_json_atomic(config_path(workdir), cfg.to_dict())
    _barrier("moe_lab_workdir_written")


def _check_expert_parallel(cfg: Config, mesh) -> None:
    """expert_parallel='all_to_all' asked for explicitly must apply to the training
    batch (decode calls whose few tokens do not divide still fall back to GSPMD)."""
    m = cfg.model.moe
    if cfg.model.ffn != "moe" or m.expert_parallel != "all_to_all" or mesh.shape["expert"] == 1:
        return
    why = expert_parallel.why_not_all_to_all(m, cfg.mesh.rules, mesh, cfg.train.batch_size * cfg.data.seq_len)
    if why:
        raise ConfigError(
            f"model.moe.expert_parallel='all_to_all' cannot apply to the training "
            f"batch here: {why}; use 'auto' or change mesh.rules"
        )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _to_device(batch: dict, batch_sharding) -> dict:
    return sharding.host_local_batch_to_global(batch, batch_sharding.mesh, batch_sharding.spec)


def host_rows(batch: dict) -> dict:
    """This process's contiguous slice of the rows of a global batch."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}


class HostRows:
    """Wraps the global-batch iterator; keeps its get_state/set_state (checkpointable)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        # copied out of the batch grain's worker processes hand over in shared memory
        # (released now, not whenever the garbage collector gets to it)
        return {k: np.array(v) for k, v in host_rows(next(self.iterator)).items()}

    def close(self) -> None:
        """Stops grain's worker processes, if any (data.workers)."""
        if hasattr(self.iterator, "close"):
            self.iterator.close()

    # grain's checkpoint handler stores non-DatasetIterator states as bytes
    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self.iterator.set_state(state)

    def start_prefetch(self) -> None:
        if hasattr(self.iterator, "start_prefetch"):
            self.iterator.start_prefetch()


def evaluate_losses(eval_step, state, eval_batches, batch_sharding, task_names) -> dict:
    """Eval loss and task loss (answer tokens only, bits/token) per task."""
    sums = None
    for batch in eval_batches:
        out = eval_step(state["params"], state["model_state"], _to_device(batch, batch_sharding))
        out = local_values(out)
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    result = {}
    for i, name in enumerate(task_names):
        if sums is None or sums["loss_den"][i] == 0:
            continue
        result[f"eval/{name}/loss"] = float(sums["loss_num"][i] / sums["loss_den"][i])
        if sums["answer_den"][i] > 0:
            nats = sums["answer_num"][i] / sums["answer_den"][i]
            result[f"eval/{name}/task_loss_bits"] = float(nats / math.log(2))
    return result


class PretrainSteps:
    """Next-token pre-training on the Trainer: batches from the data iterator, the
    (phased) train step, per-task losses, throughput and MFU, the eval losses."""

    def __init__(
        self,
        cfg: Config,
        setup,
        train_iter,
        train_step: PhasedStep,
        eval_step,
        eval_batches,
        task_names,
        counters: dict,
        peak_total: float,
    ):
        self.cfg, self.setup, self.train_iter = cfg, setup, train_iter
        self.train_step, self.eval_step, self.eval_batches = train_step, eval_step, eval_batches
        self.task_names, self.counters, self.peak_total = task_names, counters, peak_total
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len

    def batch(self, state, step):
        return next(self.train_iter)

    def update(self, state, batch, step):
        step_fn, step_flops = self.train_step.at(step)
        state, metrics = step_fn(state, _to_device(batch, self.setup.batch_sharding))
        self.counters["tokens_seen"] += self.tokens_per_step
        self.counters["flops_spent"] += step_flops
        return state, (metrics, dict(self.counters), step_flops)

    def read(self, step, out):
        metrics, counted, step_flops = out
        m = local_values(metrics)
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"loss is {m['loss']} at step {step}; stopping (see metrics.jsonl)")
        return m, counted, step_flops

    def row(self, step, host, dt):
        m, counted, step_flops = host
        row = {k: v for k, v in m.items() if k not in ("task_loss_sum", "task_weight_sum")}
        for i, name in enumerate(self.task_names):
            if m["task_weight_sum"][i] > 0:
                row[f"loss/{name}"] = m["task_loss_sum"][i] / m["task_weight_sum"][i]
        row.update(
            tokens_seen=counted["tokens_seen"],
            flops_spent=counted["flops_spent"],
            tokens_per_sec=self.tokens_per_step / dt,
            mfu=step_flops / dt / self.peak_total,
            step_time=dt,
        )
        return row

    def message(self, step, row, eta):
        names = self.task_names
        msg = (
            f"step {step}/{self.cfg.train.steps} loss {row['loss']:.4f} "
            + " ".join(f"{n} {row[f'loss/{n}']:.3f}" for n in names if f"loss/{n}" in row)
            + f" | {row['tokens_per_sec']:.0f} tok/s | MFU {100 * row['mfu']:.1f}% "
            f"| ETA {fmt_time(eta)}"
        )
        if "moe/max_violation" in row:
            msg += f" | maxvio {row['moe/max_violation']:.2f} drop {row['moe/drop_fraction']:.3f}"
        return msg

    def evaluate(self, state, step):
        res = evaluate_losses(
            self.eval_step, state, self.eval_batches, self.setup.batch_sharding, self.task_names
        )
        return res, f"eval @ {step}: " + " ".join(f"{k[5:]} {v:.3f}" for k, v in res.items())

    def meta(self, seconds_this_run):
        return {**self.counters, "wall_seconds": self.counters["wall_seconds"] + seconds_this_run}


def _train_tokenizer(cfg: Config, workdir: str) -> Tokenizer:
    """The tokenizer data.tokenizer names; where that file is gone, the run's own copy."""
    spec = cfg.data.tokenizer
    if spec == BYTE or os.path.isfile(spec):
        return load_tokenizer(spec)
    return run_tokenizer(workdir, cfg)


def train(cfg: Config, workdir: str, *, max_steps: int | None = None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final summary dict.

    `max_steps` stops early after that many steps of this invocation (tests use it
    to simulate an interruption); checkpoints and counters behave as on a kill.
    The run holds the workdir's lock (train/run_lock.py; process 0 of a multi-host
    run): a second writer is refused, a dead holder's lock taken over.
    """
    with locked(lock_path_beside(workdir), "moe-lab train", enabled=jax.process_index() == 0, log=log0):
        return _train(cfg, workdir, max_steps=max_steps)


def _train(cfg: Config, workdir: str, *, max_steps: int | None = None) -> dict:

    init_from = cfg.train.init_from and not os.path.isfile(config_path(workdir))
    if init_from:  # a new run from another's weights: its model and tokenizer
        cfg, tok = source_config(cfg)
    else:
        tok = _train_tokenizer(cfg, workdir)
    cfg = resolve_config(cfg, tok)  # refuses a resume with another tokenizer (fingerprints)
    validate_for_devices(cfg, jax.device_count())
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    # the model and its shardings are built (abstractly) before the workdir is written:
    # a config that cannot build leaves no config.json behind to block the fixed rerun
    setup = make_setup(cfg, mesh, tok)
    _check_expert_parallel(cfg, mesh)
    resuming = check_workdir(cfg, workdir)

    # the data next (a bad data file is refused here), then the checkpoint: nothing is
    # printed or written before the run is known to start
    task_names = [name for name, _ in parse_mixture(cfg.data.mixture)]
    # Every host iterates the same global batch and keeps its own rows: the data a
    # run sees does not depend on the number of hosts, and the iterator state in a
    # checkpoint restores under any process count.
    # shuffles follow the run's seed; data.seed fixes the tasks' contents (pipeline.py)
    train_iter = HostRows(pipeline.make_train_iterator(cfg.data, t.batch_size, seed=t.seed, tokenizer=tok))
    eval_batches = [
        host_rows(b)
        for b in pipeline.mixture_eval_batches(cfg.data, t.batch_size, t.eval_batches, tokenizer=tok)
    ]

    if not resuming:  # the checkpoint manager creates checkpoints/ in the new workdir
        write_workdir_config(cfg, workdir, tok)
    counters = {"tokens_seen": 0.0, "flops_spent": 0.0, "wall_seconds": 0.0}
    trainer = Trainer(
        workdir,
        total_steps=t.steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        keep_last=t.keep_last,
        keep_every=t.keep_every,
        keep_steps=grown_steps(workdir),
        async_save=t.async_checkpoint,
        data_iterator=train_iter,
        progress=t.progress,
        profile=t.profile_steps,
    )
    state, meta = trainer.restore(setup.abstract_state)
    if state is None:
        state = setup.init_state()
        if init_from:
            state = initial_state(cfg, setup, state)
            log0(f"initialised from {cfg.train.init_from} (fresh optimizer and schedule)")
    counters.update({k: meta[k] for k in counters if k in meta})
    if resuming:  # the checkpoint restored: the run's new settings (steps, lr, ...) go in
        write_workdir_config(cfg, workdir, tok)
    log0(sharding.format_rules(cfg.mesh.rules, mesh))
    if trainer.latest is not None:
        log0(f"resuming from {workdir}/checkpoints/{trainer.latest} (step {int(state['step'])})")
    start_step = int(local_values(state["step"]))

    counts = flops.param_counts(cfg.model)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    flops_per_step = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak, peak_how = peak_flops_per_device(cfg.model.compute_dtype)
    peak_total = peak * jax.device_count()
    log0(f"tokenizer {tok.describe()} | model.vocab_size {cfg.model.vocab_size}")
    log0(
        f"params total {counts['total']:,} active {counts['active']:,} | "
        f"{flops_per_step / tokens_per_step:.3g} train FLOPs/token | peak {peak_total:.3g} "
        f"FLOP/s ({peak_how}) | steps {start_step} -> {t.steps}"
    )
    if cfg.data.corpus:
        log0(describe_corpora(cfg.data.corpus, tok, t.steps * tokens_per_step, counts["active"]))
    for note in setup.kernel_notes:
        log0(note)
    if cfg.model.ffn == "moe":
        log0(expert_parallel.plan_line(cfg, mesh))

    num_tasks = len(task_names)
    # Everything the jitted steps close over: every config value as JSON text (hashable
    # whatever the field types; setup was built from this cfg and this mesh), the mesh,
    # the number of tasks and the tokenizer's EOS id (a file the config names only by
    # path).  The run's name is a label: runs that differ only in it share the steps.
    cache_key = (json.dumps(cfg.replace(name="").to_dict(), sort_keys=True), mesh, num_tasks, tok.eos_id)
    with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules, mesh):

        def jit_step(name, graphdef, step_cfg):
            return cached_jit(
                "train",
                cache_key,
                name,
                lambda: jit_train_step(setup, step_cfg, graphdef, num_tasks, tok.eos_id),
            )

        train_step = PhasedStep(jit_step("train", setup.graphdef, cfg), flops_per_step)
        warm_cfg = capacity_warmup_config(cfg)
        warm_until = warm_cfg.model.mor.capacity_warmup_steps if warm_cfg else 0
        if start_step < warm_until:  # a resume after the warm-up never compiles it
            warm_flops = flops.train_flops_per_token(warm_cfg.model, cfg.data.seq_len)
            train_step = PhasedStep(
                train_step.main,
                flops_per_step,
                jit_step("warm-up", warmup_graphdef(warm_cfg), warm_cfg),
                warm_flops * tokens_per_step,
                warm_until,
            )
            log0(
                f"capacity warm-up: steps {start_step} -> {warm_until} at full depth "
                f"({warm_flops:.3g} train FLOPs/token)"
            )
        eval_step = cached_jit("train", cache_key, "eval", lambda: jit_eval_step(setup, num_tasks))
        steps = PretrainSteps(
            cfg, setup, train_iter, train_step, eval_step, eval_batches, task_names, counters, peak_total
        )
        try:
            out = trainer.run(steps, state, start_step, max_steps=max_steps)
        finally:
            trainer.close()
            train_iter.close()
    last_row = out["last_row"]
    return {
        "workdir": workdir,
        "step": out["step"],
        "steps": t.steps,
        "process_index": jax.process_index(),
        "loss": last_row.get("loss"),
        **out["last_eval"],
        "tokens_seen": counters["tokens_seen"],
        "flops_spent": counters["flops_spent"],
        "seconds_this_run": out["seconds_this_run"],
        "mfu": last_row.get("mfu"),
        "tokens_per_sec": last_row.get("tokens_per_sec"),
    }
