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
tokens (`impl="gather"`); `impl="dense"` is the masked reference (all tokens,
non-kept ones isolated by a private segment id and not updated). Threshold
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
    steps = tuple(tuple(flat[r * pool:(r + 1) * pool]) for r in range(R))
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
    """[first] + shared ScannedStack applied N_r times with routed depth + [last]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        mor = cfg.mor
        R = mor.num_recursions
        self.cfg = cfg
        self.schedule = recursion_schedule(cfg.num_layers, R, mor.sharing)
        first_ffn = "dense" if (cfg.ffn == "moe" and cfg.moe.first_dense_layers) else cfg.ffn
        if self.schedule.first:
            self.first = ScannedStack(cfg, 1, first_ffn, rngs=rngs, scan_single=False)
        self.shared = ScannedStack(cfg, self.schedule.pool, cfg.ffn, rngs=rngs)
        if self.schedule.last:
            self.last = ScannedStack(cfg, 1, cfg.ffn, rngs=rngs, scan_single=False)
        if mor.routing == "expert_choice":
            self.router = rr.StepRouters(cfg.d_model, R, mor.router_type, cfg.init_std, rngs=rngs)
            if mor.causal_aux == "aux_router":
                self.aux_router = rr.StepRouters(cfg.d_model, R, mor.router_type, cfg.init_std,
                                                 rngs=rngs)
        elif mor.routing == "token_choice":
            self.router = rr.DepthRouter(cfg.d_model, R, mor.router_type, cfg.init_std, rngs=rngs)
            if mor.balance == "loss_free":
                self.bias_R = make_router_bias(R)
            if mor.warmup_steps:
                self.steps_seen = rr.StepCounter(jnp.zeros((), jnp.int32))
        self.capacities = mor_capacities(cfg)
        self.impl = "gather"  # expert choice training path: gather | dense (reference)

    # ------------------------------------------------------------- pieces

    def _func(self) -> str:
        f = self.cfg.mor.router_func
        return f or ("sigmoid" if self.cfg.mor.routing == "expert_choice" else "softmax")

    def _update(self, h, f_h, g):
        if g is None:
            return f_h
        if isinstance(g, FinalStepGate):  # token choice: from H^1, at the last step only
            return jnp.where(g.final_BT[..., None], self._gated(g.first_BTD, f_h, g.gate_BT), f_h)
        return self._gated(h, f_h, g)

    def _gated(self, base_BTD, f_h, g_BT):
        """The gated update from base: base + g f(h) (add) or base + g (f(h) - base)."""
        g = g_BT[..., None].astype(base_BTD.dtype)
        if self.cfg.mor.update == "interpolate":
            return base_BTD + g * (f_h - base_BTD)
        return base_BTD + g * f_h

    def _tc_warmup(self, depth_BT, gate_BT, probs_BTR):
        """Token-choice warm-up: every token at full depth R, gated by its probability
        of depth R (the released code gathers the gate at the forced depth)."""
        mor = self.cfg.mor
        warming = self.steps_seen[...] < mor.warmup_steps
        full_gate_BT = mor.token_choice_alpha * probs_BTR[..., -1]
        return (jnp.where(warming, mor.num_recursions, depth_BT),
                jnp.where(warming, full_gate_BT, gate_BT), warming)

    def _tc_route(self, z_BTR):
        """Token choice from the depth logits -> (depth_BT, gate_BT, probs_BTR, warming or
        None): the loss-free bias steers the choice, the warm-up forces full depth."""
        bias = self.bias_R[...] if hasattr(self, "bias_R") else None
        tc_depth, tc_gate, probs = rr.tc_route(z_BTR, self._func(), bias,
                                               self.cfg.mor.token_choice_alpha)
        warming = None
        if hasattr(self, "steps_seen"):
            tc_depth, tc_gate, warming = self._tc_warmup(tc_depth, tc_gate, probs)
        return tc_depth, tc_gate, probs, warming

    def _route_step(self, r, h, cand, tc):
        """Step r's causal routing of the hidden state h entering it, the one rule that
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
            return depth_BT > r, FinalStepGate(gate_BT, depth_BT == r + 1, first_BTD), None, None
        z = self.router(h, r)
        g = rr.ec_gate(z, self._func(), self.cfg.mor.alpha)
        z_dec = z
        if hasattr(self, "aux_router"):  # stop-gradient auxiliary router
            z_dec = self.aux_router(jax.lax.stop_gradient(h), r)
        sel = cand if self.capacities[r] >= 1.0 else rr.ec_threshold(z_dec, cand)
        return sel, g, z, z_dec

    def _layers(self, r, x_BTD, pos_BT, mask_BTS, *, kv_n=None, want_kv=False, train, rng,
                active_BT=None):
        """The pool layers of step r in order; returns (x, aux_n, kv_n or None).
        active_BT: the tokens this step really runs (MoE statistics count only them)."""
        return self.shared.run(x_BTD, pos_BT, mask_BTS, ids=self.schedule.steps[r], kv_n=kv_n,
                               want_kv=want_kv, train=train, rng=rng, active_BT=active_BT)

    def _dense_step(self, r, h, pos, seg, sel, g, kv1, *, train, rng):
        """All T tokens through f; only `sel` tokens (all if None) are updated.

        Non-selected tokens get a private segment id, so selected ones never see them.
        """
        B, T = h.shape[:2]
        shared_kv = self.cfg.mor.kv_cache == "shared"
        if shared_kv and r > 0:
            mask = self_attention_mask(seg, (B, T))
            f_h, aux, _ = self._layers(r, h, pos, mask, kv_n=kv1, train=train, rng=rng,
                                       active_BT=sel)
            kv_out = None
        else:
            idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            seg_q = seg if sel is None else jnp.where(sel, seg, -1 - idx)
            mask = self_attention_mask(seg_q, (B, T))
            f_h, aux, kv_out = self._layers(r, h, pos, mask, want_kv=shared_kv and r == 0,
                                            train=train, rng=rng, active_BT=sel)
        new = self._update(h, f_h, g)
        return (new if sel is None else jnp.where(sel[..., None], new, h)), aux, kv_out

    def _gather_step(self, r, h, pos, seg, idx_Bk, g, kv1, *, train, rng):
        """Only the k kept tokens (causal order, original positions) through f."""
        B, T = h.shape[:2]

        def take(a):
            ix = idx_Bk.reshape(idx_Bk.shape + (1,) * (a.ndim - 2))
            return jnp.take_along_axis(a, ix, axis=1)

        h_k, pos_k, seg_k, g_k = take(h), take(pos), take(seg), take(g)
        if self.cfg.mor.kv_cache == "shared" and r > 0:
            idx_T = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            mask = attention_mask(idx_Bk, idx_T, seg_k, seg)
            f_k, aux, _ = self._layers(r, h_k, pos_k, mask, kv_n=kv1, train=train, rng=rng)
        else:
            mask = attention_mask(idx_Bk, idx_Bk, seg_k, seg_k)
            f_k, aux, _ = self._layers(r, h_k, pos_k, mask, train=train, rng=rng)
        new_k = self._update(h_k, f_k, g_k)
        h = jax.vmap(lambda hb, ib, nb: hb.at[ib].set(nb))(h, idx_Bk, new_k)
        return h, aux

    # -------------------------------------------------------------- forward

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        """Returns (x_BTD, aux) with aux = {"first", "shared", "last", "mor"} (present ones)."""
        key = (lambda i: jax.random.fold_in(rng, i)) if rng is not None else (lambda i: None)
        aux = {}
        if self.schedule.first:
            x_BTD, aux["first"] = self.first(x_BTD, positions_BT, segment_ids_BT, train=train,
                                             rng=key(0))
        x_BTD, aux["shared"], aux["mor"] = self._recurse(x_BTD, positions_BT, segment_ids_BT,
                                                         train=train, rng=key(1))
        if self.schedule.last:
            x_BTD, aux["last"] = self.last(x_BTD, positions_BT, segment_ids_BT, train=train,
                                           rng=key(2))
        return x_BTD, aux

    def _recurse(self, h, pos, seg, *, train, rng):
        mor = self.cfg.mor
        R, routing = mor.num_recursions, mor.routing
        B, T = h.shape[:2]
        valid = seg > 0
        cand = jnp.ones((B, T), bool)
        depth = jnp.zeros((B, T), jnp.int32)
        kv1, shared_aux = None, []
        m = {}
        losses = jnp.zeros((), jnp.float32)
        step_keys = (jax.random.split(rng, R) if rng is not None else [None] * R)
        tc = None
        if routing == "token_choice":
            z_BTR = self.router(h)
            tc_depth, tc_gate, probs, warming = self._tc_route(z_BTR)
            tc = (tc_depth, tc_gate, h)
            if warming is not None:
                m["warming_up"] = warming.astype(jnp.float32)  # no bias update (train/step.py)
            bal, load_R, maxvio = rr.tc_balance(probs, tc_depth, valid)
            zl = rr.masked_mean(jnp.square(jax.nn.logsumexp(z_BTR, axis=-1)), valid)
            if mor.balance == "loss":
                losses += mor.balance_weight * bal
            losses += mor.z_loss_weight * zl
            m.update(balance_loss=bal, z_loss=zl, tokens_per_depth_R=load_R, max_violation=maxvio)
        bces, zls, accs, kept = [], [], [], []
        for r in range(R):
            sel, g, z, z_dec = self._route_step(r, h, cand, tc)
            idx_Bk = None
            live = cand & valid
            target = cand  # capacity 1: every candidate is kept
            if z is not None and self.capacities[r] < 1.0:  # expert choice, routed step
                # training keeps the top k_r (the paper); the causal threshold is what
                # decoding will run: its agreement with top-k and the aux BCE train it
                thr = sel
                k = rr.capacity_tokens(self.capacities[r], T)
                idx_Bk, target = rr.ec_topk(z, cand, valid, k)
                accs.append(rr.masked_mean((thr == target).astype(jnp.float32), live))
                if train or mor.eval_routing == "topk":
                    sel = target
                else:
                    idx_Bk = None
            if z is not None:  # per-step means over the candidates, summed over steps
                if mor.causal_aux != "none":
                    bces.append(rr.masked_mean(rr.bce_with_logits(z_dec, target), live))
                zls.append(rr.masked_mean(jnp.square(z), live))
            if idx_Bk is not None and self.impl == "gather":
                h, a = self._gather_step(r, h, pos, seg, idx_Bk, g, kv1, train=train,
                                         rng=step_keys[r])
            else:
                h, a, kv_out = self._dense_step(r, h, pos, seg, sel, g, kv1, train=train,
                                                rng=step_keys[r])
                if r == 0:
                    kv1 = kv_out
            shared_aux.append(a)
            if sel is None:
                sel = jnp.ones((B, T), bool)
            depth += sel.astype(jnp.int32)
            kept.append(sel)
            cand = sel
        if routing == "expert_choice":
            # summed over every step, the capacity-1 first included, as the released
            # code (sampling_loss += per step); a mean would be N_r times weaker
            bce = sum(bces) if bces else jnp.zeros((), jnp.float32)
            zl = sum(zls)
            losses += mor.bce_weight * bce + mor.z_loss_weight * zl
            m.update(bce_loss=bce, z_loss=zl,
                     sampling_accuracy=(sum(accs) / len(accs)) if accs else jnp.ones(()))
            any_sel_T = jnp.any(cand & valid, axis=0)
            any_valid_T = jnp.any(valid, axis=0)
            m["dead_token_ratio"] = 1.0 - jnp.sum(any_sel_T) / jnp.maximum(jnp.sum(any_valid_T), 1)
        m["kept_RBT"] = jnp.stack(kept)  # per-step kept masks (tests, analysis)
        v = valid.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(v), 1.0)
        m["depth_hist"] = jnp.stack([jnp.sum(v * (depth == d)) / n for d in range(R + 1)])
        m["mean_depth"] = jnp.sum(v * depth) / n
        m["aux_loss"] = losses
        return h, _concat_aux(shared_aux), m

    # ------------------------------------------------------------- decoding

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        cfg = self.cfg
        c = {}
        if self.schedule.first:
            c["first"] = self.first.init_cache(batch, max_len, dtype)
        if self.schedule.last:
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
        if self.schedule.first:
            x_BTD, new["first"] = self.first.decode(x_BTD, positions_BT, valid_BT,
                                                    cache["first"], index)
        h = x_BTD
        cand = jnp.ones(h.shape[:2], bool)
        shared = cache["shared"]
        tc = None
        if self.cfg.mor.routing == "token_choice":
            tc = (*self._tc_route(self.router(h))[:2], h)
        kept = []
        for r in range(self.cfg.mor.num_recursions):
            sel, g, _, _ = self._route_step(r, h, cand, tc)
            sel = cand if sel is None else sel
            h, shared = self._decode_step(r, h, positions_BT, valid_BT, sel, g, shared, index)
            kept.append(sel)
            cand = sel
        new["shared"] = shared
        if self.schedule.last:
            h, new["last"] = self.last.decode(h, positions_BT, valid_BT, cache["last"], index)
        if stats:
            return h, new, jnp.stack(kept)
        return h, new

    def _decode_layers(self, r, h, pos, kv_valid, cache_n, index, write):
        """Step r's pool layers on T new tokens -> (h, cache_n); cache_n has a leading
        axis over the step's n layers (see ScannedStack.decode; write=False: KV
        sharing, steps >= 2 read step 1's cache only)."""
        return self.shared.decode(h, pos, kv_valid, cache_n, index, ids=self.schedule.steps[r],
                                  write=write)

    def _decode_step(self, r, h, pos, valid, sel, g, shared, index):
        mor = self.cfg.mor
        c = r if mor.kv_cache == "recursion_wise" else 0
        write = mor.kv_cache == "recursion_wise" or r == 0
        cache_n = shared[c]
        B, T = h.shape[:2]
        routed = mor.routing != "none" and not (mor.routing == "expert_choice"
                                                 and self.capacities[r] >= 1.0)

        def with_step(cache):
            return shared[:c] + (cache,) + shared[c + 1:]

        if T > 1 or not routed or mor.decode_buckets == 0:
            # every row computed; rows not kept write their slots marked invalid (each
            # slot is written once per step, so nothing valid is overwritten)
            f_h, cache_n = self._decode_layers(r, h, pos, valid & sel, cache_n, index, write)
            h = jnp.where(sel[..., None], self._update(h, f_h, g), h)
            return h, with_step(cache_n)

        # Depth-wise batching (T == 1): only the rows whose token takes step r are
        # computed, gathered into the smallest of `decode_buckets` static row
        # buckets that holds them (lax.switch runs one branch). Branches return only
        # row-sized arrays (h and the new KV slot), never the cache; the bucket's
        # rows of the cache are gathered (a copy of s rows) and written in place.
        sel_B = sel[:, 0]
        nb = mor.decode_buckets
        sizes = sorted({0} | {min(B, -(-B * i // nb)) for i in range(1, nb + 1)})
        order = jnp.argsort(jnp.logical_not(sel_B), stable=True)
        which = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(sel_B), side="left")
        kb = cache_n["k_BSGK"]
        kv_shape = (kb.shape[0], B, 1) + kb.shape[-2:]

        def branch(s):
            def run(h):
                zeros = (jnp.zeros(kv_shape, kb.dtype), jnp.zeros(kv_shape, kb.dtype))
                if s == 0:
                    return (h, *zeros) if write else h
                rows = order[:s]
                row_sel = sel_B[rows]
                cache_s = {k: a[:, rows] for k, a in cache_n.items()}
                h_s = h[rows]
                f_s, cache_s = self._decode_layers(r, h_s, pos[rows],
                                                   (valid[rows, 0] & row_sel)[:, None],
                                                   cache_s, index, write)
                g_s = None if g is None else jax.tree.map(lambda a: a[rows], g)
                upd = jnp.where(row_sel[:, None, None], self._update(h_s, f_s, g_s), h_s)
                h = h.at[rows].set(upd)
                if not write:
                    return h
                new_kv = (jax.lax.dynamic_slice_in_dim(cache_s[k], index, 1, axis=2)
                          for k in ("k_BSGK", "v_BSGK"))
                k_full, v_full = (z.at[:, rows].set(x) for z, x in zip(zeros, new_kv))
                return h, k_full, v_full
            return run

        out = jax.lax.switch(which, [branch(s) for s in sizes], h)
        if not write:
            return out, shared
        h, k_full, v_full = out
        n = kb.shape[0]
        valid_nBT = jnp.broadcast_to((valid & sel)[None], (n, B, T))

        def upd(buf, x):  # in place on the carried buffer
            return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype),
                                                (0, 0, index) + (0,) * (buf.ndim - 3))

        return h, with_step({"k_BSGK": upd(cache_n["k_BSGK"], k_full),
                             "v_BSGK": upd(cache_n["v_BSGK"], v_full),
                             "valid_BS": upd(cache_n["valid_BS"], valid_nBT)})
