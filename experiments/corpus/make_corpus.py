"""Writes a synthetic text corpus (JSONL, {"text": ...} rows) for the corpus pipeline:
the demo's small one, and the >= 100M-token one of the flat-memory check.

    python experiments/corpus/make_corpus.py --out runs/corpus_text --documents 4000
    python experiments/corpus/make_corpus.py --out /data/big_text --documents 2000000 --files 16

Documents are prose-like paragraphs about the facts task's invented entities plus
worked arithmetic chains, so a BPE vocabulary has something to learn and a model
something to predict.  Deterministic in (--seed, document index); files are
written atomically (a killed run leaves no half file) and an existing file is
never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from moe_lab.data.tasks.arith import ArithTask
from moe_lab.data.tasks.facts import FactsTask

FILLER = ("In the old records", "According to the survey", "Most accounts agree that",
          "It is often said that", "The archive notes that", "Travellers report that")


def document(i: int, facts: FactsTask, arith: ArithTask, seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + i)
    parts = []
    for _ in range(rng.randint(2, 8)):
        ex = facts.train_example(rng.randrange(facts.num_train))
        parts.append(f"{rng.choice(FILLER)} {ex.prompt.strip()} {ex.answer}.")
        if rng.random() < 0.3:
            a = arith.train_example(rng.randrange(10**6))
            parts.append(f"Worked problem: {a.prompt} {a.answer}.")
    return " ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--documents", type=int, default=4000)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    facts, arith = FactsTask(seed=args.seed, num_entities=500), ArithTask(seed=args.seed)
    per_file = -(-args.documents // args.files)
    for k in range(args.files):
        path = os.path.join(args.out, f"part-{k:04d}.jsonl")
        if os.path.exists(path):
            print(f"{path} exists; kept")
            continue
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            for i in range(k * per_file, min((k + 1) * per_file, args.documents)):
                f.write(json.dumps({"text": document(i, facts, arith, args.seed)}) + "\n")
        os.replace(tmp, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
