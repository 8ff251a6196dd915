"""grow_run: a trained run's checkpoint -> a new, grown run directory (arXiv 2510.08008).

Library code shared by `moe-lab grow` (moe_lab/cli/grow.py), the sweep runner and the growth benchmark.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from moe_lab.accounting import flops
from moe_lab.config.load import config_from_json
from moe_lab.config.schema import Config, ConfigError
from moe_lab.data import pipeline
from moe_lab.growth import transforms as growth
from moe_lab.growth.options import GrowOptions
from moe_lab.train.checkpoint import Checkpointer, write_checkpoint
from moe_lab.train.run_dir import (
    building,
    check_new_run_dir,
    config_path,
    keep_tokenizer,
    lineage_path,
    run_tokenizer,
    write_json_atomic,
)
from moe_lab.train.state import resolve_config, setup_on_devices
from moe_lab.train.step import forward

LOGIT_TOLERANCE = 1e-4  # max |logits difference| accepted for a function-preserving growth


def _check_dirs(from_dir: str, to_dir: str) -> tuple[str, str]:
    src, dst = os.path.realpath(from_dir), os.path.realpath(to_dir)
    if not os.path.isfile(config_path(src)):
        raise ConfigError(f"grow: --from {from_dir} holds no run (no config.json)")
    if dst == src or dst.startswith(src + os.sep):
        raise ConfigError(f"grow: --to {to_dir} is (inside) --from {from_dir}; never writing there")
    return src, check_new_run_dir(to_dir, "grow: --to")


def _check_tree(state, abstract, what: str) -> None:

    want = jax.tree_util.tree_flatten_with_path(abstract)
    have = jax.tree_util.tree_flatten_with_path(state)
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        raise ConfigError(f"grow: the {what} does not match the model's tree structure")
    for (path, a), (_, b) in zip(want[0], have[0], strict=True):
        if tuple(a.shape) != tuple(np.shape(b)):
            name = jax.tree_util.keystr(path)
            raise ConfigError(
                f"grow: the {what} does not match its config: {name} has shape {np.shape(b)}, want {a.shape}"
            )


def verify_logits(
    parent_cfg: Config,
    parent_state: dict,
    cfg: Config,
    workdir: str,
    *,
    num_sequences: int = 2,
    tokenizer=None,
) -> float:
    """Reloads workdir's checkpoint 0 and returns max |logits(grown) - logits(parent)|
    on a real eval batch of the parent's data mixture."""

    batch = pipeline.mixture_eval_batches(parent_cfg.data, num_sequences, 1, tokenizer=tokenizer)[0]
    setup = setup_on_devices(cfg)[1]
    with Checkpointer(workdir, create=False) as ckpt:
        grown, _ = ckpt.restore(0, setup.abstract_state)
    parent_setup = setup_on_devices(parent_cfg)[1]

    def logits(s, state):
        fn = jax.jit(lambda p, m, b: forward(s.graphdef, p, m, b, train=False)[0])
        with jax.set_mesh(s.mesh):
            return np.asarray(fn(state["params"], state["model_state"], batch))

    return float(np.max(np.abs(logits(setup, grown) - logits(parent_setup, parent_state))))


def grow_run(
    from_dir: str,
    to_dir: str,
    options: GrowOptions,
    *,
    step: int | None = None,
    verify: bool = True,
    log=print,
) -> dict:
    """Grows run `from_dir` (checkpoint `step`, default latest) into a new run
    `to_dir` as `options` say; returns the lineage dict (also written to
    to_dir/lineage.json)."""
    src, dst = _check_dirs(from_dir, to_dir)
    transforms, opt_state, seed = options.transforms(), options.opt_state, options.seed

    cfg = resolve_config(config_from_json(config_path(src)))
    # Dry run on the config first: bad options fail before any checkpoint is read.
    new_cfg, preserving = cfg, True
    for what, kw in transforms:
        if what == "depth":
            preserving &= growth.depth_preserves_function(new_cfg, zero_copies=kw["zero_copies"])
            new_cfg = growth.depth_plan(new_cfg, **{k: v for k, v in kw.items() if k != "zero_copies"}).cfg
        else:
            preserving &= growth.width_preserves_function(
                new_cfg, noise=kw["noise"], grow_e=kw["grow_e"], grow_k=kw["grow_k"], init=kw["init"]
            )
            new_cfg = growth.width_plan(new_cfg, **{k: v for k, v in kw.items() if k != "noise"}).cfg

    with Checkpointer(src, create=False) as ckpt:
        parent_step = ckpt.resolve_step(step, "grow")
        setup = setup_on_devices(cfg)[1]
        # Host numpy straight from disk (no device copy); the tree is checked
        # against the config's abstract state before anything is transformed.
        if opt_state == "grow":  # the moments are needed, in optax's tree structure
            state, meta = ckpt.restore(parent_step, setup.abstract_state)
            state = jax.device_get(state)
        else:
            raw = ckpt.restore_raw(parent_step, parts=("params", "model_state", "step"))
            meta = ckpt.restore_meta(parent_step)
            state = {
                "params": raw["params"],
                "model_state": raw.get("model_state") or {},
                "opt_state": None,
                "step": np.asarray(raw["step"]),
            }
            del raw
            for part in ("params", "model_state"):
                _check_tree(state[part], setup.abstract_state[part], f"checkpoint's {part}")

    new_setup = setup_on_devices(new_cfg)[1]

    def fresh_opt_state(params):
        # Adam re-initialised (2510.08008): zeros of the right shapes, built on the
        # host without materialising a second copy of the params on a device.
        shapes = jax.eval_shape(new_setup.tx.init, params)
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    grown, grown_cfg = growth.grow_train_state(
        state, cfg, transforms, opt_state=opt_state, seed=seed, init_fn_for=lambda _: fresh_opt_state
    )
    state = {"params": state["params"], "model_state": state["model_state"]}  # for verify
    assert grown_cfg.model == new_cfg.model
    _check_tree(grown, new_setup.abstract_state, "grown state")

    spent = growth.sunk_flops(cfg, meta)
    parent_counts, grown_counts = flops.param_counts(cfg.model), flops.param_counts(new_cfg.model)
    lineage = {
        "parent_workdir": src,
        "parent_step": int(parent_step),
        "transforms": [{"kind": what, **kw} for what, kw in transforms],
        "opt_state": opt_state,
        "seed": seed,
        "sunk_flops": spent,
        "sunk_tokens": float(meta.get("tokens_seen", 0.0)),
        "sunk_chinchilla_ratio": growth.chinchilla_ratio(cfg, spent),
        "parent_params_total": parent_counts["total"],
        "parent_params_active": parent_counts["active"],
        "grown_params_total": grown_counts["total"],
        "grown_params_active": grown_counts["active"],
        "function_preserving": bool(preserving),
    }
    tok = run_tokenizer(src, cfg)  # the parent's own copy, checked against its fingerprint
    with building(dst, "growing") as tmp:
        # Counters start at 0 for the new run; the sunk cost lives in lineage.json.
        write_checkpoint(
            tmp,
            0,
            grown,
            {
                "tokens_seen": 0.0,
                "flops_spent": 0.0,
                "wall_seconds": 0.0,
                "grown_from": src,
                "parent_step": int(parent_step),
            },
        )
        if verify:
            diff = verify_logits(cfg, state, new_cfg, tmp, tokenizer=tok)
            lineage["max_abs_logit_diff"] = diff
            if preserving:
                log(f"grow: function-preserving; max |logits - parent logits| = {diff:.3g}")
                if not diff <= LOGIT_TOLERANCE:
                    raise ConfigError(
                        f"grow: grown model's logits differ from the parent's by "
                        f"{diff:.3g} > {LOGIT_TOLERANCE} (a bug; nothing written)"
                    )
            else:
                log(f"grow: max |logits - parent logits| = {diff:.3g} (not function-preserving)")
        keep_tokenizer(tmp, tok)  # the grown run reads with the parent's
        write_json_atomic(lineage_path(tmp), lineage)
        write_json_atomic(config_path(tmp), new_cfg.to_dict())
    m0, m1 = cfg.model, new_cfg.model
    log(
        f"grow: {src} step {parent_step} -> {dst}: layers {m0.num_layers} -> {m1.num_layers}"
        + (
            f", experts {m0.moe.num_experts} -> {m1.moe.num_experts}, top-k {m0.moe.top_k} -> {m1.moe.top_k}"
            if m1.ffn == "moe"
            else ""
        )
        + f", params {parent_counts['total']:,} -> {grown_counts['total']:,} (active "
        f"{parent_counts['active']:,} -> {grown_counts['active']:,}), sunk {spent:.3g} FLOPs"
    )
    return lineage
