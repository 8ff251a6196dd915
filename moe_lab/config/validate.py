"""Validation of a Config: every check that needs no device, then the device-dependent ones.

A bad value raises `ConfigError` with one line naming the key, before jax compiles anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from moe_lab.config.schema import (
    MESH_AXES,
    Config,
    ConfigError,
    DataConfig,
    GRPOConfig,
    ModelConfig,
    TTCConfig,
    field_choices,
    mor_capacities,
    parse_mixture,
)

# --------------------------------------------------------------------- validation

_CHOICES = field_choices()  # {key: allowed values}, from the schema's Literal types

# Values that changed meaning, the one table: (key, old value) -> (the value that computes
# what the old one did, what to use now).  A new config with the old value is refused
# with the why; a run directory written before keeps its meaning (config.load.
# stored_meaning translates it).
RENAMED = {
    ("model.mor.update", "paper"): (
        "interpolate",
        "it named h + g (f(h) - h), which is not the paper's update: use "
        "'interpolate' for that rule, or 'add' (h + g f(h), the paper's and the released "
        "code's, now the default)",
    ),
    ("model.mor.update", "released"): ("add", "it is 'add' now (h + g f(h), the default)"),
}


def _get(cfg: Config, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node


def _positive(cfg: Config, *keys: str) -> None:
    for k in keys:
        v = _get(cfg, k)
        if v <= 0:
            raise ConfigError(f"config key '{k}' must be > 0, got {v}")


def _floats_finite(node, prefix: str = "") -> None:
    """nan / inf in any float field (lr=nan would only show up as a NaN loss later)."""
    for f in dataclasses.fields(node):
        v, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            _floats_finite(v, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' must be a finite number, got {v}")


def _validate_rules(rules) -> None:
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"mesh.rules entry {rule!r} must be [logical_axis, mesh_axes]")
        targets = rule[1] if isinstance(rule[1], (list, tuple)) else (rule[1],)
        bad = [a for a in targets if a is not None and a not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"mesh.rules maps {rule[0]!r} to unknown mesh axis {bad[0]!r} "
                f"(mesh axes: {', '.join(MESH_AXES)})"
            )


def validate(cfg: Config) -> Config:
    """Checks everything that can be checked without devices; returns cfg."""
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if (key, v) in RENAMED:
            raise ConfigError(f"config key '{key}'={v!r} was renamed: {RENAMED[key, v][1]}")
        if v not in choices:
            raise ConfigError(f"config key '{key}'={v!r} is not one of {', '.join(choices)}")
    _floats_finite(cfg)
    m, t, d = cfg.model, cfg.train, cfg.data
    _positive(
        cfg,
        "model.d_model",
        "model.num_layers",
        "model.num_heads",
        "model.num_kv_heads",
        "model.max_seq_len",
        "model.init_std",
        "model.rope_theta",
        "train.steps",
        "train.batch_size",
        "train.microbatches",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "data.seq_len",
        "eval.num_examples",
        "eval.batch_size",
        "eval.max_new_tokens",
    )
    for key in (
        "model.head_dim",
        "model.mlp_hidden",
        "model.moe.expert_hidden",
        "model.vocab_size",
        "eval.longer_chains",
    ):  # 0: the default
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0: default), got {_get(cfg, key)}")
    _validate_rules(cfg.mesh.rules)
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}"
        )
    if t.loss_on == "completion" and {n for n, _ in parse_mixture(d.mixture)} <= {"corpus"}:
        raise ConfigError(
            "train.loss_on='completion' needs prompt/answer rows in data.mixture "
            "(a corpus has no completions: its loss would be empty)"
        )
    if m.rope_scaling == "llama3":
        _positive(
            cfg, "model.rope_scaling_factor", "model.rope_low_freq_factor", "model.rope_original_max_len"
        )
        if not m.rope_high_freq_factor > m.rope_low_freq_factor:
            raise ConfigError(
                f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be > "
                f"model.rope_low_freq_factor={m.rope_low_freq_factor}"
            )
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model} (or set model.head_dim)"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}"
        )
    if m.resolved_head_dim % 2:
        raise ConfigError(f"model head_dim={m.resolved_head_dim} must be even for RoPE")
    if d.workers < 0:
        raise ConfigError(f"config key 'data.workers' must be >= 0, got {d.workers}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.decay_fraction <= 1:
        raise ConfigError(f"config key 'train.decay_fraction' must be in [0, 1], got {t.decay_fraction}")
    if t.profile and not (re.fullmatch(r"\d+:\d+", t.profile) and t.profile_steps[0] < t.profile_steps[1]):
        raise ConfigError(
            f"config key 'train.profile'={t.profile!r} must be START:STOP with "
            "0 <= START < STOP (steps to trace)"
        )
    if t.keep_last < 1:
        raise ConfigError(f"config key 'train.keep_last' must be >= 1, got {t.keep_last}")
    if m.ffn == "moe":
        _validate_moe(m)
    if m.stack == "recursive":
        _validate_mor(m)
    for axis in ("data", "fsdp", "expert", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            raise ConfigError(f"config key 'mesh.{axis}' must be a positive size or -1, got {v}")
    if cfg.mesh.dcn_data < 1 or (cfg.mesh.data > 0 and cfg.mesh.data % cfg.mesh.dcn_data):
        raise ConfigError(
            f"config key 'mesh.dcn_data'={cfg.mesh.dcn_data} must be >= 1 and "
            f"divide mesh.data={cfg.mesh.data} (the slices split the data axis)"
        )
    _validate_mixture(d)
    return cfg


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    if e.num_experts < 1:
        raise ConfigError(f"config key 'model.moe.num_experts' must be >= 1, got {e.num_experts}")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]")
    if e.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor must be > 0, got {e.capacity_factor}")
    if e.router == "topk_softmax" and e.top_k == 1:
        raise ConfigError(
            "model.moe.router='topk_softmax' with top_k=1 gives every token gate 1 "
            "(a softmax over one logit), so the router would learn nothing from "
            "the loss; use router='softmax_topk' (Switch: gate = p)"
        )
    if not 0 <= e.first_dense_layers < m.num_layers:
        raise ConfigError(
            f"model.moe.first_dense_layers={e.first_dense_layers} must be in "
            f"[0, model.num_layers={m.num_layers})"
        )
    if e.num_shared_experts < 0:
        raise ConfigError("model.moe.num_shared_experts must be >= 0")
    if e.shared_hidden < 0 or (e.shared_hidden and not e.num_shared_experts):
        raise ConfigError(
            f"model.moe.shared_hidden={e.shared_hidden} needs "
            f"model.moe.num_shared_experts > 0 (0: num_shared_experts * F)"
        )
    if e.shared_gate and not e.num_shared_experts:
        raise ConfigError("model.moe.shared_gate needs model.moe.num_shared_experts > 0")
    if not e.routed_scale > 0:
        raise ConfigError(f"model.moe.routed_scale must be > 0, got {e.routed_scale}")
    if e.num_shared_experts and e.router == "expert_choice":
        raise ConfigError(
            "model.moe.num_shared_experts > 0 is not supported with router='expert_choice' "
            "(expert choice already lets busy tokens use many experts)"
        )
    dropless = e.dispatch in ("dropless", "auto")
    if e.router == "expert_choice" and e.kernel in ("ragged", "blocks", "tokamax"):
        raise ConfigError(
            f"model.moe.kernel={e.kernel!r} is for token choice; expert choice "
            "runs 'loop' or 'buffer' (every expert holds exactly C tokens)"
        )
    if e.router != "expert_choice" and e.kernel in ("ragged", "blocks", "tokamax") and not dropless:
        raise ConfigError(
            f"model.moe.kernel={e.kernel!r} needs model.moe.dispatch='dropless' (got {e.dispatch!r})"
        )
    if e.router != "expert_choice" and e.kernel == "buffer" and dropless:
        raise ConfigError(
            "model.moe.kernel='buffer' needs model.moe.dispatch='capacity' (a "
            "dropless buffer would hold every token for every expert)"
        )
    if e.expert_parallel == "all_to_all" and (e.dispatch != "capacity" or e.router == "expert_choice"):
        raise ConfigError(
            "model.moe.expert_parallel='all_to_all' needs token-choice routing "
            f"with model.moe.dispatch='capacity' (got router={e.router!r}, "
            f"dispatch={e.dispatch!r})"
        )
    if e.router_jitter < 0 or e.aux_loss_weight < 0 or e.z_loss_weight < 0:
        raise ConfigError("model.moe router_jitter, aux_loss_weight, z_loss_weight must be >= 0")


def _validate_mor(m: ModelConfig) -> None:
    r = m.mor
    n = r.num_recursions
    if n < 1:
        raise ConfigError(f"config key 'model.mor.num_recursions' must be >= 1, got {n}")
    if (
        m.ffn == "moe"
        and r.routing != "none"
        and (m.moe.router == "expert_choice" or m.moe.dispatch == "capacity")
    ):
        # the dense recursion paths (token choice, threshold eval, prefill) run the
        # block on every token and mask only attention: capacity or expert-choice
        # experts would give their slots to tokens that are not recursing
        raise ConfigError(
            "model.stack='recursive' with routed depth needs token-choice "
            "dropless MoE experts (got model.moe.router="
            f"{m.moe.router!r}, dispatch={m.moe.dispatch!r})"
        )
    middle = r.sharing.startswith("middle")
    shared = m.num_layers - 2 if middle else m.num_layers
    if shared < n or shared % n:
        what = "model.num_layers - 2 (first and last layers are unique)" if middle else "model.num_layers"
        raise ConfigError(
            f"model.mor.num_recursions={n} does not divide the {shared} shared layers "
            f"({what}) for sharing={r.sharing!r}"
        )
    func = r.router_func
    if r.routing == "expert_choice" and func not in ("", "sigmoid", "tanh"):
        raise ConfigError(f"model.mor.router_func={func!r}: expert choice needs sigmoid or tanh")
    if r.routing == "token_choice" and func not in ("", "softmax", "sigmoid"):
        raise ConfigError(f"model.mor.router_func={func!r}: token choice needs softmax or sigmoid")
    caps = mor_capacities(m)
    if r.routing == "expert_choice":
        if len(caps) != n:
            raise ConfigError(f"model.mor.capacities has {len(caps)} entries, need num_recursions={n}")
        if any(not 0 < c <= 1 for c in caps):
            raise ConfigError(f"model.mor.capacities={r.capacities!r}: each must be in (0, 1]")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(
                f"model.mor.capacities={r.capacities!r} must be non-increasing "
                "(hierarchical filtering: step r keeps a subset of step r-1)"
            )
    elif r.capacities.strip() or r.capacity_warmup_steps:
        raise ConfigError(
            "model.mor.capacities and capacity_warmup_steps are only used by "
            f"routing='expert_choice', got routing={r.routing!r}"
        )
    if r.kv_cache == "shared" and r.routing == "expert_choice" and caps[0] < 1:
        raise ConfigError(
            "model.mor.kv_cache='shared' reuses step 1's KV for every token, but expert-choice "
            f"capacity at step 1 is {caps[0]} < 1 (use kv_cache='recursion_wise')"
        )
    if r.alpha <= 0 or r.token_choice_alpha <= 0:
        raise ConfigError("model.mor.alpha and token_choice_alpha must be > 0")
    for k in (
        "bce_weight",
        "z_loss_weight",
        "balance_weight",
        "bias_update_rate",
        "warmup_steps",
        "capacity_warmup_steps",
        "decode_buckets",
    ):
        if getattr(r, k) < 0:
            raise ConfigError(f"config key 'model.mor.{k}' must be >= 0, got {getattr(r, k)}")
    if m.ffn == "moe" and m.moe.first_dense_layers > (1 if middle else 0):
        raise ConfigError(
            f"model.moe.first_dense_layers={m.moe.first_dense_layers}: a recursive stack can "
            "only make its unique first layer dense (middle_* sharing)"
        )


def _validate_mixture(d: DataConfig) -> None:
    parse_mixture(d.mixture)
    names = [n for n, _ in parse_mixture(d.mixture)]
    if "corpus" in names and not d.corpus.strip():
        raise ConfigError("data.mixture uses 'corpus' but data.corpus is empty")
    if d.corpus.strip() and "corpus" not in names:
        raise ConfigError(
            "data.corpus is set but data.mixture has no 'corpus' entry (e.g. data.mixture=corpus:1)"
        )
    if "file" in names and not d.files:
        raise ConfigError("data.mixture uses 'file' but data.files is empty")
    for p in filter(None, d.files.split(",")):
        if not os.path.isfile(p):
            raise ConfigError(f"data.files: no such file: {p}")


def validate_for_devices(cfg: Config, num_devices: int) -> tuple[int, ...]:
    """Device-dependent checks: mesh shape, batch and expert divisibility."""
    shape = cfg.mesh.shape(num_devices)
    data, fsdp, expert, tensor = shape
    batch_shards = data * fsdp * expert
    if cfg.train.batch_size % batch_shards:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by the "
            f"data*fsdp*expert mesh size {batch_shards}"
        )
    m = cfg.train.microbatches
    if (cfg.train.batch_size // m) % batch_shards:
        raise ConfigError(
            f"train.batch_size / train.microbatches = {cfg.train.batch_size // m} is not divisible by "
            f"the data*fsdp*expert mesh size {batch_shards} (every microbatch spans every batch shard)"
        )
    if cfg.model.ffn == "moe" and cfg.model.moe.num_experts % expert:
        raise ConfigError(
            f"model.moe.num_experts={cfg.model.moe.num_experts} is not divisible by mesh.expert={expert}"
        )
    return shape


# ------------------------------------------------------- post-training and test-time


def _check_choices(obj, prefix: str) -> None:
    for key, choices in field_choices(type(obj)).items():
        v = getattr(obj, key)
        if v not in choices:
            raise ConfigError(f"{prefix} config key '{key}'={v!r} is not one of {', '.join(choices)}")


def validate_grpo(rl: GRPOConfig) -> GRPOConfig:
    """`moe-lab rl`'s config, checked before any run is read (one-line errors)."""
    _check_choices(rl, "rl")
    for k in (
        "steps",
        "prompts_per_step",
        "num_rollouts",
        "updates_per_batch",
        "log_every",
        "eval_every",
        "eval_examples",
        "checkpoint_every",
        "keep_last",
    ):
        if getattr(rl, k) < 1:
            raise ConfigError(f"rl config key '{k}' must be >= 1, got {getattr(rl, k)}")
    if rl.num_rollouts < 2:
        raise ConfigError("rl config key 'num_rollouts' must be >= 2 (group-normalised advantages)")
    if rl.lr <= 0 or rl.temperature < 0 or not 0 < rl.top_p <= 1:
        raise ConfigError("rl config: lr must be > 0, temperature >= 0, top_p in (0, 1]")
    if not 0 < rl.clip_eps < 1 or rl.kl_coef < 0 or rl.max_new_tokens < 0:
        raise ConfigError("rl config: clip_eps in (0, 1), kl_coef >= 0, max_new_tokens >= 0")
    return rl


def validate_ttc(t: TTCConfig) -> TTCConfig:
    """`eval --ttc`'s config (and the sweep's test-time stage), checked before any run
    is read (one-line errors)."""
    if t.n < 1 or t.num_prompts < 1 or t.batch_size < 1:
        raise ConfigError(f"ttc: n={t.n}, num_prompts={t.num_prompts} and batch_size must be >= 1")
    if t.temperature < 0 or not 0 < t.top_p <= 1:
        raise ConfigError(
            f"ttc: temperature must be >= 0 and top_p in (0, 1], got {t.temperature}, {t.top_p}"
        )
    for what in ("budgets", "waits", "depths"):
        v = getattr(t, what)
        if any(x < (1 if what == "depths" else 0) for x in v) or len(set(v)) != len(v):
            raise ConfigError(f"ttc: {what} must be distinct non-negative integers, got {v}")
    return t
