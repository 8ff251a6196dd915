"""`train.init_from = RUN[:STEP]` (`moe-lab train --init-from`): a new run that starts
from another run's weights with a fresh optimizer and schedule (supervised
fine-tuning of a pretrained or imported model, s1 arXiv 2501.19393 style).

The new run takes the source's model section and tokenizer (the weights only mean
something with them); data, train and eval come from the new config.  The params and
model state (router biases, ...) are read from the source's checkpoint STEP (default:
latest), checked leaf by leaf against the model, and placed with the new run's
shardings; Adam's moments and the step start at zero.  Only a new workdir reads them:
a resume continues from its own checkpoints.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from moe_lab.config.load import config_from_json
from moe_lab.config.schema import Config, ConfigError
from moe_lab.data.tokenizer import Tokenizer
from moe_lab.train.checkpoint import Checkpointer
from moe_lab.train.run_dir import config_path, run_tokenizer


def parse_init_from(spec: str) -> tuple[str, int | None]:
    """ "RUN[:STEP]" -> (RUN, STEP or None)."""
    run, sep, step = spec.rpartition(":")
    if not sep or not step.isdigit():
        return spec, None
    return run, int(step)


def _source_step(spec: str) -> tuple[str, int]:
    src, step = parse_init_from(spec)
    if not os.path.isfile(config_path(src)):
        raise ConfigError(f"train.init_from={spec}: {src} holds no run (no config.json)")
    with Checkpointer(src, create=False) as ckpt:
        return src, ckpt.resolve_step(step, f"train.init_from={spec}")


def source_config(cfg: Config) -> tuple[Config, Tokenizer]:
    """cfg with the source run's model and tokenizer; the source's tokenizer (checked,
    with the checkpoint step, before anything is written)."""
    src, _ = _source_step(cfg.train.init_from)
    src_cfg = config_from_json(config_path(src))
    tok = run_tokenizer(src, src_cfg)
    data = dataclasses.replace(
        cfg.data, tokenizer=tok.source, tokenizer_fingerprint=src_cfg.data.tokenizer_fingerprint
    )
    return cfg.replace(model=src_cfg.model, data=data), tok


def _placed(host, abstract):
    """A host array as a global jax.Array with the abstract leaf's sharding: every host
    holds the whole array and keeps its own shards (multi-host safe)."""
    host = np.asarray(host, abstract.dtype)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda idx: host[idx])


def initial_state(cfg: Config, setup, fresh: dict) -> dict:
    """`fresh` (setup.init_state()) with the source checkpoint's params and model state."""
    src, step = _source_step(cfg.train.init_from)
    with Checkpointer(src, create=False) as ckpt:
        raw = ckpt.restore_raw(step, parts=("params", "model_state"))
    out = dict(fresh)
    for part in ("params", "model_state"):
        want = setup.abstract_state[part]
        have = raw.get(part) or {}
        if jax.tree.structure(have) != jax.tree.structure(want):
            raise ConfigError(f"train.init_from: {src} step {step}'s {part} do not match the model's tree")
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(have), strict=True
        ):
            if tuple(a.shape) != tuple(np.shape(b)):
                raise ConfigError(
                    f"train.init_from: {jax.tree_util.keystr(path)} has shape "
                    f"{np.shape(b)} in {src}, the model wants {a.shape}"
                )
        out[part] = jax.tree.map(_placed, have, want)
    return out
