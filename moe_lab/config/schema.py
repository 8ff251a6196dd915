"""Configuration schema: Python config files -> validated, frozen dataclasses.

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
import typing
from typing import Literal

# The mesh axes, in mesh order; MeshConfig has one size field per axis.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

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
    shared_hidden: int = 0  # the shared experts' hidden size (0: num_shared_experts * F)
    # shared expert output times sigmoid(x . w_D) (Qwen2-MoE's shared_expert_gate)
    shared_gate: bool = False
    routed_scale: float = 1.0  # routed experts' output times this (DeepSeek-V3 routed_scaling_factor)
    first_dense_layers: int = 0  # the first N layers keep a dense SwiGLU
    # topk_softmax: top-k of logits then softmax over the k (Mixtral)
    # softmax_topk: softmax over all experts then top-k (optionally renormalised)
    # sigmoid: sigmoid scores, selection-only bias for loss-free balancing (DeepSeek-V3)
    # expert_choice: every expert takes its top-C tokens (Zhou et al. 2022)
    router: Literal["topk_softmax", "softmax_topk", "sigmoid", "expert_choice"] = "softmax_topk"
    renormalize: bool = True  # softmax_topk / sigmoid at k > 1 (at k = 1 the gate stays p)
    bias_update_rate: float = 1e-3  # sigmoid router: b_i += rate * sign(mean load - load_i)
    router_jitter: float = 0.0  # multiplicative uniform noise on router inputs during training
    aux_loss_weight: float = 1e-2  # Switch load-balance loss (2508.18672: 1e-2)
    z_loss_weight: float = 1e-3  # router z-loss (ST-MoE; 2508.18672: 1e-3)
    # reference: every expert on every token (slow, exact); capacity: sort + per-expert
    # buffers, overflow dropped; dropless: nothing dropped; auto: dropless.
    dispatch: Literal["reference", "capacity", "dropless", "auto"] = "dropless"
    # expert kernels (moe_lab/layers/moe_kernels/dispatch.py): auto picks by backend
    # (CPU: loop; GPU / TPU: buffer for capacity, tokamax for dropless)
    # auto | loop | buffer | ragged | blocks | tokamax
    kernel: Literal["auto", "loop", "buffer", "ragged", "blocks", "tokamax"] = "auto"
    # expert parallelism with capacity dispatch on a mesh whose `expert` axis > 1:
    # auto / all_to_all: tokens go to their experts' devices by all-to-all, capacity per
    # device (GShard; layers/expert_parallel.py); all_to_all is also an error where it
    # cannot apply to the training batch (dropless, expert choice, mesh.rules that do not
    # split the batch over `expert`); calls whose tokens the shards do not divide (small
    # decode batches) take the GSPMD path in both | gspmd: the global sort of
    # dispatch.py, partitioned by XLA
    expert_parallel: Literal["auto", "all_to_all", "gspmd"] = "auto"
    capacity_factor: float = 1.25
    metrics: Literal["aggregate", "per_layer"] = "aggregate"  # aggregate | per_layer


@dataclasses.dataclass(frozen=True)
class MoRConfig:
    """Mixture-of-Recursions (arXiv 2507.10524); used when model.stack = "recursive".

    See moe_lab/models/recursive.py for the algorithms.
    """

    num_recursions: int = 3  # N_r
    # cycle: layer l uses pool[l mod L/N_r]; sequence: pool[floor(l/N_r)];
    # middle_*: the first and last layers unique, the middle L-2 shared as above
    sharing: Literal["cycle", "sequence", "middle_cycle", "middle_sequence"] = "middle_cycle"
    # none (fixed depth) | expert_choice | token_choice
    routing: Literal["none", "expert_choice", "token_choice"] = "expert_choice"
    router_type: Literal["linear", "mlp"] = "linear"  # linear (no bias) | mlp
    # expert choice: sigmoid | tanh; token choice: softmax | sigmoid ("" = the default of each)
    router_func: Literal["", "sigmoid", "tanh", "softmax"] = ""
    alpha: float = 0.1  # gate scale g = alpha * score (expert choice)
    token_choice_alpha: float = 1.0  # gate scale for token choice
    # expert choice capacities per step, comma-separated fractions of the sequence
    # ("" = (N_r - r + 1) / N_r, i.e. 1, 2/3, 1/3 for N_r = 3)
    capacities: str = ""
    # add: h + g f(h), f the whole step with its residual (2507.10524 and its released
    # code) | interpolate: h + g (f(h) - h) (a gated interpolation; neither of them)
    update: Literal["add", "interpolate"] = "add"
    # causal decoding for expert choice: bce (aux BCE on router logits vs top-k
    # membership) | aux_router (separate stop-gradient router) | none
    causal_aux: Literal["bce", "aux_router", "none"] = "bce"
    bce_weight: float = 1e-3  # on the per-step BCE summed over the N_r steps (released)
    z_loss_weight: float = 0.0
    # expert choice at train=False: threshold (causal, what decoding does) | topk (looks
    # at future tokens: eval losses then describe a model that generation cannot run)
    eval_routing: Literal["threshold", "topk"] = "threshold"
    # token choice: loss (sum f_i P_i) | loss_free (selection bias)
    balance: Literal["loss", "loss_free"] = "loss"
    balance_weight: float = 0.1
    bias_update_rate: float = 1e-3
    warmup_steps: int = 0  # token choice: every token at full depth for the first N steps
    # expert choice: every capacity 1 (all tokens, full depth) for the first N train
    # steps, then the configured capacities.  k_r is static, so the warm-up runs as a
    # second compiled train step (moe_lab/train/loop.py), not as a traced condition.
    capacity_warmup_steps: int = 0
    # recursion_wise | shared (all steps reuse step 1's KV)
    kv_cache: Literal["recursion_wise", "shared"] = "recursion_wise"
    decode_buckets: int = 8  # depth-wise batching at decode: row buckets of B/n (0: off)
    # expert choice's training path: gather (the k_r kept tokens only: the fast path) |
    # dense (every token, the others masked: the slow reference the tests hold it to)
    expert_choice_impl: Literal["gather", "dense"] = "gather"


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
    # none | llama3 (Llama 3.1's frequency-dependent scaling of the RoPE frequencies)
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0  # llama3: low frequencies are divided by this
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original / this are scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original / this are kept
    rope_original_max_len: int = 8192  # llama3: the pretraining context length
    norm_eps: float = 1e-6  # HF Llama 3, Mixtral, Qwen, OLMoE checkpoints use 1e-5 / 1e-6
    # none | qkv (Qwen2: biases on the q, k, v projections) | qkvo (Llama attention_bias)
    attn_bias: Literal["none", "qkv", "qkvo"] = "none"
    # RMSNorm of queries and keys before RoPE: none | head (per head over K: Qwen3) |
    # full (over all heads' H*K at once: OLMoE)
    qk_norm: Literal["none", "head", "full"] = "none"
    norm_placement: Literal["pre", "post"] = "pre"  # pre | post
    tie_embeddings: bool = False
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"  # none | full | dots (save matmul outputs)
    # attention kernel (moe_lab/layers/attention_kernels.py): auto (GPU cudnn, TPU
    # tokamax, CPU xla) | xla (einsum, T x T scores) | chunked (tokamax xla_chunked,
    # memory linear in T anywhere) | tokamax (its Pallas flash kernels) | cudnn
    attention_impl: Literal["auto", "xla", "chunked", "tokamax", "cudnn", "splash"] = "auto"
    ffn: Literal["dense", "moe"] = "dense"  # dense | moe
    stack: Literal["plain", "recursive"] = "plain"  # plain | recursive
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
    arith_direct: float = 0.0  # share of training solutions with no working (answer only)
    # countdown (TinyZero): reach a target from N numbers in [1, max] with + - * /
    countdown_num_numbers: int = 3
    countdown_max_number: int = 20
    # file source: comma-separated paths of .txt or .jsonl files ({"text": ...} or
    # {"prompt": ..., "answer": ...} rows)
    files: str = ""
    pack: bool = True
    # grain worker processes building the training batches (0: in the training
    # process). Deterministic for a given count; batches differ between counts (each
    # worker packs its own slice), so a resume keeps the count of the run.
    workers: int = 0
    # byte | PATH/tokenizer.json (HF tokenizers) | PATH/NAME.model (SentencePiece);
    # the run directory keeps a copy (DIR/tokenizer/) and config.json its fingerprint
    tokenizer: str = "byte"
    # the `corpus` mixture entry: DIR[:WEIGHT][,DIR[:WEIGHT]...] prepared by moe-lab prepare
    corpus: str = ""
    tokenizer_fingerprint: str = ""  # filled from the tokenizer (resolve_config)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # global batch, sequences
    # gradient accumulation: the step runs the batch as this many slices, one at a
    # time (activation memory / microbatches; same update up to the aux losses)
    microbatches: int = 1
    seed: int = 0
    lr: float = 3e-3
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # cosine | wsd | constant
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
    # all: every token's next-token loss | completion: only the completion of prompt /
    # answer rows (working, answer marker, answer and the EOS after it: SFT); rows
    # without a prompt (plain text) then add no loss
    loss_on: Literal["all", "completion"] = "all"
    # RUN[:STEP]: a new run starts from that run's weights (its model and tokenizer),
    # fresh optimizer and schedule (moe_lab/train/init_from.py)
    init_from: str = ""
    # "START:STOP": a jax.profiler trace of steps START..STOP-1 into WORKDIR/profile/
    # (TensorBoard / XProf); "" off
    profile: str = ""

    @property
    def profile_steps(self) -> tuple[int, int] | None:
        """(START, STOP) of train.profile, or None (validate.py checks the form)."""
        if not self.profile:
            return None
        start, _, stop = self.profile.partition(":")
        return int(start), int(stop)


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
    # slices joined over DCN (multi-slice TPU pods): the data axis spans dcn_data slices,
    # data / dcn_data within each; every other axis stays inside a slice
    dcn_data: int = 1
    # For `moe-lab info` memory plans of pod configs on a laptop: the device count and
    # the chip kind the config is written for (tpu-v5p, tpu-v6e, h100, h200, cpu).
    plan_devices: int = 0
    plan_hardware: str = ""

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = [getattr(self, a) for a in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if sizes.count(-1) > 1:
            raise ConfigError("mesh: at most one axis may be -1")
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"mesh: fixed axes {sizes} (product {known}) do not divide the {num_devices} devices"
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


# ------------------------------------------------------- post-training and test-time


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """`moe-lab rl` (moe_lab/rl/grpo.py): GRPO (DeepSeekMath) from a trained run.  Its
    optimiser fields (lr .. b2) become the RL run's train section (rl/grpo.py:
    _rl_run_config), so they mean what TrainConfig's do; the defaults are 2508.18672's."""

    task: str = "arith"  # arith | countdown | facts (anything with Task.check)
    steps: int = 100
    prompts_per_step: int = 8
    num_rollouts: int = 5  # G, rollouts per prompt
    max_new_tokens: int = 0  # 0: longest reference completion + slack
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 5e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    clip_eps: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: Literal["k3", "k1"] = "k3"  # k3 (Schulman's unbiased, >= 0) | k1 (log ratio)
    format_reward: float = 0.0  # added to the exact-match reward when the format is right
    loss_agg: Literal["sequence", "token"] = "sequence"  # sequence (GRPO paper) | token
    scale_rewards: bool = True
    updates_per_batch: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 25
    eval_examples: int = 64
    checkpoint_every: int = 25
    keep_last: int = 2
    devices: Literal["all", "one"] = "all"  # all: the run's mesh (sharded like training) | one


@dataclasses.dataclass(frozen=True)
class TTCConfig:
    """`moe-lab eval --ttc` (moe_lab/eval/test_time.py): coverage@k and majority@k of
    sampled answers, s1 budget forcing (2501.19393), recursion depth (MoR runs)."""

    task: str = ""  # "" = arith if in the mixture, else the first task with answers
    num_prompts: int = 32
    n: int = 16  # samples per prompt (128 on accelerators)
    max_k: int = 0  # 0 = n
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    max_new_tokens: int = 0  # 0: from the reference completions (eval.generation_budget)
    budgets: tuple[int, ...] = (2, 4, 8, 16, 32)  # max thinking tokens ("2,4" in a spec)
    waits: tuple[int, ...] = (0, 1, 2, 4)  # N for the extrapolation sweep
    wait_cap: int = 64  # max thinking tokens during the extrapolation sweep
    depths: tuple[int, ...] = ()  # recursive models: () = 1 .. N_r + 2


# --------------------------------------------------------------------------- load


def _to_jsonable(x):
    if hasattr(x, "to_dict"):  # ml_collections.ConfigDict
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    return x


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


TASK_NAMES = ("facts", "arith", "countdown", "file", "corpus")  # corpus: data/corpus.py


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


def field_choices(root=None) -> dict[str, tuple]:
    """{dotted key: allowed values} of every Literal-typed field of `root` (default:
    Config) and the dataclasses under it."""
    out = {}

    def walk(cls, prefix):
        for name, typ in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{name}.")
            elif typing.get_origin(typ) is Literal:
                out[prefix + name] = typing.get_args(typ)

    walk(root or Config, "")
    return out
