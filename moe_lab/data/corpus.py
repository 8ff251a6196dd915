"""The `corpus` training source: corpora `moe-lab prepare` wrote, read with grain.

    data.mixture = "corpus:1,facts:0.05"     data.corpus = "DIR[:WEIGHT][,DIR[:WEIGHT]...]"

Per corpus: grain ArrayRecordDataSource over its train shards -> index shuffle
(a new order every epoch) -> this host's slice -> one [n, 4] document array per
record (inputs, targets, task id, answer mask 0).  Several corpora are mixed by
their weights into the one `corpus` stream of the mixture.  A mixture with a
corpus is packed concat-then-split (grain's ConcatThenSplitIterDataset):
documents longer than a row continue on the next row, nothing is truncated, and
segment ids keep attention inside each document piece.  Nothing per document is
held in memory: a corpus is opened from its meta.json and shard files, so
start-up cost is O(shards) whatever the corpus's size.  The eval loss reads the
first documents of the held-out shards.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os

import grain
import numpy as np

from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.base import stable_hash
from moe_lab.data.tokenizer import Tokenizer

CORPUS = "corpus"  # the mixture entry
META = "meta.json"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus directory, checked: its meta.json and every shard's size."""

    path: str
    meta: dict

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    def shard_paths(self, split: str) -> list[str]:
        return [p for p, _ in self.shard_counts(split)]

    def shard_counts(self, split: str) -> list[tuple[str, int]]:
        """(path, documents) of the shards of split that hold any."""
        key = "heldout_documents" if split == "heldout" else "documents"
        return [(os.path.join(self.path, s[split]), int(s[key])) for s in self.meta["shards"] if s[key] > 0]

    def records(self, split: str) -> ShardRecords:
        return ShardRecords(self.shard_counts(split))


class CorruptShardError(ConfigError):
    """A shard whose bytes fail ArrayRecord's (Riegeli's) chunk hashes: corrupted in
    place, at the same size, so open_corpus's size check passed."""


class ShardRecords:
    """grain random-access source over a corpus's shards (one ArrayRecord reader per
    shard, opened on first use): what grain.sources.ArrayRecordDataSource over the
    list does, except that a record failing Riegeli's hashes names its shard file
    (CorruptShardError) instead of an anonymous RuntimeError deep in the pipeline.
    The shards' document counts come from meta.json, so nothing is opened to build it."""

    def __init__(self, shards: list[tuple[str, int]]):
        self.paths = [p for p, _ in shards]
        self.starts = np.cumsum([0] + [n for _, n in shards]).tolist()
        self._readers: dict[int, grain.sources.ArrayRecordDataSource] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def reader(self, shard: int) -> grain.sources.ArrayRecordDataSource:
        """The shard's reader, checked to hold meta.json's documents: a damaged footer
        or index opens as a reader of fewer (0) records, not as an error."""
        if shard not in self._readers:
            try:  # a footer damaged where Riegeli hashes it fails here, not as 0 records
                reader = grain.sources.ArrayRecordDataSource([self.paths[shard]])
            except RuntimeError as e:
                raise self._corrupt(shard, "its footer", e) from None
            want = self.starts[shard + 1] - self.starts[shard]
            if len(reader) != want:
                raise CorruptShardError(
                    f"data.corpus: shard {self.paths[shard]} is corrupt (its index lists "
                    f"{len(reader)} records, meta.json says {want}); prepare the corpus "
                    f"again or restore the file"
                )
            self._readers.setdefault(shard, reader)
        return self._readers[shard]

    def __getitem__(self, index: int) -> bytes:
        shard = bisect.bisect_right(self.starts, index) - 1
        try:
            return self.reader(shard)[index - self.starts[shard]]
        except RuntimeError as e:
            raise self._corrupt(shard, f"record {index - self.starts[shard]}", e) from None

    def _corrupt(self, shard: int, where: str, e: RuntimeError) -> CorruptShardError:
        """The one-line error naming the shard for Riegeli's hash failure `e` (raised at
        `where`); any other RuntimeError is re-raised as it is."""
        if "Riegeli" not in str(e):  # not a hash failure (too many open files, ...)
            raise e
        return CorruptShardError(
            f"data.corpus: shard {self.paths[shard]} is corrupt ({where}: "
            f"{str(e).partition(chr(10))[0][:160]}); prepare the corpus again or restore "
            f"the file"
        )

    def __getstate__(self):  # grain workers reopen their own readers
        return {"paths": self.paths, "starts": self.starts}

    def __setstate__(self, state):
        self.__dict__.update(state, _readers={})


def parse_corpora(spec: str) -> list[tuple[str, float]]:
    """ "DIR[:W],DIR[:W]" -> [(DIR, W)] (W defaults to 1)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path, _, w = part.rpartition(":") if ":" in part else (part, "", "1")
        try:
            weight = float(w)
        except ValueError:
            path, weight = part, 1.0
        if weight <= 0:
            raise ConfigError(f"data.corpus: weight of {path} must be > 0, got {w}")
        out.append((path, weight))
    if not out:
        raise ConfigError("data.mixture uses 'corpus' but data.corpus is empty")
    return out


def open_corpus(path: str, tok: Tokenizer | None) -> Corpus:
    """Opens a prepared corpus: refuses a missing or unfinished one, one prepared with
    another tokenizer than `tok` (both fingerprints named; None: not checked) and a
    truncated shard (named)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ConfigError(
            f"data.corpus {path}: no {META} (not a prepared corpus, or its "
            f"prepare has not finished; rerun moe-lab prepare)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    want = meta["tokenizer"]["fingerprint"]
    if tok is not None and want != tok.fingerprint:
        raise ConfigError(
            f"data.corpus {path} was prepared with tokenizer {want} "
            f"({meta['tokenizer']['source']}); the run's is {tok.fingerprint} "
            f"({tok.source})"
        )
    for shard in meta["shards"]:
        for split in ("train", "heldout"):
            p = os.path.join(path, shard[split])
            size = os.path.getsize(p) if os.path.isfile(p) else None
            if size != shard["bytes"][split]:
                raise ConfigError(
                    f"data.corpus: shard {p} is missing or truncated "
                    f"({size} bytes, meta.json says {shard['bytes'][split]})"
                )
    return Corpus(path, meta)


def verify_corpus(path: str, *, progress: bool = True) -> dict:
    """Reads every record of every shard of a prepared corpus (a copy on another host
    or bucket, say): Riegeli's chunk hashes catch bytes changed in place, and the
    documents and tokens read must be meta.json's.  Returns the counts read; raises
    ConfigError naming the first shard that fails."""
    from tqdm import tqdm  # the command's progress bar only

    c = open_corpus(path, None)
    width = np.dtype(c.meta["token_dtype"]).itemsize
    read = {"documents": 0, "tokens": 0, "heldout_documents": 0, "heldout_tokens": 0}
    total = c.meta["documents"] + c.meta["heldout_documents"]
    with tqdm(
        total=total,
        desc="verify",
        unit="doc",
        disable=not progress or None,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        for shard in c.meta["shards"]:
            for split, prefix in (("train", ""), ("heldout", "heldout_")):
                want = (shard[f"{prefix}documents"], shard[f"{prefix}tokens"])
                if want[0] == 0:
                    continue
                records = ShardRecords([(os.path.join(path, shard[split]), want[0])])
                records.reader(0)  # its record count first
                tokens = sum(len(records[i]) // width for i in range(want[0]))  # BOS..EOS
                if tokens != want[1]:
                    raise CorruptShardError(
                        f"data.corpus: shard {records.paths[0]} holds {tokens} tokens, "
                        f"meta.json says {want[1]}"
                    )
                read[f"{prefix}documents"] += want[0]
                read[f"{prefix}tokens"] += tokens
                bar.update(want[0])
    return read


def open_corpora(spec: str, tok: Tokenizer) -> list[tuple[Corpus, float]]:
    return [(open_corpus(p, tok), w) for p, w in parse_corpora(spec)]


def describe_corpora(spec: str, tok: Tokenizer, run_tokens: int, active_params: int) -> str:
    """The start-up / info line: the corpora's tokens, the epochs this run makes of them
    and the tokens per (active) parameter they could feed."""
    corpora = open_corpora(spec, tok)
    total = sum(c.tokens for c, _ in corpora)
    shards = sum(len(c.meta["shards"]) for c, _ in corpora)
    return (
        f"corpus: {total:,} tokens in {shards} shards ({len(corpora)} corpora); this run: "
        f"{run_tokens / max(total, 1):.3g} epochs of it (all mixture entries counted); "
        f"TPP of the whole corpus {total / max(active_params, 1):.3g}"
    )


@dataclasses.dataclass(frozen=True)
class _RecordDocument:
    """Map: an ArrayRecord record (token bytes) -> {"doc": [n, 4]} (task id, no answer)."""

    dtype: str
    task_index: int

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        ids = np.frombuffer(record, np.dtype(self.dtype).newbyteorder("<")).astype(np.int32)
        doc_N4 = np.zeros((len(ids) - 1, 4), np.int32)
        doc_N4[:, 0], doc_N4[:, 1], doc_N4[:, 2] = ids[:-1], ids[1:], self.task_index
        return {"doc": doc_N4}


def corpus_documents(
    corpora: list[tuple[Corpus, float]], task_index: int, seed: int, shard_index: int, shard_count: int
) -> grain.MapDataset:
    """The infinite, shuffled document stream of the corpora (this host's slice)."""
    streams = []
    for k, (c, _) in enumerate(corpora):
        if not c.shard_paths("train"):
            raise ConfigError(f"data.corpus {c.path} holds no training documents")
        source = c.records("train")
        shuffle_seed = stable_hash(f"shuffle/{seed}/corpus/{k}") % 2**32
        ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
        streams.append(ds[shard_index::shard_count].map(_RecordDocument(c.meta["token_dtype"], task_index)))
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, [w for _, w in corpora])


def heldout_documents(
    corpora: list[tuple[Corpus, float]], n: int, task_index: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """The first n held-out documents (round robin over the corpora), cut to seq_len:
    the eval-loss rows (cycled where the held-out split is smaller)."""
    readers = [(c.records("heldout"), c.meta["token_dtype"]) for c, _ in corpora if c.shard_paths("heldout")]
    if not readers:
        raise ConfigError("data.corpus: the corpora hold no held-out documents (prepare with --heldout > 0)")
    out = []
    for i in range(n):
        r, dtype = readers[i % len(readers)]
        record = r[(i // len(readers)) % len(r)]
        doc_N4 = _RecordDocument(dtype, task_index)(record)["doc"][:seq_len]
        out.append(
            {
                "inputs": doc_N4[:, 0],
                "targets": doc_N4[:, 1],
                "task_ids": doc_N4[:, 2],
                "answer_mask": doc_N4[:, 3].astype(np.float32),
            }
        )
    return out
