"""Budget forcing (s1, arXiv 2501.19393) as a token-level controller around a decoder.

Maximum budget: when the thinking budget is reached, append the end-of-thinking
delimiter and the answer marker so the model must answer. Minimum budget /
extrapolation: when the model ends thinking early, suppress the delimiter and
append " Wait", N times.  The decoder it controls is generate.CachedStepper (the
KV-cache decoder one token at a time); moe_lab/eval/test_time.py runs the tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from moe_lab.data.tokenizer import BYTE_TOKENIZER, Tokenizer
from moe_lab.eval.generate import CachedStepper, fixed_batches

# ------------------------------------------------------------ budget forcing


@dataclasses.dataclass(frozen=True)
class Forcing:
    """One budget-forcing setting (token counts are thinking tokens after <think>)."""

    max_think: int | None = None  # force "</think><answer>" on reaching it (None: no cap)
    min_think: int = 0  # suppress an earlier end of thinking (append `wait`)
    num_waits: int = 0  # suppress the first N ends of thinking (append `wait`)
    wait: str = " Wait"
    max_answer: int = 8  # answer tokens after <answer> (then the row stops)
    open_think: bool = True  # force "<think>" as the first token
    temperature: float = 0.0
    top_p: float = 1.0


_THINK, _ANSWER, _DONE = 0, 1, 2


def _sample_host(
    logits_BV: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float
) -> np.ndarray:
    if temperature == 0.0:
        return np.argmax(logits_BV, axis=-1)
    z = logits_BV / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        ps = np.take_along_axis(p, order, -1)
        keep = np.cumsum(ps, -1) - ps < top_p
        mask = np.zeros_like(p, bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def budget_force(
    first_logits_BV,
    step_fn: Callable,
    forcing: Forcing,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    tok: Tokenizer = BYTE_TOKENIZER,
) -> list[dict]:
    """Runs the budget-forcing controller; returns per row {"tokens", "think_len",
    "forced_end", "waits", "ended"}.

    first_logits_BV: the model's logits for the first new token (after the prompt);
    step_fn(tokens_B) feeds one token per row and returns the next logits [B, V]
    (a KV-cache decoder, or any scripted fake model).  Token ids come from the
    run's tokenizer `tok` (THINK_START / THINK_END / ANSWER / EOS, " Wait" encoded).
    """
    f = forcing
    if f.max_think is not None and f.max_think < 0:
        raise ValueError(f"max_think must be >= 0, got {f.max_think}")
    wait_ids = tok.encode(f.wait)
    end_ids = {tok.think_end_id, tok.answer_id, tok.eos_id}
    logits = np.asarray(first_logits_BV)
    B = logits.shape[0]
    rng = np.random.default_rng(seed)
    rows = [
        {
            "tokens": [],
            "think_len": 0,
            "forced_end": False,
            "waits": 0,
            "ended": False,
            "phase": _THINK,
            "queue": [tok.think_start_id] if f.open_think else [],
            "opened": not f.open_think,
            "answer_len": 0,
        }
        for _ in range(B)
    ]
    cap = f.max_think if f.max_think is not None else 10**9
    limit = max_steps or (
        min(cap, 4096) + (len(wait_ids) + 1) * (f.num_waits + 1) + f.min_think + f.max_answer + 4
    )
    for _ in range(limit):
        if all(r["phase"] == _DONE for r in rows):
            break
        sampled = _sample_host(logits, rng, f.temperature, f.top_p)
        feed = np.full((B,), tok.pad_id, np.int32)
        for b, r in enumerate(rows):
            if r["phase"] == _DONE:
                feed[b] = tok.eos_id
                continue
            if r["phase"] == _THINK and r["opened"] and not r["queue"] and r["think_len"] >= cap:
                r["queue"] = [tok.think_end_id, tok.answer_id]  # max budget reached
                r["forced_end"] = True
            if r["queue"]:
                t = r["queue"].pop(0)
                forced = True
            else:
                t, forced = int(sampled[b]), False
            if r["phase"] == _THINK:
                if t == tok.think_start_id and not r["opened"]:
                    r["opened"] = True
                elif not forced and t in end_ids:
                    push = r["waits"] < f.num_waits or r["think_len"] < f.min_think
                    if push and r["think_len"] + len(wait_ids) <= cap:
                        r["waits"] += 1  # suppress the end, append "Wait"
                        r["queue"] = wait_ids[1:]
                        t = wait_ids[0]
                        r["think_len"] += 1
                    else:
                        r["phase"] = _ANSWER if t != tok.eos_id else _DONE
                        r["ended"] = True
                        if t == tok.think_end_id:
                            r["queue"] = [tok.answer_id]
                elif forced and t == tok.think_end_id:
                    pass  # forced end: <answer> is already queued
                elif forced and t == tok.answer_id:
                    r["phase"] = _ANSWER
                else:
                    r["think_len"] += 1
            elif r["phase"] == _ANSWER:
                if t == tok.answer_id and forced:
                    pass
                elif t == tok.eos_id:
                    r["phase"] = _DONE
                else:
                    r["answer_len"] += 1
                    if r["answer_len"] >= f.max_answer:
                        r["phase"] = _DONE
            r["tokens"].append(t)
            feed[b] = t
        if all(r["phase"] == _DONE for r in rows):
            break
        logits = np.asarray(step_fn(feed))
    return [{k: r[k] for k in ("tokens", "think_len", "forced_end", "waits", "ended")} for r in rows]


def forcing_tokens(forcing: Forcing, tok: Tokenizer = BYTE_TOKENIZER) -> int:
    """An upper bound on the tokens one row writes under `forcing`."""
    cap = forcing.max_think if forcing.max_think is not None else 256
    return (
        cap
        + (len(tok.encode(forcing.wait)) + 1) * (forcing.num_waits + 1)
        + forcing.min_think
        + forcing.max_answer
        + 8
    )


def run_forcing(
    graphdef,
    params,
    model_state,
    task,
    examples,
    forcing: Forcing,
    *,
    tok: Tokenizer,
    batch_size: int = 64,
    seed: int = 0,
    max_new: int | None = None,
) -> dict:
    """Budget forcing on `examples`: accuracy, control (within max_think), mean thinking.
    `max_new` (>= forcing_tokens) fixes the cache length: one compilation for a table."""
    max_new = max(max_new or 0, forcing_tokens(forcing, tok))
    rows = []
    for s, chunk, padded in fixed_batches(examples, batch_size):
        prompts = [tok.encode(ex.prompt, add_bos=True) for ex in padded]
        stepper = CachedStepper(graphdef, params, model_state, prompts, max_new, pad_id=tok.pad_id)
        out = budget_force(
            stepper.first_logits, stepper, forcing, seed=seed + s, max_steps=max_new - 1, tok=tok
        )
        for ex, r in zip(chunk, out):
            text = tok.decode(t for t in r["tokens"] if t != tok.eos_id)
            rows.append({**r, "correct": bool(task.check(text, ex)), "text": text})
    within = [forcing.max_think is None or r["think_len"] <= forcing.max_think for r in rows]
    return {
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "control": float(np.mean(within)),
        "within": within,
        "think_lens": [r["think_len"] for r in rows],
        "mean_think": float(np.mean([r["think_len"] for r in rows])),
        "forced_end": float(np.mean([r["forced_end"] for r in rows])),
        "mean_waits": float(np.mean([r["waits"] for r in rows])),
        "sample": rows[0]["text"] if rows else "",
    }
