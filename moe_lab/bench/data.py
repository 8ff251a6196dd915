"""Data pipeline benchmark (`moe-lab bench data`): the corpus path against what it feeds.

Targets (issue 19), each a ratio measured in this one run:
  - prepare tokens/s (2 workers: tokenize, write shards, bookkeeping) / the
    tokenizer's own batch-encode tokens/s in one process: >= 0.7;
  - the training iterator's tokens/s (shuffle, decode, concat-then-split packing,
    batching; in-process) / the small dense config's train-step tokens/s: >= 20
    (the same iterator in 2 grain worker processes, data.workers=2, is reported too);
  - start-up time and peak RSS of the pipeline (open the corpus, build the
    iterator, first batch; a fresh process each) over a corpus 10x larger / the
    smaller one: <= 1.2 each.
Corpora are synthetic prose (data/synthetic_text.py) tokenized with a BPE
vocabulary trained on it; sizes: quick 0.1M / 1M tokens, full 2M / 20M tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from moe_lab.accounting.hardware import peak_flops_per_device
from moe_lab.bench.common import print_targets, target
from moe_lab.bench.train_step import _config, measure_throughput
from moe_lab.config.schema import DataConfig
from moe_lab.data import pipeline
from moe_lab.data.prepare import prepare
from moe_lab.data.sources import Skipped, expand_inputs, iter_unit, plan_units
from moe_lab.data.synthetic_text import SyntheticText
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.data.tokenizer_train import train_bpe

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from moe_lab.config.schema import DataConfig
from moe_lab.data import pipeline
cfg = DataConfig(mixture="corpus:1", corpus=sys.argv[1], tokenizer=sys.argv[2], seq_len=256)
it = pipeline.make_train_iterator(cfg, 16, seed=0)
next(it)
# VmHWM: this process's own peak (ru_maxrss would carry the forking parent's peak over exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_kib": hwm}))
"""


def _startup(corpus: str, tok: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, corpus, tok],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:

    docs_small = 1_000 if quick else 18_000  # ~114 tokens per document
    tmp = tempfile.mkdtemp(prefix="moe_lab_bench_data_")
    quiet = dict(progress=False, log=lambda *_: None)
    try:
        text = SyntheticText(0)
        small_dir, big_dir = os.path.join(tmp, "small"), os.path.join(tmp, "big")
        text.write_jsonl(small_dir, docs_small, files=4, log=lambda *_: None)
        text.write_jsonl(big_dir, 10 * docs_small, files=16, log=lambda *_: None)
        tok_path = os.path.join(tmp, "tok.json")
        train_bpe(f"{small_dir}/*.jsonl", 1024, tok_path, log=lambda *_: None)
        tok = load_tokenizer(tok_path)

        # the tokenizer alone, one process, batched, on the big corpus's documents
        units = plan_units(expand_inputs(f"{big_dir}/*.jsonl"), None, "text")
        docs = [d for u in units for d in iter_unit(u, "text", Skipped())]
        t0 = time.perf_counter()
        n_tok = sum(len(x) + 2 for s in range(0, len(docs), 512) for x in tok.encode_batch(docs[s : s + 512]))
        encode_tps = n_tok / (time.perf_counter() - t0)
        del docs

        t0 = time.perf_counter()
        meta_big = prepare(
            f"{big_dir}/*.jsonl", tok_path, os.path.join(tmp, "c_big"), workers=2, heldout=0.001, **quiet
        )
        prep_s = time.perf_counter() - t0
        prep_tokens = meta_big["tokens"] + meta_big["heldout_tokens"]
        meta_small = prepare(
            f"{small_dir}/*.jsonl", tok_path, os.path.join(tmp, "c_small"), workers=2, heldout=0.001, **quiet
        )

        # the iterator in-process against the small dense config's train step
        cfg = DataConfig(
            mixture="corpus:1", corpus=os.path.join(tmp, "c_big"), tokenizer=tok_path, seq_len=256
        )
        it = pipeline.make_train_iterator(cfg, 16, seed=0)
        next(it)
        n_batches = 20 if quick else 200
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(it)
        iter_tps = n_batches * 16 * 256 / (time.perf_counter() - t0)
        # the same in 2 grain worker processes (data.workers=2), after their start-up
        workers_it = pipeline.make_train_iterator(dataclasses.replace(cfg, workers=2), 16, seed=0)
        next(workers_it)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            next(workers_it)
        workers_tps = n_batches * 16 * 256 / (time.perf_counter() - t0)
        del workers_it
        small = _config(128, 2, 4, 4, 64, 2) if quick else _config(512, 8, 8, 8, 256, 8)
        peak, _ = peak_flops_per_device("float32")
        step_tps = measure_throughput(small, peak, 3 if quick else 5)["tokens_per_sec"]

        start_small = _startup(os.path.join(tmp, "c_small"), tok_path)
        start_big = _startup(os.path.join(tmp, "c_big"), tok_path)
        return {
            "name": "data",
            "quick": quick,
            "tokenizer": tok.describe(),
            "tokens_small": meta_small["tokens"],
            "tokens_big": meta_big["tokens"],
            "encode_tokens_per_sec": encode_tps,
            "prepare_tokens_per_sec": prep_tokens / prep_s,
            "prepare_seconds": prep_s,
            "prepare_shards": len(meta_big["shards"]),
            "iterator_tokens_per_sec": iter_tps,
            "iterator_workers2_tokens_per_sec": workers_tps,
            "train_step_tokens_per_sec": step_tps,
            "startup_small": start_small,
            "startup_big": start_big,
            "targets": [
                target(
                    "prepare tok/s (2 workers) / tokenizer batch-encode tok/s",
                    prep_tokens / prep_s / encode_tps,
                    0.7,
                    at_least=True,
                ),
                target(
                    "iterator tok/s / small dense train-step tok/s", iter_tps / step_tps, 20.0, at_least=True
                ),
                target(
                    "pipeline start-up time, 10x corpus / 1x",
                    start_big["seconds"] / start_small["seconds"],
                    1.2,
                ),
                target(
                    "pipeline peak RSS, 10x corpus / 1x", start_big["rss_kib"] / start_small["rss_kib"], 1.2
                ),
            ],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_print(r: dict) -> None:
    print(f"data benchmark: {r['tokenizer']}; corpora {r['tokens_small']:,} / {r['tokens_big']:,} tokens")
    print(
        f"  tokenizer batch-encode {r['encode_tokens_per_sec']:,.0f} tok/s | prepare "
        f"{r['prepare_tokens_per_sec']:,.0f} tok/s ({r['prepare_shards']} shards, "
        f"{r['prepare_seconds']:.1f}s) | iterator {r['iterator_tokens_per_sec']:,.0f} tok/s "
        f"(2 workers: {r['iterator_workers2_tokens_per_sec']:,.0f}) | "
        f"small dense train step {r['train_step_tokens_per_sec']:,.0f} tok/s"
    )
    for k in ("startup_small", "startup_big"):
        print(f"  {k}: {r[k]['seconds']:.2f}s, peak RSS {r[k]['rss_kib'] / 1024:.0f} MiB")
    print_targets(r["targets"])
