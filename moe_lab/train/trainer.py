"""The step loop every kind of training runs on (pre-training, GRPO, ...).

A `Trainer` owns what does not depend on what a step computes: the loop over
steps, metrics rows (read one step late, so the host never stalls the device),
the console line with progress and ETA, periodic evaluation, checkpoints with
retention, the SIGTERM preemption save (agreed on by every host), resuming the
counters and the data-iterator state from the newest checkpoint, and the
caches of jitted steps.  What a step computes comes from a `Steps` object: its
batch source (`batch`: the next batch of a data iterator, or rollouts of the
current policy) and its update (`update`), how its metrics become a row and a
console line, its evaluation and the extra meta of its checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from moe_lab.train.checkpoint import Checkpointer
from moe_lab.train.jit_cache import cached_for
from moe_lab.train.metrics import MetricsWriter


def log0(msg: str) -> None:
    """Prints on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def local_values(tree):
    """Host numpy copies of replicated arrays (works when they span several hosts)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# The jitted steps of the latest run of each kind ("train", "grpo") in this process,
# kept for the next run with the same key (everything the steps close over): a run
# resumed in the same process (an in-process sweep that resumes a point, a notebook
# that trains on) reuses the compiled executables instead of compiling again.
_JIT_CACHES: dict[str, dict] = {}


def jit_cache(kind: str) -> dict:
    """The cache of jitted functions of one kind of training (latest key only)."""
    return _JIT_CACHES.setdefault(kind, {})


def cached_jit(kind: str, key, name: str, build):
    """build() (a jitted function) from the `kind` cache while runs pass the same key."""
    return cached_for(jit_cache(kind), key, name, build)


class Preempted:
    """Turns SIGTERM into a flag checked between steps (save, then exit 0)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        self.flag = True

    def should_stop(self, step: int, sync_point: bool) -> bool:
        """Whether to save and exit after `step`.  One process: as soon as its flag is
        up.  Several: only at sync points (log and checkpoint steps, the same on every
        host), and then all together if any host got SIGTERM: a host that stopped
        alone would leave the others waiting forever in the collective save.  Cost:
        the all-gather waits for the step to finish, one pipeline stall per log step
        on multi-host runs (carrying the flag in the step's metrics would avoid it)."""
        if jax.process_count() == 1:
            return self.flag
        if not sync_point:
            return False
        flags = multihost_utils.process_allgather(np.asarray([self.flag], np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Steps(Protocol):
    """What a Trainer runs.  `step` counts completed steps."""

    def batch(self, state, step: int) -> Any:
        """The batch of the step after `step` (may read `state`: rollouts)."""

    def update(self, state, batch, step: int) -> tuple[Any, Any]:
        """(new state, what `row` needs later; device values are read one step late)."""

    def read(self, step: int, out) -> Any:
        """Host values of update's `out` for `step` (blocks until the step has run)."""

    def row(self, step: int, host, step_time: float) -> dict:
        """The metrics row of `step` from `read`'s host values."""

    def message(self, step: int, row: dict, eta: float) -> str:
        """The console line of a logged row."""

    def evaluate(self, state, step: int) -> tuple[dict, str]:
        """(eval metrics, console line) at an eval step."""

    def meta(self, seconds_this_run: float) -> dict:
        """Extra meta of a checkpoint (counters)."""


class Trainer:
    """The step loop of one run directory (module docstring).

    merge_eval: eval metrics go into the step's own row (which is then always
    logged), instead of a row of their own after it.
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        log_every: int,
        eval_every: int,
        checkpoint_every: int,
        keep_last: int,
        keep_every: int = 0,
        keep_steps: tuple[int, ...] = (),
        async_save: bool = True,
        data_iterator=None,
        progress: bool = False,
        merge_eval: bool = False,
        log=log0,
        profile: tuple[int, int] | None = None,
    ):
        self.workdir, self.total_steps = workdir, total_steps
        self.profile = profile  # (START, STOP): jax.profiler trace of those steps
        self.log_every, self.eval_every = log_every, eval_every
        self.checkpoint_every, self.merge_eval = checkpoint_every, merge_eval
        self.data_iterator, self.progress, self.log = data_iterator, progress, log
        self.ckpt = Checkpointer(
            workdir, keep_last=keep_last, keep_every=keep_every, keep_steps=keep_steps, async_save=async_save
        )
        self.writer: MetricsWriter | None = None
        self.latest = self.ckpt.latest_step()

    def restore(self, abstract_state) -> tuple[Any, dict]:
        """(state, meta) of the newest checkpoint (and the data iterator's state), or
        (None, {}) in a run without checkpoints."""
        if self.latest is None:
            return None, {}
        return self.ckpt.restore(self.latest, abstract_state, data_iterator=self.data_iterator)

    def open_metrics(self, start_step: int) -> MetricsWriter:
        """metrics.jsonl, rows after the resumed checkpoint dropped (they are re-logged)."""
        self.writer = MetricsWriter(
            self.workdir,
            enabled=jax.process_index() == 0,
            resume_step=start_step if self.latest is not None else None,
        )
        return self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.ckpt.close()

    def run(self, steps: Steps, state, start_step: int, *, max_steps: int | None = None) -> dict:
        """`steps` from `start_step` to total_steps (or `max_steps` more); returns
        {state, step, last_row, last_eval, seconds_this_run}."""
        return _Run(self, steps, state, start_step, max_steps).loop()


class _StepProfiler:
    """A jax.profiler trace of steps [START, STOP) (train.profile) into `logdir`, viewable
    in TensorBoard's profile plugin or XProf.  A resume past START traces nothing."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str, log):
        self.steps, self.logdir, self.log, self.on = steps, logdir, log, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            self.log(f"profiling steps {self.steps[0]}..{self.steps[1] - 1} -> {self.logdir}")
            jax.profiler.start_trace(self.logdir)
            self.on = True

    def after(self, step: int, state) -> None:
        if self.on and step >= self.steps[1]:
            self.close(state)

    def close(self, state) -> None:
        if self.on:
            jax.block_until_ready(state)  # the traced steps ran inside the trace
            jax.profiler.stop_trace()
            self.on = False


class _Run:
    """One invocation of Trainer.run: its clock, pending row and last save."""

    def __init__(self, trainer: Trainer, steps: Steps, state, start_step: int, max_steps: int | None):
        self.tr, self.steps, self.state, self.start = trainer, steps, state, start_step
        n = trainer.total_steps
        self.last_step = n if max_steps is None else min(n, start_step + max_steps)
        if trainer.writer is None:
            trainer.open_metrics(start_step)
        self.bar = None
        if trainer.progress and jax.process_index() == 0 and self.last_step > start_step:
            self.bar = tqdm(
                total=n,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                disable=None,
            )  # off if no tty
        # (step, update's out, eval metrics merged into the row): read one step late
        self.pending = None
        self.last_row, self.last_eval = {}, {}
        # throughput window: from the last flushed (completed) step to the one being
        # flushed, minus eval and checkpoint time spent in between; the first window
        # opens when this invocation's first step (its compilation) has finished
        self.clock = {"t": time.perf_counter(), "step": start_step, "excluded": 0.0}
        self.t_run = time.perf_counter()
        self.saved = None

    def say(self, msg: str) -> None:
        (self.bar.write if self.bar else self.tr.log)(msg)

    def save(self, step: int, force: bool = False) -> None:
        if self.saved == step:
            return
        self.saved = step
        meta = {**self.steps.meta(time.perf_counter() - self.t_run), "step": step}
        self.tr.ckpt.save(step, self.state, data_iterator=self.tr.data_iterator, meta=meta, force=force)

    @contextlib.contextmanager
    def untimed(self):
        """Eval and checkpoint time stays out of the throughput window; the steps
        still queued before it stay in (they are waited for first)."""
        jax.block_until_ready(self.state["step"])
        t0 = time.perf_counter()
        yield
        self.clock["excluded"] += time.perf_counter() - t0

    def flush(self, extra: dict | None = None) -> None:
        if self.pending is None:
            return
        step, out = self.pending
        self.pending = None
        host = self.steps.read(step, out)  # blocks until `step` has run
        now = time.perf_counter()
        clock = self.clock
        # the first row of an invocation times its first step, compilation included
        dt = (now - clock["t"] - clock["excluded"]) / max(step - clock["step"], 1)
        clock.update(t=now, step=step, excluded=0.0)
        row = {**self.steps.row(step, host, dt), **(extra or {})}
        self.last_row = self.tr.writer.write(step, row)
        self.say(self.steps.message(step, self.last_row, (self.tr.total_steps - step) * dt))

    def evaluate(self, step: int) -> dict:
        with self.untimed():
            self.last_eval, msg = self.steps.evaluate(self.state, step)
            if not self.tr.merge_eval:
                self.tr.writer.write(step, self.last_eval)
                self.say(msg)
        return self.last_eval

    def loop(self) -> dict:
        tr, steps = self.tr, self.steps
        with Preempted() as preempt:
            step = self.start
            profiler = _StepProfiler(tr.profile, os.path.join(tr.workdir, "profile"), tr.log)
            while step < self.last_step:
                batch = steps.batch(self.state, step)
                profiler.before(step)
                self.state, out = steps.update(self.state, batch, step)
                step += 1
                profiler.after(step, self.state)
                if step == self.start + 1 and step < self.last_step and step % tr.log_every:
                    jax.block_until_ready(self.state["step"])  # the window opens here
                    self.clock.update(t=time.perf_counter(), step=step, excluded=0.0)
                self.flush()
                eval_now = step % tr.eval_every == 0 or step == tr.total_steps
                if step % tr.log_every == 0 or step == self.last_step or (tr.merge_eval and eval_now):
                    self.pending = (step, out)
                if self.bar:
                    self.bar.update(1)
                if eval_now:
                    if tr.merge_eval:
                        self.flush(self.evaluate(step))
                    else:
                        self.flush()
                        self.evaluate(step)
                checkpoint_now = step % tr.checkpoint_every == 0 or step == self.last_step
                stop = preempt.should_stop(step, step % tr.log_every == 0 or checkpoint_now)
                if checkpoint_now or stop:
                    # the row of a checkpointed step is written before the checkpoint: a
                    # resume re-logs only the steps after it, so a later kill loses nothing
                    self.flush()
                    with self.untimed():
                        if checkpoint_now:
                            self.save(step, force=step == self.last_step)
                        if stop:
                            tr.log(
                                f"SIGTERM{'' if preempt.flag else ' on another host'}: "
                                f"saving step {step} and exiting"
                            )
                            self.save(step, force=True)
                    if stop:
                        break
            self.flush()
            profiler.close(self.state)
        if self.bar:
            self.bar.close()
        tr.ckpt.wait()
        return {
            "state": self.state,
            "step": int(step),
            "last_row": self.last_row,
            "last_eval": self.last_eval,
            "seconds_this_run": time.perf_counter() - self.t_run,
        }
