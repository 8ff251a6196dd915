"""grain input pipeline: task mixture -> tokenized documents -> packed batches.

Train pipeline (per host), every stage index-based and deterministic so that
the iterator state is a handful of integers and resumes exactly:

    per task t:  MapDataset.range(num_train_t).shuffle(seed_t).repeat()
                 (a fresh permutation every epoch: grain folds the epoch into
                 the shuffle seed)
                 [shard_index::shard_count]   disjoint slice per host
                 .map(tokenize)  -> {"doc": [n, 4]} per document, n <= T
                 (columns: inputs, targets, task id, answer flag)
    MapDataset.mix(tasks, weights)        deterministic interleave; the weights
                                          count DOCUMENTS, not tokens
    .to_iter_dataset(no threads)          in-memory generators: threads only
                                          fight over the GIL
    FirstFitPackIterDataset(T)            several documents per row, never split
                                          (short task documents must keep their
                                          prompt next to their answer)
    .batch(B_host, collate)               -> the batch dict below

Batch format (numpy, every field [B, T], T = data_cfg.seq_len):

    inputs       int32    token ids (0 = <pad>)
    targets      int32    next token *within the same document*
    weights      float32  1 on real (input, target) pairs, 0 on padding
    segment_ids  int32    1, 2, 3 ... per packed document in a row; 0 = padding
    positions    int32    position within its document (restarts at 0)
    task_ids     int32    index of the task in the mixture list (0 on padding:
                          always combine with weights)
    answer_mask  float32  1 where the target belongs to the completion (working,
                          answer marker, answer): the "task loss" of 2508.18672

Each document is BOS + text + EOS and is shifted *before* packing (inputs =
doc[:-1], targets = doc[1:]), so no target ever crosses a document boundary and
`weights` is simply segment_ids > 0. The model must mask attention with
segment_ids and use `positions` for RoPE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from moe_lab.config.absl_flags import parse_absl_flags_once
from moe_lab.config.schema import ConfigError, DataConfig, parse_mixture
from moe_lab.data import corpus as corpus_source
from moe_lab.data.tasks.base import Example, Task, stable_hash
from moe_lab.data.tasks.registry import make_task
from moe_lab.data.tokenizer import BYTE_TOKENIZER, Tokenizer, load_tokenizer

BATCH_FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions", "task_ids", "answer_mask")
# Columns of a document's [n, 4] int32 array. Packing one 2-D feature instead of
# four 1-D ones cuts grain's per-document packing overhead (it walks pytrees).
_COLUMNS = ("inputs", "targets", "task_ids", "answer_mask")


# ------------------------------------------------------------------ documents


def document_N4(ex: Example, task_index: int, seq_len: int, tok: Tokenizer = BYTE_TOKENIZER) -> np.ndarray:
    """Example -> [n, 4] int32 columns (inputs, targets, task_ids, answer_mask),
    n <= seq_len: BOS + text + EOS shifted by one.

    The answer span is located by encoding the parts separately (with the run's
    tokenizer `tok`): for bytes encode(a + b) == encode(a) + encode(b); for a
    learned vocabulary the cut is also where generation starts (the prompt is
    encoded alone), so training sees the tokens the model will continue from."""
    # Task loss covers the whole completion (working + answer marker + answer): as in
    # GSM8K, whose answers include the worked solution (2508.18672 scores the NLL of
    # the answer field). Masking only the final answer would measure copying the last
    # value of the teacher-forced working, which a model gets right while failing
    # every problem.
    # Tasks without working (facts) keep the answer value alone.
    if ex.working:
        prefix, answer = ex.prompt, ex.working + ex.marker + ex.answer
    else:
        prefix, answer = ex.prompt + ex.marker, ex.answer
    prefix, answer = tok.encode_array(prefix), tok.encode_array(answer)
    parts = [[tok.bos_id], prefix, answer, [tok.eos_id]]
    if ex.suffix:
        parts.insert(3, tok.encode_array(ex.suffix))
    doc = np.concatenate(parts)[: seq_len + 1]  # too long: truncate (FileTask pre-chunks text)
    n = len(doc) - 1
    out_N4 = np.empty((n, 4), np.int32)
    out_N4[:, 0] = doc[:-1]
    out_N4[:, 1] = doc[1:]
    out_N4[:, 2] = task_index
    out_N4[:, 3] = 0
    # target k is doc[k + 1]; the answer occupies doc[1 + len(prefix): ... + len(answer)]
    out_N4[len(prefix) : len(prefix) + len(answer), 3] = 1
    return out_N4


def tokenize_example(
    ex: Example, task_index: int, seq_len: int, tok: Tokenizer = BYTE_TOKENIZER
) -> dict[str, np.ndarray]:
    """Example -> {inputs, targets, task_ids (int32), answer_mask (float32)}, each [n]."""
    doc_N4 = document_N4(ex, task_index, seq_len, tok)
    out = {k: np.ascontiguousarray(doc_N4[:, c]) for c, k in enumerate(_COLUMNS)}
    out["answer_mask"] = out["answer_mask"].astype(np.float32)
    return out


def _collate_packed(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Packed rows {doc [T, 4], doc_segment_ids [T], doc_positions [T]} -> batch."""
    doc_BT4 = np.stack([r["doc"] for r in rows])
    segment_ids = np.stack([r["doc_segment_ids"] for r in rows]).astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(doc_BT4[..., 0]),
        "targets": np.ascontiguousarray(doc_BT4[..., 1]),
        "weights": (segment_ids > 0).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": np.stack([r["doc_positions"] for r in rows]).astype(np.int32),
        "task_ids": np.ascontiguousarray(doc_BT4[..., 2]),
        "answer_mask": doc_BT4[..., 3].astype(np.float32),
    }


def pad_documents(docs: Sequence[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """One document per row, left-aligned, zero-padded: the unpacked batch."""
    batch_size = len(docs)
    out = {
        "inputs": np.zeros((batch_size, seq_len), np.int32),
        "targets": np.zeros((batch_size, seq_len), np.int32),
        "weights": np.zeros((batch_size, seq_len), np.float32),
        "segment_ids": np.zeros((batch_size, seq_len), np.int32),
        "positions": np.zeros((batch_size, seq_len), np.int32),
        "task_ids": np.zeros((batch_size, seq_len), np.int32),
        "answer_mask": np.zeros((batch_size, seq_len), np.float32),
    }
    for b, d in enumerate(docs):
        n = len(d["inputs"])
        for k in _COLUMNS:
            out[k][b, :n] = d[k]
        out["weights"][b, :n] = 1.0
        out["segment_ids"][b, :n] = 1
        out["positions"][b, :n] = np.arange(n)
    return out


@dataclasses.dataclass(frozen=True)
class _PadCollate:
    """Unpacked training (data.pack=False): [n, 4] documents -> padded batch."""

    seq_len: int

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        docs = [{k: r["doc"][:, c] for c, k in enumerate(_COLUMNS)} for r in rows]
        return pad_documents(docs, self.seq_len)


# ------------------------------------------------------------------- training


def make_tasks(data_cfg: DataConfig) -> list[Task | None]:
    """One task per mixture entry, in mixture order (task_ids index this list); None
    for the `corpus` entry (data/corpus.py: documents, not examples)."""
    return [
        None if name == corpus_source.CORPUS else make_task(name, data_cfg)
        for name, _ in parse_mixture(data_cfg.mixture)
    ]


@dataclasses.dataclass(frozen=True)
class _TrainDocument:
    """Map: example index of one task -> {"doc": [n, 4]} tokenized document."""

    task: Task
    task_index: int
    seq_len: int
    tok: Tokenizer

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        ex = self.task.train_example(int(i))
        return {"doc": document_N4(ex, self.task_index, self.seq_len, self.tok)}


def _task_documents(
    task_index: int, task: Task, seq_len: int, seed: int, shard_index: int, shard_count: int, tok: Tokenizer
) -> grain.MapDataset:
    """Infinite stream of one task's documents, reshuffled every epoch, this
    host's slice only."""
    shuffle_seed = stable_hash(f"shuffle/{seed}/{task_index}/{task.name}") % 2**32
    ds = grain.MapDataset.range(task.num_train).shuffle(seed=shuffle_seed).repeat()
    return ds[shard_index::shard_count].map(_TrainDocument(task, task_index, seq_len, tok))


def make_train_dataset(
    data_cfg: DataConfig,
    global_batch_size: int,
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_packing_bins: int | None = None,
    prefetch: int = 0,
    tokenizer: Tokenizer | None = None,
) -> grain.IterDataset:
    """Packed training batches for host `shard_index` of `shard_count`.

    `seed` drives the shuffles (the run's seed); `data_cfg.seed` fixes the task
    contents (which facts exist, which problems), so two runs with different
    training seeds see the same knowledge base in a different order.
    Per-host batch = global_batch_size // shard_count rows. `num_packing_bins`
    (default 2 x the host batch) trades packing density for latency.
    `prefetch` > 0 adds a thread prefetch buffer of that many batches; grain's
    thread prefetch checkpoints the state of the last *consumed* batch.
    `data_cfg.workers` > 0 runs the pipeline in that many grain worker processes
    (`mp_prefetch`; `prefetch` batches buffered per worker) instead.
    `tokenizer`: the run's (default: data_cfg.tokenizer's).
    """
    if global_batch_size % shard_count:
        raise ConfigError(f"global batch {global_batch_size} not divisible by {shard_count} hosts")
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index {shard_index} not in [0, {shard_count})")
    host_batch = global_batch_size // shard_count
    seq_len = data_cfg.seq_len
    tasks = make_tasks(data_cfg)
    weights = [w for _, w in parse_mixture(data_cfg.mixture)]
    # Shard each task stream, THEN mix: grain's mix is a fixed interleave
    # (1:1 -> t0 t1 t0 t1 ...), so slicing the mixture would hand each host a
    # different task (host 0 all t0, host 1 all t1). Sliced first, every host
    # sees the full mixture over disjoint example indices.
    tok = tokenizer or load_tokenizer(data_cfg.tokenizer)
    streams = [
        corpus_source.corpus_documents(
            corpus_source.open_corpora(data_cfg.corpus, tok), t, seed, shard_index, shard_count
        )
        if task is None
        else _task_documents(t, task, seq_len, seed, shard_index, shard_count, tok)
        for t, task in enumerate(tasks)
    ]
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if None in tasks:  # a corpus: documents of any length, concatenated then split into rows
        it_ds = grain.experimental.ConcatThenSplitIterDataset(it_ds, length_struct={"doc": seq_len})
        it_ds = it_ds.batch(host_batch, drop_remainder=True, batch_fn=_collate_packed)
    elif data_cfg.pack:
        it_ds = grain.experimental.FirstFitPackIterDataset(
            it_ds,
            length_struct={"doc": seq_len},
            num_packing_bins=num_packing_bins or 2 * host_batch,
            seed=stable_hash(f"pack/{seed}/{shard_index}") % 2**31,
            shuffle_bins=True,
        )
        it_ds = it_ds.batch(host_batch, drop_remainder=True, batch_fn=_collate_packed)
    else:
        it_ds = it_ds.batch(host_batch, drop_remainder=True, batch_fn=_PadCollate(seq_len))
    if data_cfg.workers:
        # the whole pipeline (read, tokenise, pack, batch) in worker processes, each on
        # a slice of the documents; its state (every worker's) checkpoints as before.
        # Contiguous slices of the mixture: grain's default (every N-th document) would
        # give each worker one task of a fixed interleave (1:1 -> worker 0 all t0)
        parse_absl_flags_once()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_cfg.workers, per_worker_buffer_size=max(1, prefetch)
            ),
            sequential_slice=True,
        )
    elif prefetch:
        it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=prefetch)
    return it_ds


def make_train_iterator(
    data_cfg: DataConfig,
    global_batch_size: int,
    *,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    **kwargs,
):
    """`iter(make_train_dataset(...))`: a grain DatasetIterator with
    get_state() / set_state(state) (a small JSON-able dict) for checkpoints."""
    return iter(
        make_train_dataset(
            data_cfg, global_batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count, **kwargs
        )
    )


# ----------------------------------------------------------------------- eval


def make_eval_batches(
    task: Task,
    data_cfg: DataConfig,
    batch_size: int,
    num_batches: int,
    *,
    task_index: int = 0,
    start: int = 0,
    tokenizer: Tokenizer | None = None,
) -> list[dict[str, np.ndarray]]:
    """Fixed, unpacked batches of the task's eval split (one example per row).

    Same fields as training batches, so the same loss code gives eval loss
    (weights) and task loss (answer_mask). Finite eval splits (facts, file) are
    cycled if batch_size * num_batches exceeds them: duplicates do not bias a
    mean loss, and fixed shapes keep the eval step compiled once."""
    tok = tokenizer or load_tokenizer(data_cfg.tokenizer)
    out = []
    for b in range(num_batches):
        docs = [
            tokenize_example(task.eval_example(start + b * batch_size + r), task_index, data_cfg.seq_len, tok)
            for r in range(batch_size)
        ]
        out.append(pad_documents(docs, data_cfg.seq_len))
    return out


def mixture_eval_batches(
    data_cfg: DataConfig, batch_size: int, num_batches: int, *, tokenizer: Tokenizer | None = None, tasks=None
) -> list[dict]:
    """make_eval_batches of every mixture entry (`tasks`: [(name, Task | None)], default
    the mixture's), task_index = its position; the corpus entry reads its held-out
    documents."""
    tok = tokenizer or load_tokenizer(data_cfg.tokenizer)
    if tasks is None:
        names = [n for n, _ in parse_mixture(data_cfg.mixture)]
        tasks = list(zip(names, make_tasks(data_cfg)))
    out = []
    for i, (_, task) in enumerate(tasks):
        if task is not None:
            out += make_eval_batches(task, data_cfg, batch_size, num_batches, task_index=i, tokenizer=tok)
            continue
        docs = corpus_source.heldout_documents(
            corpus_source.open_corpora(data_cfg.corpus, tok), batch_size * num_batches, i, data_cfg.seq_len
        )
        out += [
            pad_documents(docs[b * batch_size : (b + 1) * batch_size], data_cfg.seq_len)
            for b in range(num_batches)
        ]
    return out


def eval_prompts(task: Task, n: int, *, start: int = 0) -> list[Example]:
    """The first n eval examples (prompt, answer) for generation-based accuracy;
    feed `tokenizer.encode(ex.prompt, add_bos=True)` and score with `task.check`."""
    return [task.eval_example(start + i) for i in range(n)]


def describe_batch(
    batch: dict[str, np.ndarray],
    task_names: Sequence[str] = (),
    rows: int = 2,
    tok: Tokenizer = BYTE_TOKENIZER,
) -> str:
    """Human-readable summary: shapes, fill, documents per row, first rows."""
    w = batch["weights"]
    lines = [
        ", ".join(f"{k}{tuple(v.shape)}:{v.dtype}" for k, v in batch.items()),
        (
            f"fill {w.mean():.1%}  docs/row {batch['segment_ids'].max(1).mean():.1f}  "
            f"answer tokens {int(batch['answer_mask'].sum())}"
        ),
    ]
    for t in np.unique(batch["task_ids"][w > 0]):
        name = task_names[t] if t < len(task_names) else str(t)
        lines.append(f"  task {name}: {int(((batch['task_ids'] == t) & (w > 0)).sum())} tokens")
    for r in range(min(rows, len(w))):
        lines.append(f"  row {r}: {tok.decode(batch['inputs'][r])!r}")
    return "\n".join(lines)
