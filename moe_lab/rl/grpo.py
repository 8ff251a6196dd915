"""GRPO post-training with verifiable rewards (DeepSeekMath, arXiv 2402.03300 sec. 4;
the recipe of 2508.18672: n=5 rollouts, LR 5e-6, KL 1e-3, exact-match reward).

    moe-lab rl --from DIR --to NEWDIR [--config configs/grpo.py] [--config.KEY=V ...]

One step:
  1. rollouts: `prompts_per_step` train prompts of `task`, `num_rollouts` samples
     each from the KV-cache decoder (temperature/top-p), cut after EOS.  The
     prompts of step s and the sampling key are functions of (seed, s) only, so a
     resumed run repeats exactly what an uninterrupted one does.
  2. reward r = exact match (Task.check: verifier for countdown) + `format_reward`
     x [working, answer marker and EOS in the expected form].
  3. group-normalised advantage A_i = (r_i - mean_g r) / (std_g r + 1e-4) (std over
     the group, population form; `scale_rewards=False`: no division, Dr. GRPO).
  4. loss per response token t of rollout i (policy pi, sampler pi_old, frozen
     start pi_ref; rho = pi/pi_old):
        l_it = -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta KL_it
        KL_it = pi_ref/pi - log(pi_ref/pi) - 1          (k3, unbiased, >= 0)
     aggregated as in the paper, mean_i (1/|o_i|) sum_t l_it (`loss_agg="sequence"`),
     or over all tokens (`"token"`).  With `updates_per_batch = 1` pi_old = pi
     (value 1, gradient A grad log pi); more updates per batch make the clip act.
  5. AdamW step on the policy (MoE aux losses added, as in pre-training).

Works for any model moe_lab trains (dense / MoE / recursive): log-probs come
from the model's own forward pass with the same left-padding, positions and
masking as the decoder.  NEWDIR is an ordinary run directory: config.json (the
parent's, with the train section describing the RL optimizer), checkpoints/,
metrics.jsonl (reward, accuracy, kl, response_length, ...), rl.json (the GRPO
config and the parent), reference/ (the frozen start for the KL term), so
`moe-lab eval --workdir NEWDIR` works on it and `moe-lab rl` on it resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_lab.config.load import config_from_json, from_dict, load_raw
from moe_lab.config.schema import Config, ConfigError
from moe_lab.data import pipeline
from moe_lab.data.tasks.base import extract_answer
from moe_lab.data.tasks.registry import make_task
from moe_lab.data.tokenizer import EOS, THINK_END, THINK_START, TOKENIZER
from moe_lab.data.tokenizer import TOKENIZER as tok
from moe_lab.eval import generate as gen
from moe_lab.eval.generate import PROMPT_BUCKET, generate_batched, generation_budget, left_pad
from moe_lab.models.transformer import total_aux_loss
from moe_lab.parallel import sharding
from moe_lab.train.checkpoint import Checkpointer, checkpoint_steps, write_checkpoint
from moe_lab.train.metrics import MetricsWriter, read_metrics
from moe_lab.train.run_dir import write_json_atomic
from moe_lab.train.state import make_setup, resolve_config
from moe_lab.train.trainer import Preempted, local_values

_LOSS_AGG = ("sequence", "token")
_KL = ("k3", "k1")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
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
    kl_estimator: str = "k3"  # k3 (Schulman's unbiased, >= 0) | k1 (log ratio)
    format_reward: float = 0.0  # added to the exact-match reward when the format is right
    loss_agg: str = "sequence"  # sequence (GRPO paper) | token
    scale_rewards: bool = True
    updates_per_batch: int = 1
    seed: int = 0
    log_every: int = 1
    eval_every: int = 25
    eval_examples: int = 64
    checkpoint_every: int = 25
    keep_last: int = 2
    devices: str = "all"  # all: the run's mesh (sharded like training) | one


def validate_grpo(rl: GRPOConfig) -> GRPOConfig:
    for k in ("steps", "prompts_per_step", "num_rollouts", "updates_per_batch", "log_every",
              "eval_every", "eval_examples", "checkpoint_every", "keep_last"):
        if getattr(rl, k) < 1:
            raise ConfigError(f"rl config key '{k}' must be >= 1, got {getattr(rl, k)}")
    if rl.num_rollouts < 2:
        raise ConfigError("rl config key 'num_rollouts' must be >= 2 (group-normalised advantages)")
    if rl.lr <= 0 or rl.temperature < 0 or not 0 < rl.top_p <= 1:
        raise ConfigError("rl config: lr must be > 0, temperature >= 0, top_p in (0, 1]")
    if not 0 < rl.clip_eps < 1 or rl.kl_coef < 0 or rl.max_new_tokens < 0:
        raise ConfigError("rl config: clip_eps in (0, 1), kl_coef >= 0, max_new_tokens >= 0")
    if rl.loss_agg not in _LOSS_AGG or rl.kl_estimator not in _KL or rl.devices not in ("all",
                                                                                         "one"):
        raise ConfigError(f"rl config: loss_agg in {_LOSS_AGG}, kl_estimator in {_KL}, devices "
                          f"in ('all', 'one'); got {rl.loss_agg!r}, {rl.kl_estimator!r}, "
                          f"{rl.devices!r}")
    return rl


def load_grpo_config(config_arg: str | None, overrides: dict | None = None) -> GRPOConfig:
    """GRPOConfig from a config file's get_config() (or the defaults) + overrides."""
    raw = {}
    if config_arg:
        raw = load_raw(config_arg) or {}
        if hasattr(raw, "to_dict"):
            raw = raw.to_dict()
    raw = {**dict(raw), **(overrides or {})}
    return validate_grpo(from_dict(GRPOConfig, raw, "rl."))


# ---------------------------------------------------------------------- loss


def token_logprobs(graphdef, params, model_state, tokens_BS, valid_BS):
    """(log pi(tokens[:, t+1] | tokens[:, :t+1]) [B, S-1], aux): left-padded rows,
    positions counting real tokens only and pads in their own segment, as in decoding."""

    model = nnx.merge(graphdef, params, model_state)
    inputs, targets, valid = tokens_BS[:, :-1], tokens_BS[:, 1:], valid_BS[:, :-1]
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    logits_BTV, aux = model(inputs, pos, valid.astype(jnp.int32), train=False)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return jnp.take_along_axis(logp_BTV, targets[..., None], axis=-1)[..., 0], aux


def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, *, clip_eps: float,
              kl_coef: float, loss_agg: str = "sequence", kl_estimator: str = "k3"):
    """The clipped GRPO objective (module docstring, step 4) -> (loss, metrics)."""

    mask = mask_BT.astype(jnp.float32)
    ratio = jnp.exp(logp_BT - old_logp_BT)
    a = adv_B[:, None]
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
    d = ref_logp_BT - logp_BT
    kl = jnp.exp(d) - d - 1.0 if kl_estimator == "k3" else -d
    tok = pg + kl_coef * kl
    n_B = jnp.sum(mask, axis=1)
    total = jnp.maximum(jnp.sum(mask), 1.0)
    if loss_agg == "sequence":
        loss = jnp.mean(jnp.sum(tok * mask, axis=1) / jnp.maximum(n_B, 1.0))
    else:
        loss = jnp.sum(tok * mask) / total
    clipped = (jnp.abs(ratio - 1.0) > clip_eps) & (mask > 0)
    metrics = {"pg_loss": jnp.sum(pg * mask) / total, "kl": jnp.sum(kl * mask) / total,
               "clip_fraction": jnp.sum(clipped) / total,
               "ratio": jnp.sum(ratio * mask) / total}
    return loss, metrics


_JIT_CACHE: dict = {}  # compiled step / log-prob functions, reused across runs of one model


def _logp_jit():

    if "logp" not in _JIT_CACHE:
        _JIT_CACHE["logp"] = jax.jit(lambda gd, p, ms, t, v: token_logprobs(gd, p, ms, t, v)[0],
                                     static_argnums=0)
    return _JIT_CACHE["logp"]


def _step_jit(setup, rl: GRPOConfig, replicated):
    """The jitted GRPO step, cached by everything it closes over (sweeps and resumes in
    one process compile it once)."""

    loss_keys = ("clip_eps", "kl_coef", "loss_agg", "kl_estimator")
    key = ("step", setup.graphdef, repr(setup.cfg.train), rl.updates_per_batch == 1,
           tuple(getattr(rl, k) for k in loss_keys), setup.mesh.shape_tuple,
           tuple(d.id for d in setup.mesh.devices.flat))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(make_grpo_step(setup.graphdef, setup.tx, rl),
                                  in_shardings=(setup.shardings, setup.batch_sharding),
                                  out_shardings=(setup.shardings, replicated), donate_argnums=0)
    return _JIT_CACHE[key]


def make_grpo_step(graphdef, tx, rl: GRPOConfig):
    """state, batch -> (state, metrics); batch: tokens, valid [B, S], mask, ref_logp
    (and old_logp when updates_per_batch > 1) [B, S-1], adv_B1 [B, 1]."""


    on_policy = rl.updates_per_batch == 1

    def loss_fn(params, model_state, batch):
        logp, aux = token_logprobs(graphdef, params, model_state, batch["tokens"],
                                   batch["valid"])
        old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
        loss, m = grpo_loss(logp, old, batch["ref_logp"], batch["adv_B1"][:, 0], batch["mask"],
                            clip_eps=rl.clip_eps, kl_coef=rl.kl_coef, loss_agg=rl.loss_agg,
                            kl_estimator=rl.kl_estimator)
        aux_loss = total_aux_loss(aux)
        return loss + aux_loss, {**m, "aux_loss": aux_loss, "loss": loss}

    def step(state, batch):
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["model_state"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        m["grad_norm"] = optax.tree.norm(grads)
        return {"params": params, "opt_state": opt_state, "model_state": state["model_state"],
                "step": state["step"] + 1}, m

    return step


# ------------------------------------------------------------------ rollouts


def group_advantages(rewards_PG: np.ndarray, scale: bool = True) -> np.ndarray:
    r = np.asarray(rewards_PG, np.float64)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + 1e-4)
    return a.astype(np.float32)


def format_ok(text: str, example) -> bool:
    """The completion has the training documents' shape: working (if the task has
    any), the answer marker, a non-empty answer, then EOS."""

    if not text.endswith(EOS):
        return False
    body = text[:-len(EOS)]
    if example.working.startswith(THINK_START):
        if not body.startswith(THINK_START) or THINK_END not in body:
            return False
        body = body.split(THINK_END, 1)[1]
    return body.startswith(example.marker) and bool(extract_answer(body))


def build_batch(prompts: list[list[int]], responses: list[list[int]], width: int, eos_id: int,
                pad_id: int) -> dict:
    """tokens/valid [B, W+N] (prompt left-padded to W, then the N generated tokens) and
    mask [B, W+N-1] over the targets that are response tokens up to and incl. EOS."""

    tok_p, val_p = left_pad(prompts, pad_id)
    extra = width - tok_p.shape[1]
    tok_p = np.pad(tok_p, ((0, 0), (extra, 0)), constant_values=pad_id)
    val_p = np.pad(val_p, ((0, 0), (extra, 0)), constant_values=False)
    resp = np.asarray(responses, np.int32)
    B, N = resp.shape
    lengths = np.array([(list(r).index(eos_id) + 1) if eos_id in r else N for r in resp.tolist()])
    tokens = np.concatenate([tok_p, resp], axis=1)
    valid = np.concatenate([val_p, np.ones((B, N), bool)], axis=1)
    mask = np.zeros((B, width + N - 1), bool)
    for b, n in enumerate(lengths):
        mask[b, width - 1:width - 1 + n] = True
    return {"tokens": tokens, "valid": valid, "mask": mask, "lengths": lengths}


# -------------------------------------------------------------------- runner


RL_JSON = "rl.json"


def _rl_run_config(parent: Config, rl: GRPOConfig, name: str) -> Config:
    """The parent's config with a train section that describes the RL optimizer (so the
    checkpoints' optimizer state has the structure `make_setup` expects)."""
    t = dataclasses.replace(parent.train, steps=rl.steps, lr=rl.lr, schedule="constant",
                            warmup_steps=rl.warmup_steps, weight_decay=rl.weight_decay,
                            clip_norm=rl.clip_norm, b1=rl.b1, b2=rl.b2,
                            log_every=rl.log_every, checkpoint_every=rl.checkpoint_every,
                            keep_last=rl.keep_last, async_checkpoint=False,
                            batch_size=rl.prompts_per_step * rl.num_rollouts)
    ev = dataclasses.replace(parent.eval, at_end=False)
    return parent.replace(train=t, eval=ev, name=name)


_RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "checkpoint_every", "keep_last",
                      "devices"}


def _prepare(src: str, dst: str, rl: GRPOConfig, step: int | None):
    """(run cfg, rl cfg, parent step, resuming) after checking/creating NEWDIR."""

    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConfigError("rl: --to must differ from --from")
    rl_json = os.path.join(dst, RL_JSON)
    if os.path.isfile(rl_json):
        with open(rl_json) as f:
            info = json.load(f)
        old = from_dict(GRPOConfig, info["grpo"], "rl.")
        if os.path.abspath(src) != info["parent"]:
            raise ConfigError(f"rl: {dst} holds a GRPO run of {info['parent']}, not of {src}")
        diff = [f"{k}: {getattr(old, k)} -> {getattr(rl, k)}"
                for k in vars(old) if getattr(old, k) != getattr(rl, k)
                and k not in _RESUMABLE_CHANGES]
        if diff:
            raise ConfigError(f"rl: {dst} holds a GRPO run with a different config "
                              f"({'; '.join(diff)[:200]}); use a new --to")
        cfg = config_from_json(os.path.join(dst, "config.json"))
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=rl.steps))
        write_json_atomic(os.path.join(dst, "config.json"), cfg.to_dict())
        write_json_atomic(rl_json, {**info, "grpo": dataclasses.asdict(rl)})
        return cfg, rl, int(info["parent_step"]), True
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConfigError(f"rl: --to {dst} exists and is not empty (and holds no GRPO run)")
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ConfigError(f"rl: --from {src} holds no run (no config.json)")
    steps = checkpoint_steps(src)
    if not steps:
        raise ConfigError(f"rl: no checkpoint in {src}/checkpoints")
    step = max(steps) if step is None else int(step)
    if step not in steps:
        raise ConfigError(f"rl: no checkpoint at step {step} in {src} (have {steps})")

    parent = config_from_json(os.path.join(src, "config.json"))
    make_task(rl.task, parent.data)  # an unknown task fails before anything is written
    cfg = _rl_run_config(parent, rl, f"{parent.name}-grpo")
    os.makedirs(dst, exist_ok=True)
    write_json_atomic(os.path.join(dst, "config.json"), cfg.to_dict())
    write_json_atomic(os.path.join(dst, "lineage.json"),
                      {"parent": os.path.abspath(src), "step": step, "transform": "grpo"})
    write_json_atomic(rl_json, {"grpo": dataclasses.asdict(rl), "parent": os.path.abspath(src),
                                "parent_step": step})
    return cfg, rl, step, False


def _greedy_accuracy(graphdef, params, model_state, task, examples, max_new: int) -> float:

    prompts = [TOKENIZER.encode(ex.prompt, add_bos=True) for ex in examples]
    out = generate_batched(graphdef, params, model_state, prompts, max_new,
                           batch_size=min(32, len(prompts)), pad_id=TOKENIZER.pad_id,
                           eos_id=TOKENIZER.eos_id)
    return float(np.mean([task.check(TOKENIZER.decode(o), ex) for o, ex in zip(out, examples)]))


def run_grpo(src: str, dst: str, rl: GRPOConfig, *, step: int | None = None,
             max_steps: int | None = None, log=print) -> dict:
    """GRPO from run `src` (checkpoint `step`, default latest) into `dst`; resumes a
    GRPO run already in `dst`.  `max_steps` stops after that many steps of this call."""


    rl = validate_grpo(rl)
    if jax.process_count() > 1:
        raise ConfigError("rl: multi-process GRPO is not supported yet (one host, many devices)")
    cfg, rl, parent_step, resuming = _prepare(src, dst, rl, step)
    cfg = resolve_config(cfg)
    if rl.devices == "one":
        mesh_cfg = dataclasses.replace(cfg.mesh, data=1, fsdp=1, expert=1, tensor=1)
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    else:
        mesh_cfg = cfg.mesh
        mesh = sharding.make_mesh(mesh_cfg)
    cfg = cfg.replace(mesh=mesh_cfg)
    B = rl.prompts_per_step * rl.num_rollouts
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
    if B % shards:
        raise ConfigError(f"rl: prompts_per_step*num_rollouts={B} is not divisible by the "
                          f"data*fsdp*expert mesh size {shards} (or use devices='one')")
    setup = make_setup(cfg, mesh)
    task = make_task(rl.task, cfg.data)
    eval_exs = [ex for ex in pipeline.eval_prompts(task, min(rl.eval_examples, task.num_eval))
                if ex.answer]
    probe = [task.train_example(i) for i in range(64)] + eval_exs
    max_new = rl.max_new_tokens or generation_budget(probe, cfg.eval.max_new_tokens)

    ref_dir = os.path.join(dst, "reference")
    ckpt = Checkpointer(dst, keep_last=rl.keep_last, async_save=False)
    latest = ckpt.latest_step()
    with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules, mesh):
        if latest is not None:
            state, _ = ckpt.restore(latest, setup.abstract_state)
            with Checkpointer(ref_dir, create=False) as rc:
                ref_state, _ = rc.restore(0, setup.abstract_state)
            log(f"rl: resuming {dst} from step {latest}")
        else:
            parent_cfg = resolve_config(config_from_json(os.path.join(src, "config.json")))
            parent_cfg = parent_cfg.replace(mesh=mesh_cfg)
            parent_setup = make_setup(parent_cfg, mesh)
            with Checkpointer(src, create=False) as pc:
                pstate, _ = pc.restore(parent_step, parent_setup.abstract_state)

            def fresh(params, model_state):
                return {"params": params, "opt_state": setup.tx.init(params),
                        "model_state": model_state, "step": jnp.zeros((), jnp.int32)}

            state = jax.jit(fresh, out_shardings=setup.shardings)(pstate["params"],
                                                                   pstate["model_state"])
            del pstate
            if not os.path.isdir(os.path.join(ref_dir, "checkpoints")):
                write_checkpoint(ref_dir, 0, state, {"parent": os.path.abspath(src),
                                                     "parent_step": parent_step})
            ref_state = state
            log(f"rl: GRPO of {src}@{parent_step} into {dst} ({rl.task}, {rl.steps} steps)")
        ref_params = jax.tree.map(jnp.copy, ref_state["params"])
        ref_ms = jax.tree.map(jnp.copy, ref_state["model_state"])  # state is donated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # RL steps (rollout batches); the optimizer's own counter advances updates_per_batch
        # times per RL step
        start = int(latest) if latest is not None else 0
        step_fn = _step_jit(setup, rl, replicated)
        logp_jit = _logp_jit()

        def logp_fn(p, ms, t, v):
            return logp_jit(setup.graphdef, p, ms, t, v)
        if latest is None and os.path.exists(os.path.join(dst, "metrics.jsonl")):
            os.remove(os.path.join(dst, "metrics.jsonl"))  # killed before its first checkpoint
        writer = MetricsWriter(dst, resume_step=start if latest is not None else None)
        summary = {"rewards": []}
        if start == 0:
            acc0 = _greedy_accuracy(setup.graphdef, state["params"], state["model_state"], task,
                                    eval_exs, max_new)
            writer.write(0, {"eval_accuracy": acc0})
            log(f"rl: step 0 eval accuracy {acc0:.3f} ({len(eval_exs)} {rl.task} prompts)")
        last = rl.steps if max_steps is None else min(rl.steps, start + max_steps)
        s = start
        with Preempted() as preempt:
            while s < last:
                t0 = time.perf_counter()
                exs = [task.train_example(rl.seed * 1_000_003 + s * rl.prompts_per_step + j)
                       for j in range(rl.prompts_per_step)]
                prompts = [tok.encode(ex.prompt, add_bos=True) for ex in exs]
                rows = [p for p in prompts for _ in range(rl.num_rollouts)]
                width = PROMPT_BUCKET * math.ceil(max(map(len, rows)) / PROMPT_BUCKET)
                tokens, valid = gen.left_pad(rows, tok.pad_id)
                extra = width - tokens.shape[1]
                tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=tok.pad_id)
                valid = np.pad(valid, ((0, 0), (extra, 0)), constant_values=False)
                key = jax.random.fold_in(jax.random.key(rl.seed), s)
                resp = np.asarray(gen._generate_cached(
                    setup.graphdef, state["params"], state["model_state"], jnp.asarray(tokens),
                    jnp.asarray(valid), key, max_new_tokens=max_new,
                    temperature=float(rl.temperature), top_p=float(rl.top_p)))
                batch = build_batch(rows, resp.tolist(), width, tok.eos_id, tok.pad_id)
                texts = [tok.decode(r[:n]) for r, n in zip(resp.tolist(), batch["lengths"])]
                correct = np.array([task.check(x, exs[i // rl.num_rollouts])
                                    for i, x in enumerate(texts)], np.float32)
                fmt = np.array([format_ok(x, exs[i // rl.num_rollouts])
                                for i, x in enumerate(texts)], np.float32)
                reward = correct + rl.format_reward * fmt
                adv = group_advantages(reward.reshape(rl.prompts_per_step, rl.num_rollouts),
                                       rl.scale_rewards).reshape(-1)
                dev = {"tokens": jnp.asarray(batch["tokens"]),
                       "valid": jnp.asarray(batch["valid"])}
                dbatch = {**dev, "mask": jnp.asarray(batch["mask"]),
                          "adv_B1": jnp.asarray(adv)[:, None]}  # rank 2: batch sharding
                dbatch["ref_logp"] = (logp_fn(ref_params, ref_ms, *dev.values())
                                      if rl.kl_coef > 0 else jnp.zeros(batch["mask"].shape))
                if rl.updates_per_batch > 1:
                    dbatch["old_logp"] = logp_fn(state["params"], state["model_state"],
                                                 *dev.values())
                dbatch = jax.device_put(dbatch, setup.batch_sharding)
                ms = []
                for _ in range(rl.updates_per_batch):
                    state, m = step_fn(state, dbatch)
                    ms.append(m)
                s += 1
                m = {k: float(np.mean([local_values(x)[k] for x in ms])) for k in ms[0]}
                row = {"reward": float(reward.mean()), "accuracy": float(correct.mean()),
                       "format": float(fmt.mean()),
                       "response_length": float(batch["lengths"].mean()),
                       "solved_groups": float(np.mean(
                           correct.reshape(rl.prompts_per_step, -1).max(1))),
                       **m, "step_time": time.perf_counter() - t0}
                summary["rewards"].append(row["reward"])
                if s % rl.eval_every == 0 or s == rl.steps:
                    row["eval_accuracy"] = _greedy_accuracy(
                        setup.graphdef, state["params"], state["model_state"], task, eval_exs,
                        max_new)
                if s % rl.log_every == 0 or s == last or "eval_accuracy" in row:
                    writer.write(s, row)
                    log(f"rl step {s}/{rl.steps} reward {row['reward']:.3f} acc "
                        f"{row['accuracy']:.3f} kl {row['kl']:.2e} len "
                        f"{row['response_length']:.1f} clip {row['clip_fraction']:.3f}"
                        + (f" | eval acc {row['eval_accuracy']:.3f}" if "eval_accuracy" in row
                           else "") + f" | {row['step_time']:.2f}s")
                if s % rl.checkpoint_every == 0 or s == last or preempt.flag:
                    ckpt.save(s, state, meta={"step": s, "rl": True}, force=True)
                if preempt.flag:
                    log(f"rl: SIGTERM, saved step {s}")
                    break
    writer.close()
    ckpt.close()
    summary.update(step=s, steps=rl.steps, workdir=dst)
    return summary


def read_rl_metrics(workdir: str) -> list[dict]:

    return read_metrics(workdir)


def sweep_stage(run_dir: str, spec: dict) -> dict:
    """Sweep post stage {"kind": "moe_lab.rl.grpo:sweep_stage", "to": "grpo",
    "config": "configs/grpo.py", <GRPOConfig keys>...}: GRPO from the run's last
    checkpoint into RUN/<to> (resumable), then columns grpo_accuracy (greedy exact
    match on the task's eval prompts after GRPO), grpo_accuracy_before, grpo_reward_first /
    _last (mean over the first / last 5 steps), grpo_kl, grpo_steps, grpo_task."""
    extra = {k: v for k, v in spec.items() if k not in ("kind", "to", "config", "step")}
    rl = load_grpo_config(spec.get("config"), extra)
    dst = os.path.join(run_dir, spec.get("to", "grpo"))
    run_grpo(run_dir, dst, rl, step=spec.get("step"))
    rows = read_rl_metrics(dst)
    evals = [r for r in rows if "eval_accuracy" in r]
    rewards = [r["reward"] for r in rows if "reward" in r]
    kls = [r["kl"] for r in rows if "kl" in r]
    return {"grpo_task": rl.task, "grpo_steps": rl.steps,
            "grpo_accuracy_before": evals[0]["eval_accuracy"] if evals else None,
            "grpo_accuracy": evals[-1]["eval_accuracy"] if evals else None,
            "grpo_reward_first": float(np.mean(rewards[:5])) if rewards else None,
            "grpo_reward_last": float(np.mean(rewards[-5:])) if rewards else None,
            "grpo_kl": kls[-1] if kls else None}
