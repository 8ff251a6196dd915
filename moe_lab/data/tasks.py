"""Synthetic tasks (and a local-file source) for the sparsity experiments.

2508.18672 separates *memorization* (TriviaQA: accuracy keeps improving with
total parameters) from *reasoning* (GSM8K: an optimum in tokens-per-parameter).
We need laptop-sized analogues whose difficulty is a config knob:

- `facts`  (memorization): a knowledge base of invented entities x relations.
  The number of facts (num_entities x 5) is the amount to memorize. Eval asks
  *queries* about facts whose *statements* are in the training stream but whose
  query form is held out, so eval measures recall of known facts, not guessing.
- `arith`  (reasoning): chained modular arithmetic with a worked solution in
  <think>...</think>. num_steps sets the chain length; eval may ask for longer
  chains (eval_num_steps) to probe length generalisation. Problems are split by
  a hash of the problem text, so an eval problem can never appear in training.
- `file`   the user's own .txt / .jsonl data with a 5% hash split.

Determinism: example i of a task is a pure function of (seed, i) -- drawn from
`KeyedRng`, a blake2b counter-mode generator -- never of global RNG state or of
library versions (numpy/python RNG streams may change between releases; a hash
does not). This is what makes the grain pipeline's iterator state (an index)
enough to resume training exactly.

Every Example is  prompt + working + marker + answer + suffix:
    arith:  "a=7 b=a+5 c=b*a mod 23. c?" "<think>b=12 c=15</think>" "<answer>" "15" ""
    facts:  "Q: Zorvak job? A:"           ""                        " "        "baker" ""
            "Zorvak's job is"             ""                        " "        "baker" "."
The pipeline uses the split to put `answer_mask` on exactly the answer tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Sequence

import numpy as np

from moe_lab.config import ConfigError, DataConfig
from moe_lab.data.jsonl import iter_jsonl
from moe_lab.data.tokenizer import ANSWER, EOS, SEP, THINK_END, THINK_START

# ------------------------------------------------------------------ primitives


@dataclasses.dataclass(frozen=True)
class Example:
    """One document. `text` is what is trained on; `prompt` is what a model is
    given at generation time and `answer` what `check` compares against."""

    prompt: str
    answer: str
    working: str = ""  # step-by-step reasoning, "<think>...</think>" (arith)
    marker: str = ANSWER  # between working and answer: "<answer>" or " " (facts)
    suffix: str = ""  # after the answer, e.g. "." closing a fact statement
    key: str = ""  # identity used by the split (problem text / fact id / doc hash)

    @property
    def text(self) -> str:
        return self.prompt + self.working + self.marker + self.answer + self.suffix

    @property
    def completion(self) -> str:
        """What a perfect model generates after `prompt` (before EOS)."""
        return self.working + self.marker + self.answer + self.suffix


def stable_hash(s: str) -> int:
    """64-bit hash that is the same in every process and Python version
    (builtin hash() of str is randomised per process)."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little")


class KeyedRng:
    """Random draws that are a pure function of a key (e.g. (seed, salt, i)).

    blake2b in counter mode: each block of 64 bytes gives eight 64-bit words.
    `below(n)` uses a plain modulo; the bias (n / 2**64) is irrelevant here."""

    __slots__ = ("_block", "_key", "_words")

    def __init__(self, *key):
        self._key = "/".join(map(str, key)).encode("utf-8")
        self._block = 0
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            digest = hashlib.blake2b(self._key + b"#%d" % self._block, digest_size=64).digest()
            self._words = list(struct.unpack("<8Q", digest))
            self._block += 1
        return self._words.pop()

    def below(self, n: int) -> int:
        return self._word() % n

    def uniform(self) -> float:
        return self._word() / 2.0**64

    def choice(self, seq: Sequence):
        return seq[self._word() % len(seq)]


def extract_answer(prediction: str) -> str:
    """The answer inside a generated continuation: the text after the last
    "<answer>" marker (if any), cut at EOS / newline / another special."""
    if ANSWER in prediction:
        prediction = prediction.rsplit(ANSWER, 1)[1]
    for stop in (EOS, "\n", SEP, THINK_START, THINK_END, "<pad>"):
        prediction = prediction.split(stop, 1)[0]
    return prediction.strip()


class Task:
    """Interface shared by all tasks (see module docstring)."""

    name: str = "task"
    num_train: int = 0  # size of the train index space (train_example(i % num_train))
    num_eval: int = 0  # size of the eval index space

    def train_example(self, i: int) -> Example:
        raise NotImplementedError

    def eval_example(self, i: int) -> Example:
        raise NotImplementedError

    def check(self, prediction: str, example: Example) -> bool:
        """Exact match of the extracted answer; `prediction` is the generated
        continuation of `example.prompt` (specials decoded as strings)."""
        return extract_answer(prediction) == example.answer.strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_train={self.num_train})"


def _held_out(key: str, fraction: float) -> bool:
    return stable_hash(key) % 10_000 < round(fraction * 10_000)


# ----------------------------------------------------------------------- facts

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sh", "th", "ch", "j")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "k", "s", "x", "m")

_CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Tokyo", "Accra",
           "Hanoi", "Kyiv", "Dakar", "Perth", "Bergen", "Porto", "Austin", "Lagos", "Riga",
           "Seoul", "Tunis", "Zurich", "Bogota", "Havana", "Nairobi")
_JOBS = ("baker", "pilot", "farmer", "nurse", "painter", "tailor", "judge", "miner",
         "sailor", "doctor", "poet", "chemist", "plumber", "dancer", "weaver", "carpenter",
         "lawyer", "drummer", "florist", "teacher", "cook", "jeweler", "mason", "potter")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
            "pink", "brown", "teal", "gold", "silver", "violet", "amber", "crimson",
            "navy", "olive", "maroon", "ivory", "cyan", "lime", "beige")
_PETS = ("cat", "dog", "parrot", "hamster", "rabbit", "turtle", "goldfish", "lizard",
         "ferret", "pony", "snake", "owl", "frog", "goat", "canary", "mouse", "crab",
         "hedgehog", "llama", "duck", "pig", "spider", "bat", "gecko")
_NUMBERS = tuple(str(n) for n in range(100))

# (query word, statement phrase, value vocabulary)
RELATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("city", "home city", _CITIES),
    ("job", "job", _JOBS),
    ("colour", "favourite colour", _COLOURS),
    ("number", "lucky number", _NUMBERS),
    ("pet", "pet", _PETS),
)
_STATEMENT, _STATEMENT_ALT, _QUERY = 0, 1, 2


def invented_names(seed: int, n: int) -> list[str]:
    """n unique pronounceable names ("Zorvak", "Brelimon"), a function of seed.
    2-3 syllables give ~10^8 combinations, far more than any config needs."""
    names: list[str] = []
    seen: set[str] = set()
    k = 0
    while len(names) < n:
        rng = KeyedRng(seed, "facts-name", k)
        k += 1
        syllables = 2 + rng.below(2)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(syllables)).capitalize()
        if name not in seen and len(name) <= 12:
            seen.add(name)
            names.append(name)
    return names


class FactsTask(Task):
    """Memorization of (entity, relation) -> value facts (TriviaQA analogue).

    Train index space = every (entity, relation, template) triple: the fact in
    two statement templates for all facts, plus the query template "Q: E rel? A:
    v" for the facts NOT in the held-out query split (hash of the fact, about
    `eval_fraction` of them). Eval = query form of the held-out facts, so every
    eval query asks about a fact stated in training, in a form never trained.
    """

    name = "facts"

    def __init__(self, seed: int = 0, num_entities: int = 200, eval_fraction: float = 0.2):
        if num_entities < 1:
            raise ConfigError(f"data.facts_num_entities must be >= 1, got {num_entities}")
        self.seed = seed
        self.entities = invented_names(seed, num_entities)
        num_rel = len(RELATIONS)
        # value index of every fact: [entity, relation]
        self.values_ER = np.array(
            [[KeyedRng(seed, "facts-value", e, r).below(len(RELATIONS[r][2]))
              for r in range(num_rel)] for e in range(num_entities)], dtype=np.int32)
        held = np.array([[_held_out(f"facts-split/{seed}/{self.entities[e]}/{r}", eval_fraction)
                          for r in range(num_rel)] for e in range(num_entities)], dtype=bool)
        if not held.any() and held.size > 1:  # tiny KBs: hold out at least one fact
            held.flat[0] = True
        if held.all() and held.size > 1:  # ... and train the query form of at least one
            held.flat[-1] = False
        self.held_out_ER = held
        e_idx, r_idx = np.meshgrid(np.arange(num_entities), np.arange(num_rel), indexing="ij")
        e_idx, r_idx = e_idx.ravel(), r_idx.ravel()
        statements = [np.stack([e_idx, r_idx, np.full_like(e_idx, t)], 1)
                      for t in (_STATEMENT, _STATEMENT_ALT)]
        trained_q = ~held.ravel()
        queries = np.stack([e_idx[trained_q], r_idx[trained_q],
                            np.full(trained_q.sum(), _QUERY)], 1)
        self.train_items_N3 = np.concatenate(statements + [queries]).astype(np.int32)
        self.eval_items_N2 = np.stack([e_idx[~trained_q], r_idx[~trained_q]], 1).astype(np.int32)
        self.num_train = len(self.train_items_N3)
        self.num_eval = len(self.eval_items_N2)
        self.num_facts = held.size

    def value(self, e: int, r: int) -> str:
        return RELATIONS[r][2][self.values_ER[e, r]]

    def _example(self, e: int, r: int, template: int) -> Example:
        name, (word, phrase, _) = self.entities[e], RELATIONS[r]
        value, key = self.value(e, r), f"{name}/{word}"
        if template == _QUERY:
            return Example(prompt=f"Q: {name} {word}? A:", answer=value, marker=" ", key=key)
        if template == _STATEMENT:
            prompt = f"{name}'s {phrase} is"
        else:
            prompt = f"The {phrase} of {name} is"
        return Example(prompt=prompt, answer=value, marker=" ", suffix=".", key=key)

    def train_example(self, i: int) -> Example:
        e, r, t = self.train_items_N3[i % self.num_train]
        return self._example(int(e), int(r), int(t))

    def eval_example(self, i: int) -> Example:
        e, r = self.eval_items_N2[i % self.num_eval]
        return self._example(int(e), int(r), _QUERY)


# ----------------------------------------------------------------------- arith

_VARS = "abcdefghijklmnopqrstuvwxyz"
_OPS = ("+", "-", "*")


def _apply(op: str, x: int, y: int, m: int) -> int:
    return (x + y) % m if op == "+" else (x - y) % m if op == "-" else (x * y) % m


class ArithTask(Task):
    """Multi-step modular arithmetic with worked solutions (GSM8K analogue).

        prompt   "a=7 b=a+5 c=b*a mod 23. c?"
        working  "<think>b=12 c=15</think>"
        answer   "<answer>15"

    Each step defines the next variable from the previous one and either a
    constant or an earlier variable, so answering needs every step in order.
    `num_steps` = number of derived variables. Problems whose hash (of the
    prompt, independent of the seed) falls in the eval bucket are skipped by
    train sampling, so train and eval are disjoint as problem sets.

    `self_correct` = probability that a training solution contains one wrong
    step immediately followed by "Wait" and the corrected step ("c=9 Wait
    c=15"): teaches the model what "Wait" means, for s1-style budget forcing.
    """

    name = "arith"
    _EVAL_FRACTION = 0.1

    def __init__(self, seed: int = 0, num_steps: int = 3, eval_num_steps: int | None = None,
                 modulus: int = 23, self_correct: float = 0.0):
        eval_num_steps = num_steps if eval_num_steps is None else eval_num_steps
        for key, v in (("arith_num_steps", num_steps), ("arith_eval_num_steps", eval_num_steps)):
            if not 1 <= v <= len(_VARS) - 1:
                raise ConfigError(f"data.{key} must be in [1, {len(_VARS) - 1}], got {v}")
        if modulus < 2:
            raise ConfigError(f"data.arith_modulus must be >= 2, got {modulus}")
        if not 0.0 <= self_correct <= 1.0:
            raise ConfigError(f"arith self_correct must be in [0, 1], got {self_correct}")
        self.seed, self.num_steps, self.eval_num_steps = seed, num_steps, eval_num_steps
        self.modulus, self.self_correct = modulus, self_correct
        self.num_train = 2**31
        self.num_eval = 2**31

    def is_eval_problem(self, prompt: str) -> bool:
        return _held_out("arith-split/" + prompt, self._EVAL_FRACTION)

    def _sample(self, rng: KeyedRng, steps: int, self_correct: float) -> Example:
        m = self.modulus
        values = [rng.below(m)]
        parts = [f"a={values[0]}"]
        for k in range(1, steps + 1):
            op = rng.choice(_OPS)
            if k > 1 and rng.below(2):  # an earlier variable (not only the previous one)
                j = rng.below(k)
                operand, y = _VARS[j], values[j]
            else:
                y = 1 + rng.below(m - 1) if m > 2 else 1
                operand = str(y)
            values.append(_apply(op, values[k - 1], y, m))
            parts.append(f"{_VARS[k]}={_VARS[k - 1]}{op}{operand}")
        prompt = " ".join(parts) + f" mod {m}. {_VARS[steps]}?"
        steps_txt = [f"{_VARS[k]}={values[k]}" for k in range(1, steps + 1)]
        if self_correct > 0 and rng.uniform() < self_correct:
            k = 1 + rng.below(steps)
            wrong = (values[k] + 1 + rng.below(m - 1)) % m
            steps_txt[k - 1] = f"{_VARS[k]}={wrong} Wait {_VARS[k]}={values[k]}"
        working = THINK_START + " ".join(steps_txt) + THINK_END
        return Example(prompt=prompt, answer=str(values[steps]), working=working, key=prompt)

    def train_example(self, i: int) -> Example:
        for j in range(10_000):
            ex = self._sample(KeyedRng(self.seed, "arith-train", i, j), self.num_steps,
                              self.self_correct)
            if not self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError(f"data.arith_modulus={self.modulus} with arith_num_steps="
                          f"{self.num_steps} leaves too few problems for a train split")

    def eval_example(self, i: int) -> Example:
        for j in range(100_000):
            ex = self._sample(KeyedRng(self.seed, "arith-eval", i, j), self.eval_num_steps, 0.0)
            if self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError(f"data.arith_modulus={self.modulus} with arith_eval_num_steps="
                          f"{self.eval_num_steps} leaves too few problems for an eval split")


def solve_arith(prompt: str) -> int:
    """Independent reference solver for arith prompts (used by tests/eval)."""
    body, _, query = prompt.rpartition(" mod ")
    m = int(query.split(".")[0])
    env: dict[str, int] = {}
    for assign in body.split():
        var, expr = assign.split("=")
        for op in _OPS:
            lhs, sep, rhs = expr.partition(op)
            if sep and lhs:
                x = env[lhs]
                y = env[rhs] if rhs in env else int(rhs)
                env[var] = _apply(op, x, y, m)
                break
        else:
            env[var] = int(expr) % m
    return env[query.split(". ")[1].rstrip("?")]


# ------------------------------------------------------------------------ file


def _chunk_text(text: str, max_tokens: int) -> list[str]:
    """Splits a long document into pieces of <= max_tokens byte tokens, at
    character boundaries, so nothing is silently truncated by the packer."""
    if len(text.encode("utf-8")) <= max_tokens:
        return [text]
    chunks, start, acc = [], 0, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        if acc + n > max_tokens:
            chunks.append(text[start:i])
            start, acc = i, 0
        acc += n
    chunks.append(text[start:])
    return [c for c in chunks if c.strip()]


def _read_txt(path: str) -> list[tuple[int, Example]]:
    """Documents of a .txt file: paragraphs separated by blank lines; a file with
    no blank line at all has one document per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.files: {path}: not UTF-8 text (byte {e.start})") from None
    docs: list[tuple[int, Example]] = []
    if any(not ln.strip() for ln in lines):
        para, first = [], 0
        for lineno, ln in enumerate(lines + [""], start=1):
            if ln.strip():
                if not para:
                    first = lineno
                para.append(ln)
            elif para:
                docs.append((first, _plain("\n".join(para))))
                para = []
    else:
        docs = [(n, _plain(ln)) for n, ln in enumerate(lines, start=1) if ln.strip()]
    return docs


def _plain(text: str) -> Example:
    return Example(prompt=text, answer="", marker="", key=text)


def _read_jsonl(path: str) -> list[tuple[int, Example]]:
    docs: list[tuple[int, Example]] = []
    for lineno, row in iter_jsonl(path, "data.files:"):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            if row["text"].strip():
                docs.append((lineno, _plain(row["text"])))
        elif (isinstance(row, dict) and isinstance(row.get("prompt"), str)
              and isinstance(row.get("answer"), str)):
            working = row.get("working", "")
            if not isinstance(working, str):
                raise ConfigError(f"data.files: {path}:{lineno}: 'working' must be a string")
            if working:
                working = THINK_START + working + THINK_END
            docs.append((lineno, Example(prompt=row["prompt"], answer=row["answer"],
                                         working=working,
                                         key=row["prompt"] + ANSWER + row["answer"])))
        else:
            raise ConfigError(
                f"data.files: {path}:{lineno}: row needs a string 'text', or string "
                "'prompt' and 'answer' fields"
            )
    return docs


class FileTask(Task):
    """Documents from local .txt / .jsonl files (see `_read_txt`, `_read_jsonl`).

    Eval split: documents whose content hash falls in a 5% bucket (identical
    documents therefore land on the same side). Plain-text documents longer than
    `max_doc_tokens` are split into chunks after the split, so chunks of one
    document never straddle train and eval; prompt/answer rows are kept whole
    (the pipeline truncates them to seq_len if they are longer).
    """

    name = "file"

    def __init__(self, paths: Sequence[str], seed: int = 0, max_doc_tokens: int | None = None,
                 eval_fraction: float = 0.05):
        if not paths:
            raise ConfigError("data.files is empty but the mixture uses 'file'")
        self.seed, self.paths = seed, list(paths)
        docs: list[tuple[str, int, Example]] = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise ConfigError(f"data.files: no such file: {path}")
            if path.endswith(".jsonl"):
                file_docs = _read_jsonl(path)
            elif path.endswith(".txt"):
                file_docs = _read_txt(path)
            else:
                raise ConfigError(f"data.files: {path}: unsupported extension (use .txt or .jsonl)")
            if not file_docs:
                raise ConfigError(f"data.files: {path}: no documents (empty file)")
            docs.extend((path, n, ex) for n, ex in file_docs)
        if len(docs) < 2:
            raise ConfigError(f"data.files: need at least 2 documents for a train/eval split, "
                              f"found {len(docs)} in {', '.join(self.paths)}")
        held = [_held_out("file-split/" + ex.key, eval_fraction) for _, _, ex in docs]
        if not any(held):  # tiny files: the document with the smallest hash goes to eval
            held[min(range(len(docs)), key=lambda k: stable_hash(docs[k][2].key))] = True
        if all(held):
            held[0] = False
        self.train_docs: list[Example] = []
        self.eval_docs: list[Example] = []
        self.sources: dict[str, str] = {}  # key -> "path:line" for error messages / debugging
        for (path, lineno, ex), is_eval in zip(docs, held):
            self.sources.setdefault(ex.key, f"{path}:{lineno}")
            pieces = [ex]
            if max_doc_tokens and not ex.answer:
                pieces = [_plain(c) for c in _chunk_text(ex.prompt, max_doc_tokens)]
            (self.eval_docs if is_eval else self.train_docs).extend(pieces)
        self.num_train, self.num_eval = len(self.train_docs), len(self.eval_docs)

    def train_example(self, i: int) -> Example:
        return self.train_docs[i % self.num_train]

    def eval_example(self, i: int) -> Example:
        return self.eval_docs[i % self.num_eval]


# --------------------------------------------------------------------- factory


def make_task(name: str, data_cfg: DataConfig) -> Task:
    """Builds a task from the DataConfig knobs. `arith_self_correct` is read if
    the config has it (default 0)."""
    if name == "facts":
        return FactsTask(seed=data_cfg.seed, num_entities=data_cfg.facts_num_entities)
    if name == "arith":
        return ArithTask(seed=data_cfg.seed, num_steps=data_cfg.arith_num_steps,
                         eval_num_steps=data_cfg.arith_eval_num_steps,
                         modulus=data_cfg.arith_modulus,
                         self_correct=float(getattr(data_cfg, "arith_self_correct", 0.0)))
    if name == "countdown":
        from moe_lab.data.countdown import CountdownTask  # noqa: PLC0415 (imports this module)

        return CountdownTask(seed=data_cfg.seed, num_numbers=data_cfg.countdown_num_numbers,
                             max_number=data_cfg.countdown_max_number)
    if name == "file":
        paths = [p.strip() for p in data_cfg.files.split(",") if p.strip()]
        # BOS + content + EOS = seq_len + 1 tokens -> seq_len (input, target) pairs
        return FileTask(paths, seed=data_cfg.seed, max_doc_tokens=max(1, data_cfg.seq_len - 1))
    raise ConfigError(f"data.mixture: unknown task '{name}' (valid: facts, arith, countdown, file)")
