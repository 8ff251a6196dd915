"""Task primitives: Example, the keyed RNG, the Task interface, the answer extractor.

Synthetic tasks (and a local-file source) for the sparsity experiments.

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
import struct
from collections.abc import Sequence

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
