"""Tests for moe_lab.data: tokenizer, synthetic tasks, file source, grain pipeline."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from moe_lab.config.schema import ConfigError, DataConfig
from moe_lab.data import pipeline
from moe_lab.data.tasks.arith import ArithTask
from moe_lab.data.tasks.facts import RELATIONS, FactsTask
from moe_lab.data.tasks.file import FileTask
from moe_lab.data.tasks.registry import make_task
from moe_lab.data.tokenizer import BYTE_TOKENIZER as TOKENIZER
from moe_lab.data.tokenizer import ByteTokenizer as Tokenizer

TOK = TOKENIZER


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_layout():
    t = Tokenizer()
    assert t.vocab_size % 8 == 0 and t.vocab_size >= 256 + 7
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
    ids = {t.pad_id, t.bos_id, t.eos_id, t.think_start_id, t.think_end_id, t.answer_id}
    assert len(ids) == 6 and max(ids) < t.byte_offset
    assert t.encode("A") == [ord("A") + t.byte_offset]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "héllo → 世界 🙂",
        "a=7 b=a+5 mod 23. b?<think>b=12</think><answer>12",
        "<s>x</s><sep><reserved_9>",
        "literal <pad> stays text",
        "<thin<think>k>",
        "<<answer>>",
    ],
)
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert all(0 <= i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text
    with_specials = TOK.encode(text, add_bos=True, add_eos=True)
    assert with_specials[0] == TOK.bos_id and with_specials[-1] == TOK.eos_id
    assert TOK.decode(with_specials) == "<s>" + text + "</s>"
    assert TOK.encode_array(text).dtype == np.int32


def test_tokenizer_specials_map_to_single_ids_and_pad_is_dropped():
    ids = TOK.encode("x<think>y</think><answer>z")
    assert ids.count(TOK.think_start_id) == 1 and ids.count(TOK.think_end_id) == 1
    assert ids.count(TOK.answer_id) == 1 and len(ids) == 6
    assert TOK.decode([TOK.pad_id, *TOK.encode("ab"), TOK.pad_id]) == "ab"
    assert TOK.pad_id not in TOK.encode("<pad>")


# ---------------------------------------------------------------------- tasks


def _solve(prompt: str) -> tuple[int, dict[str, int]]:
    """Independent solver: evaluates each assignment with Python arithmetic."""
    m = re.match(r"^(.*) mod (\d+)\. ([a-z])\?$", prompt)
    assert m, prompt
    body, mod, query = m.group(1), int(m.group(2)), m.group(3)
    env: dict[str, int] = {}
    for assign in body.split(" "):
        var, expr = assign.split("=")
        assert re.fullmatch(r"[a-z0-9]+([+\-*][a-z0-9]+)?", expr), expr
        env[var] = eval(expr, {}, dict(env)) % mod  # test-only; regex-checked
    return env[query], env


def test_task_determinism():
    for make in (lambda s: ArithTask(seed=s, num_steps=3), lambda s: FactsTask(seed=s, num_entities=50)):
        a, b, c = make(0), make(0), make(1)
        for i in (0, 1, 17, 12345):
            assert a.train_example(i) == b.train_example(i)
            assert a.eval_example(i % 5) == b.eval_example(i % 5)
        assert [a.train_example(i) for i in range(20)] != [c.train_example(i) for i in range(20)]
    f0, f1 = FactsTask(0, 50), FactsTask(1, 50)
    assert f0.entities != f1.entities and len(set(f0.entities)) == 50


def test_arith_answers_and_working_are_correct():
    task = ArithTask(seed=3, num_steps=4, eval_num_steps=6, modulus=17, self_correct=0.3)
    n_wait = 0
    for ex in [task.train_example(i) for i in range(300)] + [task.eval_example(i) for i in range(50)]:
        answer, env = _solve(ex.prompt)
        assert ex.answer == str(answer)
        assert ex.text == ex.prompt + ex.working + "<answer>" + ex.answer
        assert ex.working.startswith("<think>") and ex.working.endswith("</think>")
        steps = ex.working[len("<think>") : -len("</think>")]
        if "Wait" in steps:
            n_wait += 1
            wrong, right = re.search(r"([a-z])=(\d+) Wait \1=(\d+)", steps).group(2, 3)
            assert wrong != right
            steps = re.sub(r"[a-z]=\d+ Wait ", "", steps)
        assert steps == " ".join(f"{v}={env[v]}" for v in sorted(env) if v != "a")
        assert task.check(ex.completion + "</s>", ex)
        assert not task.check("<think></think><answer>" + str((answer + 1) % 17), ex)
    assert 40 < n_wait < 140  # ~30% of the 300 training examples; eval has none
    assert "Wait" not in task.eval_example(0).working
    assert task.eval_example(0).prompt.count("=") == 7  # a + 6 steps


def test_arith_direct_rows_drop_only_the_working():
    """arith_direct: that share of training rows answer with an empty <think></think>;
    the rest, every eval row and the answers are the plain task's, and 0 draws nothing
    (runs stored before the option read the same data)."""
    plain, none, direct = (ArithTask(seed=2, num_steps=2, modulus=7, direct=d) for d in (0.0, 0.0, 0.4))
    rows = [direct.train_example(i) for i in range(400)]
    assert [plain.train_example(i) for i in range(50)] == [none.train_example(i) for i in range(50)]
    empty = [ex for ex in rows if ex.working == "<think></think>"]
    assert 110 < len(empty) < 210  # ~40% of 400
    for ex in rows:
        assert ex.answer == str(_solve(ex.prompt)[0]) and direct.check(ex.completion, ex)
        assert ex.working == "<think></think>" or ex.working.count("=") == 2
    assert all(direct.eval_example(i) == plain.eval_example(i) for i in range(30))
    with pytest.raises(ConfigError, match="arith_direct must be in"):
        ArithTask(direct=1.5)


def test_arith_train_eval_disjoint():
    task = ArithTask(seed=0, num_steps=2, modulus=7)  # small problem space: collisions likely
    train = {task.train_example(i).prompt for i in range(2000)}
    evals = {task.eval_example(i).prompt for i in range(500)}
    assert len(evals) > 50 and not train & evals
    assert all(task.is_eval_problem(p) for p in evals)
    assert not any(task.is_eval_problem(p) for p in train)


def test_facts_eval_queries_ask_about_stated_facts_with_held_out_query_form():
    task = FactsTask(seed=0, num_entities=60)
    train = [task.train_example(i) for i in range(task.num_train)]
    stated = {(ex.key, ex.answer) for ex in train if ex.suffix == "."}
    train_queries = {ex.prompt for ex in train if ex.prompt.startswith("Q: ")}
    assert len(stated) == 60 * len(RELATIONS)  # every fact is stated
    assert train_queries and task.num_eval > 0
    for i in range(task.num_eval):
        ex = task.eval_example(i)
        assert ex.prompt.startswith("Q: ") and ex.prompt.endswith("? A:")
        assert (ex.key, ex.answer) in stated
        assert ex.prompt not in train_queries
        assert task.check(" " + ex.answer + "</s>", ex)
    # both statement phrasings occur
    assert any(ex.prompt.startswith("The ") for ex in train)
    assert any("'s " in ex.prompt for ex in train)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_file_task_split_and_rows(tmp_path):
    paras = "\n\n".join(f"Paragraph number {i} about topic {i * 7}." for i in range(200))
    txt = _write(tmp_path / "a.txt", paras + "\n\n" + "x" * 500)
    rows = [{"text": f"doc {i}"} for i in range(100)] + [
        {"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(100)
    ]
    jsonl = _write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = FileTask([txt, jsonl], max_doc_tokens=127)
    train = {task.train_example(i).text for i in range(task.num_train)}
    evals = {task.eval_example(i).text for i in range(task.num_eval)}
    assert task.num_eval >= 3 and task.num_train + task.num_eval >= 400
    assert not train & evals
    assert max(len(TOK.encode(t)) for t in train | evals) <= 127  # the long doc was chunked
    qa = [task.train_example(i) for i in range(task.num_train) if task.train_example(i).answer]
    assert qa and all(t.text == t.prompt + "<answer>" + t.answer for t in qa)
    assert task.check("<answer>" + qa[0].answer, qa[0])
    again = FileTask([txt, jsonl], max_doc_tokens=127)
    assert again.train_docs == task.train_docs


def test_txt_lines_without_blank_lines_are_documents(tmp_path):
    path = _write(tmp_path / "lines.txt", "\n".join(f"line {i}" for i in range(40)) + "\n")
    task = FileTask([path])
    assert task.num_train + task.num_eval == 40


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file: .*missing.txt"):
        FileTask([str(tmp_path / "missing.txt")])
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "ok2"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: invalid JSON"):
        FileTask([bad])
    nofield = _write(tmp_path / "nofield.jsonl", '{"text": "a"}\n{"question": "b"}\n')
    with pytest.raises(ConfigError, match=r"nofield\.jsonl:2: row needs"):
        FileTask([nofield])
    empty = _write(tmp_path / "empty.txt", "\n\n   \n")
    with pytest.raises(ConfigError, match=r"empty\.txt: no documents"):
        FileTask([empty])
    with pytest.raises(ConfigError, match="unsupported extension"):
        FileTask([_write(tmp_path / "x.csv", "a,b\n")])
    cfg = DataConfig(mixture="file:1", files=f"{bad}")
    with pytest.raises(ConfigError, match="bad.jsonl:3"):
        make_task("file", cfg)
    try:
        FileTask([bad])
    except ConfigError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------- pipeline

CFG = DataConfig(mixture="arith:3,facts:1", seq_len=128, facts_num_entities=100)


def _segments(batch):
    """Yields (row, segment id, token slice) for every packed document."""
    for r in range(batch["inputs"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s > 0:
                yield r, int(s), np.nonzero(batch["segment_ids"][r] == s)[0]


def _segment_texts(batch):
    out = []
    for r, _, idx in _segments(batch):
        out.append(TOK.decode(batch["inputs"][r, idx]) + TOK.decode(batch["targets"][r, idx[-1:]]))
    return out


def test_batch_format_and_masks():
    it = pipeline.make_train_iterator(CFG, 8, seed=0)
    facts = make_task("facts", CFG)
    names = {name: e for e, name in enumerate(facts.entities)}
    words = {w: r for r, (w, phrase, _) in enumerate(RELATIONS)}
    phrases = {phrase: r for r, (w, phrase, _) in enumerate(RELATIONS)}
    checked = {0: 0, 1: 0}
    for _ in range(3):
        b = next(it)
        assert set(b) == set(pipeline.BATCH_FIELDS)
        for k, v in b.items():
            assert v.shape == (8, 128), k
            assert v.dtype == (np.float32 if k in ("weights", "answer_mask") else np.int32), k
        pad = b["segment_ids"] == 0
        assert pad.any() and (b["segment_ids"] > 1).any()  # padded and packed
        np.testing.assert_array_equal(b["weights"], (~pad).astype(np.float32))
        assert not b["inputs"][pad].any() and not b["targets"][pad].any()
        assert not b["answer_mask"][pad].any()
        for r, _s, idx in _segments(b):
            assert np.all(np.diff(idx) == 1)  # contiguous
            np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
            ins, tgt = b["inputs"][r, idx], b["targets"][r, idx]
            assert ins[0] == TOK.bos_id and tgt[-1] == TOK.eos_id
            np.testing.assert_array_equal(ins[1:], tgt[:-1])  # next token within the doc
            (task_id,) = np.unique(b["task_ids"][r, idx])
            text = TOK.decode(ins[1:])
            answer = TOK.decode(tgt[b["answer_mask"][r, idx] > 0])
            if task_id == 0:  # arith: answer mask = working + <answer> + the answer
                assert text.endswith(answer) and answer.startswith("<think>")
                assert answer.split("<answer>")[1] == str(_solve(text.split("<think>")[0])[0])
            else:  # facts: answer mask = the value, and it is the true value
                m = re.fullmatch(r"Q: (\w+) (\w+)\? A: (.+)", text) or re.fullmatch(
                    r"(\w+)'s (.+) is (.+)\.", text
                )
                if m:
                    e, r_ = names[m.group(1)], {**words, **phrases}[m.group(2)]
                else:
                    m = re.fullmatch(r"The (.+) of (\w+) is (.+)\.", text)
                    e, r_ = names[m.group(2)], phrases[m.group(1)]
                assert answer == m.group(3) == facts.value(e, r_)
            checked[int(task_id)] += 1
    assert checked[0] > 20 and checked[1] > 5


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_checkpoint_round_trip(prefetch):
    it = pipeline.make_train_iterator(CFG, 4, seed=7, prefetch=prefetch)
    for _ in range(5):
        next(it)
    state = it.get_state()
    json.dumps(state)  # goes into the checkpoint as JSON
    expected = [next(it) for _ in range(3)]
    fresh = pipeline.make_train_iterator(CFG, 4, seed=7, prefetch=prefetch)
    fresh.set_state(json.loads(json.dumps(state)))
    for want in expected:
        got = next(fresh)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    it.close()
    fresh.close()


def test_worker_processes_keep_the_mixture_and_resume():
    """data.workers = 2: every batch (each worker's) holds the 3:1 mixture (grain's
    default strided slicing gave each worker one task of the interleave), and the
    workers' state resumes exactly."""
    cfg = dataclasses.replace(CFG, workers=2)
    it = pipeline.make_train_iterator(cfg, 8, seed=0)
    try:
        for _ in range(4):
            b = next(it)
            tasks = [b["task_ids"][r, idx[0]] for r, _, idx in _segments(b)]
            assert 0.5 < np.mean(np.equal(tasks, 0)) < 0.95, tasks
        state = json.loads(json.dumps(it.get_state()))
        want = [next(it) for _ in range(2)]
    finally:
        it.close()
    fresh = pipeline.make_train_iterator(cfg, 8, seed=0)
    try:
        fresh.set_state(state)
        for w in want:
            np.testing.assert_array_equal(next(fresh)["inputs"], w["inputs"])
    finally:
        fresh.close()


def test_seed_changes_order_but_is_deterministic():
    def first(seed):
        return next(pipeline.make_train_iterator(CFG, 4, seed=seed))

    a, b, c = first(1), first(1), first(2)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], c["inputs"])


def test_host_shards_are_disjoint_and_each_sees_the_mixture():
    cfg = dataclasses.replace(CFG, facts_num_entities=300)
    docs = []
    for shard in range(2):
        it = pipeline.make_train_iterator(cfg, 8, seed=0, shard_index=shard, shard_count=2)
        batches = [next(it) for _ in range(6)]
        assert batches[0]["inputs"].shape == (4, 128)  # per-host batch
        task_of_doc = [b["task_ids"][r, idx[0]] for b in batches for r, _, idx in _segments(b)]
        assert abs(np.mean(np.equal(task_of_doc, 0)) - 0.75) < 0.1  # 3:1 on every host
        docs.append([t for b in batches for t in _segment_texts(b)])
    assert len(set(docs[0])) == len(docs[0]) and len(set(docs[1])) == len(docs[1])
    assert len(docs[0]) > 50 and not set(docs[0]) & set(docs[1])


def test_mixture_weights_respected():
    it = pipeline.make_train_iterator(CFG, 16, seed=0)
    counts = np.zeros(2)
    while counts.sum() < 2000:
        b = next(it)
        for r, _, idx in _segments(b):
            counts[b["task_ids"][r, idx[0]]] += 1
    share = counts[0] / counts.sum()
    assert abs(share - 0.75) < 0.03, counts


def test_unpacked_training_and_eval_batches():
    cfg = dataclasses.replace(CFG, pack=False)
    b = next(pipeline.make_train_iterator(cfg, 4, seed=0))
    assert b["segment_ids"].max() == 1 and (b["positions"][:, 0] == 0).all()
    task = make_task("arith", CFG)
    batches = pipeline.make_eval_batches(task, CFG, batch_size=4, num_batches=2, task_index=0)
    assert len(batches) == 2
    prompts = pipeline.eval_prompts(task, 8)
    for k, batch in enumerate(batches):
        assert set(batch) == set(pipeline.BATCH_FIELDS)
        assert batch["segment_ids"].max() == 1
        np.testing.assert_array_equal(batch["weights"], (batch["segment_ids"] > 0))
        for r in range(4):
            ex = prompts[4 * k + r]
            mask = batch["answer_mask"][r] > 0
            assert TOK.decode(batch["targets"][r][mask]) == ex.working + ex.marker + ex.answer
            n = int(batch["weights"][r].sum())
            assert TOK.decode(batch["inputs"][r, :n]) == "<s>" + ex.text
    again = pipeline.make_eval_batches(task, CFG, batch_size=4, num_batches=2)
    np.testing.assert_array_equal(again[1]["inputs"], batches[1]["inputs"])
    assert "fill" in pipeline.describe_batch(batches[0], ["arith"])


def test_long_documents_are_truncated_to_seq_len():
    ex = ArithTask(num_steps=20).train_example(0)
    doc = pipeline.tokenize_example(ex, 0, 32)
    assert len(doc["inputs"]) == 32 and doc["targets"][-1] != TOK.eos_id


def test_file_mixture_pipeline(tmp_path):
    path = _write(tmp_path / "d.txt", "\n\n".join(f"the quick fox {i} " * (1 + i % 20) for i in range(300)))
    cfg = DataConfig(mixture="file:1,facts:1", files=path, seq_len=64, facts_num_entities=20)
    b = next(pipeline.make_train_iterator(cfg, 4, seed=0))
    assert b["inputs"].shape == (4, 64) and set(np.unique(b["task_ids"][b["weights"] > 0])) == {0, 1}
