"""`moe-lab prepare`: tokenize a corpus once into ArrayRecord shards every host reads.

    moe-lab prepare --input 'data/*.jsonl' --tokenizer tok.json --out corpora/web [--workers 8]

Layout of DIR:
    train-<unit>.array_record    one record per document: its token ids (BOS ... EOS)
                                 as little-endian uint16 (vocab <= 65535) or uint32
    heldout-<unit>.array_record  the held-out documents of the unit (eval loss)
    units/<unit>.json            a finished unit: documents, tokens, skipped, bytes
    plan.json                    what is being prepared (inputs, tokenizer, options)
    meta.json                    written last: the finished corpus (tokenizer
                                 fingerprint, per-shard documents and tokens, the
                                 sources with sizes and sha256, the held-out split)

Deterministic: work units (data/sources.py) depend on the input files only, a
unit's shard is a function of the unit, and a document is held out by a hash of
(unit, position), so any --workers gives byte-identical shards and meta.json.
Resumable: a shard is written to a temporary name and renamed, then its unit's
json; a rerun of the same command skips finished units and redoes only
unfinished ones.  Memory is flat in the corpus size: a worker streams one unit
in batches of documents; the parent holds one small record per unit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from moe_lab.config.schema import ConfigError
from moe_lab.data import sources
from moe_lab.data.tokenizer import BYTE, load_tokenizer

PLAN, META, UNITS = "plan.json", "meta.json", "units"
FORMAT_VERSION = 1
ENCODE_BATCH = 512  # documents per tokenizer call


def shard_name(split: str, unit_index: int) -> str:
    return f"{split}-{unit_index:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def is_heldout(unit_index: int, doc_index: int, fraction: float) -> bool:
    """A fixed share of the documents, picked by a hash of their place in the corpus."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{unit_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------ one unit


def prepare_unit(args: tuple) -> dict:
    """Tokenizes one unit into its train and held-out shards (runs in a worker)."""
    out, index, unit, field, tok_spec, heldout = args
    from array_record.python.array_record_module import ArrayRecordWriter

    done = _unit_done(out, index)
    if done is not None:  # written meanwhile (a rerun racing a dying worker): keep it
        return done
    tok = load_tokenizer(tok_spec)
    dtype = np.dtype(token_dtype(tok.vocab_size)).newbyteorder("<")
    skipped = sources.Skipped()
    counts = {"train": [0, 0], "heldout": [0, 0]}  # documents, tokens
    paths = {s: os.path.join(out, shard_name(s, index)) for s in counts}
    # each process writes its own temporary files, renamed when complete: a unit is never
    # half-written by two processes
    tmp = f".tmp.{os.getpid()}"
    writers = {s: ArrayRecordWriter(p + tmp, "group_size:1") for s, p in paths.items()}
    t0 = time.perf_counter()
    doc_index = 0
    batch: list[str] = []

    def flush():
        nonlocal doc_index
        for ids in tok.encode_batch(batch, add_bos=True, add_eos=True):
            split = "heldout" if is_heldout(index, doc_index, heldout) else "train"
            writers[split].write(ids.astype(dtype).tobytes())
            counts[split][0] += 1
            counts[split][1] += len(ids)
            doc_index += 1
        batch.clear()

    for text in sources.iter_unit(unit, field, skipped):
        batch.append(text)
        if len(batch) >= ENCODE_BATCH:
            flush()
    flush()
    for s, w in writers.items():
        w.close()
        os.replace(paths[s] + tmp, paths[s])
    record = {
        "unit": index,
        "path": unit.path,
        "start": unit.start,
        "end": unit.end,
        "documents": counts["train"][0],
        "tokens": counts["train"][1],
        "heldout_documents": counts["heldout"][0],
        "heldout_tokens": counts["heldout"][1],
        **{f"skipped_{k}": n for k, n in skipped.counts().items()},
        "bytes": {s: os.path.getsize(p) for s, p in paths.items()},
        "input_bytes": (unit.end - unit.start) if unit.fmt != "parquet" else 0,
        "seconds": time.perf_counter() - t0,
    }
    _write_json(os.path.join(out, UNITS, f"{index:05d}.json"), record)
    return record


def die_with_parent(parent_pid: int) -> None:
    """A pool worker's initializer: the kernel kills it when the prepare that spawned it
    dies (Linux PR_SET_PDEATHSIG), so a kill -9 of the prepare leaves no worker writing
    units behind it; one that started after its parent died exits at once."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def worker_options() -> dict:
    """Pool options of prepare's workers: they die with this process (die_with_parent)."""
    return {"initializer": die_with_parent, "initargs": (os.getpid(),)}


def _unit_done(out: str, index: int) -> dict | None:
    """The unit's record if its shards are complete (the sizes it recorded), else None."""
    path = os.path.join(out, UNITS, f"{index:05d}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    for split, size in rec["bytes"].items():
        shard = os.path.join(out, shard_name(split, index))
        if not os.path.isfile(shard) or os.path.getsize(shard) != size:
            return None
    return rec


# ---------------------------------------------------------------------- plan


def _plan(inputs: str, fmt: str | None, field: str, tokenizer: str, heldout: float):
    files = sources.expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    units = sources.plan_units(files, fmt, field)
    plan = {
        "format_version": FORMAT_VERSION,
        "field": field,
        "heldout_fraction": heldout,
        "tokenizer": {
            "kind": tok.kind,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "source": tok.source,
        },
        "token_dtype": token_dtype(tok.vocab_size),
        "sources": [
            {"path": os.path.abspath(f), "bytes": os.path.getsize(f), "mtime_ns": os.stat(f).st_mtime_ns}
            for f in files
        ],
        "units": [[u.path, u.fmt, u.start, u.end] for u in units],
    }
    return plan, units, tok


def _same_plan(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_out(out: str, plan: dict, log=print) -> bool:
    """True: DIR holds an unfinished (or finished) prepare of this plan, to resume.
    Refuses a non-empty DIR that holds anything else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return False
    path = os.path.join(out, PLAN)
    if not os.path.isfile(path):
        raise ConfigError(f"--out {out} is not empty and holds no moe_lab prepare (no {PLAN})")
    with open(path) as f:
        old = json.load(f)
    if not _same_plan(old, plan):
        diff = [k for k in plan if old.get(k) != plan[k]]
        same_files = [s["path"] for s in old.get("sources", [])] == [s["path"] for s in plan["sources"]]
        if (
            diff == ["sources", "units"][: len(diff)]
            and same_files
            and not os.path.isfile(os.path.join(out, META))
        ):
            # an unfinished prepare of the same files, changed since (a fixed input):
            # what it made is replaced; a finished corpus never is
            _remove_prepare(out)
            log(f"prepare: replacing the unfinished prepare in {out} (its inputs changed since)")
            return False
        raise ConfigError(
            f"--out {out} holds a prepare of other inputs or options "
            f"({', '.join(diff)} differ); use a new --out"
        )
    return True


def _remove_prepare(out: str) -> None:
    """Removes the files an unfinished prepare made in `out` (and nothing else)."""
    shutil.rmtree(os.path.join(out, UNITS), ignore_errors=True)
    for name in os.listdir(out):
        if re.fullmatch(r"(train|heldout)-\d{5}\.array_record(\.tmp\.\d+)?", name) or name == PLAN:
            os.remove(os.path.join(out, name))


def prepare(
    inputs: str,
    tokenizer: str,
    out: str,
    *,
    fmt: str | None = None,
    field: str = "text",
    workers: int = 1,
    heldout: float = 0.001,
    progress: bool = True,
    log=print,
) -> dict:
    """Prepares (or resumes preparing) the corpus in `out`; returns its meta."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not 0 <= heldout < 0.5:
        raise ConfigError(f"--heldout must be in [0, 0.5), got {heldout}")
    plan, units, tok = _plan(inputs, fmt, field, tokenizer, heldout)
    resuming = _check_out(out, plan, log)
    meta_path = os.path.join(out, META)
    if resuming and os.path.isfile(meta_path):
        log(f"prepare: {out} is already prepared (same inputs and tokenizer)")
        with open(meta_path) as f:
            return json.load(f)
    os.makedirs(os.path.join(out, UNITS), exist_ok=True)
    _write_json(os.path.join(out, PLAN), plan)
    done = {i: rec for i in range(len(units)) if (rec := _unit_done(out, i)) is not None}
    todo = [i for i in range(len(units)) if i not in done]
    log(
        f"prepare: {len(plan['sources'])} files, {len(units)} units "
        f"({len(done)} done before), tokenizer {tok.describe()}, {workers} workers"
    )
    spec = tokenizer if tok.kind != BYTE else BYTE
    jobs = [(out, i, units[i], field, spec, heldout) for i in todo]
    t0 = time.perf_counter()
    docs = tokens = 0
    bar = tqdm(
        total=len(units),
        initial=len(done),
        desc="prepare",
        unit="unit",
        disable=not progress or None,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    pool = None
    try:
        if workers == 1:
            results = map(prepare_unit, jobs)
        else:  # spawn: a forked child of a process that imported jax can deadlock
            pool = multiprocessing.get_context("spawn").Pool(workers, **worker_options())
            results = pool.imap_unordered(prepare_unit, jobs)
        for rec in results:
            done[rec["unit"]] = rec
            docs += rec["documents"] + rec["heldout_documents"]
            tokens += rec["tokens"] + rec["heldout_tokens"]
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs / dt:,.0f} docs/s {tokens / dt:,.0f} tok/s")
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    for name in os.listdir(out):  # every unit is done: a killed worker's temporary files
        if re.fullmatch(r"(train|heldout)-\d{5}\.array_record\.tmp\.\d+", name):
            os.remove(os.path.join(out, name))
    meta = _meta(out, plan, [done[i] for i in range(len(units))])
    said = sources.Skipped.describe({k: meta[f"skipped_{k}"] for k in sources.Skipped.KINDS})
    if meta["documents"] + meta["heldout_documents"] == 0:  # no corpus: nothing left behind
        _remove_prepare(out)
        if not os.listdir(out):
            os.rmdir(out)
        raise ConfigError(f"--input {inputs}: no documents ({said or 'no rows'}); nothing written to {out}")
    _write_json(meta_path, meta)
    dt = time.perf_counter() - t0
    log(
        f"prepare: {meta['documents']:,} documents, {meta['tokens']:,} tokens in "
        f"{len(units)} shards (+ held out {meta['heldout_documents']:,} documents, "
        f"{meta['heldout_tokens']:,} tokens); {dt:.1f}s this run" + (f"; {said}" if said else "")
    )
    return meta


def _meta(out: str, plan: dict, records: list[dict]) -> dict:
    keys = (
        "documents",
        "tokens",
        "heldout_documents",
        "heldout_tokens",
        *(f"skipped_{k}" for k in sources.Skipped.KINDS),
    )
    shards = [
        {
            "train": shard_name("train", r["unit"]),
            "heldout": shard_name("heldout", r["unit"]),
            "bytes": r["bytes"],
            **{k: r[k] for k in keys[:4]},
        }
        for r in records
    ]
    sources_ = [{**s, "sha256": sources.file_sha256(s["path"])} for s in plan["sources"]]
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": plan["tokenizer"],
        "token_dtype": plan["token_dtype"],
        "field": plan["field"],
        "heldout_fraction": plan["heldout_fraction"],
        "sources": sources_,
        "shards": shards,
        **{k: sum(r.get(k, 0) for r in records) for k in keys},
    }
