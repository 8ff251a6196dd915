"""`countdown`: reach a target from given numbers with + - * / (TinyZero's RL task).

    prompt   "Make 36 from 3 19 74 with +-*/."
    working  "<think>74-19=55 55-3=52 ...</think>"     (the generator's own solution)
    answer   "74-19-3"                                   (any valid expression is right)

Correctness is decided by a verifier, not by string match (`verify`): the
answer must be an arithmetic expression over integers with + - * / and
parentheses, using only the given numbers, each at most as often as it is
given (TinyZero requires every number exactly once: `use_all=True`), and its
exact value (rational arithmetic, no floats; division by zero is invalid)
must equal the target.  The parser is a small recursive-descent parser: no
`eval`.

Problems are generated left to right over a random order of the numbers with
operations that keep every intermediate a positive integer (division only when
exact), so every problem has a solution; the split is by a hash of the prompt,
like `arith`.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.base import Example, KeyedRng, Task, _held_out, extract_answer
from moe_lab.data.tokenizer import THINK_END, THINK_START

_PROMPT_RE = re.compile(r"^Make (\d+) from ((?:\d+ )*\d+) with \+-\*/\.$")
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|(.))")


class ExprError(ValueError):
    """Not a valid countdown expression."""


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, integers used) of an expression with + - * / ( ); raises ExprError."""
    tokens: list[tuple[str, object]] = []
    for num, op in _TOKEN_RE.findall(text.strip()):
        if num:
            if len(num) > 6:
                raise ExprError(f"number too long: {num}")
            tokens.append(("num", int(num)))
        elif op in "+-*/()":
            tokens.append(("op", op))
        elif op.strip():
            raise ExprError(f"unexpected character {op!r}")
    if not tokens:
        raise ExprError("empty expression")
    pos = 0
    used: list[int] = []

    def peek():
        return tokens[pos] if pos < len(tokens) else ("end", None)

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Fraction:
        if depth > 32:
            raise ExprError("too deeply nested")
        v = term(depth)
        while peek() in (("op", "+"), ("op", "-")):
            op = take()[1]
            w = term(depth)
            v = v + w if op == "+" else v - w
        return v

    def term(depth: int) -> Fraction:
        v = atom(depth)
        while peek() in (("op", "*"), ("op", "/")):
            op = take()[1]
            w = atom(depth)
            if op == "*":
                v = v * w
            elif w == 0:
                raise ExprError("division by zero")
            else:
                v = v / w
        return v

    def atom(depth: int) -> Fraction:
        kind, val = take() if pos < len(tokens) else ("end", None)
        if kind == "num":
            used.append(val)
            return Fraction(val)
        if (kind, val) == ("op", "("):
            v = expr(depth + 1)
            if peek() != ("op", ")"):
                raise ExprError("missing ')'")
            take()
            return v
        raise ExprError(f"unexpected {val if val is not None else 'end'}")  # incl. unary minus

    value = expr(0)
    if pos != len(tokens):
        raise ExprError(f"trailing {tokens[pos][1]}")
    return value, used


def verify(expression: str, numbers: list[int], target: int, *, use_all: bool = False) -> bool:
    """True iff `expression` is valid over `numbers` (each at most once, or exactly
    once with use_all) and equals `target` exactly."""
    try:
        value, used = parse_expression(expression)
    except ExprError:
        return False
    have, need = Counter(numbers), Counter(used)
    if any(need[x] > have[x] for x in need):
        return False
    if use_all and need != have:
        return False
    return value == target


def parse_prompt(prompt: str) -> tuple[int, list[int]]:
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not a countdown prompt: {prompt!r}")
    return int(m.group(1)), [int(x) for x in m.group(2).split()]


class CountdownTask(Task):
    """TinyZero's countdown (see module docstring)."""

    name = "countdown"
    _EVAL_FRACTION = 0.1

    def __init__(self, seed: int = 0, num_numbers: int = 3, max_number: int = 20, use_all: bool = False):
        if not 2 <= num_numbers <= 6:
            raise ConfigError(f"data.countdown_num_numbers must be in [2, 6], got {num_numbers}")
        if max_number < 2:
            raise ConfigError(f"data.countdown_max_number must be >= 2, got {max_number}")
        self.seed, self.num_numbers, self.max_number = seed, num_numbers, max_number
        self.use_all = use_all
        self.num_train = 2**31
        self.num_eval = 2**31

    def _sample(self, rng: KeyedRng) -> Example:
        nums = [1 + rng.below(self.max_number) for _ in range(self.num_numbers)]
        order = list(range(len(nums)))
        for i in range(len(order) - 1, 0, -1):  # Fisher-Yates
            j = rng.below(i + 1)
            order[i], order[j] = order[j], order[i]
        v = nums[order[0]]
        expr, low = str(v), True  # low: the expression's top operator is + or - (or a number)
        steps = []
        for i in order[1:]:
            x = nums[i]
            ops = ["+", "*"] + (["-"] if v > x else []) + (["/"] if x > 1 and v % x == 0 else [])
            op = rng.choice(ops)
            new = {"+": v + x, "-": v - x, "*": v * x, "/": v // x if op == "/" else 0}[op]
            steps.append(f"{v}{op}{x}={new}")
            if op in "*/" and low and not expr.isdigit():
                expr = f"({expr})"
            expr = f"{expr}{op}{x}"
            low = op in "+-"
            v = new
        shown = " ".join(str(x) for x in nums)
        prompt = f"Make {v} from {shown} with +-*/."
        working = THINK_START + " ".join(steps) + THINK_END
        return Example(prompt=prompt, answer=expr, working=working, key=prompt)

    def is_eval_problem(self, prompt: str) -> bool:
        return _held_out("countdown-split/" + prompt, self._EVAL_FRACTION)

    def train_example(self, i: int) -> Example:
        for j in range(10_000):
            ex = self._sample(KeyedRng(self.seed, "countdown-train", i, j))
            if not self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError("countdown: too few problems for a train split")

    def eval_example(self, i: int) -> Example:
        for j in range(100_000):
            ex = self._sample(KeyedRng(self.seed, "countdown-eval", i, j))
            if self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError("countdown: too few problems for an eval split")

    def check(self, prediction: str, example: Example) -> bool:
        target, nums = parse_prompt(example.prompt)
        return verify(extract_answer(prediction), nums, target, use_all=self.use_all)

    def vote_key(self, prediction: str, example: Example) -> str:
        """Majority vote groups answers by meaning: a legal expression votes for its
        value ("=36"), anything else for its own text."""
        expr = extract_answer(prediction)
        target, nums = parse_prompt(example.prompt)
        try:
            value, used = parse_expression(expr)
        except ExprError:
            return "invalid:" + expr
        have, need = Counter(nums), Counter(used)
        if any(need[x] > have[x] for x in need) or (self.use_all and need != have):
            return "invalid:" + expr
        return f"={value}"
