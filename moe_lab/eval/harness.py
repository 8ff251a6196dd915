"""Evaluation harness for the user's own JSONL files (GSM8K-, TriviaQA-, HellaSwag-like).

    moe-lab eval --workdir DIR --data FILE.jsonl [--shots K] [--step N]

One JSON object per line:

    {"prompt": "Q: capital of France? A:", "answer": "Paris"}                  exact match
    {"prompt": "...", "answer": "...", "choices": ["...", "...", ...]}          multiple choice
        ("answer" is one of the choices, or the integer index of the right one)

Few-shot prompting: K solved examples from the same file, chosen per item
deterministically (a hash of (seed, item index), never the item itself), are
placed before the item's prompt, each as  prompt + marker + answer + separator.
The default marker is "<answer>", the one moe_lab's `file` task trains with,
so a model trained on prompt/answer rows sees the format it learned.

Scoring:
  exact match      greedy KV-cache generation after the prompt; the answer is
                   the text after the last "<answer>" cut at newline/EOS
                   (tasks.extract_answer), compared exactly, and also after
                   SQuAD-style normalisation (lower case, no punctuation or
                   articles, collapsed spaces) as `accuracy_normalized`.
  multiple choice  log-likelihood of each choice's tokens given the context:
                   `accuracy` uses the sum (acc), `accuracy_length_normalized`
                   the mean per token (acc_norm; the tokenizer is byte-level, so
                   per token = per byte).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import string
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_lab.config.schema import ConfigError
from moe_lab.data.jsonl import iter_jsonl
from moe_lab.data.tasks.base import KeyedRng, extract_answer
from moe_lab.data.tokenizer import ANSWER
from moe_lab.eval.evaluate import load_run, report
from moe_lab.eval.generate import generate_batched
from moe_lab.parallel import sharding
from moe_lab.train.jit_cache import cached_for
from moe_lab.train.run_dir import eval_file
from moe_lab.train.step import forward

LENGTH_BUCKET = 32  # sequences are right-padded to a multiple of this (few compilations)


@dataclasses.dataclass(frozen=True)
class Item:
    prompt: str
    answer: str  # for multiple choice: the text of the right choice
    choices: tuple[str, ...] = ()
    label: int = -1  # index of the right choice
    line: int = 0


def load_items(path: str) -> list[Item]:
    """Reads and checks a JSONL file; every problem is one ConfigError line."""
    if not os.path.isfile(path):
        raise ConfigError(f"eval --data: no such file: {path}")
    items: list[Item] = []
    for lineno, row in iter_jsonl(path, "eval --data"):
        where = f"eval --data {path}:{lineno}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(f"{where}: each row needs a string 'prompt'")
        answer, choices = row.get("answer"), row.get("choices")
        if choices is None:
            if not isinstance(answer, str) or not answer.strip():
                raise ConfigError(f"{where}: 'answer' must be a non-empty string")
            items.append(Item(row["prompt"], answer, line=lineno))
            continue
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise ConfigError(f"{where}: answer index {answer} out of range (0..{len(choices) - 1})")
            label = answer
        elif isinstance(answer, str) and answer in choices:
            label = choices.index(answer)
        else:
            raise ConfigError(f"{where}: 'answer' must be one of 'choices' or its index")
        items.append(Item(row["prompt"], choices[label], tuple(choices), label, lineno))
    if not items:
        raise ConfigError(f"eval --data {path}: no rows (empty file)")
    kinds = {bool(it.choices) for it in items}
    if len(kinds) > 1:
        raise ConfigError(
            f"eval --data {path}: mixes multiple-choice rows (with 'choices') and "
            "exact-match rows; use one kind per file"
        )
    return items


def shot_indices(num_items: int, i: int, shots: int, seed: int = 0) -> list[int]:
    """K distinct indices != i, a pure function of (seed, i)."""
    if shots <= 0:
        return []
    if shots >= num_items:
        raise ConfigError(
            f"eval --shots {shots}: the file has only {num_items} rows (need more rows than shots)"
        )
    pool = [j for j in range(num_items) if j != i]
    rng = KeyedRng(seed, "harness-shots", i)
    for k in range(shots):  # partial Fisher-Yates
        j = k + rng.below(len(pool) - k)
        pool[k], pool[j] = pool[j], pool[k]
    return pool[:shots]


def build_context(
    items: list[Item], i: int, shots: int, *, seed: int = 0, marker: str = ANSWER, separator: str = "\n"
) -> str:
    """Few-shot context for item i: shots then the prompt (without the marker)."""
    parts = [
        items[j].prompt + marker + items[j].answer + separator
        for j in shot_indices(len(items), i, shots, seed)
    ]
    return "".join(parts) + items[i].prompt


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(s: str) -> str:
    """SQuAD-style answer normalisation."""
    s = _ARTICLES.sub(" ", s.lower().translate(_PUNCT))
    return " ".join(s.split())


def exact_match(prediction: str, answer: str) -> tuple[bool, bool]:
    """(exact, normalised) match of the answer extracted from a continuation."""
    got = extract_answer(prediction)
    return got == answer.strip(), normalize(got) == normalize(answer)


# ------------------------------------------------------------------- model side


def _target_logprobs(graphdef, params, model_state, batch):
    """(log p(target), target == argmax) at every position of a (right-padded) batch:
    two [B, T] arrays."""
    logits_BTV, _ = forward(graphdef, params, model_state, batch, train=False)
    lp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    lp_BT = jnp.take_along_axis(lp_BTV, batch["targets"][..., None], axis=-1)[..., 0]
    return lp_BT, jnp.argmax(logits_BTV, axis=-1) == batch["targets"]


_LOGP_FNS: dict = {}  # the latest model's jitted `_target_logprobs` (cached_for)


def choice_logprobs(
    graphdef,
    params,
    model_state,
    contexts: list[list[int]],
    continuations: list[list[int]],
    *,
    batch_size: int,
    max_len: int,
    with_greedy: bool = False,
) -> list:
    """Per-token log p(continuation | context) for each pair (teacher forcing), and with
    `with_greedy` (logprobs, is each token the argmax) pairs.  Contexts longer than
    `max_len` - len(continuation) lose their oldest tokens."""
    seqs, starts = [], []
    for ctx, cont in zip(contexts, continuations):
        keep = max(1, max_len - len(cont))
        ctx = ctx[-keep:]
        seqs.append(ctx + cont)
        starts.append(len(ctx))
    T = LENGTH_BUCKET * math.ceil(max(len(s) for s in seqs) / LENGTH_BUCKET)
    logp = cached_for(
        _LOGP_FNS, graphdef, "logp", lambda: jax.jit(functools.partial(_target_logprobs, graphdef))
    )
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        B = batch_size
        inputs = np.zeros((B, T), np.int32)
        targets = np.zeros((B, T), np.int32)
        seg = np.zeros((B, T), np.int32)
        for r, seq in enumerate(chunk):
            n = len(seq) - 1
            inputs[r, :n], targets[r, :n], seg[r, :n] = seq[:-1], seq[1:], 1
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        lp, greedy = jax.device_get(
            logp(
                params,
                model_state,
                {
                    "inputs": jnp.asarray(inputs),
                    "targets": jnp.asarray(targets),
                    "positions": jnp.asarray(positions),
                    "segment_ids": jnp.asarray(seg),
                },
            )
        )
        for r, seq in enumerate(chunk):
            # target k predicts seq[k + 1]: the continuation is targets start-1 .. len-2
            cut = slice(starts[s + r] - 1, len(seq) - 1)
            out.append((lp[r, cut], greedy[r, cut]) if with_greedy else lp[r, cut])
    return out


def run_harness(
    workdir: str,
    data_path: str,
    *,
    shots: int = 0,
    step: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    limit: int | None = None,
    marker: str = ANSWER,
    separator: str = "\n",
    write: bool = True,
    print_table: bool = True,
    num_samples: int = 3,
) -> dict:
    """Scores the run's checkpoint on a user JSONL file; writes
    DIR/eval/<step>-<file stem>-<K>shot.json."""
    items = load_items(data_path)
    if shots < 0:
        raise ConfigError(f"eval --shots must be >= 0, got {shots}")
    shot_indices(len(items), 0, shots, seed)  # checks shots < rows before loading the model
    t0 = time.perf_counter()
    cfg, setup, state, step = load_run(workdir, step)
    bs = batch_size or cfg.eval.batch_size
    todo = list(range(len(items)))[:limit] if limit else list(range(len(items)))
    contexts = [build_context(items, i, shots, seed=seed, marker=marker, separator=separator) for i in todo]
    mc = bool(items[0].choices)
    result = {
        "workdir": os.path.abspath(workdir),
        "step": step,
        "data": os.path.abspath(data_path),
        "shots": shots,
        "seed": seed,
        "num_examples": len(todo),
        "kind": "multiple_choice" if mc else "exact_match",
    }
    P, M, S = setup.graphdef, state["params"], state["model_state"]
    tok = setup.tokenizer
    with jax.set_mesh(setup.mesh), sharding.use_rules(cfg.mesh.rules, setup.mesh):
        if mc:
            ctx_ids, cont_ids, owner = [], [], []
            for k, i in enumerate(todo):
                ctx = tok.encode(contexts[k] + marker, add_bos=True)
                for c in items[i].choices:
                    ctx_ids.append(ctx)
                    cont_ids.append(tok.encode(c))
                    owner.append(k)
            lps = choice_logprobs(
                P, M, S, ctx_ids, cont_ids, batch_size=bs, max_len=max(cfg.model.max_seq_len, 64)
            )
            sums = [[] for _ in todo]
            means = [[] for _ in todo]
            for k, lp in zip(owner, lps):
                sums[k].append(float(lp.sum()))
                means[k].append(float(lp.mean()))
            labels = [items[i].label for i in todo]
            pred = [int(np.argmax(s)) for s in sums]
            pred_n = [int(np.argmax(m)) for m in means]
            result.update(
                accuracy=float(np.mean([p == y for p, y in zip(pred, labels)])),
                accuracy_length_normalized=float(np.mean([p == y for p, y in zip(pred_n, labels)])),
                chance=float(np.mean([1 / len(items[i].choices) for i in todo])),
            )
            samples = [
                {
                    "prompt": items[i].prompt,
                    "answer": items[i].answer,
                    "loglik": sums[k],
                    "prediction": items[i].choices[pred[k]],
                }
                for k, i in enumerate(todo[:num_samples])
            ]
        else:
            prompts = [tok.encode(c, add_bos=True) for c in contexts]
            out = generate_batched(
                P,
                M,
                S,
                prompts,
                max_new_tokens,
                batch_size=min(bs, len(prompts)),
                pad_id=tok.pad_id,
                eos_id=tok.eos_id,
            )
            preds = [tok.decode(o) for o in out]
            scores = [exact_match(p, items[i].answer) for p, i in zip(preds, todo)]
            # the answer's NLL in bits/token given the context (the task-loss tier)
            lps = choice_logprobs(
                P,
                M,
                S,
                [tok.encode(c + marker, add_bos=True) for c in contexts],
                [tok.encode(items[i].answer) for i in todo],
                batch_size=bs,
                max_len=max(cfg.model.max_seq_len, 64),
            )
            nll = np.concatenate(lps)
            result.update(
                accuracy=float(np.mean([s[0] for s in scores])),
                accuracy_normalized=float(np.mean([s[1] for s in scores])),
                task_loss_bits=float(-nll.mean() / math.log(2)),
                max_new_tokens=max_new_tokens,
            )
            samples = [
                {
                    "prompt": contexts[k][-200:],
                    "answer": items[i].answer,
                    "prediction": preds[k],
                    "correct": scores[k][0],
                }
                for k, i in enumerate(todo[:num_samples])
            ]
    result["samples"] = samples
    result["seconds"] = time.perf_counter() - t0
    return report(
        result,
        harness_path(workdir, step, data_path, shots),
        format_harness,
        write=write,
        print_table=print_table,
    )


def harness_path(workdir: str, step: int, data_path: str, shots: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(data_path))[0])
    return eval_file(workdir, f"{int(step)}-{stem}-{shots}shot")


def format_harness(r: dict) -> str:
    head = (
        f"eval @ step {r['step']} on {os.path.basename(r['data'])} ({r['kind']}, "
        f"{r['shots']}-shot, n={r['num_examples']})"
    )
    if r["kind"] == "multiple_choice":
        body = (
            f"accuracy {r['accuracy']:.3f}  length-normalised {r['accuracy_length_normalized']:.3f}"
            f"  chance {r['chance']:.3f}"
        )
    else:
        body = (
            f"exact match {r['accuracy']:.3f}  normalised {r['accuracy_normalized']:.3f}  "
            f"answer NLL {r['task_loss_bits']:.3f} bits/token"
        )
    return head + "\n" + body
