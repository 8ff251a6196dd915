"""MoE routers, router auxiliary losses and loss-free bias balancing.

Dimension legend: N tokens (= B*T), D d_model, E experts, K top-k, C capacity
(tokens per expert), A = N*K assignments.

Routers turn float32 router logits `logits_NE` into a routing decision:

* token choice (each token picks K experts): `TokenChoice(expert_NK, gate_NK, probs_NE)`
* expert choice (each expert picks C tokens): `ExpertChoice(token_EC, gate_EC, probs_NE)`

`probs_NE` is the routing probability distribution used for the load-balance
loss and the router entropy metric.  Selection (top-k) is not differentiable;
gradients reach the router through the gate values only.

Papers: Switch Transformer (Fedus et al. 2021, arXiv 2101.03961: load-balance
loss eq. 4-6, jitter); ST-MoE (Zoph et al. 2022, arXiv 2202.08906: router z-loss
eq. 5); Mixtral (Jiang et al. 2024, arXiv 2401.04088); DeepSeek-V3 (arXiv
2412.19437, sec. 2.1.2: sigmoid scores, auxiliary-loss-free balancing bias);
Expert Choice (Zhou et al. 2022, arXiv 2202.09368).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.parallel.sharding import LOGICAL_AXES_KEY


class RouterBias(nnx.Variable):
    """Selection-only expert bias of the sigmoid router (DeepSeek-V3 loss-free balancing).

    Not an `nnx.Param`: the optimizer never sees it; after each train step it
    moves by `loss_free_bias_update` from the observed per-expert load
    (layers/moe.py: router_bias_after_step).
    """


def make_router_bias(num_experts: int) -> RouterBias:
    return RouterBias(jnp.zeros((num_experts,), jnp.float32), **{LOGICAL_AXES_KEY: (None,)})


def loss_free_bias_update(bias_E: jax.Array, tokens_per_expert_E: jax.Array, rate: float) -> jax.Array:
    """b_i += rate * sign(mean_load - load_i)  (DeepSeek-V3 sec. 2.1.2; MoR uses rate 1e-3).

    Overloaded experts get a lower selection bias, idle ones a higher one.
    `tokens_per_expert_E` may be counts or fractions (only its sign pattern
    against its mean matters); it may carry leading (e.g. layer) axes.
    """
    load = tokens_per_expert_E.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return (bias_E + rate * jnp.sign(mean - load)).astype(bias_E.dtype)


class TokenChoice(NamedTuple):
    expert_NK: jax.Array  # int32 expert ids, distinct per token
    gate_NK: jax.Array  # float32 combine weights
    probs_NE: jax.Array  # float32 routing distribution (rows sum to 1)


class ExpertChoice(NamedTuple):
    token_EC: jax.Array  # int32 token ids chosen by each expert
    gate_EC: jax.Array  # float32 combine weights
    probs_NE: jax.Array


class TopKSoftmaxRouter:
    """Mixtral router: top-k of the logits, softmax over the k (arXiv 2401.04088, eq. 1-2).

    Steps:
      1. expert_NK, top_logits_NK = top_k(logits_NE, K)
      2. gate_NK = softmax(top_logits_NK) over the K (gates always sum to 1)
      3. probs_NE = softmax(logits_NE) over all E (for balance loss / entropy)
    """

    def __call__(self, logits_NE, bias_E, *, top_k: int, renormalize: bool) -> TokenChoice:
        top_NK, expert_NK = jax.lax.top_k(logits_NE, top_k)
        return TokenChoice(
            expert_NK.astype(jnp.int32), jax.nn.softmax(top_NK, axis=-1), jax.nn.softmax(logits_NE, axis=-1)
        )


class SoftmaxTopKRouter:
    """Switch/GShard router: softmax over all experts, then top-k (arXiv 2101.03961 eq. 1).

    Steps:
      1. probs_NE = softmax(logits_NE) over E
      2. gate_NK, expert_NK = top_k(probs_NE, K)
      3. if renormalize and K > 1: gate_NK /= sum_k gate_NK (otherwise gates sum to < 1)

    At K = 1 the gate stays the raw probability p (Switch eq. 2): renormalised it
    would be p / p = 1 for every token, and the router would get no gradient from
    the LM loss, only from the auxiliary losses.
    """

    def __call__(self, logits_NE, bias_E, *, top_k: int, renormalize: bool) -> TokenChoice:
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
        gate_NK, expert_NK = jax.lax.top_k(probs_NE, top_k)
        if renormalize and top_k > 1:
            gate_NK = gate_NK / jnp.sum(gate_NK, axis=-1, keepdims=True)
        return TokenChoice(expert_NK.astype(jnp.int32), gate_NK, probs_NE)


class SigmoidRouter:
    """DeepSeek-V3 router: sigmoid affinities, biased selection (arXiv 2412.19437 eq. 12-16).

    Steps:
      1. scores_NE = sigmoid(logits_NE)
      2. expert_NK = top_k(scores_NE + bias_E, K)  -- the bias only steers selection
      3. gate_NK = scores_NE[expert_NK]  (unbiased scores)
      4. if renormalize and K > 1: gate_NK /= sum_k gate_NK (at K = 1 it would be 1
         for every token, cutting the router off from the LM loss)
      5. probs_NE = scores_NE / sum_e scores_NE (for balance loss / entropy)
    """

    def __call__(self, logits_NE, bias_E, *, top_k: int, renormalize: bool) -> TokenChoice:
        scores_NE = jax.nn.sigmoid(logits_NE)
        biased_NE = scores_NE if bias_E is None else scores_NE + bias_E.astype(jnp.float32)
        _, expert_NK = jax.lax.top_k(jax.lax.stop_gradient(biased_NE), top_k)
        gate_NK = jnp.take_along_axis(scores_NE, expert_NK, axis=-1)
        if renormalize and top_k > 1:
            gate_NK = gate_NK / jnp.sum(gate_NK, axis=-1, keepdims=True)
        probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
        return TokenChoice(expert_NK.astype(jnp.int32), gate_NK, probs_NE)


class ExpertChoiceRouter:
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368 sec. 3.2; flaxformer).

    Steps:
      1. probs_NE = softmax(logits_NE) over experts, per token
      2. C = ceil(capacity_factor * N * K / E), K acting as the average number of
         experts per token (paper: k = n*c/e), capped at N
      3. for each expert: gate_EC, token_EC = top_k(probs_NE[:, e], C) over tokens
      4. output of token n = sum over the (e, c) with token_EC = n of gate_EC * expert_e(x_n)

    Look-ahead: step 3 ranks all N = B*T tokens of the batch together, so a
    token's routing depends on other sequences and on future positions.  Fine
    for training and scoring; autoregressive decoding needs a causal
    approximation (e.g. the MoR auxiliary-router trick), not provided here.
    Every expert takes exactly C tokens, so load is balanced by construction;
    a token may get 0..E experts.
    """

    def __call__(self, logits_NE, *, capacity: int) -> ExpertChoice:
        probs_NE = jax.nn.softmax(logits_NE, axis=-1)
        gate_EC, token_EC = jax.lax.top_k(probs_NE.T, capacity)
        return ExpertChoice(token_EC.astype(jnp.int32), gate_EC, probs_NE)


TOKEN_CHOICE_ROUTERS = {
    "topk_softmax": TopKSoftmaxRouter(),
    "softmax_topk": SoftmaxTopKRouter(),
    "sigmoid": SigmoidRouter(),
}


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * N * K / E), at least 1 and at most N (distinct tokens)."""
    return int(max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts))))


def jitter(x_ND: jax.Array, eps: float, rng: jax.Array) -> jax.Array:
    """Multiplicative uniform(1-eps, 1+eps) noise on router inputs (Switch Transformer sec. 2.4)."""
    noise = jax.random.uniform(rng, x_ND.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return x_ND * noise


def router_aux(
    logits_NE: jax.Array,
    probs_NE: jax.Array,
    load_E: jax.Array,
    *,
    balance: bool,
    drop_fraction: jax.Array,
    aux_loss_weight: float,
    z_loss_weight: float,
    mask_N: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The aux dict (all float32; same keys for every router so layers can be scanned).

    load_E: assignments per expert BEFORE capacity drops (counts), of the tokens in
    mask_N (all if None); the means below are over those tokens too.
    - tokens_per_expert_E = f_i = load_i / sum(load)  (sums to 1)
    - load_balance_loss = E * sum_i f_i * P_i, P_i = mean_n probs_NE  (Switch eq. 4-6;
      1 at perfect balance); 0 when `balance` is False (expert choice is balanced
      by construction).  Normalisation for k > 1: f_i over the N*K assignments, as
      Megatron-LM and MegaBlocks do (1 at balance); HF Mixtral and MaxText count
      f over tokens per choice, which is K times larger, so their weight w
      corresponds to K*w here.
    - z_loss = mean_n logsumexp(logits_n)^2  (ST-MoE eq. 5)
    - router_entropy = mean_n -sum_e p log p
    - max_violation = max_i load_i / mean_i load_i - 1  (MaxVio, arXiv 2408.15664)
    """
    num_experts = logits_NE.shape[-1]
    f_E = load_E.astype(jnp.float32) / jnp.maximum(jnp.sum(load_E).astype(jnp.float32), 1.0)
    # means over the tokens that count (mask_N: e.g. those a recursion step really runs)
    w_N = jnp.ones(logits_NE.shape[:1], jnp.float32) if mask_N is None else mask_N.astype(jnp.float32)

    def mean_n(v_N):
        return jnp.sum(v_N * w_N) / jnp.maximum(jnp.sum(w_N), 1.0)

    p_E = jnp.sum(probs_NE * w_N[:, None], axis=0) / jnp.maximum(jnp.sum(w_N), 1.0)
    lb = num_experts * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)
    lb = lb if balance else jnp.zeros((), jnp.float32)
    z = mean_n(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1)))
    plogp = jnp.where(probs_NE > 0, probs_NE * jnp.log(jnp.where(probs_NE > 0, probs_NE, 1.0)), 0.0)
    entropy = -mean_n(jnp.sum(plogp, axis=-1))
    max_violation = num_experts * jnp.max(f_E) - 1.0
    return {
        "aux_loss": (aux_loss_weight * lb + z_loss_weight * z).astype(jnp.float32),
        "load_balance_loss": lb.astype(jnp.float32),
        "z_loss": z.astype(jnp.float32),
        "tokens_per_expert_E": f_E,
        "drop_fraction": jnp.asarray(drop_fraction, jnp.float32),
        "router_entropy": jax.lax.stop_gradient(entropy).astype(jnp.float32),
        "max_violation": jax.lax.stop_gradient(max_violation).astype(jnp.float32),
        # tokens these statistics are over: weights for averaging layers / applications
        "num_tokens": jax.lax.stop_gradient(jnp.sum(w_N)),
    }
