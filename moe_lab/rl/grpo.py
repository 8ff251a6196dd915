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
masking as the decoder.  The objective is rl/objective.py; the run is a
`GRPOSteps` on the shared Trainer (train/trainer.py: step loop, metrics,
checkpoints, SIGTERM, resume).  NEWDIR is an ordinary run directory: config.json (the
parent's, with the train section describing the RL optimizer), checkpoints/,
metrics.jsonl (reward, accuracy, kl, response_length, ...), rl.json (the GRPO
config and the parent), reference/ (the frozen start for the KL term), so
`moe-lab eval --workdir NEWDIR` works on it and `moe-lab rl` on it resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from moe_lab.config.load import config_from_json, from_dict, load_grpo_config
from moe_lab.config.schema import Config, ConfigError, GRPOConfig
from moe_lab.config.validate import validate_grpo
from moe_lab.data import pipeline
from moe_lab.data.tasks.registry import make_task
from moe_lab.eval.generate import (
    generate_batched,
    generate_tokens,
    generation_budget,
    left_pad,
    prompt_width,
)
from moe_lab.parallel import sharding
from moe_lab.rl.objective import (
    build_batch,
    format_ok,
    group_advantages,
    make_grpo_step,
    token_logprobs,
)
from moe_lab.train.checkpoint import Checkpointer, resolve_step, write_checkpoint
from moe_lab.train.metrics import read_metrics
from moe_lab.train.run_dir import (
    CHECKPOINTS,
    config_path,
    keep_tokenizer,
    lineage_path,
    metrics_path,
    reference_dir,
    rl_path,
    run_tokenizer,
    write_json_atomic,
)
from moe_lab.train.state import make_setup, resolve_config, setup_on_devices
from moe_lab.train.trainer import Trainer, cached_jit, local_values

# -------------------------------------------------------------------- the run


def _rl_run_config(parent: Config, rl: GRPOConfig, name: str) -> Config:
    """The parent's config with a train section that describes the RL optimizer (so the
    checkpoints' optimizer state has the structure `make_setup` expects)."""
    t = dataclasses.replace(
        parent.train,
        steps=rl.steps,
        lr=rl.lr,
        schedule="constant",
        warmup_steps=rl.warmup_steps,
        weight_decay=rl.weight_decay,
        clip_norm=rl.clip_norm,
        b1=rl.b1,
        b2=rl.b2,
        log_every=rl.log_every,
        checkpoint_every=rl.checkpoint_every,
        keep_last=rl.keep_last,
        async_checkpoint=False,
        batch_size=rl.prompts_per_step * rl.num_rollouts,
    )
    ev = dataclasses.replace(parent.eval, at_end=False)
    return parent.replace(train=t, eval=ev, name=name)


_RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "checkpoint_every", "keep_last", "devices"}


def _prepare(src: str, dst: str, rl: GRPOConfig, step: int | None):
    """(run cfg, rl cfg, parent step, resuming) after checking/creating NEWDIR."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConfigError("rl: --to must differ from --from")
    rl_json = rl_path(dst)
    if os.path.isfile(rl_json):
        with open(rl_json) as f:
            info = json.load(f)
        old = from_dict(GRPOConfig, info["grpo"], "rl.")
        if os.path.abspath(src) != info["parent"]:
            raise ConfigError(f"rl: {dst} holds a GRPO run of {info['parent']}, not of {src}")
        diff = [
            f"{k}: {getattr(old, k)} -> {getattr(rl, k)}"
            for k in vars(old)
            if getattr(old, k) != getattr(rl, k) and k not in _RESUMABLE_CHANGES
        ]
        if diff:
            raise ConfigError(
                f"rl: {dst} holds a GRPO run with a different config "
                f"({'; '.join(diff)[:200]}); use a new --to"
            )
        cfg = config_from_json(config_path(dst))
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=rl.steps))
        write_json_atomic(config_path(dst), cfg.to_dict())
        write_json_atomic(rl_json, {**info, "grpo": dataclasses.asdict(rl)})
        return cfg, rl, int(info["parent_step"]), True
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConfigError(f"rl: --to {dst} exists and is not empty (and holds no GRPO run)")
    if not os.path.isfile(config_path(src)):
        raise ConfigError(f"rl: --from {src} holds no run (no config.json)")
    step = resolve_step(src, step, "rl")

    parent = config_from_json(config_path(src))
    make_task(rl.task, parent.data)  # an unknown task fails before anything is written
    cfg = _rl_run_config(parent, rl, f"{parent.name}-grpo")
    tok = run_tokenizer(src, parent)
    os.makedirs(dst, exist_ok=True)
    keep_tokenizer(dst, tok)
    write_json_atomic(config_path(dst), cfg.to_dict())
    write_json_atomic(lineage_path(dst), {"parent": os.path.abspath(src), "step": step, "transform": "grpo"})
    write_json_atomic(
        rl_json, {"grpo": dataclasses.asdict(rl), "parent": os.path.abspath(src), "parent_step": step}
    )
    return cfg, rl, step, False


def _greedy_accuracy(graphdef, params, model_state, task, examples, max_new: int, tok) -> float:
    prompts = [tok.encode(ex.prompt, add_bos=True) for ex in examples]
    out = generate_batched(
        graphdef,
        params,
        model_state,
        prompts,
        max_new,
        batch_size=min(32, len(prompts)),
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
    )
    return float(np.mean([task.check(tok.decode(o), ex) for o, ex in zip(out, examples)]))


class GRPOSteps:
    """GRPO on the Trainer (train/trainer.py): the batch of a step is rollouts of the
    current policy, scored and turned into advantages and reference log-probs; the
    update is `updates_per_batch` jitted GRPO steps on it; eval is greedy exact match
    on the task's eval prompts."""

    def __init__(self, rl: GRPOConfig, setup, task, eval_examples, max_new: int, ref_weights):
        self.rl, self.setup, self.task = rl, setup, task
        self.eval_examples, self.max_new = eval_examples, max_new
        self.ref_params, self.ref_model_state = ref_weights
        self.rewards: list[float] = []  # per step of this invocation (the command's summary)
        replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
        # everything the jitted functions close over: a resumed run or a sweep point
        # with the same model and objective in this process compiles nothing again
        loss_keys = ("clip_eps", "kl_coef", "loss_agg", "kl_estimator")
        key = (
            setup.graphdef,
            repr(setup.cfg.train),
            rl.updates_per_batch == 1,
            tuple(getattr(rl, k) for k in loss_keys),
            setup.mesh.shape_tuple,
            tuple(d.id for d in setup.mesh.devices.flat),
        )
        self.step_fn = cached_jit(
            "grpo",
            key,
            "step",
            lambda: jax.jit(
                make_grpo_step(setup.graphdef, setup.tx, rl),
                in_shardings=(setup.shardings, setup.batch_sharding),
                out_shardings=(setup.shardings, replicated),
                donate_argnums=0,
            ),
        )
        gd = setup.graphdef
        self.logp_fn = cached_jit(
            "grpo", key, "logp", lambda: jax.jit(lambda p, ms, t, v: token_logprobs(gd, p, ms, t, v)[0])
        )

    def batch(self, state, step: int) -> dict:
        """Rollouts of step `step` + 1: its prompts and sampling key are functions of
        (seed, step) only, so a resumed run repeats what an uninterrupted one does."""
        rl, P, G = self.rl, self.rl.prompts_per_step, self.rl.num_rollouts
        tok = self.setup.tokenizer
        exs = [self.task.train_example(rl.seed * 1_000_003 + step * P + j) for j in range(P)]
        rows = [tok.encode(ex.prompt, add_bos=True) for ex in exs for _ in range(G)]
        width = prompt_width(rows)
        tokens, valid = left_pad(rows, tok.pad_id, width)
        responses = generate_tokens(
            self.setup.graphdef,
            state["params"],
            state["model_state"],
            tokens,
            valid,
            jax.random.fold_in(jax.random.key(rl.seed), step),
            max_new_tokens=self.max_new,
            temperature=rl.temperature,
            top_p=rl.top_p,
        ).tolist()
        b = build_batch(rows, responses, width, tok.eos_id, tok.pad_id)
        texts = [tok.decode(r[:n]) for r, n in zip(responses, b["lengths"])]
        correct = np.array([self.task.check(x, exs[i // G]) for i, x in enumerate(texts)], np.float32)
        fmt = np.array([format_ok(x, exs[i // G]) for i, x in enumerate(texts)], np.float32)
        reward = correct + rl.format_reward * fmt
        adv = group_advantages(reward.reshape(P, G), rl.scale_rewards).reshape(-1)
        seqs = (jnp.asarray(b["tokens"]), jnp.asarray(b["valid"]))
        dev = {
            "tokens": seqs[0],
            "valid": seqs[1],
            "mask": jnp.asarray(b["mask"]),
            "adv_B1": jnp.asarray(adv)[:, None],
        }  # rank 2: the batch sharding applies
        dev["ref_logp"] = (
            self.logp_fn(self.ref_params, self.ref_model_state, *seqs)
            if rl.kl_coef > 0
            else jnp.zeros(b["mask"].shape)
        )
        if rl.updates_per_batch > 1:  # pi_old: the sampler, frozen for the batch
            dev["old_logp"] = self.logp_fn(state["params"], state["model_state"], *seqs)
        rollout = {
            "reward": float(reward.mean()),
            "accuracy": float(correct.mean()),
            "format": float(fmt.mean()),
            "response_length": float(b["lengths"].mean()),
            "solved_groups": float(np.mean(correct.reshape(P, G).max(1))),
        }
        return {"device": jax.device_put(dev, self.setup.batch_sharding), "rollout": rollout}

    def update(self, state, batch, step: int):
        metrics = []
        for _ in range(self.rl.updates_per_batch):
            state, m = self.step_fn(state, batch["device"])
            metrics.append(m)
        self.rewards.append(batch["rollout"]["reward"])
        return state, (metrics, batch["rollout"])

    def read(self, step: int, out):
        metrics, rollout = out
        host = [local_values(m) for m in metrics]
        return rollout, {k: float(np.mean([m[k] for m in host])) for k in host[0]}

    def row(self, step: int, host, step_time: float) -> dict:
        rollout, m = host
        return {**rollout, **m, "step_time": step_time}

    def message(self, step: int, row: dict, eta: float) -> str:
        return (
            f"rl step {step}/{self.rl.steps} reward {row['reward']:.3f} acc "
            f"{row['accuracy']:.3f} kl {row['kl']:.2e} len {row['response_length']:.1f} "
            f"clip {row['clip_fraction']:.3f}"
            + (f" | eval acc {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else "")
            + f" | {row['step_time']:.2f}s"
        )

    def evaluate(self, state, step: int) -> tuple[dict, str]:
        acc = _greedy_accuracy(
            self.setup.graphdef,
            state["params"],
            state["model_state"],
            self.task,
            self.eval_examples,
            self.max_new,
            self.setup.tokenizer,
        )
        return {"eval_accuracy": acc}, f"rl: step {step} eval accuracy {acc:.3f}"

    def meta(self, seconds_this_run: float) -> dict:
        return {"rl": True}


def _start_state(src: str, parent_step: int, setup, dst: str):
    """The policy's first state: the parent's weights with a fresh optimizer; the frozen
    reference for the KL term is written once to DST/reference."""
    parent_cfg = resolve_config(config_from_json(config_path(src))).replace(mesh=setup.cfg.mesh)
    with Checkpointer(src, create=False) as pc:  # read straight into the RL run's mesh
        parent_setup = make_setup(parent_cfg, setup.mesh, setup.tokenizer)
        pstate, _ = pc.restore(parent_step, parent_setup.abstract_state)

    def fresh(params, model_state):
        return {
            "params": params,
            "opt_state": setup.tx.init(params),
            "model_state": model_state,
            "step": jnp.zeros((), jnp.int32),
        }

    state = jax.jit(fresh, out_shardings=setup.shardings)(pstate["params"], pstate["model_state"])
    if not os.path.isdir(os.path.join(reference_dir(dst), CHECKPOINTS)):
        write_checkpoint(
            reference_dir(dst), 0, state, {"parent": os.path.abspath(src), "parent_step": parent_step}
        )
    return state


def run_grpo(
    src: str, dst: str, rl: GRPOConfig, *, step: int | None = None, max_steps: int | None = None, log=print
) -> dict:
    """GRPO from run `src` (checkpoint `step`, default latest) into `dst`; resumes a
    GRPO run already in `dst`.  `max_steps` stops after that many steps of this call."""
    rl = validate_grpo(rl)
    if jax.process_count() > 1:
        raise ConfigError("rl: multi-process GRPO is not supported yet (one host, many devices)")
    cfg, rl, parent_step, _ = _prepare(src, dst, rl, step)
    tok = run_tokenizer(dst, cfg)  # the parent's, copied into dst by _prepare
    cfg, setup = setup_on_devices(resolve_config(cfg, tok), rl.devices, tok)
    mesh = setup.mesh
    B = rl.prompts_per_step * rl.num_rollouts
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    if B % shards:
        raise ConfigError(
            f"rl: prompts_per_step*num_rollouts={B} is not divisible by the "
            f"data*fsdp*expert mesh size {shards} (or use devices='one')"
        )
    task = make_task(rl.task, cfg.data)
    eval_exs = [ex for ex in pipeline.eval_prompts(task, min(rl.eval_examples, task.num_eval)) if ex.answer]
    probe = [task.train_example(i) for i in range(64)] + eval_exs
    max_new = rl.max_new_tokens or generation_budget(probe, cfg.eval.max_new_tokens, tok)

    with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules, mesh):
        trainer = Trainer(
            dst,
            total_steps=rl.steps,
            log_every=rl.log_every,
            eval_every=rl.eval_every,
            checkpoint_every=rl.checkpoint_every,
            keep_last=rl.keep_last,
            async_save=False,
            merge_eval=True,
            log=log,
        )
        state, _ = trainer.restore(setup.abstract_state)
        if state is not None:
            with Checkpointer(reference_dir(dst), create=False) as rc:
                ref_state, _ = rc.restore(0, setup.abstract_state)
            log(f"rl: resuming {dst} from step {trainer.latest}")
        else:
            state = ref_state = _start_state(src, parent_step, setup, dst)
            log(f"rl: GRPO of {src}@{parent_step} into {dst} ({rl.task}, {rl.steps} steps)")
            if os.path.exists(metrics_path(dst)):
                os.remove(metrics_path(dst))  # killed before its first checkpoint
        # copies: the policy's state is donated to its step
        ref_weights = jax.tree.map(jnp.copy, (ref_state["params"], ref_state["model_state"]))
        steps = GRPOSteps(rl, setup, task, eval_exs, max_new, ref_weights)
        # RL steps count rollout batches (the checkpoint's step); the optimizer's own
        # counter advances updates_per_batch times per RL step
        start = trainer.latest or 0
        writer = trainer.open_metrics(start)
        if start == 0:
            ev, msg = steps.evaluate(state, 0)
            writer.write(0, ev)
            log(f"{msg} ({len(eval_exs)} {rl.task} prompts)")
        try:
            out = trainer.run(steps, state, start, max_steps=max_steps)
        finally:
            trainer.close()
    return {"rewards": steps.rewards, "step": out["step"], "steps": rl.steps, "workdir": dst}


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
    rows = read_metrics(dst)
    evals = [r for r in rows if "eval_accuracy" in r]
    rewards = [r["reward"] for r in rows if "reward" in r]
    kls = [r["kl"] for r in rows if "kl" in r]
    return {
        "grpo_task": rl.task,
        "grpo_steps": rl.steps,
        "grpo_accuracy_before": evals[0]["eval_accuracy"] if evals else None,
        "grpo_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "grpo_reward_first": float(np.mean(rewards[:5])) if rewards else None,
        "grpo_reward_last": float(np.mean(rewards[-5:])) if rewards else None,
        "grpo_kl": kls[-1] if kls else None,
    }
