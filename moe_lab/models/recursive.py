"""Mixture-of-Recursions stack (MoR, Bae et al. 2025, arXiv 2507.10524).

Dimension legend: B batch, T time, D d_model, R recursion steps (N_r), k tokens
kept at a step, n layer applications per step, P shared-pool layers, S cache
slots, G kv heads, K head dim.

Structure: [first] -> shared step x R -> [last].  The shared layers are ONE
ScannedStack (`shared`, P layers stacked on axis 0); recursion step r applies
the pool layers `schedule.steps[r]` (a static index list) by lax.scan, so the
same variables are used R times and stored once.  Sharing strategies for L
layers (paper sec. 2.1): cycle (layer l -> pool[l mod L/R]), sequence
(pool[floor(l/R)]), middle_* (first and last layers unique, the middle L-2
shared the same way); step r is the r-th slice of n = L_shared/R applications.

Routing (the hidden state h entering step r; tokens not kept pass unchanged; f is
the whole step, residuals included, as the paper's h^{l+1} = f(h^l) and the released
code's LlamaDecoderLayer):
  none           every token takes every step: h <- f(h) (fixed-depth baseline)
  expert_choice  router_r scores z; keep the top k_r = floor(cap_r T) of the
                 tokens kept at step r-1 (per sequence), gather them in causal
                 order, run f on them with attention among kept tokens at their
                 ORIGINAL positions (RoPE) / order / segments, scatter back:
                   add (default):  h <- h + g f(h)          g = alpha sigmoid(z)
                     (2507.10524 sec. 2.2.1 and the released code's scatter_add of
                     w * block(h); the capacity-1 first step is gated too)
                   interpolate:    h <- h + g (f(h) - h)    (moe_lab's rule before:
                     a gated interpolation, neither the paper's nor the released one)
                 Causal decoding: threshold z >= 0 (see layers/recursion_routing.py),
                 trained by an aux BCE loss vs top-k membership (or an aux router),
                 summed over every step as the released code does (the capacity-1
                 step, whose targets are all 1, included); the router z-loss too.
  token_choice   one router on the recursion's input H^1 picks depth d in 1..R;
                 step r runs f on the tokens with d >= r: the plain h <- f(h) before
                 a token's last step, and at it the output H^1 + g f^d(H^1) (sec.
                 2.2.1; released: `final_x = x.clone()`, then `final_x += w * f(x)` at
                 the exit step; interpolate: H^1 + g (f^d(H^1) - H^1)).  Implemented
                 dense: f runs on ALL T tokens and the update is masked (attention
                 is restricted to active tokens; MoE statistics count active
                 tokens only), so training costs a full-depth pass; the FLOP
                 accounting (flops.py) counts the routed work instead.

KV caching (sec. 2.3): recursion_wise - step r stores and attends to the KV of
tokens kept at step r only; shared - every step attends to step 1's KV (all
tokens take step 1), steps >= 2 compute queries only.  The training forward
uses the same attention pattern, so a trained model decodes as it was trained.

Fast paths and their references (tests/test_mor.py): expert choice gathers k_r
tokens (model.mor.expert_choice_impl = "gather"); "dense" is the masked reference (all
tokens, non-kept ones isolated by a private segment id and not updated). Threshold
routing at eval (train=False, eval_routing="threshold") uses the dense path,
which is what the no-cache reference decode runs.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.schema import ModelConfig, mor_capacities
from moe_lab.layers import recursion_routing as rr
from moe_lab.layers.attention import attention_mask, self_attention_mask
from moe_lab.layers.routing import make_router_bias
from moe_lab.models.blocks import ScannedStack, empty_cache


@dataclasses.dataclass(frozen=True)
class Schedule:
    first: bool
    last: bool
    pool: int  # P shared layers
    steps: tuple[tuple[int, ...], ...]  # pool indices applied at each recursion step

    @property
    def applications(self) -> tuple[int, ...]:
        """The pool layer of each shared-layer application, step-major: the rows of
        the shared pool's aux (aux["shared"]) in order."""
        return tuple(i for step in self.steps for i in step)


def recursion_schedule(num_layers: int, num_recursions: int, sharing: str) -> Schedule:
    middle = sharing.startswith("middle")
    shared = num_layers - 2 if middle else num_layers
    R = num_recursions
    pool = shared // R
    if sharing.endswith("cycle"):
        flat = [i % pool for i in range(shared)]
    else:
        flat = [i // R for i in range(shared)]
    steps = tuple(tuple(flat[r * pool : (r + 1) * pool]) for r in range(R))
    return Schedule(first=middle, last=middle, pool=pool, steps=steps)


def layer_sequence(num_layers: int, num_recursions: int, sharing: str) -> list[tuple[str, int]]:
    """The layer applied at each depth: ("first"|"shared"|"last", index in its stack)."""
    s = recursion_schedule(num_layers, num_recursions, sharing)
    seq = [("first", 0)] if s.first else []
    seq += [("shared", i) for i in s.applications]
    return seq + ([("last", 0)] if s.last else [])


def _concat_aux(auxes):
    auxes = [a for a in auxes if a]
    if not auxes:
        return {}
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *auxes)


class FinalStepGate(NamedTuple):
    """Token choice's gate (2507.10524 sec. 2.2.1, released code): a token chose its
    depth d up front; the steps before its last apply the block plainly, h <- f(h),
    and its last gives H^1 + g f(h) = H^1 + g f^d(H^1), from the recursion's input
    H^1 (first_BTD), not from the state the step started with."""

    gate_BT: jax.Array
    final_BT: jax.Array
    first_BTD: jax.Array


class RecursiveStack(nnx.Module):
    """[first] + the shared step applied N_r times with routed depth + [last].

    One forward (2507.10524 sec. 2; h^r_BTD the hidden state entering step r, f the
    shared step's layers with their residuals, g the router's gate):

      0. token choice only: one router on the recursion's input H^1 gives each token
         its depth d in 1..N_r, and the gate g = alpha * softmax(z)_d (sec. 2.2.1, eq.
         for token choice); loss-free bias / warm-up as configured.
      for r = 1 .. N_r:
      1. route (`_route_step`, shared with decoding): expert choice scores the
         candidates (the tokens kept at step r-1): z^r = router_r(h^r), g = alpha *
         sigmoid(z^r) (sec. 2.2.1, eq. 2); training keeps the top k_r = floor(cap_r T)
         per sequence, decoding keeps z >= 0 (causal), the BCE between the two trains
         the threshold.  Token choice keeps the tokens with d >= r.  none keeps all.
      2. run f on the kept tokens only: gathered in causal order at their original
         positions (`_gather_step`; attention among kept tokens), or all T tokens with
         the others masked out (`_dense_step`, the reference; token choice and the
         threshold path at eval run it).
      3. update the kept tokens, the others pass unchanged:
           add:          h^{r+1} = h^r + g f(h^r)        (the paper's, the released code's)
           interpolate:  h^{r+1} = h^r + g (f(h^r) - h^r)
         token choice: h <- f(h) before a token's last step, H^1 + g f^d(H^1) at it.
    Losses (summed over steps as the released code does): the BCE of the causal
    threshold (expert choice), router z-loss, token choice's balance loss.

    Optional parts are fields set to None when the config has none of them: `first`,
    `last` (middle_* sharing), `aux_router` (causal_aux = aux_router), `bias_R`
    (loss-free token-choice balance), `steps_seen` (token-choice warm-up).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        mor = cfg.mor
        R = mor.num_recursions
        self.cfg = cfg
        self.schedule = recursion_schedule(cfg.num_layers, R, mor.sharing)
        first_ffn = "dense" if (cfg.ffn == "moe" and cfg.moe.first_dense_layers) else cfg.ffn
        self.first = (
            ScannedStack(cfg, 1, first_ffn, rngs=rngs, scan_single=False) if self.schedule.first else None
        )
        self.shared = ScannedStack(cfg, self.schedule.pool, cfg.ffn, rngs=rngs)
        self.last = (
            ScannedStack(cfg, 1, cfg.ffn, rngs=rngs, scan_single=False) if self.schedule.last else None
        )
        # each attribute assigned once (NNX fixes whether it holds data or None then)
        router = aux_router = bias_R = steps_seen = None
        if mor.routing == "expert_choice":
            router = rr.StepRouters(cfg.d_model, R, mor.router_type, cfg.init_std, rngs=rngs)
            if mor.causal_aux == "aux_router":
                aux_router = rr.StepRouters(cfg.d_model, R, mor.router_type, cfg.init_std, rngs=rngs)
        elif mor.routing == "token_choice":
            router = rr.DepthRouter(cfg.d_model, R, mor.router_type, cfg.init_std, rngs=rngs)
            if mor.balance == "loss_free":
                bias_R = make_router_bias(R)
            if mor.warmup_steps:
                steps_seen = rr.StepCounter(jnp.zeros((), jnp.int32))
        self.router, self.aux_router, self.bias_R, self.steps_seen = (router, aux_router, bias_R, steps_seen)
        self.capacities = mor_capacities(cfg)

    # ------------------------------------------------------------- pieces

    def _func(self) -> str:
        f = self.cfg.mor.router_func
        return f or ("sigmoid" if self.cfg.mor.routing == "expert_choice" else "softmax")

    def _update(self, h_BTD, f_BTD, gate):
        """Step 3's update of the tokens a step ran (gate None: h <- f(h))."""
        if gate is None:
            return f_BTD
        if isinstance(gate, FinalStepGate):  # token choice: from H^1, at the last step only
            gated_BTD = self._gated(gate.first_BTD, f_BTD, gate.gate_BT)
            return jnp.where(gate.final_BT[..., None], gated_BTD, f_BTD)
        return self._gated(h_BTD, f_BTD, gate)

    def _gated(self, base_BTD, f_BTD, gate_BT):
        """The gated update from base: base + g f(h) (add) or base + g (f(h) - base)."""
        g_BT1 = gate_BT[..., None].astype(base_BTD.dtype)
        if self.cfg.mor.update == "interpolate":
            return base_BTD + g_BT1 * (f_BTD - base_BTD)
        return base_BTD + g_BT1 * f_BTD

    def _tc_warmup(self, depth_BT, gate_BT, probs_BTR):
        """Token-choice warm-up: every token at full depth R, gated by its probability
        of depth R (the released code gathers the gate at the forced depth)."""
        mor = self.cfg.mor
        warming = self.steps_seen[...] < mor.warmup_steps
        full_gate_BT = mor.token_choice_alpha * probs_BTR[..., -1]
        return (
            jnp.where(warming, mor.num_recursions, depth_BT),
            jnp.where(warming, full_gate_BT, gate_BT),
            warming,
        )

    def _tc_route(self, z_BTR):
        """Token choice from the depth logits -> (depth_BT, gate_BT, probs_BTR, warming or
        None): the loss-free bias steers the choice, the warm-up forces full depth."""
        bias_R = None if self.bias_R is None else self.bias_R[...]
        depth_BT, gate_BT, probs_BTR = rr.tc_route(
            z_BTR, self._func(), bias_R, self.cfg.mor.token_choice_alpha
        )
        warming = None
        if self.steps_seen is not None:
            depth_BT, gate_BT, warming = self._tc_warmup(depth_BT, gate_BT, probs_BTR)
        return depth_BT, gate_BT, probs_BTR, warming

    def _route_step(self, r, h_BTD, cand_BT, tc):
        """Step r's causal routing of the hidden state entering it, the one rule that
        training and decoding share -> (sel_BT, gate, z_BT, z_dec_BT).

        none: sel None (every token), no gate.  token choice (tc = (depth_BT, gate_BT,
        first_BTD), chosen up front on the recursion's input first_BTD): the tokens
        whose depth reaches step r, gated at their last (FinalStepGate).
        expert choice: gate from the step router's z; sel keeps the candidates with
        z_dec >= 0 (z_dec: the auxiliary router's logits where there is one), all of
        them at capacity 1.  z, z_dec (expert choice only, else None) are what
        training's top-k and losses need.
        """
        routing = self.cfg.mor.routing
        if routing == "none":
            return None, None, None, None
        if routing == "token_choice":
            depth_BT, gate_BT, first_BTD = tc
            return (depth_BT > r, FinalStepGate(gate_BT, depth_BT == r + 1, first_BTD), None, None)
        z_BT = self.router(h_BTD, r)
        gate_BT = rr.ec_gate(z_BT, self._func(), self.cfg.mor.alpha)
        z_dec_BT = z_BT
        if self.aux_router is not None:  # stop-gradient auxiliary router
            z_dec_BT = self.aux_router(jax.lax.stop_gradient(h_BTD), r)
        sel_BT = cand_BT if self.capacities[r] >= 1.0 else rr.ec_threshold(z_dec_BT, cand_BT)
        return sel_BT, gate_BT, z_BT, z_dec_BT

    def _layers(self, r, x_BTD, pos_BT, mask_BTS, *, kv_n=None, want_kv=False, train, rng, active_BT=None):
        """The pool layers of step r in order; returns (x, aux_n, kv_n or None).
        active_BT: the tokens this step really runs (MoE statistics count only them)."""
        return self.shared.run(
            x_BTD,
            pos_BT,
            mask_BTS,
            ids=self.schedule.steps[r],
            kv_n=kv_n,
            want_kv=want_kv,
            train=train,
            rng=rng,
            active_BT=active_BT,
        )

    def _dense_step(self, r, h_BTD, pos_BT, seg_BT, sel_BT, gate, kv_step1, *, train, rng):
        """All T tokens through f; only `sel_BT` tokens (all if None) are updated.

        Non-selected tokens get a private segment id, so selected ones never see them.
        Returns (h_BTD, aux, kv of step 1 under KV sharing else None).
        """
        B, T = h_BTD.shape[:2]
        shared_kv = self.cfg.mor.kv_cache == "shared"
        if shared_kv and r > 0:
            mask_BTT = self_attention_mask(seg_BT, (B, T))
            f_BTD, aux, _ = self._layers(
                r, h_BTD, pos_BT, mask_BTT, kv_n=kv_step1, train=train, rng=rng, active_BT=sel_BT
            )
            kv_out = None
        else:
            idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            seg_q_BT = seg_BT if sel_BT is None else jnp.where(sel_BT, seg_BT, -1 - idx_BT)
            mask_BTT = self_attention_mask(seg_q_BT, (B, T))
            f_BTD, aux, kv_out = self._layers(
                r,
                h_BTD,
                pos_BT,
                mask_BTT,
                want_kv=shared_kv and r == 0,
                train=train,
                rng=rng,
                active_BT=sel_BT,
            )
        new_BTD = self._update(h_BTD, f_BTD, gate)
        if sel_BT is not None:
            new_BTD = jnp.where(sel_BT[..., None], new_BTD, h_BTD)
        return new_BTD, aux, kv_out

    def _gather_step(self, r, h_BTD, pos_BT, seg_BT, idx_Bk, gate_BT, kv_step1, *, train, rng):
        """Only the k kept tokens (causal order, original positions) through f."""
        B, T = h_BTD.shape[:2]

        def take(a_BT_):
            ix = idx_Bk.reshape(idx_Bk.shape + (1,) * (a_BT_.ndim - 2))
            return jnp.take_along_axis(a_BT_, ix, axis=1)

        h_BkD, pos_Bk, seg_Bk, gate_Bk = take(h_BTD), take(pos_BT), take(seg_BT), take(gate_BT)
        if self.cfg.mor.kv_cache == "shared" and r > 0:
            idx_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            mask_BkT = attention_mask(idx_Bk, idx_BT, seg_Bk, seg_BT)
            f_BkD, aux, _ = self._layers(r, h_BkD, pos_Bk, mask_BkT, kv_n=kv_step1, train=train, rng=rng)
        else:
            mask_Bkk = attention_mask(idx_Bk, idx_Bk, seg_Bk, seg_Bk)
            f_BkD, aux, _ = self._layers(r, h_BkD, pos_Bk, mask_Bkk, train=train, rng=rng)
        new_BkD = self._update(h_BkD, f_BkD, gate_Bk)
        h_BTD = jax.vmap(lambda h_TD, i_k, n_kD: h_TD.at[i_k].set(n_kD))(h_BTD, idx_Bk, new_BkD)
        return h_BTD, aux

    # -------------------------------------------------------------- forward

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        """Returns (x_BTD, aux) with aux = {"first", "shared", "last", "mor"} (present ones)."""
        key = (lambda i: jax.random.fold_in(rng, i)) if rng is not None else (lambda i: None)
        aux = {}
        if self.first is not None:
            x_BTD, aux["first"] = self.first(x_BTD, positions_BT, segment_ids_BT, train=train, rng=key(0))
        x_BTD, aux["shared"], aux["mor"] = self._recurse(
            x_BTD, positions_BT, segment_ids_BT, train=train, rng=key(1)
        )
        if self.last is not None:
            x_BTD, aux["last"] = self.last(x_BTD, positions_BT, segment_ids_BT, train=train, rng=key(2))
        return x_BTD, aux

    def _recurse(self, h_BTD, pos_BT, seg_BT, *, train, rng):
        """The N_r steps (class docstring) -> (h_BTD, the shared pool's aux, MoR metrics
        and aux_loss)."""
        mor = self.cfg.mor
        R, routing = mor.num_recursions, mor.routing
        B, T = h_BTD.shape[:2]
        valid_BT = seg_BT > 0
        cand_BT = jnp.ones((B, T), bool)  # the tokens kept at the step before
        depth_BT = jnp.zeros((B, T), jnp.int32)
        kv_step1, shared_aux = None, []
        metrics = {}
        aux_loss = jnp.zeros((), jnp.float32)
        step_keys = jax.random.split(rng, R) if rng is not None else [None] * R
        tc = None
        if routing == "token_choice":  # step 0: every token's depth, up front
            z_BTR = self.router(h_BTD)
            tc_depth_BT, tc_gate_BT, probs_BTR, warming = self._tc_route(z_BTR)
            tc = (tc_depth_BT, tc_gate_BT, h_BTD)
            if warming is not None:  # no bias update while warming (train/step.py)
                metrics["warming_up"] = warming.astype(jnp.float32)
            balance, load_R, maxvio = rr.tc_balance(probs_BTR, tc_depth_BT, valid_BT)
            z_loss = rr.masked_mean(jnp.square(jax.nn.logsumexp(z_BTR, axis=-1)), valid_BT)
            if mor.balance == "loss":
                aux_loss += mor.balance_weight * balance
            aux_loss += mor.z_loss_weight * z_loss
            metrics.update(
                balance_loss=balance, z_loss=z_loss, tokens_per_depth_R=load_R, max_violation=maxvio
            )
        bce_per_step, z_loss_per_step, accuracy_per_step, kept_per_step = [], [], [], []
        for r in range(R):
            sel_BT, gate, z_BT, z_dec_BT = self._route_step(r, h_BTD, cand_BT, tc)
            idx_Bk = None
            live_BT = cand_BT & valid_BT
            target_BT = cand_BT  # capacity 1: every candidate is kept
            if z_BT is not None and self.capacities[r] < 1.0:  # expert choice, routed step
                # training keeps the top k_r (the paper); the causal threshold is what
                # decoding will run: its agreement with top-k and the aux BCE train it
                threshold_BT = sel_BT
                k = rr.capacity_tokens(self.capacities[r], T)
                idx_Bk, target_BT = rr.ec_topk(z_BT, cand_BT, valid_BT, k)
                accuracy_per_step.append(
                    rr.masked_mean((threshold_BT == target_BT).astype(jnp.float32), live_BT)
                )
                if train or mor.eval_routing == "topk":
                    sel_BT = target_BT
                else:
                    idx_Bk = None
            if z_BT is not None:  # per-step means over the candidates, summed over steps
                if mor.causal_aux != "none":
                    bce_per_step.append(rr.masked_mean(rr.bce_with_logits(z_dec_BT, target_BT), live_BT))
                z_loss_per_step.append(rr.masked_mean(jnp.square(z_BT), live_BT))
            if idx_Bk is not None and mor.expert_choice_impl == "gather":
                h_BTD, step_aux = self._gather_step(
                    r, h_BTD, pos_BT, seg_BT, idx_Bk, gate, kv_step1, train=train, rng=step_keys[r]
                )
            else:
                h_BTD, step_aux, kv_out = self._dense_step(
                    r, h_BTD, pos_BT, seg_BT, sel_BT, gate, kv_step1, train=train, rng=step_keys[r]
                )
                if r == 0:
                    kv_step1 = kv_out
            shared_aux.append(step_aux)
            if sel_BT is None:
                sel_BT = jnp.ones((B, T), bool)
            depth_BT += sel_BT.astype(jnp.int32)
            kept_per_step.append(sel_BT)
            cand_BT = sel_BT
        if routing == "expert_choice":
            # summed over every step, the capacity-1 first included, as the released
            # code (sampling_loss += per step); a mean would be N_r times weaker
            bce = sum(bce_per_step) if bce_per_step else jnp.zeros((), jnp.float32)
            z_loss = sum(z_loss_per_step)
            aux_loss += mor.bce_weight * bce + mor.z_loss_weight * z_loss
            accuracy = sum(accuracy_per_step) / len(accuracy_per_step) if accuracy_per_step else jnp.ones(())
            metrics.update(bce_loss=bce, z_loss=z_loss, sampling_accuracy=accuracy)
            any_kept_T = jnp.any(cand_BT & valid_BT, axis=0)
            any_valid_T = jnp.any(valid_BT, axis=0)
            metrics["dead_token_ratio"] = 1.0 - jnp.sum(any_kept_T) / jnp.maximum(jnp.sum(any_valid_T), 1)
        metrics["kept_RBT"] = jnp.stack(kept_per_step)  # per-step kept masks (tests, analysis)
        valid_f_BT = valid_BT.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(valid_f_BT), 1.0)
        metrics["depth_hist"] = jnp.stack([jnp.sum(valid_f_BT * (depth_BT == d)) / n for d in range(R + 1)])
        metrics["mean_depth"] = jnp.sum(valid_f_BT * depth_BT) / n
        metrics["aux_loss"] = aux_loss
        return h_BTD, _concat_aux(shared_aux), metrics

    # ------------------------------------------------------------- decoding

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        cfg = self.cfg
        c = {}
        if self.first is not None:
            c["first"] = self.first.init_cache(batch, max_len, dtype)
        if self.last is not None:
            c["last"] = self.last.init_cache(batch, max_len, dtype)
        # one buffer set per cached step (a tuple, not a stacked axis: slicing a step out
        # of a stacked buffer would copy it at every decode step)
        steps = cfg.mor.num_recursions if cfg.mor.kv_cache == "recursion_wise" else 1
        n = len(self.schedule.steps[0])
        c["shared"] = tuple(empty_cache((n,), batch, max_len, cfg, dtype) for _ in range(steps))
        return c

    def decode(self, x_BTD, positions_BT, valid_BT, cache: dict, index, *, stats: bool = False):
        """T new tokens -> (x_BTD, new cache); routing is causal (threshold / token choice).

        stats=True also returns the per-step kept masks [R, B, T] (for benchmarks).
        """
        new = dict(cache)
        if self.first is not None:
            x_BTD, new["first"] = self.first.decode(x_BTD, positions_BT, valid_BT, cache["first"], index)
        h_BTD = x_BTD
        cand_BT = jnp.ones(h_BTD.shape[:2], bool)
        shared = cache["shared"]
        tc = None
        if self.cfg.mor.routing == "token_choice":
            tc = (*self._tc_route(self.router(h_BTD))[:2], h_BTD)
        kept_per_step = []
        for r in range(self.cfg.mor.num_recursions):
            sel_BT, gate, _, _ = self._route_step(r, h_BTD, cand_BT, tc)
            sel_BT = cand_BT if sel_BT is None else sel_BT
            h_BTD, shared = self._decode_step(r, h_BTD, positions_BT, valid_BT, sel_BT, gate, shared, index)
            kept_per_step.append(sel_BT)
            cand_BT = sel_BT
        new["shared"] = shared
        if self.last is not None:
            h_BTD, new["last"] = self.last.decode(h_BTD, positions_BT, valid_BT, cache["last"], index)
        if stats:
            return h_BTD, new, jnp.stack(kept_per_step)
        return h_BTD, new

    def _decode_layers(self, r, h_BTD, pos_BT, kv_valid_BT, cache_n, index, write):
        """Step r's pool layers on T new tokens -> (h, cache_n); cache_n has a leading
        axis over the step's n layers (see ScannedStack.decode; write=False: KV
        sharing, steps >= 2 read step 1's cache only)."""
        return self.shared.decode(
            h_BTD, pos_BT, kv_valid_BT, cache_n, index, ids=self.schedule.steps[r], write=write
        )

    def _decode_step(self, r, h_BTD, pos_BT, valid_BT, sel_BT, gate, shared, index):
        """Step r of decoding T new tokens: the kept rows through f, their KV written
        into step r's cache (step 1's under KV sharing) -> (h_BTD, the caches)."""
        mor = self.cfg.mor
        c = r if mor.kv_cache == "recursion_wise" else 0
        write = mor.kv_cache == "recursion_wise" or r == 0
        cache_n = shared[c]
        B, T = h_BTD.shape[:2]
        routed = mor.routing != "none" and not (mor.routing == "expert_choice" and self.capacities[r] >= 1.0)

        def with_step(cache):
            return shared[:c] + (cache,) + shared[c + 1 :]

        if T > 1 or not routed or mor.decode_buckets == 0:
            # every row computed; rows not kept write their slots marked invalid (each
            # slot is written once per step, so nothing valid is overwritten)
            f_BTD, cache_n = self._decode_layers(r, h_BTD, pos_BT, valid_BT & sel_BT, cache_n, index, write)
            h_BTD = jnp.where(sel_BT[..., None], self._update(h_BTD, f_BTD, gate), h_BTD)
            return h_BTD, with_step(cache_n)

        # Depth-wise batching (T == 1): only the rows whose token takes step r are
        # computed, gathered into the smallest of `decode_buckets` static row
        # buckets that holds them (lax.switch runs one branch). Branches return only
        # row-sized arrays (h and the new KV slot), never the cache; the bucket's
        # rows of the cache are gathered (a copy of s rows) and written in place.
        sel_B = sel_BT[:, 0]
        nb = mor.decode_buckets
        sizes = sorted({0} | {min(B, -(-B * i // nb)) for i in range(1, nb + 1)})
        kept_first_B = jnp.argsort(jnp.logical_not(sel_B), stable=True)  # kept rows first
        bucket = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(sel_B), side="left")
        k_nBSGK = cache_n["k_BSGK"]
        kv_shape = (k_nBSGK.shape[0], B, 1) + k_nBSGK.shape[-2:]  # [n, B, 1, G, K]

        def branch(s):
            def run(h_BTD):
                zeros = (jnp.zeros(kv_shape, k_nBSGK.dtype), jnp.zeros(kv_shape, k_nBSGK.dtype))
                if s == 0:
                    return (h_BTD, *zeros) if write else h_BTD
                rows_s = kept_first_B[:s]
                row_sel_s = sel_B[rows_s]
                cache_s = {k: a[:, rows_s] for k, a in cache_n.items()}
                h_sTD = h_BTD[rows_s]
                f_sTD, cache_s = self._decode_layers(
                    r,
                    h_sTD,
                    pos_BT[rows_s],
                    (valid_BT[rows_s, 0] & row_sel_s)[:, None],
                    cache_s,
                    index,
                    write,
                )
                gate_s = None if gate is None else jax.tree.map(lambda a: a[rows_s], gate)
                upd_sTD = jnp.where(row_sel_s[:, None, None], self._update(h_sTD, f_sTD, gate_s), h_sTD)
                h_BTD = h_BTD.at[rows_s].set(upd_sTD)
                if not write:
                    return h_BTD
                new_kv = (
                    jax.lax.dynamic_slice_in_dim(cache_s[k], index, 1, axis=2) for k in ("k_BSGK", "v_BSGK")
                )
                k_full, v_full = (z.at[:, rows_s].set(x) for z, x in zip(zeros, new_kv))
                return h_BTD, k_full, v_full

            return run

        out = jax.lax.switch(bucket, [branch(s) for s in sizes], h_BTD)
        if not write:
            return out, shared
        h_BTD, k_full, v_full = out
        n = k_nBSGK.shape[0]
        valid_nBT = jnp.broadcast_to((valid_BT & sel_BT)[None], (n, B, T))

        def upd(buf, x):  # in place on the carried buffer
            return jax.lax.dynamic_update_slice(
                buf, x.astype(buf.dtype), (0, 0, index) + (0,) * (buf.ndim - 3)
            )

        return h_BTD, with_step(
            {
                "k_BSGK": upd(cache_n["k_BSGK"], k_full),
                "v_BSGK": upd(cache_n["v_BSGK"], v_full),
                "valid_BS": upd(cache_n["valid_BS"], valid_nBT),
            }
        )
