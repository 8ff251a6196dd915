"""Mixture-of-Recursions routers: expert choice (one router per recursion step) and
token choice (one router picks each token's depth up front), with their losses.

Dimension legend: B batch, T time, D d_model, R recursion steps (N_r), H MLP-router
hidden size, k tokens kept at a step.

Paper: Bae et al. 2025, "Mixture-of-Recursions" (arXiv 2507.10524), sec. 2.2
(routing), sec. 2.3 (KV caching), appendix (auxiliary BCE loss / auxiliary router,
loss-free balancing).

Decode-time (causal) rule for expert choice, used everywhere a threshold is meant:
a candidate token is kept at step r iff its router logit z >= 0, i.e. sigmoid(z) >= 0.5,
i.e. the alpha-scaled score alpha*sigmoid(z) >= alpha/2 (for the tanh score the
same z >= 0 rule is its midpoint). Steps with capacity 1 keep every candidate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_lab.layers.base import param, router_matmul
from moe_lab.layers.routing import loss_free_bias_update


class StepCounter(nnx.Variable):
    """Train steps seen (token-choice warm-up); counted by `steps_seen_after_step`."""


def steps_seen_after_step(steps_seen: jax.Array) -> jax.Array:
    return steps_seen + 1


def router_hidden(d: int) -> int:
    """The MLP router's hidden width: 2 d, as the released code's MLPRouter
    (model/mor_model/util.py: Linear(d, 2d, bias=False), GELU, Linear(2d, out))."""
    return 2 * d


class StepRouters(nnx.Module):
    """Expert choice: one router per recursion step, logits z_r = router_r(h) (f32).

    linear: z = w_r . h (no bias, as in the paper); mlp: z = w2_r . gelu(W1_r h), hidden
    width router_hidden(d) = 2d, no biases (the released code's MLPRouter).
    """

    def __init__(self, d: int, num_steps: int, kind: str, init_std: float, *, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "linear":
            self.w_RD = param(rngs, (num_steps, d), (None, "embed"), std=init_std)
        else:
            h = router_hidden(d)
            self.w1_RDH = param(rngs, (num_steps, d, h), (None, "embed", None), std=init_std)
            self.w2_RH = param(rngs, (num_steps, h), (None, None), std=init_std)

    def __call__(self, h_BTD: jax.Array, r: int) -> jax.Array:
        if self.kind == "linear":
            return router_matmul(h_BTD, self.w_RD[r])
        hid = jax.nn.gelu(router_matmul(h_BTD, self.w1_RDH[r]))
        return router_matmul(hid, self.w2_RH[r])


def step_routers_for(leaves: dict, steps: list[int]) -> dict:
    """A StepRouters' parameters (a pure dict, every leaf with the step axis first)
    for a model whose step r uses the trained router steps[r] (test-time depth)."""
    return {name: np.asarray(w)[steps] for name, w in leaves.items()}


class DepthRouter(nnx.Module):
    """Token choice: one router on the first hidden state, logits over the R depths."""

    def __init__(self, d: int, num_steps: int, kind: str, init_std: float, *, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "linear":
            self.w_DR = param(rngs, (d, num_steps), ("embed", None), std=init_std)
        else:
            h = router_hidden(d)
            self.w1_DH = param(rngs, (d, h), ("embed", None), std=init_std)
            self.w2_HR = param(rngs, (h, num_steps), (None, None), std=init_std)

    def __call__(self, h_BTD: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return router_matmul(h_BTD, self.w_DR[...])
        return router_matmul(jax.nn.gelu(router_matmul(h_BTD, self.w1_DH[...])), self.w2_HR[...])


# ------------------------------------------------------------------ expert choice


def capacity_tokens(cap: float, seq_len: int) -> int:
    """k_r = floor(cap * T), static at trace time (at least 1, at most T): the released
    code's `max(1, int(capacity_factor * seq_len))`; the 1e-9 keeps a product that
    float arithmetic puts just under an integer (0.29 * 100) at that integer."""
    return min(seq_len, max(1, math.floor(cap * seq_len + 1e-9)))


def ec_gate(z_BT: jax.Array, func: str, alpha: float) -> jax.Array:
    """g = alpha * sigmoid(z) (default) or alpha * tanh(z)."""
    return alpha * (jnp.tanh(z_BT) if func == "tanh" else jax.nn.sigmoid(z_BT))


def ec_topk(z_BT: jax.Array, cand_BT: jax.Array, valid_BT: jax.Array, k: int):
    """Per-sequence top-k among the candidates (hierarchical filtering).

    Steps:
      1. non-candidates get -inf, padding candidates -1e30 (real tokens first)
      2. idx_Bk = top_k over T within each row
      3. idx_Bk sorted ascending: the kept tokens in causal order
    Returns (idx_Bk, sel_BT) with sel_BT the membership mask.
    """
    B, T = z_BT.shape
    score = jnp.where(cand_BT, jnp.where(valid_BT, z_BT, -1e30), -jnp.inf)
    _, idx_Bk = jax.lax.top_k(jax.lax.stop_gradient(score), k)
    idx_Bk = jnp.sort(idx_Bk, axis=-1).astype(jnp.int32)
    sel_BT = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], idx_Bk].set(True)
    return idx_Bk, sel_BT


def ec_threshold(z_BT: jax.Array, cand_BT: jax.Array) -> jax.Array:
    """Causal decode rule: keep a candidate iff sigmoid(z) >= 0.5 (z >= 0)."""
    return cand_BT & (z_BT >= 0)


def masked_mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def bce_with_logits(z, target):
    """Binary cross-entropy of sigmoid(z) against 0/1 targets (stable form)."""
    t = target.astype(jnp.float32)
    return jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z)))


# ------------------------------------------------------------------- token choice


def tc_route(z_BTR: jax.Array, func: str, bias_R, alpha: float):
    """Token choice: (depth_BT in 1..R, gate_BT, probs_BTR).

    Steps:
      1. probs = softmax(z) over the R depths (or sigmoid(z) per depth)
      2. depth = 1 + argmax(probs + bias) (bias: loss-free balancing, selection only)
      3. gate = alpha * probs[depth] (gradients reach the router through the gate)
    """
    probs = jax.nn.sigmoid(z_BTR) if func == "sigmoid" else jax.nn.softmax(z_BTR, axis=-1)
    choose = probs if bias_R is None else probs + bias_R
    d0_BT = jnp.argmax(jax.lax.stop_gradient(choose), axis=-1)
    gate_BT = alpha * jnp.take_along_axis(probs, d0_BT[..., None], axis=-1)[..., 0]
    return (d0_BT + 1).astype(jnp.int32), gate_BT, probs


def depth_bias_after_step(bias_R: jax.Array, mor_aux: dict, rate: float) -> jax.Array:
    """The token-choice depth bias after a train step: loss-free balancing,
    b_i += rate * sign(mean load - load_i) on the tokens per depth; held during the
    warm-up (every token is forced to full depth: the load says nothing)."""
    new_R = loss_free_bias_update(bias_R, mor_aux["tokens_per_depth_R"], rate)
    if "warming_up" in mor_aux:
        new_R = jnp.where(mor_aux["warming_up"] > 0, bias_R, new_R)
    return new_R


def tc_balance(probs_BTR, depth_BT, valid_BT):
    """(Switch-style loss R * sum_i f_i P_i, load_R fractions, MaxVio)."""
    R = probs_BTR.shape[-1]
    v = valid_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    onehot = jax.nn.one_hot(depth_BT - 1, R) * v[..., None]
    f_R = jnp.sum(onehot, axis=(0, 1)) / n
    p_R = jnp.sum(probs_BTR * v[..., None], axis=(0, 1)) / n
    loss = R * jnp.sum(jax.lax.stop_gradient(f_R) * p_R)
    mean = jnp.mean(f_R)
    maxvio = (jnp.max(f_R) - mean) / jnp.maximum(mean, 1e-9)
    return loss, f_R, maxvio
