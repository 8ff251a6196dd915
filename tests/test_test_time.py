"""Test-time compute: estimators vs enumeration, s1 metrics on hand-computed fixtures,
the budget-forcing controller on a scripted fake model, the cached stepper vs greedy
decoding, recursion depth at inference, and `moe-lab eval --ttc` end to end."""

import argparse
import dataclasses
import json
import os
import random

import numpy as np
import pytest
from conftest import tiny_config

from moe_lab.data.tokenizer import BYTE_TOKENIZER as TOK
from moe_lab.eval import budget_forcing as bf
from moe_lab.eval import generate as gen
from moe_lab.eval import test_time as tt
from moe_lab.growth.transforms import with_recursions


def make_run(path: str, cfg) -> str:
    """A run dir with config.json and one checkpoint of the randomly initialised model
    (no training: these tests exercise plumbing, not learning)."""
    import jax

    from moe_lab.parallel import sharding
    from moe_lab.train.checkpoint import write_checkpoint
    from moe_lab.train.run_dir import write_json_atomic
    from moe_lab.train.state import make_setup

    mesh_cfg = dataclasses.replace(cfg.mesh, data=1)
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    setup = make_setup(cfg.replace(mesh=mesh_cfg), mesh)
    os.makedirs(path, exist_ok=True)
    write_json_atomic(os.path.join(path, "config.json"), cfg.to_dict())
    write_checkpoint(path, cfg.train.steps, setup.init_state(), {"step": cfg.train.steps})
    return path


def tiny_model_config(**model):
    return tiny_config(
        model=dict(num_layers=1, **model),
        data=dict(mixture="arith:1", arith_num_steps=2, arith_eval_num_steps=2),
        train=dict(steps=1),
        eval=dict(num_examples=4, batch_size=4, max_new_tokens=16, at_end=False),
    )


# ---------------------------------------------------------------- estimators


def test_coverage_and_majority_match_enumeration():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 9)
        keys = [rng.choice("abcd") for _ in range(n)]
        right = rng.choice("abcdx")
        correct = [k == right for k in keys]
        for k in range(1, n + 1):
            assert tt.coverage_at_k(n, sum(correct), k) == pytest.approx(
                tt.coverage_bruteforce(correct, k), abs=1e-12
            )
            assert tt.majority_at_k(keys, correct, k) == pytest.approx(
                tt.majority_bruteforce(keys, correct, k), abs=1e-12
            )


def test_majority_with_several_right_keys_and_hand_values():
    # verifier tasks: two different right answers ("=6" twice, "=6b" once) vs one wrong
    keys, correct = ["r1", "r1", "r2", "w"], [True, True, True, False]
    for k in range(1, 5):
        assert tt.majority_at_k(keys, correct, k) == pytest.approx(tt.majority_bruteforce(keys, correct, k))
    # hand-computed: answers a, a, b with a right; k=2: subsets {a,a} 1, {a,b} x2 tie 1/2 -> 2/3
    assert tt.majority_at_k(["a", "a", "b"], [True, True, False], 2) == pytest.approx(2 / 3)
    assert tt.coverage_at_k(3, 1, 2) == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2)
    assert tt.majority_at_k(["a", "b"], [False, False], 1) == 0.0
    with pytest.raises(ValueError):
        tt.majority_at_k(["a", "a"], [True, False], 1)
    assert tt.default_ks(16) == [1, 2, 4, 8, 16] and tt.default_ks(20, 8) == [1, 2, 4, 8]


def test_majority_scales_to_128_samples():
    rng = np.random.default_rng(0)
    keys = list(rng.choice(list("abcdefgh"), size=128, p=[0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]))
    correct = [k == "a" for k in keys]
    curve = [tt.majority_at_k(keys, correct, k) for k in (1, 8, 64, 128)]
    assert curve[0] == pytest.approx(np.mean(correct))
    assert curve[-1] == 1.0 and curve[1] < curve[2] < curve[3]


def test_budget_metrics_on_hand_computed_fixtures():
    # f = (0.1, 0.3, 0.2) at a = (1, 2, 4): slopes 0.2, 0.1/3, -0.05 -> mean 0.061111
    m = tt.budget_metrics([1, 2, 4], [0.1, 0.3, 0.2], [[True, False], [True, True], [True, True]])
    assert m == pytest.approx({"control": 5 / 6, "scaling": (0.2 + 0.1 / 3 - 0.05) / 3, "performance": 0.3})
    # order of the budgets does not matter; shares may be given directly
    m2 = tt.budget_metrics([4, 1, 2], [0.2, 0.1, 0.3], [1.0, 0.5, 1.0])
    assert m2["scaling"] == pytest.approx(m["scaling"]) and m2["control"] == pytest.approx(2.5 / 3)
    # s1-style: monotone accuracy in percent over token budgets
    m3 = tt.budget_metrics([512, 1024, 2048], [30.0, 40.0, 50.0], [1.0, 1.0, 1.0])
    assert m3["scaling"] == pytest.approx((10 / 512 + 20 / 1536 + 10 / 1024) / 3)
    assert m3["performance"] == 50.0 and m3["control"] == 1.0


# ----------------------------------------------------- budget forcing (fake model)


class Bigram:
    """A scripted model: the next token depends only on the last token fed (per row).
    Logits are fixed one-hots, so greedy decoding is exact."""

    def __init__(self, tables, default):
        self.tables, self.default = tables, default
        self.V = TOK.vocab_size

    def logits(self, last):
        out = np.full((len(last), self.V), -10.0, np.float32)
        for b, t in enumerate(last):
            out[b, self.tables[b].get(int(t), self.default)] = 10.0
        return out

    def start(self, B):
        return self.logits([TOK.bos_id] * B)

    def __call__(self, tokens_B):
        return self.logits(tokens_B)


def ids(s):
    return TOK.encode(s)[0]


def text_of(row):
    return TOK.decode(row["tokens"])


def test_forced_end_at_max_budget():
    # after <think> the model writes "a" forever; after <answer> "7" then EOS
    table = {TOK.think_start_id: ids("a"), ids("a"): ids("a"), TOK.answer_id: ids("7"), ids("7"): TOK.eos_id}
    m = Bigram([table], TOK.eos_id)
    for budget in (0, 1, 5):
        (row,) = bf.budget_force(m.start(1), m, bf.Forcing(max_think=budget))
        assert text_of(row) == "<think>" + "a" * budget + "</think><answer>7</s>"
        assert row["think_len"] == budget and row["forced_end"] and not row["ended"]


def test_wait_is_inserted_n_times_then_end_allowed():
    # the model thinks "b" and immediately tries to close; after "Wait" it writes "b" again
    table = {
        TOK.think_start_id: ids("b"),
        ids("b"): TOK.think_end_id,
        ids("t"): ids("b"),
        TOK.answer_id: ids("7"),
        ids("7"): TOK.eos_id,
    }
    m = Bigram([table], TOK.eos_id)
    for n in (0, 1, 2, 4):
        (row,) = bf.budget_force(m.start(1), m, bf.Forcing(num_waits=n))
        assert text_of(row) == "<think>b" + " Waitb" * n + "</think><answer>7</s>", n
        assert row["waits"] == n and row["think_len"] == 1 + 6 * n and not row["forced_end"]
    # min budget: pushed until 8 thinking tokens are written (b, " Wait", b = 7; twice = 13)
    (row,) = bf.budget_force(m.start(1), m, bf.Forcing(min_think=8))
    assert text_of(row) == "<think>b Waitb Waitb</think><answer>7</s>"
    # the max budget wins over extrapolation: no room for another " Wait" -> forced end
    (row,) = bf.budget_force(m.start(1), m, bf.Forcing(max_think=9, num_waits=5))
    assert text_of(row) == "<think>b Waitb</think><answer>7</s>"
    assert row["waits"] == 1 and row["think_len"] == 7 and not row["forced_end"]
    (row,) = bf.budget_force(m.start(1), m, bf.Forcing(max_think=7, num_waits=5, max_answer=1))
    assert row["think_len"] <= 7 and text_of(row).endswith("<answer>7")


def test_rows_are_controlled_independently():
    closing = {
        TOK.think_start_id: ids("b"),
        ids("b"): TOK.think_end_id,
        ids("t"): ids("b"),
        TOK.answer_id: ids("7"),
        ids("7"): TOK.eos_id,
    }
    endless = {TOK.think_start_id: ids("a"), ids("a"): ids("a"), TOK.answer_id: ids("5"), ids("5"): ids("5")}
    m = Bigram([closing, endless], TOK.eos_id)
    rows = bf.budget_force(m.start(2), m, bf.Forcing(max_think=10, num_waits=1, max_answer=3))
    assert text_of(rows[0]) == "<think>b Waitb</think><answer>7</s>"
    assert text_of(rows[1]) == "<think>" + "a" * 10 + "</think><answer>555"
    assert [r["forced_end"] for r in rows] == [False, True]


# ------------------------------------------------------------ real tiny model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("ttc") / "run"), tiny_model_config())


def test_sampling_and_cached_stepper_match_the_decoder(run_dir):
    import jax

    from moe_lab.eval.evaluate import load_run

    cfg, setup, state, _ = load_run(run_dir)
    args = (setup.graphdef, state["params"], state["model_state"])
    prompts = [TOK.encode("a=1 b=a+2 mod 11. b?", add_bos=True), TOK.encode("a=3", add_bos=True)]
    s1 = tt.sample_batched(*args, prompts, 3, 6, temperature=1.0, seed=1, batch_size=4)
    s2 = tt.sample_batched(*args, prompts, 3, 6, temperature=1.0, seed=1, batch_size=4)
    assert s1 == s2 and len(s1) == 2 and all(len(x) == 3 for x in s1)
    assert tt.sample_batched(*args, prompts, 3, 6, temperature=1.0, seed=2, batch_size=4) != s1
    # the stepper fed the greedy tokens reproduces greedy decoding step by step
    tokens, valid = gen.left_pad(prompts, TOK.pad_id)
    greedy = gen.generate_tokens(*args, tokens, valid, jax.random.key(0), max_new_tokens=6)
    st = gen.CachedStepper(*args, prompts, 8, pad_id=TOK.pad_id)
    logits = st.first_logits
    for i in range(6):
        np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), greedy[:, i])
        logits = st(greedy[:, i])


def test_eval_ttc_command_writes_tables(run_dir, capsys):
    from moe_lab.cli.eval import add_eval_parser

    p = argparse.ArgumentParser()
    add_eval_parser(p.add_subparsers())
    args = p.parse_args(
        [
            "eval",
            "--workdir",
            run_dir,
            "--ttc",
            "--ttc-n",
            "4",
            "--ttc-prompts",
            "4",
            "--ttc-budgets",
            "2,6",
            "--ttc-waits",
            "0,1",
        ]
    )
    assert args.fn(args, {}) == 0
    with open(os.path.join(run_dir, "eval", "1-ttc.json")) as f:
        r = json.load(f)
    assert r["ks"] == [1, 2, 4] and set(r["coverage"]) == {"1", "2", "4"}
    for k in ("1", "2", "4"):
        assert 0.0 <= r["majority"][k] <= r["coverage"][k] + 1e-9 <= 1.0 + 1e-9
    bf = r["budget_forcing"]
    assert [row["budget"] for row in bf["max_budget"]["rows"]] == [2, 6]
    assert bf["max_budget"]["metrics"]["control"] == 1.0  # forcing keeps every run in budget
    assert all(row["mean_think"] <= row["budget"] for row in bf["max_budget"]["rows"])
    assert [row["waits"] for row in bf["extrapolation"]["rows"]] == [0, 1]
    out = capsys.readouterr().out
    assert "coverage@k" in out and "Control" in out and "Scaling" in out
    cols = tt.sweep_columns(r)
    assert {"coverage@4", "majority@4", "bf_max_budget_control"} <= set(cols)


def test_recursion_depth_override_keeps_the_pool_and_extrapolates():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_lab.train.state import build_model, split_model

    cfg = tiny_config(
        model=dict(
            num_layers=3,
            stack="recursive",
            mor=dict(num_recursions=1, sharing="middle_cycle", routing="expert_choice"),
        )
    )
    params, ms = jax.jit(lambda: split_model(build_model(cfg))[1:])()  # jit: eager is slow
    state = {"params": jax.tree.map(np.asarray, params), "model_state": ms}
    toks = jnp.asarray([[1, 30, 40, 50, 60, 70]], jnp.int32)

    def forward(c, p, m):
        g = split_model(nnx.eval_shape(lambda: build_model(c)))[0]
        return jax.jit(lambda p, m: nnx.merge(g, p, m)(toks)[0])(p, m)

    ref = forward(cfg, params, ms)
    outs = {}
    for d in (1, 3):
        cfg2, p2, ms2 = with_recursions(cfg, state, d)
        assert cfg2.model.num_layers == d + 2
        outs[d] = forward(cfg2, p2, ms2)
    np.testing.assert_allclose(outs[1], ref, rtol=1e-6, atol=1e-6)  # trained depth: same model
    assert not np.allclose(outs[3], outs[1])  # more recursions change the function
    tc = tiny_config(
        model=dict(num_layers=3, stack="recursive", mor=dict(num_recursions=1, routing="token_choice"))
    )
    with pytest.raises(Exception, match="token-choice"):
        with_recursions(tc, state, 2)
