"""`facts`: the memorization task (a knowledge base of invented entities)."""

from __future__ import annotations

import numpy as np

from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.base import Example, KeyedRng, Task, _held_out

# ----------------------------------------------------------------------- facts

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "st",
    "sh",
    "th",
    "ch",
    "j",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "k", "s", "x", "m")

_CITIES = (
    "Paris",
    "Lima",
    "Oslo",
    "Cairo",
    "Delhi",
    "Quito",
    "Rome",
    "Tokyo",
    "Accra",
    "Hanoi",
    "Kyiv",
    "Dakar",
    "Perth",
    "Bergen",
    "Porto",
    "Austin",
    "Lagos",
    "Riga",
    "Seoul",
    "Tunis",
    "Zurich",
    "Bogota",
    "Havana",
    "Nairobi",
)
_JOBS = (
    "baker",
    "pilot",
    "farmer",
    "nurse",
    "painter",
    "tailor",
    "judge",
    "miner",
    "sailor",
    "doctor",
    "poet",
    "chemist",
    "plumber",
    "dancer",
    "weaver",
    "carpenter",
    "lawyer",
    "drummer",
    "florist",
    "teacher",
    "cook",
    "jeweler",
    "mason",
    "potter",
)
_COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "grey",
    "pink",
    "brown",
    "teal",
    "gold",
    "silver",
    "violet",
    "amber",
    "crimson",
    "navy",
    "olive",
    "maroon",
    "ivory",
    "cyan",
    "lime",
    "beige",
)
_PETS = (
    "cat",
    "dog",
    "parrot",
    "hamster",
    "rabbit",
    "turtle",
    "goldfish",
    "lizard",
    "ferret",
    "pony",
    "snake",
    "owl",
    "frog",
    "goat",
    "canary",
    "mouse",
    "crab",
    "hedgehog",
    "llama",
    "duck",
    "pig",
    "spider",
    "bat",
    "gecko",
)
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
        name = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        ).capitalize()
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
            [
                [KeyedRng(seed, "facts-value", e, r).below(len(RELATIONS[r][2])) for r in range(num_rel)]
                for e in range(num_entities)
            ],
            dtype=np.int32,
        )
        held = np.array(
            [
                [
                    _held_out(f"facts-split/{seed}/{self.entities[e]}/{r}", eval_fraction)
                    for r in range(num_rel)
                ]
                for e in range(num_entities)
            ],
            dtype=bool,
        )
        if not held.any() and held.size > 1:  # tiny KBs: hold out at least one fact
            held.flat[0] = True
        if held.all() and held.size > 1:  # ... and train the query form of at least one
            held.flat[-1] = False
        self.held_out_ER = held
        e_idx, r_idx = np.meshgrid(np.arange(num_entities), np.arange(num_rel), indexing="ij")
        e_idx, r_idx = e_idx.ravel(), r_idx.ravel()
        statements = [
            np.stack([e_idx, r_idx, np.full_like(e_idx, t)], 1) for t in (_STATEMENT, _STATEMENT_ALT)
        ]
        trained_q = ~held.ravel()
        queries = np.stack([e_idx[trained_q], r_idx[trained_q], np.full(trained_q.sum(), _QUERY)], 1)
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
