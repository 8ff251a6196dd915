"""Pure train and eval steps: (graphdef, state, batch) -> (state, metrics).

`state` is a plain pytree {"params", "opt_state", "model_state", "step"}:
params and model_state are pure nested dicts (nnx.State.to_pure_dict()), so
the same tree is what Orbax saves and what the growth transforms rewrite.
`model_state` holds non-trainable variables (the sigmoid router's selection
bias, DeepSeek-V3 loss-free balancing; MoR token choice's depth bias and warm-up
counter): after each step the layers' own update rules (layers/moe.py,
layers/recursion_routing.py) are applied at their paths (models/tree.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_lab.config.schema import Config
from moe_lab.data.pipeline import BATCH_FIELDS
from moe_lab.layers import recursion_routing as rr
from moe_lab.layers.moe import router_bias_after_step
from moe_lab.models import tree
from moe_lab.models.recursive import recursion_schedule
from moe_lab.models.transformer import total_aux_loss

# Per-layer MoE aux entries summarised in metrics (mean over layers; max for violation).
_MOE_SCALARS = ("load_balance_loss", "z_loss", "drop_fraction", "router_entropy", "max_violation")


def forward(graphdef, params, model_state, batch, *, train: bool, rng=None):
    model = nnx.merge(graphdef, params, model_state)
    return model(batch["inputs"], batch["positions"], batch["segment_ids"], train=train, rng=rng)


def token_losses(logits_BTV, targets_BT):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


def per_task_sums(values_BT, weights_BT, task_ids_BT, num_tasks: int):
    """(sum of value*weight, sum of weight) per task id."""
    flat_ids = task_ids_BT.reshape(-1)
    num = jax.ops.segment_sum((values_BT * weights_BT).reshape(-1), flat_ids, num_tasks)
    den = jax.ops.segment_sum(weights_BT.reshape(-1), flat_ids, num_tasks)
    return num, den


def moe_metrics(aux: dict, per_layer: bool) -> dict:
    """Load, drops, entropy and aux losses from the stacked per-layer aux dicts of
    every stack, averaged over layers (and MoR applications) weighted by the tokens
    each counted: a recursion step that ran few tokens weighs little, one that ran
    none not at all.  max_violation is the worst layer's."""
    out, rows = {}, []
    for stack, a in aux.items():
        if "tokens_per_expert_E" not in a:
            continue
        rows.append(a)
        if per_layer:
            for k in _MOE_SCALARS:
                out[f"moe/{stack}/{k}_L"] = a[k]
            out[f"moe/{stack}/tokens_per_expert_LE"] = a["tokens_per_expert_E"]
    if not rows:
        return out
    cat = {
        k: jnp.concatenate([a[k] for a in rows], axis=0)
        for k in (*_MOE_SCALARS, "tokens_per_expert_E", "num_tokens")
    }
    w_L = cat["num_tokens"]
    total = jnp.maximum(jnp.sum(w_L), 1.0)
    for k in _MOE_SCALARS:
        out[f"moe/{k}"] = (
            jnp.max(jnp.where(w_L > 0, cat[k], -jnp.inf))
            if k == "max_violation"
            else jnp.sum(cat[k] * w_L) / total
        )
    out["moe/tokens_per_expert_E"] = jnp.sum(cat["tokens_per_expert_E"] * w_L[:, None], 0) / total
    return out


# MoR scalars summarised in metrics (aux["mor"], see models/recursive.py).
_MOR_KEYS = (
    "mean_depth",
    "depth_hist",
    "dead_token_ratio",
    "sampling_accuracy",
    "bce_loss",
    "z_loss",
    "balance_loss",
    "max_violation",
    "tokens_per_depth_R",
    "aux_loss",
)


def mor_metrics(aux: dict) -> dict:
    """Mixture-of-Recursions metrics: depth histogram (fraction of tokens that took
    0..N_r recursion steps), dead-token ratio, sampling accuracy, MaxVio, aux losses."""
    a = aux.get("mor")
    if not a:
        return {}
    return {f"mor/{k}": a[k] for k in _MOR_KEYS if k in a}


def update_mor_state(model_state: dict, aux: dict, rate: float) -> dict:
    """MoR token choice: the loss-free depth bias and the warm-up step counter after a
    step (non-trainable model_state, like update_router_biases)."""
    updates = (
        (tree.DEPTH_BIAS, lambda b: rr.depth_bias_after_step(b, aux["mor"], rate)),
        (tree.STEPS_SEEN, rr.steps_seen_after_step),
    )
    new = model_state
    for name, after_step in updates:
        value = tree.get(model_state, tree.mor_path(name))
        if value is not None:
            new = tree.replace(new, tree.mor_path(name), after_step(value))
    return new


def update_router_biases(
    model_state: dict, aux: dict, rate: float, shared_pool_ids: tuple[int, ...] | None = None
) -> dict:
    """Loss-free balancing of every stack's sigmoid routers (moe.router_bias_after_step).

    Plain stacks: a stack's [L, E] biases get one row of aux[stack] per layer.  A
    recursive stack keeps its stacks under model_state["recursive"], and its shared
    pool's aux has a row per layer *application*: `shared_pool_ids[i]` is the pool
    layer of row i (Schedule.applications).
    """
    new = model_state
    for stack in tree.stack_paths(model_state):
        name, path = stack[-1], tree.router_bias_path(stack)
        bias_LE = tree.get(model_state, path)
        if bias_LE is None or name not in aux:
            continue
        pool = stack == (tree.RECURSIVE, tree.SHARED_POOL)
        if pool and (
            shared_pool_ids is None or len(shared_pool_ids) != aux[name]["tokens_per_expert_E"].shape[0]
        ):
            raise ValueError(
                "update_router_biases: a recursive stack's shared pool needs "
                "the pool layer of each aux row (shared_pool_ids)"
            )
        new = tree.replace(
            new, path, router_bias_after_step(bias_LE, aux[name], rate, shared_pool_ids if pool else None)
        )
    return new


def merge_microbatch_aux(aux_M: dict) -> dict:
    """The layers' aux of a batch from its microbatches' (every leaf stacked on a
    leading [M] axis): token counts add, the worst violation is the max, every other
    entry (load fractions, losses, histograms) is the mean over microbatches,
    weighted by the tokens each counted where the dict has `num_tokens` (a recursion
    step that ran few tokens in one slice weighs little)."""
    out = {}
    for name, value in aux_M.items():
        if isinstance(value, dict):
            out[name] = merge_microbatch_aux(value)
        elif name == "num_tokens":
            out[name] = jnp.sum(value, axis=0)
        elif name == "max_violation":
            out[name] = jnp.max(value, axis=0)
        elif "num_tokens" in aux_M and aux_M["num_tokens"].shape == value.shape[: aux_M["num_tokens"].ndim]:
            w = aux_M["num_tokens"].reshape(
                aux_M["num_tokens"].shape + (1,) * (value.ndim - aux_M["num_tokens"].ndim)
            )
            out[name] = jnp.sum(value * w, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1.0)
        else:
            out[name] = jnp.mean(value, axis=0)
    return out


def loss_weights(batch, loss_on: str, eos_id: int | None) -> jax.Array:
    """[B, T] weights of the training loss: every real token (all), or the completion
    tokens (answer_mask) and the EOS target right after a completion (completion: SFT;
    the model learns where to stop)."""
    w_BT = batch["weights"]
    if loss_on == "all":
        return w_BT
    ans_BT = batch["answer_mask"]
    prev_BT = jnp.pad(ans_BT[:, :-1], ((0, 0), (1, 0)))
    stop_BT = prev_BT * (batch["targets"] == eos_id) if eos_id is not None else 0.0
    return w_BT * jnp.maximum(ans_BT, stop_BT)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    cfg: Config,
    num_tasks: int,
    schedule: Callable,
    eos_id: int | None = None,
) -> Callable:
    """eos_id: the tokenizer's EOS (train.loss_on="completion" counts it after a completion)."""
    per_layer = cfg.model.ffn == "moe" and cfg.model.moe.metrics == "per_layer"
    shared_pool_ids = None
    if cfg.model.stack == "recursive":  # pool layer of each row of aux["shared"]
        shared_pool_ids = recursion_schedule(
            cfg.model.num_layers, cfg.model.mor.num_recursions, cfg.model.mor.sharing
        ).applications
    seed = cfg.train.seed + 1

    microbatches = cfg.train.microbatches

    def loss_fn(params, model_state, batch, rng, w_total=None):
        """w_total: the whole batch's loss weight when `batch` is one of its
        microbatches (the LM loss is then this slice's share of the batch's mean, and
        the aux losses a 1/microbatches share of their average)."""
        logits_BTV, aux = forward(graphdef, params, model_state, batch, train=True, rng=rng)
        ce_BT = token_losses(logits_BTV, batch["targets"])
        w_BT = loss_weights(batch, cfg.train.loss_on, eos_id)
        aux_loss = total_aux_loss(aux)
        if w_total is None:
            lm_loss = jnp.sum(ce_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)
            return lm_loss + aux_loss, (lm_loss, aux_loss, ce_BT, aux)
        lm_part = jnp.sum(ce_BT * w_BT) / w_total
        return lm_part + aux_loss / microbatches, (lm_part, aux_loss, ce_BT, aux)

    def accumulated_grads(params, model_state, batch, rng):
        """Gradient accumulation over `microbatches` slices of the batch (lax.scan:
        one microbatch's activations live at a time).  The LM loss of each slice is
        its sum over the whole batch's weight, so the summed gradients are exactly the
        full batch's; the aux losses (balance, z-loss) are each slice's own, averaged
        (as MaxText's gradient accumulation does: they are batch statistics)."""
        w_total = jnp.maximum(jnp.sum(loss_weights(batch, cfg.train.loss_on, eos_id)), 1.0)
        b = batch["inputs"].shape[0]
        # microbatch j = rows j, j + M, j + 2M, ...: every slice spans every batch shard
        slices = {
            k: jnp.swapaxes(v.reshape(b // microbatches, microbatches, *v.shape[1:]), 0, 1)
            for k, v in batch.items()
        }

        def body(grads_acc, xs):
            mb, i = xs
            (total, (lm_part, aux_loss, ce_BT, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, mb, jax.random.fold_in(rng, i), w_total
            )
            num, den = per_task_sums(ce_BT, mb["weights"], mb["task_ids"], num_tasks)
            return jax.tree.map(jnp.add, grads_acc, grads), (total, lm_part, aux_loss, num, den, aux)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (total_M, lm_M, aux_loss_M, num_M, den_M, aux_M) = jax.lax.scan(
            body, zeros, (slices, jnp.arange(microbatches))
        )
        sums = (jnp.sum(total_M), jnp.sum(lm_M), jnp.mean(aux_loss_M), num_M.sum(0), den_M.sum(0))
        return sums, merge_microbatch_aux(aux_M), grads

    def train_step(state, batch):
        # the key is made inside the trace: an eager key would run on the host's default
        # device, which an AOT compile for another platform (moe-lab compile) cannot use
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        if microbatches == 1:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (total, (lm_loss, aux_loss, ce_BT, aux)), grads = grad_fn(
                state["params"], state["model_state"], batch, rng
            )
            num, den = per_task_sums(ce_BT, batch["weights"], batch["task_ids"], num_tasks)
        else:
            (total, lm_loss, aux_loss, num, den), aux, grads = accumulated_grads(
                state["params"], state["model_state"], batch, rng
            )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        model_state = state["model_state"]
        if cfg.model.ffn == "moe" and cfg.model.moe.router == "sigmoid":
            model_state = update_router_biases(
                model_state, aux, cfg.model.moe.bias_update_rate, shared_pool_ids
            )
        if cfg.model.stack == "recursive":
            model_state = update_mor_state(model_state, aux, cfg.model.mor.bias_update_rate)
        metrics = {
            "loss": lm_loss,
            "total_loss": total,
            "aux_loss": aux_loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "lr": schedule(state["step"]),
            "task_loss_sum": num,
            "task_weight_sum": den,
            "tokens": jnp.sum(batch["weights"]),
            **moe_metrics(aux, per_layer),
            **mor_metrics(aux),
        }
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "model_state": model_state,
            "step": state["step"] + 1,
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, num_tasks: int) -> Callable:
    """Sums for eval loss and task loss (NLL of answer tokens only), per task."""

    def eval_step(params, model_state, batch):
        logits_BTV, _ = forward(graphdef, params, model_state, batch, train=False)
        ce_BT = token_losses(logits_BTV, batch["targets"])
        loss_num, loss_den = per_task_sums(ce_BT, batch["weights"], batch["task_ids"], num_tasks)
        ans_w = batch["answer_mask"] * batch["weights"]
        ans_num, ans_den = per_task_sums(ce_BT, ans_w, batch["task_ids"], num_tasks)
        return {"loss_num": loss_num, "loss_den": loss_den, "answer_num": ans_num, "answer_den": ans_den}

    return eval_step


# ------------------------------------------------- the jitted steps (train and compile)

# the batch the pipeline yields (data/pipeline.py: BATCH_FIELDS): int32 ids, float32 masks
_FLOAT_FIELDS = ("weights", "answer_mask")


def batch_shapes(setup, batch_size: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global batch under the setup's batch sharding."""
    return {
        k: jax.ShapeDtypeStruct(
            (batch_size, seq_len),
            jnp.float32 if k in _FLOAT_FIELDS else jnp.int32,
            sharding=setup.batch_sharding,
        )
        for k in BATCH_FIELDS
    }


def replicated(mesh) -> jax.sharding.NamedSharding:
    """Metrics replicated: every host can read them without a cross-host gather."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def jit_train_step(setup, step_cfg: Config, graphdef, num_tasks: int, eos_id: int | None) -> Callable:
    """The jitted train step of `moe-lab train`, with the state's shardings in and out and
    the state donated.  `moe-lab compile` lowers this same function for a pod."""
    return jax.jit(
        make_train_step(graphdef, setup.tx, step_cfg, num_tasks, setup.schedule, eos_id),
        in_shardings=(setup.shardings, setup.batch_sharding),
        out_shardings=(setup.shardings, replicated(setup.mesh)),
        donate_argnums=0,
    )


def jit_eval_step(setup, num_tasks: int) -> Callable:
    """The jitted eval step of `moe-lab train` (and `moe-lab compile`)."""
    return jax.jit(make_eval_step(setup.graphdef, num_tasks), out_shardings=replicated(setup.mesh))
