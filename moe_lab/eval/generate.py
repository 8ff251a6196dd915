"""Batched generation with a KV cache (greedy, temperature, top-p), and the slow
no-cache reference it is tested against.

Dimension legend: B batch, P prompt length (left-padded), S cache slots = P + N,
N new tokens, V vocab.

Prompts are left-padded so every row's next token lands on the same cache slot;
pads are marked invalid in the cache and never attended to, and positions
count real tokens only, so a padded row computes exactly what it would alone.

The one generation API is `generate_batched` (fixed-shape batches, prompts
left-padded to a multiple of PROMPT_BUCKET, tokens cut at EOS); its pieces are
public for the callers that need them one by one: `prompt_width` / `left_pad`
(the bucketed padding), `fixed_batches` (the fixed batch shape),
`generate_tokens` (one padded batch, uncut), `cut_at_eos`, the model-level
`prefill` / `decode_steps` (and their logits forms `prefill_logits` /
`decode_logits`), and `CachedStepper` (the decoder one token at a time, for a
controller that picks each token itself, e.g. budget forcing).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_lab.data.tokenizer import Tokenizer
from moe_lab.train.jit_cache import cached_for

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: few compilations


def bucketed(n: int) -> int:
    """n rounded up to a multiple of PROMPT_BUCKET."""
    return PROMPT_BUCKET * math.ceil(n / PROMPT_BUCKET)


def prompt_width(prompts: list[list[int]]) -> int:
    """The padded prompt length of a set of prompts: the longest, rounded up to the bucket."""
    return bucketed(max(len(p) for p in prompts))


def left_pad(
    prompts: list[list[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BP, valid_BP) with each prompt right-aligned in `width` columns
    (default: the longest prompt's length)."""
    longest = max(len(p) for p in prompts)
    P = longest if width is None else width
    if P < longest:
        raise ValueError(f"left_pad: width {P} is shorter than the longest prompt ({longest})")
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt")
        tokens[i, P - len(p) :] = p
        valid[i, P - len(p) :] = True
    return tokens, valid


def fixed_batches(rows: list, batch_size: int) -> Iterator[tuple[int, list, list]]:
    """(start, chunk, padded) per batch of `batch_size` rows: the last chunk is padded
    with copies of its first row, so every batch has the same shape (one compilation)."""
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        yield s, chunk, chunk + [chunk[0]] * (batch_size - len(chunk))


def cut_at_eos(row: list[int], eos_id: int | None) -> list[int]:
    """The tokens before the first eos_id (all of them where there is none)."""
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id)]
    return row


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


# ------------------------------------------------------------ model level


def prefill_logits(model, tokens_BP, valid_BP, cache_len: int):
    """Runs the prompt through `model` into a fresh cache of `cache_len` slots:
    (logits of the first new token [B, V], cache, last prompt position [B])."""
    cache = model.init_cache(tokens_BP.shape[0], cache_len)
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0).astype(jnp.int32)
    logits_BPV, cache = model.decode(tokens_BP, positions_BP, valid_BP, cache, 0)
    return logits_BPV[:, -1], cache, positions_BP[:, -1]


def decode_logits(model, token_B, pos_B, cache, index):
    """Feeds one token per row (position pos_B, cache slot `index`): (next logits [B, V], cache)."""
    valid_B1 = jnp.ones((token_B.shape[0], 1), bool)
    logits_B1V, cache = model.decode(token_B[:, None], pos_B[:, None], valid_B1, cache, index)
    return logits_B1V[:, 0], cache


def prefill(model, tokens_BP, valid_BP, rng, *, max_new_tokens: int, temperature: float, top_p: float):
    """Runs the prompt through `model` into a fresh cache; returns the decode state.

    State = (first sampled token_B, cache, last prompt position_B, per-step keys).
    """
    P = tokens_BP.shape[1]
    logits_BV, cache, last_pos_B = prefill_logits(model, tokens_BP, valid_BP, P + max_new_tokens)
    keys = jax.random.split(rng, max_new_tokens)
    first_B = sample_logits(logits_BV, keys[0], temperature, top_p)
    return first_B, cache, last_pos_B, keys


def decode_steps(model, state, prompt_len: int, *, temperature: float, top_p: float):
    """The max_new_tokens - 1 single-token decode steps after `prefill`: tokens [B, N]."""
    first_B, cache, last_pos_B, keys = state
    P = prompt_len

    def step(carry, i):
        token_B, cache = carry
        logits_BV, cache = decode_logits(model, token_B, last_pos_B + i, cache, P + i - 1)
        nxt_B = sample_logits(logits_BV, keys[i], temperature, top_p)
        return (nxt_B, cache), nxt_B

    (_, _), rest_NB = jax.lax.scan(step, (first_B, cache), jnp.arange(1, keys.shape[0]))
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate_cached(
    graphdef,
    params,
    model_state,
    tokens_BP,
    valid_BP,
    rng,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
):
    model = nnx.merge(graphdef, params, model_state)
    sampling = {"temperature": temperature, "top_p": top_p}
    state = prefill(model, tokens_BP, valid_BP, rng, max_new_tokens=max_new_tokens, **sampling)
    return decode_steps(model, state, tokens_BP.shape[1], **sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate_reference(
    graphdef,
    params,
    model_state,
    tokens_BP,
    valid_BP,
    rng,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
):
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


def _check_sampling(who: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"{who}: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:  # top_p <= 0 would mask every token, and sample token 0
        raise ValueError(f"{who}: top_p must be in (0, 1], got {top_p}")
    if not temperature >= 0.0:
        raise ValueError(f"{who}: temperature must be >= 0, got {temperature}")


# ---------------------------------------------------------------- host level


def generate_tokens(
    graphdef,
    params,
    model_state,
    tokens_BP,
    valid_BP,
    rng,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> np.ndarray:
    """KV-cache generation for one left-padded batch (`left_pad`): the new tokens
    [B, max_new_tokens], not cut at EOS; sampled with key `rng`."""
    _check_sampling("generate", max_new_tokens, temperature, top_p)
    return np.asarray(
        _generate_cached(
            graphdef,
            params,
            model_state,
            jnp.asarray(tokens_BP),
            jnp.asarray(valid_BP),
            rng,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
        )
    )


def generate(
    graphdef,
    params,
    model_state,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` per prompt in one batch (no bucketing; key(seed));
    output stops at (and drops) eos_id.  use_cache=False: the no-cache reference."""
    _check_sampling("generate", max_new_tokens, temperature, top_p)
    tokens, valid = left_pad(prompts, pad_id)
    fn = _generate_cached if use_cache else _generate_reference
    out = fn(
        graphdef,
        params,
        model_state,
        jnp.asarray(tokens),
        jnp.asarray(valid),
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
    )
    return [cut_at_eos(row, eos_id) for row in np.asarray(out).tolist()]


def generation_budget(examples, cap: int, tok: Tokenizer) -> int:
    """Tokens to generate: enough for the longest reference completion in `tok`'s ids
    (+ EOS and a little slack), at most `cap` unless the reference itself needs more."""
    need = max(len(tok.encode(ex.completion)) for ex in examples) + 1
    return max(min(cap, need + 8), need)


def generate_batched(
    graphdef,
    params,
    model_state,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    rng: jax.Array | None = None,
) -> list[list[int]]:
    """KV-cache generation in fixed-shape batches (rows padded to `batch_size`, every
    prompt left-padded to `prompt_width(prompts)`, so the decoder compiles once per
    model and budget): one token list per prompt, cut at (and without) eos_id.

    Greedy at temperature 0, else sampled (temperature, top-p nucleus); batch b
    samples with key fold_in(rng, b), rng = key(seed) by default, so a call is a
    pure function of its seed.
    """
    rng = jax.random.key(seed) if rng is None else rng
    width = prompt_width(prompts)
    out: list[list[int]] = []
    for b, (_, chunk, rows) in enumerate(fixed_batches(prompts, batch_size)):
        tokens, valid = left_pad(rows, pad_id, width)
        new = generate_tokens(
            graphdef,
            params,
            model_state,
            tokens,
            valid,
            jax.random.fold_in(rng, b),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
        )
        out += [cut_at_eos(row, eos_id) for row in new[: len(chunk)].tolist()]
    return out


# ------------------------------------------------------------- one token at a time


def _prefill_fn(graphdef, params, model_state, tokens_BP, valid_BP, *, cache_len: int):
    return prefill_logits(nnx.merge(graphdef, params, model_state), tokens_BP, valid_BP, cache_len)


def _decode_fn(graphdef, params, model_state, cache, token_B, pos_B, index):
    return decode_logits(nnx.merge(graphdef, params, model_state), token_B, pos_B, cache, index)


_STEPPER_FNS: dict = {}  # the latest model's jitted prefill and one-token step (cached_for)


def _stepper_fns(graphdef):
    prefill_fn = cached_for(
        _STEPPER_FNS,
        graphdef,
        "prefill",
        lambda: jax.jit(functools.partial(_prefill_fn, graphdef), static_argnames=("cache_len",)),
    )
    decode_fn = cached_for(
        _STEPPER_FNS,
        graphdef,
        "decode",
        lambda: jax.jit(functools.partial(_decode_fn, graphdef), donate_argnames=("cache",)),
    )
    return prefill_fn, decode_fn


class CachedStepper:
    """The KV-cache decoder one token at a time: `first_logits` [B, V] after the
    prompts (left-padded to `prompt_width`), and stepper(tokens_B) feeds one token
    per row and returns the next logits [B, V].  Room for `max_new` tokens (bucketed)."""

    def __init__(
        self, graphdef, params, model_state, prompts: list[list[int]], max_new: int, pad_id: int = 0
    ):
        width = prompt_width(prompts)
        tokens, valid = left_pad(prompts, pad_id, width)
        prefill_fn, self._decode = _stepper_fns(graphdef)
        self._weights = (params, model_state)
        self.index, self.max_len = width, width + bucketed(max_new)
        self.first_logits, self.cache, self.pos = prefill_fn(
            params, model_state, jnp.asarray(tokens), jnp.asarray(valid), cache_len=self.max_len
        )

    def __call__(self, tokens_B):
        if self.index >= self.max_len:
            raise RuntimeError("CachedStepper: cache full (raise max_new)")
        self.pos = self.pos + 1
        logits, self.cache = self._decode(
            *self._weights, self.cache, jnp.asarray(tokens_B, jnp.int32), self.pos, jnp.int32(self.index)
        )
        self.index += 1
        return logits
