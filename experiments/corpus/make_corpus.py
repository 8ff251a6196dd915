"""Writes a synthetic text corpus (JSONL, {"text": ...} rows; moe_lab/data/synthetic_text.py)
for the corpus pipeline: the demo's small one, and the large one of the flat-memory check.

    python experiments/corpus/make_corpus.py --out runs/corpus_text --documents 4000
    python experiments/corpus/make_corpus.py --out /data/big_text --documents 900000 --files 16

About 114 tokens per document with the demo's 1024-id BPE vocabulary (900k
documents: ~100M tokens).  Deterministic in (--seed, document index); files are
written atomically and an existing file is never overwritten.
"""

from __future__ import annotations

import argparse

from moe_lab.data.synthetic_text import SyntheticText


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--documents", type=int, default=4000)
    p.add_argument("--files", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    SyntheticText(args.seed).write_jsonl(args.out, args.documents, args.files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
