"""Checkpoints: the only module that talks to Orbax.

Layout: ``DIR/checkpoints/<step>/`` holds one checkpoint with the items

    state  the train-state pytree (nested dicts of jax.Arrays, possibly sharded); a
           checkpoint written without "opt_state" (`moe-lab import`) restores with fresh
           optimizer state (zeros), so it costs a third of the disk and memory
    data   the grain iterator state (optional: grown checkpoints have none)
    meta   a JSON dict of counters (step, tokens_seen, flops_spent, ...)

Why things are the way they are:

- Atomicity comes from Orbax: a step is written to
  ``<step>.orbax-checkpoint-tmp-<ts>/`` and renamed to ``<step>/`` only after
  every item (and, async, every background write) has committed.  We list steps
  from disk with ``ocp.utils.checkpoint_steps``, which only returns finalized
  directories, so a save killed mid-write is never seen, not even by this
  process while its own async save is still in flight.
- Stale tmp dirs are removed on the first ``save`` of a Checkpointer, never at
  construction: an evaluator opening a workdir while a trainer writes into it
  must not delete the trainer's in-flight checkpoint.
- Async saves copy device buffers to host before ``save`` returns, so the
  caller may donate/overwrite its state right after; the grain handler is a
  synchronous Orbax handler, so the iterator position is also captured then.
- Shape/structure mismatches are found by comparing ``abstract_state`` with the
  saved metadata tree *before* restoring: Orbax's own errors name tensorstore
  paths and span many lines.
- A state may hold `LazyArray` leaves (made only when written): `moe-lab import`
  writes a checkpoint larger than it ever holds in memory that way.  Orbax's pytree
  save takes every leaf at once and copies them while it writes (measured on a
  400 MiB tree: peaks of 2.0x the tree with jax leaves, 2.95x with numpy ones);
  `_LazyArrayHandler` writes `LazyArray`s in sequence, each dropped before the next
  is made.  They are saved as numpy arrays, so they restore like any other leaf.
- `restore_leaf` restores one leaf (Orbax's partial restore): `moe-lab export`
  streams a checkpoint one leaf at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any, Self

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint import future as ocp_future

from moe_lab.config.schema import ConfigError
from moe_lab.train.run_dir import CHECKPOINTS

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
OPT_STATE = "opt_state"  # the train state's optimizer part (train/state.py)


class LazyArray:
    """A checkpoint leaf made only when it is written: `make()` -> a numpy array of
    `shape` and `dtype`.  `write_checkpoint` / `Checkpointer.save` write such leaves one
    at a time, each dropped before the next is made, so a state whose leaves are all
    lazy is saved in the memory of its largest leaf (see the module docstring).

    compress: zstd, the codec Orbax gives every other leaf.  Off by default: on float
    weights it saves ~8% of the disk (measured on the 429 MB `bench interop`
    checkpoint: 378 vs 410 MB) for ~0.5 CPU-seconds per 430 MB, 40% of an import's
    time on 2 cores.  A restore reads either (the codec is in each array's metadata)."""

    def __init__(self, shape, dtype, make: Callable[[], np.ndarray], *, compress: bool = False):
        self.shape, self.dtype, self.make = tuple(int(d) for d in shape), np.dtype(dtype), make
        self.compress = compress
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize  # Orbax's byte accounting reads it

    def __repr__(self) -> str:
        return f"LazyArray({self.shape}, {self.dtype})"


# A written LazyArray is cut into chunks of at most this many bytes, which tensorstore
# encodes and writes on several threads: one leaf at a time would otherwise use one
# core (measured, 3 leaves of 128 MiB on 2 cores: 0.69-0.83 s as single chunks,
# 0.56-0.62 s in 16 MiB chunks; Orbax writing all three at once: 0.44-0.76 s).
LAZY_CHUNK_BYTES = 16 * 2**20


class _LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler, fed one made leaf at a time.  The numpy handler copies
    every value it is given and writes them all concurrently; this one makes, writes
    (awaiting the write) and drops each leaf in turn, inside the commit future.  (Making
    the next leaf in a thread while one is written was measured too: no faster on 2
    cores, one more leaf alive.)  Tensorstore may let go of a written array a moment
    after the write resolves, in its own thread, so two leaves can overlap briefly.
    typestr stays 'np.ndarray': an ordinary checkpoint."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _write_in_sequence(self, values, infos, args):
        def made(k):
            array = values[k].make()
            if tuple(array.shape) != values[k].shape or array.dtype != values[k].dtype:
                raise ValueError(
                    f"LazyArray {infos[k].name}: made {array.shape} {array.dtype},"
                    f" declared {values[k].shape} {values[k].dtype}"
                )
            return array

        for k in range(len(values)):
            array = made(k)
            arg = (
                args[k]
                if args[k].chunk_byte_size
                else dataclasses.replace(args[k], chunk_byte_size=LAZY_CHUNK_BYTES)
            )
            info = copy.copy(infos[k])
            info.use_compression = values[k].compress
            await self._background_serialize([array], [info], [arg])
            del array  # before the next leaf is made

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(
                self._write_in_sequence(values, infos, args), name="lazy_array_handler"
            )
        ]


def _state_type_handlers():
    """Orbax's type handlers plus LazyArray's, in a registry of the state item's own:
    Orbax's global registry is left as it is (no import-time side effect).  LazyArray
    goes first so that the typestr 'np.ndarray' still restores with Orbax's handler."""
    return ocp.type_handlers.create_type_handler_registry(
        (LazyArray, _LazyArrayHandler()),
        *[(ty, ocp.type_handlers.get_type_handler(ty)) for ty in ocp.type_handlers.supported_types()],
    )


def _fresh_opt_state(abstract_opt):
    """Zeros of the optimizer state's shapes and shardings: the fresh Adam moments and
    counts of a checkpoint saved without optimizer state (`moe-lab import`)."""
    return jax.jit(
        lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_opt),
        out_shardings=jax.tree.map(lambda s: s.sharding, abstract_opt),
    )()


def _checkpoint_dir(workdir: str) -> epath.Path:
    """DIR/checkpoints, refusing paths that exist but are files.  epath (not
    os.path) so that gs:// workdirs on pods work the same as local ones."""
    if "://" not in str(workdir):  # orbax (OCDBT) needs absolute local paths
        workdir = os.path.abspath(workdir)
    workdir = epath.Path(workdir)
    ckpt_dir = workdir / CHECKPOINTS
    for path in (workdir, ckpt_dir):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"workdir: {path} exists but is not a directory")
    return ckpt_dir


def checkpoint_steps(workdir: str) -> list[int]:
    """Committed steps under DIR/checkpoints, ascending; [] if there are none."""
    ckpt_dir = _checkpoint_dir(workdir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(ocp.utils.checkpoint_steps(ckpt_dir))


def resolve_step(workdir: str, step: int | None, who: str = "") -> int:
    """The one checkpoint-step resolver: `step` (None: the latest) if DIR/checkpoints
    holds it, else a one-line ConfigError (prefixed `who: `) listing the steps there are."""
    return _resolve_step(checkpoint_steps(workdir), step, _checkpoint_dir(workdir), who)


def _resolve_step(steps: list[int], step: int | None, where, who: str) -> int:
    prefix = f"{who}: " if who else ""
    if step is None:
        if not steps:
            raise ConfigError(f"{prefix}no checkpoint in {where}")
        return steps[-1]
    if int(step) not in steps:
        avail = ", ".join(map(str, steps)) or "none"
        raise ConfigError(f"{prefix}no checkpoint at step {step} in {where} (available: {avail})")
    return int(step)


def _key_str(path) -> str:
    """'params/w' from a jax key path; Orbax may return tuples as lists or
    string-keyed dicts, so every key kind collapses to its plain string."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes_by_key(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key_str(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def _first_mismatch(saved: dict, wanted: dict) -> str | None:
    """One line naming the first key whose presence or shape differs."""
    for key in sorted(saved.keys() | wanted.keys()):
        if key not in wanted:
            return f"'{key}' (shape {saved[key]}) is in the checkpoint but not in abstract_state"
        if key not in saved:
            return f"'{key}' (shape {wanted[key]}) is in abstract_state but not in the checkpoint"
        if saved[key] != wanted[key]:
            return f"'{key}' has shape {saved[key]} in the checkpoint but {wanted[key]} in abstract_state"
    return None


def _jsonable(meta: dict) -> dict:
    """Meta goes through json.dumps; numpy/jax scalars from metrics are common,
    so convert them instead of failing inside a background save."""

    def default(obj):
        if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(obj).tolist()
        raise TypeError(type(obj).__name__)

    try:
        return json.loads(json.dumps(meta, default=default))
    except TypeError as e:
        raise ConfigError(f"checkpoint meta: value of type {e} is not JSON-serializable") from None


class Checkpointer:
    """Saves/restores train state, data-iterator state and meta for one workdir.

    keep_last: keep the newest N checkpoints (0: keep all).
    keep_steps: steps kept whatever the rest says (checkpoints this run did not make).
    keep_every: additionally keep every step that is a multiple of it (0: off).
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep_last: int = 2,
        keep_every: int = 0,
        keep_steps: tuple[int, ...] = (),
        async_save: bool = True,
        create: bool = True,
    ):
        if keep_last < 0 or keep_every < 0:
            raise ConfigError(f"checkpoint: keep_last={keep_last} and keep_every={keep_every} must be >= 0")
        self.directory = _checkpoint_dir(workdir)
        # Retention: the union of "latest N" and "every K-th step".  LatestN(None)
        # keeps everything; LatestN(0) would delete even the newest step.
        policies = [ocm.LatestN(n=keep_last or None)]
        if keep_every:
            policies.append(ocm.EveryNSteps(interval_steps=keep_every))
        if keep_steps:  # e.g. the checkpoint `grow` started this run from (grown_steps)
            policies.append(ocm.CustomSteps(steps=sorted(int(x) for x in keep_steps)))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=create,
            cleanup_tmp_directories=False,  # see module docstring; done in save()
        )
        # An explicit registry lets a fresh manager read item metadata and restore
        # items before it has saved anything.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=_state_type_handlers())
        registry.add(STATE, ocp.args.PyTreeSave, state_handler)
        registry.add(STATE, ocp.args.PyTreeRestore, state_handler)
        registry.add(META, ocp.args.JsonSave)
        registry.add(META, ocp.args.JsonRestore)
        data_handler = grain.checkpoint.CheckpointHandler()
        registry.add(DATA, grain.checkpoint.CheckpointSave, data_handler)
        registry.add(DATA, grain.checkpoint.CheckpointRestore, data_handler)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._cleaned_tmp = False
        self._closed = False

    # ---------------------------------------------------------------- listing

    def all_steps(self) -> list[int]:
        """Committed steps (an in-flight async save is not listed until done)."""
        if not self.directory.is_dir():
            return []
        return sorted(ocp.utils.checkpoint_steps(self.directory))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None, who: str = "") -> int:
        """`step` (None: the latest) if this directory holds it, else a ConfigError
        (prefixed `who: `) that lists the steps there are."""
        return _resolve_step(self.all_steps(), step, self.directory, who)

    def _has_item(self, step: int, item: str) -> bool:
        return (self.directory / str(step) / item).is_dir()

    # ------------------------------------------------------------------ save

    def _cleanup_stale_tmp(self) -> None:
        """Remove tmp dirs left by a killed save.  Only the writer does this (and
        only the primary process), before its first save, so no live save of
        ours can be among them."""
        if self._cleaned_tmp:
            return
        self._cleaned_tmp = True
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in ocp.path.step.all_temporary_paths(self.directory):
            log.warning("removing unfinished checkpoint %s", path.get())
            path.get().rmtree(missing_ok=True)

    def save(
        self,
        step: int,
        state,
        *,
        data_iterator=None,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving `step`; returns False (and writes nothing) if the step is
        already saved, or without `force` if it is not newer than the latest one.

        Async: returns once the state is on host; call wait() to block until the
        checkpoint is committed.  All processes must call this.
        """
        step = int(step)
        meta = _jsonable({"step": step, **(meta or {})})
        # No disk check here: the skip decision must be identical on every
        # process, so it is left to Orbax's in-memory step list.
        self._cleanup_stale_tmp()
        items = {STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
        except ocp.checkpoint_manager.StepAlreadyExistsError:  # only with force=True
            log.warning(
                "checkpoint step %d already exists in %s; not overwriting",
                step,
                self.directory,
            )
            return False

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves (and deletions of old steps), release threads."""
        if not self._closed:
            self._closed = True
            self._mngr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- restore

    def _saved_tree(self, step: int):
        """The saved state's metadata tree (ArrayMetadata leaves: shape, dtype)."""
        if not self._has_item(step, STATE):
            raise ConfigError(f"checkpoint step {step} in {self.directory} has no '{STATE}' item")
        md = self._read(step, lambda: self._mngr.metadata(step).item_metadata[STATE])
        return md.tree if hasattr(md, "tree") else md

    def _read(self, step: int, fn):
        """fn() with a damaged checkpoint (missing or corrupt files) reported as one
        line naming the step, not orbax / tensorstore's multi-page traceback."""
        try:
            return fn()
        except (ValueError, KeyError, OSError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} cannot be read (damaged?): {first[:300]}"
            ) from e

    def restore(self, step: int | None, abstract_state, *, data_iterator=None) -> tuple[Any, dict]:
        """Restore (state, meta) from `step` (None: latest).

        abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set; every
        array is read directly into that sharding, whatever the sharding (or
        device count) was at save time.  If `data_iterator` is given its state is
        restored in place; a checkpoint without data state (e.g. a grown one)
        leaves it untouched and logs a warning.
        """
        step = self.resolve_step(step)
        saved = self._saved_tree(step)
        full = abstract_state
        fresh_opt = (
            isinstance(full, dict)
            and OPT_STATE in full
            and isinstance(saved, dict)
            and OPT_STATE not in saved
        )
        if fresh_opt:
            abstract_state = {k: v for k, v in full.items() if k != OPT_STATE}
        problem = _first_mismatch(_shapes_by_key(saved), _shapes_by_key(abstract_state))
        if problem:
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} does not match the model: {problem}"
            )
        items = {
            STATE: ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            )
        }
        if self._has_item(step, META):
            items[META] = ocp.args.JsonRestore()
        data_fallback = None
        if data_iterator is not None:
            own = (
                self.directory
                / str(step)
                / DATA
                / (f"process_{jax.process_index()}-of-{jax.process_count()}.json")
            )
            if self._has_item(step, DATA) and own.exists():
                items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
            elif self._has_item(step, DATA):
                # Saved under another process count (resharding restore). moe_lab's
                # pipeline is host-independent (every host iterates the global batch
                # and keeps its rows), so process 0's state is every host's state.
                data_fallback = sorted((self.directory / str(step) / DATA).glob("process_0-of-*.json"))
            else:
                log.warning(
                    "checkpoint step %d has no data-iterator state; the iterator starts fresh",
                    step,
                )
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint step {step} in {self.directory}: {first}") from e
        if data_fallback:
            data_iterator.set_state(json.loads(data_fallback[0].read_text()))
        meta = restored[META] if META in items else {}
        state = restored[STATE]
        if fresh_opt:
            state = {**state, OPT_STATE: _fresh_opt_state(full[OPT_STATE])}
        return state, dict(meta or {})

    def restore_meta(self, step: int | None = None) -> dict:
        step = self.resolve_step(step)
        if not self._has_item(step, META):
            return {}
        restored = self._read(
            step, lambda: self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        )
        return dict(restored[META] or {})

    def saved_shapes(self, step: int | None = None):
        """The saved state's tree with a jax.ShapeDtypeStruct per leaf, read from the
        checkpoint's metadata (no array is read)."""
        step = self.resolve_step(step)
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), self._saved_tree(step)
        )

    def restore_leaf(self, step: int, path: tuple[str, ...]) -> np.ndarray:
        """One leaf of the saved state (`path` from the state's root, e.g. ("params",
        "embed_VD")) as a host numpy array; Orbax's partial restore reads that leaf's
        bytes only, so `moe-lab export` holds one leaf at a time."""
        step = self.resolve_step(step)
        node = self._saved_tree(step)
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"checkpoint step {step} in {self.directory} has no leaf {'/'.join(path)}")
            node = node[key]
        item, restore_args = node, ocp.RestoreArgs(restore_type=np.ndarray)
        for key in reversed(path):
            item, restore_args = {key: item}, {key: restore_args}
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        out = self._read(
            step, lambda: self._mngr.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
        )
        for key in path:
            out = out[key]
        return out

    def restore_raw(self, step: int | None = None, parts: tuple[str, ...] | None = None):
        """The saved state as host numpy arrays, structure taken from the
        checkpoint: growth tools read a run without building its model, and
        numpy avoids needing the devices/mesh the run was saved from.  parts: only
        these top-level entries (e.g. ("params",): export and growth skip the two Adam
        moments, 2/3 of a trained checkpoint); missing ones are left out."""
        step = self.resolve_step(step)
        saved = self._saved_tree(step)
        item = None
        if parts is not None:
            saved = item = {k: v for k, v in saved.items() if k in parts}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=parts is not None)
        return self._read(
            step, lambda: self._mngr.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
        )


def grown_steps(workdir: str) -> tuple[int, ...]:
    """Checkpoints `moe-lab grow` wrote into this workdir (meta 'grown_from'): a
    training run keeps them whatever its retention, since it did not make them."""
    out = []
    for step in checkpoint_steps(workdir):
        path = _checkpoint_dir(workdir) / str(step) / META / "metadata"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "grown_from" in meta:
            out.append(step)
    return tuple(out)


def write_checkpoint(workdir: str, step: int, state, meta: dict | None) -> None:
    """Synchronously write one checkpoint (state + meta, no data state) into
    workdir/checkpoints/<step>/; used by `grow` to start a new run.  Refuses to
    touch an existing step and keeps every other checkpoint there."""
    if int(step) in checkpoint_steps(workdir):
        raise ConfigError(f"checkpoint step {step} already exists in {_checkpoint_dir(workdir)}")
    with Checkpointer(workdir, keep_last=0, async_save=False) as ckpt:
        if not ckpt.save(step, state, meta=meta, force=True):
            raise ConfigError(f"could not write checkpoint step {step} in {ckpt.directory}")
