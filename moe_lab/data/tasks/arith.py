"""`arith`: the reasoning task (chained modular arithmetic with a worked solution)."""

from __future__ import annotations

from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.base import Example, KeyedRng, Task, _held_out
from moe_lab.data.tokenizer import THINK_END, THINK_START

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

    `direct` = probability that a training solution shows no working
    ("<think></think><answer>15"), as answer-only rows sit beside worked solutions in
    real pre-training data.  A model trained on both has two strategies for a new
    problem: answering at once (a whole chain in one step: near chance on held-out
    problems) and working it out (composing steps it has seen).  Greedy decoding takes
    whichever starts more likely; samples take both, so votes can find the worked
    answer (majority@k) and RL can learn to prefer it (DeepSeekMath's "RL boosts
    Maj@K into Pass@1"): the base for issue 21's (d) and (e).  Eval prompts are the
    same either way: the model chooses.
    """

    name = "arith"
    _EVAL_FRACTION = 0.1

    def __init__(
        self,
        seed: int = 0,
        num_steps: int = 3,
        eval_num_steps: int | None = None,
        modulus: int = 23,
        self_correct: float = 0.0,
        direct: float = 0.0,
    ):
        eval_num_steps = num_steps if eval_num_steps is None else eval_num_steps
        for key, v in (("arith_num_steps", num_steps), ("arith_eval_num_steps", eval_num_steps)):
            if not 1 <= v <= len(_VARS) - 1:
                raise ConfigError(f"data.{key} must be in [1, {len(_VARS) - 1}], got {v}")
        if modulus < 2:
            raise ConfigError(f"data.arith_modulus must be >= 2, got {modulus}")
        for key, v in (("arith_self_correct", self_correct), ("arith_direct", direct)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{key} must be in [0, 1], got {v}")
        self.seed, self.num_steps, self.eval_num_steps = seed, num_steps, eval_num_steps
        self.modulus, self.self_correct, self.direct = modulus, self_correct, direct
        self.num_train = 2**31
        self.num_eval = 2**31

    def is_eval_problem(self, prompt: str) -> bool:
        return _held_out("arith-split/" + prompt, self._EVAL_FRACTION)

    def _sample(self, rng: KeyedRng, steps: int, self_correct: float, direct: float = 0.0) -> Example:
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
        if direct > 0 and rng.uniform() < direct:  # no draw at 0: old runs' data unchanged
            working = THINK_START + THINK_END
        return Example(prompt=prompt, answer=str(values[steps]), working=working, key=prompt)

    def train_example(self, i: int) -> Example:
        for j in range(10_000):
            ex = self._sample(
                KeyedRng(self.seed, "arith-train", i, j), self.num_steps, self.self_correct, self.direct
            )
            if not self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError(
            f"data.arith_modulus={self.modulus} with arith_num_steps="
            f"{self.num_steps} leaves too few problems for a train split"
        )

    def eval_example(self, i: int) -> Example:
        for j in range(100_000):
            ex = self._sample(KeyedRng(self.seed, "arith-eval", i, j), self.eval_num_steps, 0.0)
            if self.is_eval_problem(ex.prompt):
                return ex
        raise ConfigError(
            f"data.arith_modulus={self.modulus} with arith_eval_num_steps="
            f"{self.eval_num_steps} leaves too few problems for an eval split"
        )
