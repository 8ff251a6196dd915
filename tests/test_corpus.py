"""Real vocabularies and prepared corpora: the three tokenizer kinds with moe_lab's
special tokens, `moe-lab tokenizer train`, and `moe-lab prepare` (ArrayRecord
shards: decodable, identical whatever --workers, resumable, bad input refused)."""

import dataclasses
import io
import json
import os
import random
import re

import numpy as np
import pytest

from moe_lab.config.schema import ConfigError
from moe_lab.data import prepare as prep
from moe_lab.data.tokenizer import (
    ANSWER,
    BOS,
    BYTE_TOKENIZER,
    EOS,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    load_tokenizer,
)
from moe_lab.data.tokenizer_train import train_bpe

WORDS = "the a model expert router token layer sparse dense reason memory fact é 数".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl files, a txt file, a parquet file (3 row groups), a row that is not
    UTF-8; a BPE tokenizer.json and a SentencePiece model trained on them."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, n in (("a.jsonl", 300), ("b.jsonl", 200)):
        with open(d / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": _text(rng, rng.randint(3, 40))}) + "\n")
    with open(d / "a.jsonl", "ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')
    (d / "c.txt").write_text("\n\n".join(_text(rng, 12) for _ in range(50)) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"content": [_text(rng, 9) for _ in range(90)]}), d / "d.parquet", row_group_size=30
    )
    tok_json = str(d / "tok.json")
    train_bpe(f"{d}/*.jsonl,{d}/*.txt", 400, tok_json, log=lambda *_: None)
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_text(rng, 20) for _ in range(400)]),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (d / "sp.model").write_bytes(model.getvalue())
    return d


TASK_TEXT = f"{BOS}a=1 b=a+2 mod 23. b?{THINK_START}b=3{THINK_END}{ANSWER}3{EOS}"


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
def test_special_tokens_in_every_tokenizer_kind(corpus, kind):
    spec = {"byte": "byte", "hf": str(corpus / "tok.json"), "sentencepiece": str(corpus / "sp.model")}[kind]
    tok = load_tokenizer(spec)
    assert tok.kind == kind and len(set(tok.special_to_id.values())) == len(SPECIAL_TOKENS)
    ids = tok.encode(TASK_TEXT)
    for s in (BOS, THINK_START, THINK_END, ANSWER, EOS):
        assert ids.count(tok.special_to_id[s]) == 1, s  # each special is one token
    assert tok.decode(ids) == TASK_TEXT  # specials round-trip (and this text, in every kind)
    assert tok.encode("x", add_bos=True, add_eos=True)[:: len(tok.encode("x")) + 1] == [
        tok.bos_id,
        tok.eos_id,
    ]
    assert max(tok.encode(_text(random.Random(1), 30))) < tok.vocab_size
    assert tok.decode([tok.pad_id] + tok.encode("ab")) == "ab"
    assert tok.decode(tok.encode("a") + [tok.vocab_size + 3]) == "a\ufffd"  # padded rows
    if kind == "hf":  # `tokenizer train` puts the specials at ids 0..15: nothing appended
        assert [tok.special_to_id[s] for s in SPECIAL_TOKENS] == list(range(16))
        s = "naïve 数 text\n  with  spaces <think>"
        assert tok.decode(tok.encode(s)) == s  # byte-level BPE round-trips any string
        assert tok.default_vocab_size() % 128 == 0 >= 0 and tok.default_vocab_size() >= 400 - 128
    if kind == "sentencepiece":  # SP has <s> </s> of its own; the task ones are appended
        assert tok.bos_id < 300 and tok.think_start_id >= 300
    # the batched fast path (HF: Rust batch encode) against one text at a time
    texts = [_text(random.Random(k), 12) for k in range(5)]
    for batch in (texts, texts + [TASK_TEXT]):
        fast = tok.encode_batch(batch, add_bos=True, add_eos=True)
        slow = [tok.encode_array(t, add_bos=True, add_eos=True) for t in batch]
        assert [f.tolist() for f in fast] == [x.tolist() for x in slow]
    assert load_tokenizer(spec) is tok  # cached while the file is unchanged


def test_tokenizer_refusals(corpus, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a HF tokenizer.json"):
        load_tokenizer(str(bad))
    with pytest.raises(ConfigError, match="'byte', a HF tokenizer.json"):
        load_tokenizer("gpt2")
    with pytest.raises(ConfigError, match="never overwrites"):
        train_bpe(f"{corpus}/*.txt", 400, str(corpus / "tok.json"))
    with pytest.raises(ConfigError, match="vocab-size must be >= 272"):
        train_bpe(f"{corpus}/*.txt", 100, str(tmp_path / "t.json"))


def _read_shard(path, dtype):
    from array_record.python.array_record_module import ArrayRecordReader

    r = ArrayRecordReader(path)
    try:
        return [np.frombuffer(b, np.dtype(dtype).newbyteorder("<")).astype(np.int64) for b in r.read_all()]
    finally:
        r.close()


def _digest(out):
    return {
        f: open(os.path.join(out, f), "rb").read()
        for f in sorted(os.listdir(out))
        if f.endswith(".array_record") or f == prep.META
    }


def test_prepare_shards_decode_deterministic_and_resume(corpus, tmp_path, monkeypatch):
    tok_path = str(corpus / "tok.json")
    tok = load_tokenizer(tok_path)
    inputs = f"{corpus}/*.jsonl,{corpus}/*.txt"
    monkeypatch.setattr(prep.sources, "UNIT_BYTES", 4096)  # several units per jsonl file
    quiet = dict(progress=False, log=lambda *_: None, heldout=0.1)
    one = prep.prepare(inputs, tok_path, str(tmp_path / "one"), workers=1, **quiet)
    assert len(one["shards"]) > 3 and one["skipped_not_utf8"] == 1
    assert one["documents"] + one["heldout_documents"] == 300 + 200 + 50
    assert 0 < one["heldout_documents"] < 0.25 * 550
    # every record is BOS + the document's tokens + EOS
    first = json.loads(open(corpus / "a.jsonl").readline())["text"]
    docs = _read_shard(str(tmp_path / "one" / one["shards"][0]["train"]), one["token_dtype"])
    held = _read_shard(str(tmp_path / "one" / one["shards"][0]["heldout"]), one["token_dtype"])
    assert len(docs) + len(held) > 1 and any(len(d) for d in docs)
    rows = [
        json.loads(x)["text"]
        for x in open(corpus / "a.jsonl", "rb").read().split(b"\n")
        if x and b"\xff" not in x
    ]
    decoded = [tok.decode(d) for d in docs]
    assert decoded[0] == f"{BOS}{first}{EOS}" or tok.decode(held[0]) == f"{BOS}{first}{EOS}"
    assert set(d[len(BOS) : -len(EOS)] for d in decoded) <= set(rows)
    assert sum(len(d) for d in docs) == one["shards"][0]["tokens"]
    # the same shards and meta.json whatever --workers
    two = prep.prepare(inputs, tok_path, str(tmp_path / "two"), workers=2, **quiet)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two") and one == two
    # a prepare killed after its second unit resumes: finished units are not redone
    real, calls = prep.prepare_unit, []

    def dies_on_third(args):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(prep, "prepare_unit", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(inputs, tok_path, str(tmp_path / "cut"), workers=1, **quiet)
    assert not os.path.exists(tmp_path / "cut" / prep.META)
    monkeypatch.setattr(prep, "prepare_unit", real)
    shard0 = tmp_path / "cut" / prep.shard_name("train", 0)
    mtime = os.stat(shard0).st_mtime_ns
    assert prep.prepare(inputs, tok_path, str(tmp_path / "cut"), workers=1, **quiet) == one
    assert os.stat(shard0).st_mtime_ns == mtime
    assert _digest(tmp_path / "cut") == _digest(tmp_path / "one")


def test_prepare_parquet_and_refusals(corpus, tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    meta = prep.prepare(
        f"{corpus}/*.parquet", "byte", str(tmp_path / "pq"), field="content", heldout=0.0, **quiet
    )
    assert len(meta["shards"]) == 3 and meta["documents"] == 90  # one unit per row group
    assert meta["tokenizer"]["fingerprint"] == BYTE_TOKENIZER.fingerprint
    with pytest.raises(ConfigError, match="no column 'text'"):
        prep.prepare(f"{corpus}/*.parquet", "byte", str(tmp_path / "x"), **quiet)
    with pytest.raises(ConfigError, match="matches no file"):
        prep.prepare(f"{corpus}/*.nothing", "byte", str(tmp_path / "x"), **quiet)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and holds no moe_lab prepare"):
        prep.prepare(f"{corpus}/*.txt", "byte", str(mine), **quiet)
    assert os.listdir(mine) == ["notes.txt"]
    with pytest.raises(ConfigError, match="other inputs or options"):  # another tokenizer
        prep.prepare(
            f"{corpus}/*.parquet",
            str(corpus / "tok.json"),
            str(tmp_path / "pq"),
            field="content",
            heldout=0.0,
            **quiet,
        )


KIND_FILES = {"hf": ("tok.json", "sp.model"), "sentencepiece": ("sp.model", "tok.json")}


@pytest.mark.parametrize("kind", sorted(KIND_FILES))
def test_a_run_trains_evaluates_and_generates_with_its_own_tokenizer(corpus, tmp_path, kind):
    """data.tokenizer = a tokenizer.json or a SentencePiece .model: vocab rounded to 128,
    the run keeps a copy and its fingerprint (eval and generation read the copy after
    the original is gone); resuming with the other kind's tokenizer and a vocab_size
    below the tokenizer's are refused."""
    import shutil

    from conftest import tiny_config

    from moe_lab.eval.evaluate import evaluate, load_run
    from moe_lab.eval.generate import generate_batched
    from moe_lab.train.loop import train
    from moe_lab.train.state import resolve_config

    mine, other_file = KIND_FILES[kind]
    tok_path = str(tmp_path / ("mine" + os.path.splitext(mine)[1]))
    shutil.copyfile(corpus / mine, tok_path)
    cfg = tiny_config(
        model=dict(num_layers=1),
        data=dict(mixture="arith:1", tokenizer=tok_path),
        train=dict(steps=2, log_every=1, eval_every=2, checkpoint_every=2),
        eval=dict(num_examples=2, batch_size=2, max_new_tokens=8),
    )
    tok = load_tokenizer(tok_path)
    assert cfg.model.vocab_size == 128 * -(-tok.vocab_size // 128) >= tok.vocab_size
    assert cfg.data.tokenizer_fingerprint == tok.fingerprint
    run = str(tmp_path / "run")
    out = train(cfg, run)
    assert out["step"] == 2 and np.isfinite(out["loss"])
    assert os.path.isfile(os.path.join(run, "tokenizer", os.path.basename(tok_path)))
    os.remove(tok_path)  # the run reads its own copy from now on
    _, setup, state, _ = load_run(run)
    assert setup.tokenizer.fingerprint == tok.fingerprint
    res = evaluate(run, write=False, print_table=False)
    assert res["tasks"]["arith"]["eval_loss"] > 0 and "accuracy" in res["tasks"]["arith"]
    prompts = [setup.tokenizer.encode("a=1 b=a+2 mod 11. b?", add_bos=True)]
    new = generate_batched(
        setup.graphdef,
        state["params"],
        state["model_state"],
        prompts,
        4,
        batch_size=1,
        pad_id=setup.tokenizer.pad_id,
        eos_id=setup.tokenizer.eos_id,
    )
    assert all(0 <= t < cfg.model.vocab_size for t in new[0])
    assert isinstance(setup.tokenizer.decode(new[0]), str)  # padded rows decode as U+FFFD
    other = cfg.replace(
        data=dataclasses.replace(cfg.data, tokenizer=str(corpus / other_file), tokenizer_fingerprint="")
    )
    with pytest.raises(ConfigError, match=f"made with tokenizer {tok.fingerprint}.*this config's is"):
        train(resolve_config(other), run)
    with pytest.raises(ConfigError, match="smaller than the tokenizer's"):
        tiny_config(model=dict(vocab_size=tok.vocab_size - 8), data=dict(tokenizer=str(corpus / mine)))


def test_training_on_a_corpus_resumes_exactly_and_refuses_bad_corpora(corpus, tmp_path):
    """A corpus + facts mixture: packed rows keep documents apart (segment ids), the
    held-out split gives the eval loss, and a run killed after 2 steps and resumed logs
    the same losses as an uninterrupted one (the grain iterator state is checkpointed,
    read through a grain worker process), and not under another worker count."""
    from conftest import tiny_config

    from moe_lab.cli.main import main
    from moe_lab.data import pipeline
    from moe_lab.data.corpus import verify_corpus
    from moe_lab.train.loop import train
    from moe_lab.train.metrics import read_metrics

    tok_path = str(corpus / "tok.json")
    quiet = dict(progress=False, log=lambda *_: None, heldout=0.1)
    cdir = str(tmp_path / "c")
    meta = prep.prepare(f"{corpus}/*.jsonl,{corpus}/*.txt", tok_path, cdir, **quiet)
    cfg = tiny_config(
        model=dict(num_layers=1),
        data=dict(mixture="corpus:1,facts:0.2", corpus=cdir, tokenizer=tok_path),
        train=dict(steps=4, log_every=1, eval_every=4, checkpoint_every=2),
    )
    batch = next(pipeline.make_train_iterator(cfg.data, 4, seed=0))
    seg, pos = batch["segment_ids"], batch["positions"]
    assert seg.shape == (4, cfg.data.seq_len) and (seg > 0).mean() > 0.9  # concat-then-split
    new_doc = (pos == 0) & (seg > 0)
    assert np.all(seg[:, 1:][~new_doc[:, 1:]] == seg[:, :-1][~new_doc[:, 1:]])
    assert set(np.unique(batch["task_ids"][seg > 0])) <= {0, 1}
    # the training runs read through a grain worker process (data.workers): its
    # iterator state (the worker's) is what the checkpoint keeps
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=1))
    whole = train(cfg, str(tmp_path / "whole"))
    assert "eval/corpus/loss" in whole and whole["eval/corpus/loss"] > 0
    train(cfg, str(tmp_path / "cut"), max_steps=2)
    with pytest.raises(ConfigError, match=r"different data \(data.workers"):
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=0)), str(tmp_path / "cut"))
    train(cfg, str(tmp_path / "cut"))
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    la = [r["loss"] for r in a if "loss" in r]
    lb = [r["loss"] for r in b if "loss" in r]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-6)
    # bad corpora: another tokenizer's, a shard corrupted in place (same size: the
    # record that fails Riegeli's chunk hash names its file), a truncated shard, an
    # unfinished prepare
    with pytest.raises(ConfigError, match="prepared with tokenizer .* the run's is"):
        next(pipeline.make_train_iterator(dataclasses.replace(cfg.data, tokenizer="byte"), 4, seed=0))
    counts = ("documents", "tokens", "heldout_documents", "heldout_tokens")
    assert main(["prepare", "--verify", cdir]) == 0
    assert verify_corpus(cdir, progress=False) == {k: meta[k] for k in counts}
    shard = os.path.join(cdir, prep.shard_name("train", 0))
    with open(shard, "r+b") as f:  # a byte inside the first chunks' data
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ConfigError, match=f"shard {re.escape(shard)} is corrupt \\(record"):
        it = pipeline.make_train_iterator(cfg.data, 4, seed=0)
        for _ in range(1000):  # until the shuffled stream reads the bad chunk
            next(it)
    with pytest.raises(ConfigError, match=f"shard {re.escape(shard)} is corrupt"):  # --verify
        verify_corpus(cdir, progress=False)
    assert main(["prepare", "--verify", cdir]) == 2  # the one-line error, exit 2
    with open(shard, "rb") as f:  # the postscript (the footer's place) ends the file,
        footer = len(f.read().rstrip(b"\0")) - 100  # its chunk header fails as it opens
    with open(shard, "r+b") as f:  # the same byte back, then one of the footer
        f.seek(1000)
        f.write(byte)
        f.seek(footer)
        byte = f.read(1)
        f.seek(footer)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ConfigError, match=f"shard {re.escape(shard)} is corrupt"):
        verify_corpus(cdir, progress=False)
    with pytest.raises(ConfigError, match=f"shard {re.escape(shard)} is corrupt"):
        it = pipeline.make_train_iterator(cfg.data, 4, seed=0)
        for _ in range(1000):
            next(it)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 3)
    with pytest.raises(ConfigError, match=f"shard {shard} is missing or truncated"):
        next(pipeline.make_train_iterator(cfg.data, 4, seed=0))
    os.remove(os.path.join(cdir, prep.META))
    with pytest.raises(ConfigError, match="no meta.json"):
        next(pipeline.make_train_iterator(cfg.data, 4, seed=0))
