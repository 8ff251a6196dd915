"""The GRPO objective and the rollout batch (DeepSeekMath, arXiv 2402.03300 sec. 4):
per-token log-probs from the model's own forward pass, the clipped objective with
the KL to the frozen start, the jittable update step, group-normalised
advantages, the format check and the batch layout of prompts + rollouts.  The
runner on the shared Trainer is rl/grpo.py; the formulas are in its docstring.

Dimension legend: B rollouts (prompts x G), S prompt + response slots, T = S - 1
targets, V vocab, P prompts, G rollouts per prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_lab.data.tasks.base import extract_answer
from moe_lab.data.tokenizer import EOS, THINK_END, THINK_START
from moe_lab.eval.generate import left_pad
from moe_lab.models.transformer import total_aux_loss

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


def grpo_loss(
    logp_BT,
    old_logp_BT,
    ref_logp_BT,
    adv_B,
    mask_BT,
    *,
    clip_eps: float,
    kl_coef: float,
    loss_agg: str = "sequence",
    kl_estimator: str = "k3",
):
    """The clipped GRPO objective (rl/grpo.py's docstring, step 4) -> (loss, metrics)."""
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
    metrics = {
        "pg_loss": jnp.sum(pg * mask) / total,
        "kl": jnp.sum(kl * mask) / total,
        "clip_fraction": jnp.sum(clipped) / total,
        "ratio": jnp.sum(ratio * mask) / total,
    }
    return loss, metrics


def make_grpo_step(graphdef, tx, rl):
    """state, batch -> (state, metrics); batch: tokens, valid [B, S], mask, ref_logp
    (and old_logp when updates_per_batch > 1) [B, S-1], adv_B1 [B, 1]."""
    on_policy = rl.updates_per_batch == 1

    def loss_fn(params, model_state, batch):
        logp, aux = token_logprobs(graphdef, params, model_state, batch["tokens"], batch["valid"])
        old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
        loss, m = grpo_loss(
            logp,
            old,
            batch["ref_logp"],
            batch["adv_B1"][:, 0],
            batch["mask"],
            clip_eps=rl.clip_eps,
            kl_coef=rl.kl_coef,
            loss_agg=rl.loss_agg,
            kl_estimator=rl.kl_estimator,
        )
        aux_loss = total_aux_loss(aux)
        return loss + aux_loss, {**m, "aux_loss": aux_loss, "loss": loss}

    def step(state, batch):
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["model_state"], batch
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        m["grad_norm"] = optax.tree.norm(grads)
        return {
            "params": params,
            "opt_state": opt_state,
            "model_state": state["model_state"],
            "step": state["step"] + 1,
        }, m

    return step


# ------------------------------------------------------------------ rollouts


def group_advantages(rewards_PG: np.ndarray, scale: bool = True) -> np.ndarray:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-4) per group g (a row); scale=False: no
    division (Dr. GRPO)."""
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
    body = text[: -len(EOS)]
    if example.working.startswith(THINK_START):
        if not body.startswith(THINK_START) or THINK_END not in body:
            return False
        body = body.split(THINK_END, 1)[1]
    return body.startswith(example.marker) and bool(extract_answer(body))


def build_batch(
    prompts: list[list[int]], responses: list[list[int]], width: int, eos_id: int, pad_id: int
) -> dict:
    """tokens/valid [B, W+N] (prompt left-padded to W, then the N generated tokens) and
    mask [B, W+N-1] over the targets that are response tokens up to and incl. EOS."""
    tok_p, val_p = left_pad(prompts, pad_id, width)
    resp = np.asarray(responses, np.int32)
    B, N = resp.shape
    lengths = np.array([(list(r).index(eos_id) + 1) if eos_id in r else N for r in resp.tolist()])
    tokens = np.concatenate([tok_p, resp], axis=1)
    valid = np.concatenate([val_p, np.ones((B, N), bool)], axis=1)
    mask = np.zeros((B, width + N - 1), bool)
    for b, n in enumerate(lengths):
        mask[b, width - 1 : width - 1 + n] = True
    return {"tokens": tokens, "valid": valid, "mask": mask, "lengths": lengths}
