"""Evaluation: eval json of a tiny trained run, exact-match scoring, the JSONL harness."""

import argparse
import json
import math
import os

import numpy as np
import pytest
from conftest import tiny_config
from test_sweep import compile_cache

from moe_lab.cli.eval import add_eval_parser
from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.arith import ArithTask
from moe_lab.data.tasks.base import Example
from moe_lab.data.tasks.facts import FactsTask
from moe_lab.eval import harness
from moe_lab.eval.evaluate import evaluate, format_table, read_eval, score_predictions


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A dense tiny model trained for 4 steps (accuracy ~0: only the plumbing is tested)."""
    from moe_lab.train.loop import train

    wd = str(tmp_path_factory.mktemp("eval") / "run")
    cfg = tiny_config(
        train=dict(steps=4, checkpoint_every=4, eval_every=4),
        eval=dict(num_examples=6, batch_size=4, max_new_tokens=12, longer_chains=3, at_end=False),
    )
    with compile_cache():
        train(cfg, wd)
        yield wd


def test_evaluate_writes_eval_json(run_dir, capsys):
    with compile_cache():
        result = evaluate(run_dir)
    path = os.path.join(run_dir, "eval", "4.json")
    assert os.path.isfile(path)
    with open(path) as f:
        saved = json.load(f)
    assert saved["step"] == 4 and read_eval(run_dir)["step"] == 4
    assert set(saved["tasks"]) == {"facts", "arith", "arith_long"}
    for name, row in saved["tasks"].items():
        assert {"kind", "eval_loss", "task_loss_bits", "accuracy", "num_examples"} <= set(row), name
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["eval_loss"] > 0 and math.isfinite(row["task_loss_bits"])
    assert saved["tasks"]["facts"]["kind"] == "memorization"
    assert saved["tasks"]["arith"]["kind"] == "reasoning"
    assert saved["tasks"]["arith_long"]["num_steps"] == 3
    assert set(saved["groups"]) == {"memorization", "reasoning", "reasoning_long"}
    assert saved["samples"]["arith"][0]["prompt"].endswith("?")
    assert "memorization" in capsys.readouterr().out
    assert "arith_long@3" in format_table(result)


def test_exact_match_scoring_on_hand_made_predictions():
    arith = ArithTask(seed=0, num_steps=2, modulus=23)
    ex = Example(prompt="a=7 b=a+5 c=b*a mod 23. c?", answer="15", working="<think>b=12 c=15</think>")
    facts = FactsTask(seed=0, num_entities=5)
    fx = Example(prompt="Q: Zorvak job? A:", answer="baker", marker=" ")
    preds = [
        "<think>b=12 c=15</think><answer>15",  # right
        "<think>b=12 c=14</think><answer>14",  # wrong answer
        "<think>b=12 c=15</think><answer>15\nmore text",  # cut at newline: right
        "<think>b=12 c=15</think>15",  # no marker: whole text is the answer -> wrong
        "<answer>1<answer>15",
    ]  # the last marker counts
    assert score_predictions(arith, [ex] * 5, preds) == [True, False, True, False, True]
    assert score_predictions(facts, [fx] * 3, [" baker", " baker.", "baker</s>junk"]) == [True, False, True]
    with pytest.raises(ValueError):
        score_predictions(arith, [ex], [])


def test_eval_cli_arguments(run_dir):
    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers())
    args = p.parse_args(["eval", "--workdir", run_dir, "--step", "3"])
    with pytest.raises(ConfigError, match="no checkpoint at step 3"):
        args.fn(args, {})
    args = p.parse_args(["eval", "--workdir", run_dir])
    with pytest.raises(ConfigError, match="only --config.eval"):
        args.fn(args, {"model.d_model": "8"})
    with pytest.raises(ConfigError, match="eval.num_examples"):
        args.fn(args, {"eval.num_examples": "0"})
    args = p.parse_args(["eval", "--workdir", run_dir + "_missing"])
    with pytest.raises(ConfigError, match="holds no run"):
        args.fn(args, {})
    args = p.parse_args(["eval", "--workdir", run_dir, "--shots", "2"])
    with pytest.raises(ConfigError, match="need --data"):
        args.fn(args, {})
    args = p.parse_args(["eval", "--workdir", run_dir, "--data", run_dir + "/x.jsonl"])
    with pytest.raises(ConfigError, match="no such file"):
        args.fn(args, {})


# ------------------------------------------------------------------- harness


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


QA = [
    {"prompt": f"Q: {w} backwards? A:", "answer": w[::-1]} for w in ("cat", "dog", "sun", "map", "pen", "cup")
]
MC = [
    {"prompt": "Colour of the sky:", "choices": ["blue", "green", "red"], "answer": "blue"},
    {"prompt": "2+2=", "choices": ["3", "4"], "answer": 1},
    {"prompt": "Opposite of hot:", "choices": ["cold", "warm", "tepid"], "answer": "cold"},
    {"prompt": "A baby cat is a", "choices": ["puppy", "kitten"], "answer": "kitten"},
]


def test_few_shot_context_is_deterministic_and_excludes_the_item():
    items = [harness.Item(r["prompt"], r["answer"]) for r in QA]
    for i in range(len(items)):
        idx = harness.shot_indices(len(items), i, 3)
        assert len(set(idx)) == 3 and i not in idx
        assert idx == harness.shot_indices(len(items), i, 3)
    ctx = harness.build_context(items, 0, 2)
    assert ctx == harness.build_context(items, 0, 2) and ctx.endswith(items[0].prompt)
    assert ctx.count("<answer>") == 2 and items[0].answer not in ctx.split("\n")[-1]
    assert harness.build_context(items, 0, 0) == items[0].prompt
    with pytest.raises(ConfigError, match="only 6 rows"):
        harness.shot_indices(6, 0, 6)


def test_exact_match_normalisation():
    assert harness.exact_match("<answer>Paris", "Paris") == (True, True)
    assert harness.exact_match("<answer>the Paris.", "Paris") == (False, True)
    assert harness.exact_match("<answer>Lyon", "Paris") == (False, False)


@pytest.mark.parametrize(
    "rows,match",
    [
        (["{not json"], "invalid JSON"),
        ([{"question": "x", "answer": "y"}], "string 'prompt'"),
        ([{"prompt": "x", "answer": ""}], "non-empty string"),
        ([{"prompt": "x", "choices": ["a", "b"], "answer": "c"}], "one of 'choices'"),
        ([{"prompt": "x", "choices": ["a"], "answer": "a"}], ">= 2"),
        ([{"prompt": "x", "choices": ["a", "b"], "answer": 5}], "out of range"),
        ([{"prompt": "x", "answer": "y"}, {"prompt": "x", "choices": ["a", "b"], "answer": 0}], "mixes"),
        ([], "empty file"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, rows, match):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=match) as e:
        harness.load_items(path)
    assert "\n" not in str(e.value) and "bad.jsonl" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        harness.load_items(str(tmp_path / "missing.jsonl"))


def test_harness_exact_match_and_multiple_choice(run_dir, tmp_path):
    qa = _write(tmp_path / "qa.jsonl", QA)
    mc = _write(tmp_path / "mc.jsonl", MC)
    with compile_cache():
        r = harness.run_harness(run_dir, qa, shots=2, max_new_tokens=8, print_table=False)
        m = harness.run_harness(run_dir, mc, shots=1, print_table=False)
    assert r["kind"] == "exact_match" and r["num_examples"] == 6 and r["shots"] == 2
    assert 0 <= r["accuracy"] <= r["accuracy_normalized"] <= 1 and r["task_loss_bits"] > 0
    assert os.path.isfile(os.path.join(run_dir, "eval", "4-qa-2shot.json"))
    assert m["kind"] == "multiple_choice" and 0 <= m["accuracy"] <= 1
    assert 0 <= m["accuracy_length_normalized"] <= 1
    assert m["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 2]))
    assert len(m["samples"][0]["loglik"]) == 3


def test_choice_loglik_matches_unpadded_forward(run_dir):
    """The batched, padded scorer equals a plain forward pass on each sequence."""
    import jax.numpy as jnp

    from moe_lab.data.tokenizer import BYTE_TOKENIZER as TOKENIZER
    from moe_lab.eval.evaluate import load_run
    from moe_lab.train.step import forward

    with compile_cache():
        cfg, setup, state, _ = load_run(run_dir)
        ctxs = [TOKENIZER.encode("2+2=<answer>", add_bos=True), TOKENIZER.encode("Sky:", True)]
        conts = [TOKENIZER.encode("4"), TOKENIZER.encode(" blue")]
        got = harness.choice_logprobs(
            setup.graphdef, state["params"], state["model_state"], ctxs, conts, batch_size=4, max_len=64
        )
        for ctx, cont, lp in zip(ctxs, conts, got):
            seq = np.array([ctx + cont], np.int32)
            batch = {
                "inputs": jnp.asarray(seq[:, :-1]),
                "positions": jnp.arange(seq.shape[1] - 1)[None],
                "segment_ids": jnp.ones((1, seq.shape[1] - 1), jnp.int32),
            }
            logits, _ = forward(setup.graphdef, state["params"], state["model_state"], batch, train=False)
            logp = np.asarray(logits[0] - jnp.log(jnp.sum(jnp.exp(logits[0]), -1, keepdims=True)))
            want = [logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
            np.testing.assert_allclose(lp, want, atol=1e-5)
