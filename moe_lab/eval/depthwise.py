"""Continuous depth-wise batching for Mixture-of-Recursions decoding (arXiv 2507.10524,
sec. 3.3), next to the lockstep decode of eval/generate.py.

Dimension legend: B sequences, M slots of one shared-block call, R recursion steps,
n pool layers of a step, S cache slots, D d_model.

Lockstep decoding runs every recursion step for the whole batch in turn: at step r
only the rows whose token still recurses do work (models/recursive.py computes them
in row buckets), so the deeper steps run part-empty batches.  Here one FIFO queue
holds every sequence's in-flight token with the step it needs next, at any depth;
each call of the shared block takes the first M of the queue, whatever their depths
(the steps share their weights: cycle / middle-cycle sharing), so every call runs a
full batch while the queue holds M tokens.  A token that the step-(r+1) router
stops, or that finished step R, leaves for the last layer and the LM head; its
sequence's next token enters the queue at depth 0, after the first layer.

Each slot has its own sequence, depth and cache position: the pool layers run per
slot on the KV rows of (its step, its sequence) [recursion-wise caching], gathered
from and written back into one [R, n, B + 1, S, ...] buffer (row B: the slots the
queue could not fill).  A token's result does not depend on which others share its
call (attention reads its own sequence; dropless MoE), so the tokens are the
lockstep decode's: tests/test_generate.py checks them against the no-cache
reference.  Greedy decoding only (sampling keys are per batch row in generate.py).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_lab.config.schema import ConfigError, ModelConfig, mor_capacities
from moe_lab.eval.generate import left_pad, prefill_logits
from moe_lab.layers import recursion_routing as rr


def depthwise_error(m: ModelConfig) -> str | None:
    """Why continuous depth-wise batching cannot decode model m (one line), or None."""
    if m.stack != "recursive":
        return "depth-wise batching decodes Mixture-of-Recursions models (model.stack='recursive')"
    r = m.mor
    if r.routing != "expert_choice":
        return f"depth-wise batching needs expert-choice recursion routing, got {r.routing!r}"
    if r.kv_cache != "recursion_wise":
        return f"depth-wise batching needs model.mor.kv_cache='recursion_wise', got {r.kv_cache!r}"
    if mor_capacities(m)[0] < 1.0:
        return (
            "depth-wise batching runs step 1 for every token: it needs the first "
            f"capacity at 1, got model.mor.capacities={r.capacities!r}"
        )
    if m.ffn == "moe" and m.moe.dispatch == "capacity":
        return (
            "depth-wise batching needs a token's result independent of its call's other "
            "tokens: dropless MoE, not model.moe.dispatch='capacity'"
        )
    if not r.sharing.endswith("cycle"):
        return (
            f"depth-wise batching batches tokens of different steps through the same "
            f"layers: it needs cycle or middle_cycle sharing, got {r.sharing!r}"
        )
    return None


def _per_row(decode, h_MD, pos_M, slot_M, cache_rows):
    """decode(x_11D, pos_11, valid_11, cache_n1, index) of a stack, one slot per row:
    cache_rows {k: [M, n, S, ...]}, each row written at its own slot_M."""

    def one(h_D, pos, slot, row):
        cache = jax.tree.map(lambda a: a[:, None], row)
        y, new = decode(h_D[None, None], pos[None, None], jnp.ones((1, 1), bool), cache, slot)
        return y[0, 0], jax.tree.map(lambda a: a[:, 0], new)

    return jax.vmap(one)(h_MD, pos_M, slot_M, cache_rows)


def _step_logits(rs, h_MD, r_M):
    """Each slot's routing logits at its own step r_M: (gate z, decision z) [M]."""
    R = rs.cfg.mor.num_recursions
    h = h_MD[:, None]
    z_RM = jnp.stack([rs.router(h, r)[:, 0] for r in range(R)])
    dec = rs.aux_router if rs.aux_router is not None else rs.router
    zd_RM = jnp.stack([dec(h, r)[:, 0] for r in range(R)]) if dec is not rs.router else z_RM
    take = lambda a: jnp.take_along_axis(a, jnp.clip(r_M, 0, R - 1)[None], 0)[0]
    return take(z_RM), take(zd_RM)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("shared",))
def _recursion_tick(graphdef, params, model_state, shared, h_MD, b_M, r_M, pos_M, slot_M):
    """One shared-block call on M slots: slot m runs step r_M[m] of sequence b_M[m]
    -> (shared cache, new h, continues to step r + 1)."""
    model = nnx.merge(graphdef, params, model_state)
    rs = model.recursive
    mor = rs.cfg.mor
    rows = jax.tree.map(lambda a: a[r_M, :, b_M], shared)  # [M, n, S, ...]
    ids = rs.schedule.steps[0]  # cycle sharing: every step applies these pool layers

    def decode(x, pos, valid, cache, index):
        return rs.shared.decode(x, pos, valid, cache, index, ids=ids)

    f_MD, rows = _per_row(decode, h_MD, pos_M, slot_M, rows)
    z_M, _ = _step_logits(rs, h_MD, r_M)
    g_M = rr.ec_gate(z_M, rs._func(), mor.alpha)
    new_MD = rs._update(h_MD[:, None], f_MD[:, None], g_M[:, None])[:, 0]
    shared = jax.tree.map(lambda a, x: a.at[r_M, :, b_M].set(x), shared, rows)
    nxt_M = r_M + 1
    _, zd_M = _step_logits(rs, new_MD, nxt_M)
    caps = jnp.asarray(rs.capacities + (0.0,), jnp.float32)
    cont_M = (nxt_M < mor.num_recursions) & ((caps[nxt_M] >= 1.0) | (zd_M >= 0))
    return shared, new_MD, cont_M


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("first", "last"))
def _exit_and_enter(graphdef, params, model_state, first, last, h_MD, b_M, pos_M, slot_M):
    """Tokens that left the recursion: last layer, LM head, greedy next token; the
    next token embedded and through the first layer (at the next slot) -> its h."""
    model = nnx.merge(graphdef, params, model_state)
    rs = model.recursive
    if rs.schedule.last:
        rows = jax.tree.map(lambda a: a[:, b_M].swapaxes(0, 1), last)
        h_MD, rows = _per_row(rs.last.decode, h_MD, pos_M, slot_M, rows)
        last = jax.tree.map(lambda a, x: a.at[:, b_M].set(x.swapaxes(0, 1)), last, rows)
    token_M = jnp.argmax(model.logits(h_MD[:, None])[:, 0], axis=-1).astype(jnp.int32)
    x_MD = model.embed(token_M[:, None])[:, 0]
    if rs.schedule.first:
        rows = jax.tree.map(lambda a: a[:, b_M].swapaxes(0, 1), first)
        x_MD, rows = _per_row(rs.first.decode, x_MD, pos_M + 1, slot_M + 1, rows)
        first = jax.tree.map(lambda a, x: a.at[:, b_M].set(x.swapaxes(0, 1)), first, rows)
    return first, last, token_M, x_MD


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill(graphdef, params, model_state, tokens_BP, valid_BP, *, cache_len: int):
    """Lockstep prefill of the prompts -> (first generated token, recursive-stack cache,
    last prompt position)."""
    model = nnx.merge(graphdef, params, model_state)
    logits_BV, cache, last_pos_B = prefill_logits(model, tokens_BP, valid_BP, cache_len)
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return token_B, cache["recursive"], last_pos_B


def _with_dummy_row(cache: dict, axis: int) -> dict:
    """One more batch row (the slots the queue could not fill read and write it)."""
    return jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.zeros_like(jax.lax.slice_in_dim(a, 0, 1, axis=axis))], axis=axis),
        cache,
    )


def generate_depthwise(
    graphdef,
    params,
    model_state,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    slots: int | None = None,
    pad_id: int = 0,
    stats: dict | None = None,
) -> list[list[int]]:
    """Greedy generation of max_new_tokens per prompt with continuous depth-wise
    batching; `slots` (default: the number of prompts) tokens per shared-block call.
    stats (a dict, optional) receives the calls made and their filled slots."""
    cfg = graphdef_model_config(graphdef, params, model_state)
    why = depthwise_error(cfg)
    if why:
        raise ConfigError(why)
    if max_new_tokens < 1:
        raise ValueError(f"generate_depthwise: max_new_tokens must be >= 1, got {max_new_tokens}")
    B = len(prompts)
    M = slots or B
    tokens, valid = left_pad(prompts, pad_id)
    P = tokens.shape[1]
    token_B, cache, last_pos_B = _prefill(
        graphdef, params, model_state, jnp.asarray(tokens), jnp.asarray(valid), cache_len=P + max_new_tokens
    )
    out = [[int(t)] for t in np.asarray(token_B)]
    pos = np.asarray(last_pos_B).astype(np.int32)  # position of each sequence's last fed token
    fed = np.zeros(B, np.int32)  # tokens fed back so far (slot of the next: P + fed)
    # [R, n, B + 1, S, ...]: the steps' caches as one buffer indexed by (step, sequence)
    shared = jax.tree.map(lambda *a: jnp.stack(a), *cache["shared"])
    shared = _with_dummy_row(shared, axis=2)
    first = _with_dummy_row(cache["first"], 1) if "first" in cache else {}
    last = _with_dummy_row(cache["last"], 1) if "last" in cache else {}
    D = cfg.d_model
    h = jnp.zeros((B + 1, D), jnp.dtype(cfg.compute_dtype))
    live = [b for b in range(B) if max_new_tokens > 1]
    # the first generated token of every sequence enters: embed + first layer at slot P
    if live:
        first, h_new = _enter(graphdef, params, model_state, first, token_B, pos, P)
        h = h.at[:B].set(h_new)
    queue = collections.deque((b, 0) for b in live)
    calls = filled = 0
    while queue:
        take = [queue.popleft() for _ in range(min(M, len(queue)))]
        b_M = np.full(M, B, np.int32)
        r_M = np.zeros(M, np.int32)
        b_M[: len(take)] = [b for b, _ in take]
        r_M[: len(take)] = [r for _, r in take]
        pos_M = np.append(pos, 0)[b_M] + 1
        slot_M = P + np.append(fed, 0)[b_M]
        shared, h_MD, cont_M = _recursion_tick(
            graphdef,
            params,
            model_state,
            shared,
            h[b_M],
            jnp.asarray(b_M),
            jnp.asarray(r_M),
            jnp.asarray(pos_M),
            jnp.asarray(slot_M),
        )
        h = h.at[b_M].set(h_MD)
        calls, filled = calls + 1, filled + len(take)
        cont = np.asarray(cont_M)
        done = []
        for m, (b, r) in enumerate(take):
            (queue.append((b, r + 1)) if cont[m] else done.append(b))
        if not done:
            continue
        e_M = np.full(M, B, np.int32)
        e_M[: len(done)] = done
        first, last, tok_M, x_MD = _exit_and_enter(
            graphdef,
            params,
            model_state,
            first,
            last,
            h[e_M],
            jnp.asarray(e_M),
            jnp.asarray(np.append(pos, 0)[e_M] + 1),
            jnp.asarray(P + np.append(fed, 0)[e_M]),
        )
        tok = np.asarray(tok_M)
        h = h.at[e_M].set(x_MD)
        for m, b in enumerate(done):
            out[b].append(int(tok[m]))
            pos[b] += 1
            fed[b] += 1
            if len(out[b]) < max_new_tokens:
                queue.append((b, 0))
    if stats is not None:
        stats.update(calls=calls, filled_slots=filled, slots=M)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "slot"), donate_argnames=("first",))
def _enter_fn(graphdef, params, model_state, first, token_B, pos_B, *, slot: int):
    model = nnx.merge(graphdef, params, model_state)
    rs = model.recursive
    x_BD = model.embed(token_B[:, None])[:, 0]
    if rs.schedule.first:
        B = token_B.shape[0]
        rows = jax.tree.map(lambda a: a[:, :B].swapaxes(0, 1), first)
        x_BD, rows = _per_row(rs.first.decode, x_BD, pos_B + 1, jnp.full((B,), slot, jnp.int32), rows)
        first = jax.tree.map(lambda a, x: a.at[:, :B].set(x.swapaxes(0, 1)), first, rows)
    return first, x_BD


def _enter(graphdef, params, model_state, first, token_B, pos_B, slot: int):
    return _enter_fn(graphdef, params, model_state, first, token_B, jnp.asarray(pos_B), slot=slot)


def graphdef_model_config(graphdef, params, model_state) -> ModelConfig:
    """The ModelConfig a split model was built from."""
    return nnx.merge(graphdef, params, model_state).cfg
