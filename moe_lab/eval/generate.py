"""Batched generation with a KV cache (greedy, temperature, top-p), and the slow
no-cache reference it is tested against.

Dimension legend: B batch, P prompt length (left-padded), S cache slots = P + N,
N new tokens, V vocab.

Prompts are left-padded so every row's next token lands on the same cache slot;
pads are marked invalid in the cache and never attended to, and positions
count real tokens only, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_lab.data.tokenizer import TOKENIZER


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BP, valid_BP) with each prompt right-aligned."""
    P = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt")
        tokens[i, P - len(p):] = p
        valid[i, P - len(p):] = True
    return tokens, valid


def sample_logits(logits_BV, rng, temperature: float, top_p: float):
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # keep the smallest set whose mass reaches top_p (the top token always stays)
        keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
        cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B, logits_BV, -jnp.inf)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def prefill(model, tokens_BP, valid_BP, rng, *, max_new_tokens: int, temperature: float,
            top_p: float):
    """Runs the prompt through `model` into a fresh cache; returns the decode state.

    State = (first sampled token_B, cache, last prompt position_B, per-step keys).
    """
    B, P = tokens_BP.shape
    cache = model.init_cache(B, P + max_new_tokens)
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0).astype(jnp.int32)
    logits_BPV, cache = model.decode(tokens_BP, positions_BP, valid_BP, cache, 0)
    keys = jax.random.split(rng, max_new_tokens)
    first_B = sample_logits(logits_BPV[:, -1], keys[0], temperature, top_p)
    return first_B, cache, positions_BP[:, -1], keys


def decode_steps(model, state, prompt_len: int, *, temperature: float, top_p: float):
    """The max_new_tokens - 1 single-token decode steps after `prefill`: tokens [B, N]."""
    first_B, cache, last_pos_B, keys = state
    B, P = first_B.shape[0], prompt_len

    def step(carry, i):
        token_B, cache = carry
        pos_B1 = (last_pos_B + i)[:, None]
        valid_B1 = jnp.ones((B, 1), bool)
        logits_B1V, cache = model.decode(token_B[:, None], pos_B1, valid_B1, cache, P + i - 1)
        nxt_B = sample_logits(logits_B1V[:, 0], keys[i], temperature, top_p)
        return (nxt_B, cache), nxt_B

    (_, _), rest_NB = jax.lax.scan(step, (first_B, cache), jnp.arange(1, keys.shape[0]))
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate_cached(graphdef, params, model_state, tokens_BP, valid_BP, rng, *,
                     max_new_tokens: int, temperature: float, top_p: float):
    model = nnx.merge(graphdef, params, model_state)
    sampling = {"temperature": temperature, "top_p": top_p}
    state = prefill(model, tokens_BP, valid_BP, rng, max_new_tokens=max_new_tokens, **sampling)
    return decode_steps(model, state, tokens_BP.shape[1], **sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate_reference(graphdef, params, model_state, tokens_BP, valid_BP, rng, *,
                        max_new_tokens: int, temperature: float, top_p: float):
    """No cache: every step re-runs the full forward pass over prompt + generated."""
    model = nnx.merge(graphdef, params, model_state)
    B, P = tokens_BP.shape
    S = P + max_new_tokens
    tokens_BS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens_BP)
    valid_BS = jnp.zeros((B, S), bool).at[:, :P].set(valid_BP)
    keys = jax.random.split(rng, max_new_tokens)
    slot_S = jnp.arange(S)

    def step(i, tokens_BS):
        # prompt + the i tokens generated so far are valid; the full forward pass
        # runs over all S slots (later slots are masked out by causality)
        valid = valid_BS | ((slot_S >= P) & (slot_S < P + i))[None, :]
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        logits_BSV, _ = model(tokens_BS, positions, valid.astype(jnp.int32), train=False)
        last_BV = jax.lax.dynamic_index_in_dim(logits_BSV, P + i - 1, axis=1, keepdims=False)
        nxt_B = sample_logits(last_BV, keys[i], temperature, top_p)
        return jax.lax.dynamic_update_index_in_dim(tokens_BS, nxt_B, P + i, axis=1)

    tokens_BS = jax.lax.fori_loop(0, max_new_tokens, step, tokens_BS)
    return tokens_BS[:, P:]


def generate(graphdef, params, model_state, prompts: list[list[int]], max_new_tokens: int, *,
             pad_id: int = 0, eos_id: int | None = None, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Generates up to `max_new_tokens` per prompt; output stops at (and drops) eos_id."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:  # top_p <= 0 would mask every token, and sample token 0
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    tokens, valid = left_pad(prompts, pad_id)
    fn = _generate_cached if use_cache else _generate_reference
    out = fn(graphdef, params, model_state, jnp.asarray(tokens), jnp.asarray(valid),
             jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=float(temperature),
             top_p=float(top_p))
    result = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        result.append(row)
    return result


PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: few compilations


def generation_budget(examples, cap: int) -> int:
    """Tokens to generate: enough for the longest reference completion (+ EOS and a
    little slack), at most `cap` unless the reference itself needs more."""

    need = max(len(TOKENIZER.encode(ex.completion)) for ex in examples) + 1
    return max(min(cap, need + 8), need)


def generate_batched(graphdef, params, model_state, prompts: list[list[int]], max_new_tokens: int,
                     *, batch_size: int, pad_id: int, eos_id: int | None) -> list[list[int]]:
    """Greedy KV-cache generation in fixed-shape batches (rows and prompt length
    padded to buckets so the decoder compiles once or twice per task)."""


    width = PROMPT_BUCKET * math.ceil(max(len(p) for p in prompts) / PROMPT_BUCKET)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # fixed batch shape
        tokens, valid = left_pad(rows, pad_id)
        extra = width - tokens.shape[1]
        tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
        valid = np.pad(valid, ((0, 0), (extra, 0)), constant_values=False)

        new = _generate_cached(graphdef, params, model_state, jnp.asarray(tokens),
                                   jnp.asarray(valid), jax.random.key(0),
                                   max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
        for row in np.asarray(new)[:len(chunk)].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            out.append(row)
    return out
