"""Synthetic prose for the corpus pipeline's demo, tests and benchmark: paragraphs
about the facts task's invented entities with worked arithmetic chains, so a BPE
vocabulary has something to learn.  `document(i)` is a pure function of
(seed, i); `write_jsonl` writes {"text": ...} rows atomically and never
overwrites a file."""

from __future__ import annotations

import json
import os
import random

from moe_lab.data.tasks.arith import ArithTask
from moe_lab.data.tasks.facts import FactsTask

FILLER = (
    "In the old records",
    "According to the survey",
    "Most accounts agree that",
    "It is often said that",
    "The archive notes that",
    "Travellers report that",
)


class SyntheticText:
    def __init__(self, seed: int = 0):
        self.seed = seed
        self.facts = FactsTask(seed=seed, num_entities=500)
        self.arith = ArithTask(seed=seed)

    def document(self, i: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + i)
        parts = []
        for _ in range(rng.randint(2, 8)):
            ex = self.facts.train_example(rng.randrange(self.facts.num_train))
            parts.append(f"{rng.choice(FILLER)} {ex.prompt.strip()} {ex.answer}.")
            if rng.random() < 0.3:
                a = self.arith.train_example(rng.randrange(10**6))
                parts.append(f"Worked problem: {a.prompt} {a.answer}.")
        return " ".join(parts)

    def write_jsonl(self, out_dir: str, documents: int, files: int = 2, log=print) -> list[str]:
        """documents split over `files` part-NNNN.jsonl files in out_dir; existing kept."""
        os.makedirs(out_dir, exist_ok=True)
        per_file = -(-documents // files)
        paths = []
        for k in range(files):
            path = os.path.join(out_dir, f"part-{k:04d}.jsonl")
            paths.append(path)
            if os.path.exists(path):
                log(f"{path} exists; kept")
                continue
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                for i in range(k * per_file, min((k + 1) * per_file, documents)):
                    f.write(json.dumps({"text": self.document(i)}) + "\n")
            os.replace(tmp, path)
            log(f"wrote {path}")
        return paths
