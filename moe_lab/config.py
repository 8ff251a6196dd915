"""Configuration: Python config files -> validated, frozen dataclasses.

A config file is a Python file with `get_config(arg=None)` returning an
`ml_collections.ConfigDict` (or a plain nested dict).  The CLI loads it with
`--config path.py[:arg]`, applies `--config.a.b=value` overrides and turns the
result into the frozen `Config` dataclass below.  Every check happens here,
before jax compiles anything; a bad value raises `ConfigError` with one line
naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os

DEFAULT_RULES = (
    # logical axis -> mesh axes (None: replicated).  One table, printed at start-up.
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("expert", "expert"),
    ("layers", None),
)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 0  # 0: model.mlp_hidden; smaller values give fine-grained experts
    num_shared_experts: int = 0  # always-on experts of size expert_hidden (DeepSeekMoE)
    first_dense_layers: int = 0  # the first N layers keep a dense SwiGLU
    # topk_softmax: top-k of logits then softmax over the k (Mixtral)
    # softmax_topk: softmax over all experts then top-k (optionally renormalised)
    # sigmoid: sigmoid scores, selection-only bias for loss-free balancing (DeepSeek-V3)
    # expert_choice: every expert takes its top-C tokens (Zhou et al. 2022)
    router: str = "softmax_topk"
    renormalize: bool = True  # softmax_topk / sigmoid at k > 1 (at k = 1 the gate stays p)
    bias_update_rate: float = 1e-3  # sigmoid router: b_i += rate * sign(mean load - load_i)
    router_jitter: float = 0.0  # multiplicative uniform noise on router inputs during training
    aux_loss_weight: float = 1e-2  # Switch load-balance loss (2508.18672: 1e-2)
    z_loss_weight: float = 1e-3  # router z-loss (ST-MoE; 2508.18672: 1e-3)
    # reference: every expert on every token (slow, exact); capacity: sort + per-expert
    # buffers, overflow dropped; dropless: nothing dropped; auto: dropless.
    dispatch: str = "dropless"
    # expert kernels (moe_lab/layers/dispatch.py): auto picks by backend (CPU: loop;
    # GPU: buffer for capacity, blocks for dropless; TPU: buffer / ragged)
    kernel: str = "auto"  # auto | loop | buffer | ragged | blocks
    # expert parallelism with capacity dispatch on a mesh whose `expert` axis > 1:
    # auto / all_to_all: tokens go to their experts' devices by all-to-all, capacity per
    # device (GShard; layers/expert_parallel.py); all_to_all is also an error where it
    # cannot apply to the training batch (dropless, expert choice, mesh.rules that do not
    # split the batch over `expert`); calls whose tokens the shards do not divide (small
    # decode batches) take the GSPMD path in both | gspmd: the global sort of
    # dispatch.py, partitioned by XLA
    expert_parallel: str = "auto"
    capacity_factor: float = 1.25
    metrics: str = "aggregate"  # aggregate | per_layer


@dataclasses.dataclass(frozen=True)
class MoRConfig:
    """Mixture-of-Recursions (arXiv 2507.10524); used when model.stack = "recursive".

    See moe_lab/models/recursive.py for the algorithms.
    """

    num_recursions: int = 3  # N_r
    # cycle: layer l uses pool[l mod L/N_r]; sequence: pool[floor(l/N_r)];
    # middle_*: the first and last layers unique, the middle L-2 shared as above
    sharing: str = "middle_cycle"
    routing: str = "expert_choice"  # none (fixed depth) | expert_choice | token_choice
    router_type: str = "linear"  # linear (no bias) | mlp
    # expert choice: sigmoid | tanh; token choice: softmax | sigmoid ("" = the default of each)
    router_func: str = ""
    alpha: float = 0.1  # gate scale g = alpha * score (expert choice)
    token_choice_alpha: float = 1.0  # gate scale for token choice
    # expert choice capacities per step, comma-separated fractions of the sequence
    # ("" = (N_r - r + 1) / N_r, i.e. 1, 2/3, 1/3 for N_r = 3)
    capacities: str = ""
    update: str = "paper"  # paper: h + g*(f(h) - h) | released: h + g*f(h) (f includes residual)
    # causal decoding for expert choice: bce (aux BCE on router logits vs top-k
    # membership) | aux_router (separate stop-gradient router) | none
    causal_aux: str = "bce"
    bce_weight: float = 1e-3
    z_loss_weight: float = 0.0
    # expert choice at train=False: threshold (causal, what decoding does) | topk (looks
    # at future tokens: eval losses then describe a model that generation cannot run)
    eval_routing: str = "threshold"
    balance: str = "loss"  # token choice: loss (sum f_i P_i) | loss_free (selection bias)
    balance_weight: float = 0.1
    bias_update_rate: float = 1e-3
    warmup_steps: int = 0  # token choice: every token at full depth for the first N steps
    # expert choice: every capacity 1 (all tokens, full depth) for the first N train
    # steps, then the configured capacities.  k_r is static, so the warm-up runs as a
    # second compiled train step (moe_lab/train/loop.py), not as a traced condition.
    capacity_warmup_steps: int = 0
    kv_cache: str = "recursion_wise"  # recursion_wise | shared (all steps reuse step 1's KV)
    decode_buckets: int = 8  # depth-wise batching at decode: row buckets of B/n (0: off)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_hidden: int = 0  # 0: round(8/3 d_model) to a multiple of 8 (SwiGLU)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    norm_placement: str = "pre"  # pre | post
    tie_embeddings: bool = False
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # none | full | dots (save matmul outputs)
    ffn: str = "dense"  # dense | moe
    stack: str = "plain"  # plain | recursive
    moe: MoEConfig = MoEConfig()
    mor: MoRConfig = MoRConfig()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        return self.mlp_hidden or 8 * ((8 * self.d_model // 3 + 7) // 8)

    @property
    def resolved_expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.resolved_mlp_hidden

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.first_dense_layers if self.ffn == "moe" else 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "name:weight,name:weight"; names: facts, arith, countdown, file
    mixture: str = "facts:1,arith:1"
    seq_len: int = 128
    seed: int = 0
    # facts (memorization): num_entities invented names x relations
    facts_num_entities: int = 200
    # arith (reasoning): modular multi-step problems
    arith_num_steps: int = 3
    arith_eval_num_steps: int = 3
    arith_modulus: int = 23
    arith_self_correct: float = 0.0  # share of working with a wrong step, "Wait", the fix
    # countdown (TinyZero): reach a target from N numbers in [1, max] with + - * /
    countdown_num_numbers: int = 3
    countdown_max_number: int = 20
    # file source: comma-separated paths of .txt or .jsonl files ({"text": ...} or
    # {"prompt": ..., "answer": ...} rows)
    files: str = ""
    pack: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global batch, sequences
    seed: int = 0
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: final fraction of steps with linear decay
    end_lr_ratio: float = 0.1  # final lr = end_lr_ratio * lr (cosine, wsd)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 2
    checkpoint_every: int = 100
    keep_last: int = 2  # keep the newest N checkpoints ...
    keep_every: int = 0  # ... plus every M-th step (0: none)
    async_checkpoint: bool = True
    progress: bool = True  # progress bar with ETA


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation at the end of training and by `moe-lab eval`."""

    num_examples: int = 64  # prompts per task for generation accuracy
    batch_size: int = 32  # prompts per generation batch
    max_new_tokens: int = 48  # generation budget per prompt
    longer_chains: int = 0  # also eval arith at this many steps (0: off)
    at_end: bool = True  # run the evaluation when training finishes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: tuple = DEFAULT_RULES
    # For `moe-lab info` memory plans of pod configs on a laptop: the device count and
    # the chip kind the config is written for (tpu-v5p, tpu-v6e, h100, h200, cpu).
    plan_devices: int = 0
    plan_hardware: str = ""

    @property
    def axis_names(self) -> tuple[str, ...]:
        return ("data", "fsdp", "expert", "tensor")

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [self.data, self.fsdp, self.expert, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one axis may be -1")
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"mesh: fixed axes {sizes} (product {known}) do not divide the "
                    f"{num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh: shape data={sizes[0]} fsdp={sizes[1]} expert={sizes[2]} "
                f"tensor={sizes[3]} needs {math.prod(sizes)} devices, have {num_devices}"
            )
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    name: str = "run"

    def to_dict(self) -> dict:
        return _to_jsonable(dataclasses.asdict(self))

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- load


def _to_jsonable(x):
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------- validation

_CHOICES = {
    "model.norm_placement": ("pre", "post"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.ffn": ("dense", "moe"),
    "model.stack": ("plain", "recursive"),
    "model.moe.router": ("topk_softmax", "softmax_topk", "sigmoid", "expert_choice"),
    "model.moe.dispatch": ("reference", "capacity", "dropless", "auto"),
    "model.moe.kernel": ("auto", "loop", "buffer", "ragged", "blocks"),
    "model.moe.expert_parallel": ("auto", "all_to_all", "gspmd"),
    "model.moe.metrics": ("aggregate", "per_layer"),
    "model.mor.sharing": ("cycle", "sequence", "middle_cycle", "middle_sequence"),
    "model.mor.routing": ("none", "expert_choice", "token_choice"),
    "model.mor.router_type": ("linear", "mlp"),
    "model.mor.router_func": ("", "sigmoid", "tanh", "softmax"),
    "model.mor.update": ("paper", "released"),
    "model.mor.causal_aux": ("bce", "aux_router", "none"),
    "model.mor.eval_routing": ("threshold", "topk"),
    "model.mor.balance": ("loss", "loss_free"),
    "model.mor.kv_cache": ("recursion_wise", "shared"),
    "train.schedule": ("cosine", "wsd", "constant"),
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
    axes = tuple(f.name for f in dataclasses.fields(MeshConfig) if f.type in ("int", int))
    for rule in rules:
        if len(rule) != 2:
            raise ConfigError(f"mesh.rules entry {rule!r} must be [logical_axis, mesh_axes]")
        targets = rule[1] if isinstance(rule[1], (list, tuple)) else (rule[1],)
        bad = [a for a in targets if a is not None and a not in axes[:4]]
        if bad:
            raise ConfigError(f"mesh.rules maps {rule[0]!r} to unknown mesh axis {bad[0]!r} "
                              f"(mesh axes: {', '.join(axes[:4])})")


def validate(cfg: Config) -> Config:
    """Checks everything that can be checked without devices; returns cfg."""
    for key, choices in _CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            raise ConfigError(f"config key '{key}'={v!r} is not one of {', '.join(choices)}")
    _floats_finite(cfg)
    m, t, d = cfg.model, cfg.train, cfg.data
    _positive(cfg, "model.d_model", "model.num_layers", "model.num_heads", "model.num_kv_heads",
              "model.max_seq_len", "model.init_std", "model.rope_theta", "train.steps",
              "train.batch_size", "train.log_every", "train.eval_every", "train.checkpoint_every",
              "data.seq_len", "eval.num_examples", "eval.batch_size", "eval.max_new_tokens")
    for key in ("model.head_dim", "model.mlp_hidden", "model.moe.expert_hidden",
                "model.vocab_size", "eval.longer_chains"):  # 0: the default
        if _get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0 (0: default), got {_get(cfg, key)}")
    _validate_rules(cfg.mesh.rules)
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model} "
            "(or set model.head_dim)"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}"
        )
    if m.resolved_head_dim % 2:
        raise ConfigError(f"model head_dim={m.resolved_head_dim} must be even for RoPE")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.decay_fraction <= 1:
        raise ConfigError(f"config key 'train.decay_fraction' must be in [0, 1], got {t.decay_fraction}")
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
    _validate_mixture(d)
    return cfg


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    if e.num_experts < 1:
        raise ConfigError(f"config key 'model.moe.num_experts' must be >= 1, got {e.num_experts}")
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(
            f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]"
        )
    if e.capacity_factor <= 0:
        raise ConfigError(f"model.moe.capacity_factor must be > 0, got {e.capacity_factor}")
    if e.router == "topk_softmax" and e.top_k == 1:
        raise ConfigError("model.moe.router='topk_softmax' with top_k=1 gives every token gate 1 "
                          "(a softmax over one logit), so the router would learn nothing from "
                          "the loss; use router='softmax_topk' (Switch: gate = p)")
    if not 0 <= e.first_dense_layers < m.num_layers:
        raise ConfigError(
            f"model.moe.first_dense_layers={e.first_dense_layers} must be in "
            f"[0, model.num_layers={m.num_layers})"
        )
    if e.num_shared_experts < 0:
        raise ConfigError("model.moe.num_shared_experts must be >= 0")
    if e.num_shared_experts and e.router == "expert_choice":
        raise ConfigError(
            "model.moe.num_shared_experts > 0 is not supported with router='expert_choice' "
            "(expert choice already lets busy tokens use many experts)"
        )
    dropless = e.dispatch in ("dropless", "auto")
    if e.router == "expert_choice" and e.kernel in ("ragged", "blocks"):
        raise ConfigError(f"model.moe.kernel={e.kernel!r} is for token choice; expert choice "
                          "runs 'loop' or 'buffer' (every expert holds exactly C tokens)")
    if e.router != "expert_choice" and e.kernel in ("ragged", "blocks") and not dropless:
        raise ConfigError(f"model.moe.kernel={e.kernel!r} needs model.moe.dispatch='dropless' "
                          f"(got {e.dispatch!r})")
    if e.router != "expert_choice" and e.kernel == "buffer" and dropless:
        raise ConfigError("model.moe.kernel='buffer' needs model.moe.dispatch='capacity' (a "
                          "dropless buffer would hold every token for every expert)")
    if e.expert_parallel == "all_to_all" and (e.dispatch != "capacity"
                                              or e.router == "expert_choice"):
        raise ConfigError("model.moe.expert_parallel='all_to_all' needs token-choice routing "
                          f"with model.moe.dispatch='capacity' (got router={e.router!r}, "
                          f"dispatch={e.dispatch!r})")
    if e.router_jitter < 0 or e.aux_loss_weight < 0 or e.z_loss_weight < 0:
        raise ConfigError("model.moe router_jitter, aux_loss_weight, z_loss_weight must be >= 0")


def mor_capacities(m: ModelConfig) -> tuple[float, ...]:
    """Expert-choice capacity per recursion step (fractions of the sequence)."""
    r = m.mor
    if not r.capacities.strip():
        return tuple((r.num_recursions - i) / r.num_recursions for i in range(r.num_recursions))
    try:
        return tuple(float(c) for c in r.capacities.split(","))
    except ValueError:
        raise ConfigError(
            f"model.mor.capacities={r.capacities!r} is not a comma-separated list of numbers"
        ) from None


def _validate_mor(m: ModelConfig) -> None:
    r = m.mor
    n = r.num_recursions
    if n < 1:
        raise ConfigError(f"config key 'model.mor.num_recursions' must be >= 1, got {n}")
    if m.ffn == "moe" and r.routing != "none" and (m.moe.router == "expert_choice"
                                                    or m.moe.dispatch == "capacity"):
        # the dense recursion paths (token choice, threshold eval, prefill) run the
        # block on every token and mask only attention: capacity or expert-choice
        # experts would give their slots to tokens that are not recursing
        raise ConfigError("model.stack='recursive' with routed depth needs token-choice "
                          "dropless MoE experts (got model.moe.router="
                          f"{m.moe.router!r}, dispatch={m.moe.dispatch!r})")
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
            raise ConfigError(
                f"model.mor.capacities has {len(caps)} entries, need num_recursions={n}")
        if any(not 0 < c <= 1 for c in caps):
            raise ConfigError(f"model.mor.capacities={r.capacities!r}: each must be in (0, 1]")
        if any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(
                f"model.mor.capacities={r.capacities!r} must be non-increasing "
                "(hierarchical filtering: step r keeps a subset of step r-1)")
    elif r.capacities.strip() or r.capacity_warmup_steps:
        raise ConfigError(
            "model.mor.capacities and capacity_warmup_steps are only used by "
            f"routing='expert_choice', got routing={r.routing!r}")
    if r.kv_cache == "shared" and r.routing == "expert_choice" and caps[0] < 1:
        raise ConfigError(
            "model.mor.kv_cache='shared' reuses step 1's KV for every token, but expert-choice "
            f"capacity at step 1 is {caps[0]} < 1 (use kv_cache='recursion_wise')")
    if r.alpha <= 0 or r.token_choice_alpha <= 0:
        raise ConfigError("model.mor.alpha and token_choice_alpha must be > 0")
    for k in ("bce_weight", "z_loss_weight", "balance_weight", "bias_update_rate",
              "warmup_steps", "capacity_warmup_steps", "decode_buckets"):
        if getattr(r, k) < 0:
            raise ConfigError(f"config key 'model.mor.{k}' must be >= 0, got {getattr(r, k)}")
    if m.ffn == "moe" and m.moe.first_dense_layers > (1 if middle else 0):
        raise ConfigError(
            f"model.moe.first_dense_layers={m.moe.first_dense_layers}: a recursive stack can "
            "only make its unique first layer dense (middle_* sharing)")


def _validate_mixture(d: DataConfig) -> None:
    parse_mixture(d.mixture)
    names = [n for n, _ in parse_mixture(d.mixture)]
    if "file" in names and not d.files:
        raise ConfigError("data.mixture uses 'file' but data.files is empty")
    for p in filter(None, d.files.split(",")):
        if not os.path.isfile(p):
            raise ConfigError(f"data.files: no such file: {p}")


TASK_NAMES = ("facts", "arith", "countdown", "file")


def parse_mixture(mixture: str) -> list[tuple[str, float]]:
    out = []
    for item in filter(None, (s.strip() for s in mixture.split(","))):
        name, _, w = item.partition(":")
        if name not in TASK_NAMES:
            raise ConfigError(f"data.mixture: unknown task '{name}' (valid: {', '.join(TASK_NAMES)})")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"data.mixture: bad weight '{w}' for task '{name}'") from None
        if weight <= 0:
            raise ConfigError(f"data.mixture: weight of '{name}' must be > 0")
        out.append((name, weight))
    if not out:
        raise ConfigError("data.mixture is empty")
    return out


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
    if cfg.model.ffn == "moe" and cfg.model.moe.num_experts % expert:
        raise ConfigError(
            f"model.moe.num_experts={cfg.model.moe.num_experts} is not divisible by "
            f"mesh.expert={expert}"
        )
    return shape


# Loading (config files, overrides, JSON) lives in config_loading.py; re-exported here
# so that `from moe_lab.config import load_config` keeps working.
from moe_lab.config_loading import (  # noqa: E402
    apply_overrides,
    config_from_json,
    from_dict,
    load_config,
    load_raw,
    parse_override_args,
    split_config_arg,
)

__all__ = ["apply_overrides", "config_from_json", "from_dict", "load_config", "load_raw",
           "parse_override_args", "split_config_arg"]
