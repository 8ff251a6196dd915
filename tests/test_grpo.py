"""GRPO: the loss against a slow per-token reference (values and gradients, from the
model's own parameters), advantages, batches, the countdown verifier, and `moe-lab rl`
(creates, refuses, resumes)."""

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_test_time import make_run, tiny_model_config

from moe_lab.config.schema import ConfigError
from moe_lab.data.tasks.base import Example
from moe_lab.data.tasks.countdown import CountdownTask, parse_expression, verify
from moe_lab.data.tasks.registry import make_task
from moe_lab.data.tokenizer import BYTE_TOKENIZER as TOK
from moe_lab.rl import objective

# ------------------------------------------------------------------ the loss


def slow_loss(logp, old, ref, adv, mask, *, eps, beta, agg, kl="k3"):
    """Per-token python loop, written from the formula (module docstring of grpo.py)."""
    seq_terms, tok_sum, n_tok = [], 0.0, 0
    for b in range(len(mask)):
        s, n = 0.0, 0
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = jnp.exp(logp[b][t] - old[b][t])
            clipped = jnp.minimum(jnp.maximum(ratio, 1 - eps), 1 + eps)
            pg = -jnp.minimum(ratio * adv[b], clipped * adv[b])
            d = ref[b][t] - logp[b][t]
            k = (jnp.exp(d) - d - 1) if kl == "k3" else -d
            s, n = s + pg + beta * k, n + 1
        tok_sum, n_tok = tok_sum + s, n_tok + n
        seq_terms.append(s / max(n, 1))
    return sum(seq_terms) / len(mask) if agg == "sequence" else tok_sum / max(n_tok, 1)


@pytest.mark.parametrize("agg,kl", [("sequence", "k3"), ("token", "k3"), ("sequence", "k1")])
def test_grpo_loss_matches_slow_reference(agg, kl):
    rng = np.random.default_rng(0)
    B, T = 4, 6
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, (B, T)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (B, T)), jnp.float32)  # ratios beyond 1 +- eps
    ref = logp + jnp.asarray(rng.normal(0, 0.5, (B, T)), jnp.float32)
    adv = jnp.asarray([1.5, -0.5, 0.0, -1.0], jnp.float32)
    mask = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], bool)
    kw = dict(eps=0.2, beta=0.05, agg=agg, kl=kl)

    def fast(lp):
        return objective.grpo_loss(
            lp, old, ref, adv, jnp.asarray(mask), clip_eps=0.2, kl_coef=0.05, loss_agg=agg, kl_estimator=kl
        )[0]

    val, g = jax.jit(jax.value_and_grad(fast))(logp)
    sval, sg = jax.jit(jax.value_and_grad(lambda lp: slow_loss(lp, old, ref, adv, mask, **kw)))(logp)
    np.testing.assert_allclose(val, sval, rtol=1e-5)
    np.testing.assert_allclose(g, sg, rtol=1e-5, atol=1e-7)
    _, m = objective.grpo_loss(logp, old, ref, adv, jnp.asarray(mask), clip_eps=0.2, kl_coef=0.05)
    assert 0 < float(m["clip_fraction"]) < 1 and float(m["kl"]) > 0


def _model(kind):
    from moe_lab.train.state import build_model, split_model

    model = {
        "dense": dict(num_layers=1),
        "moe": dict(num_layers=1, ffn="moe", moe=dict(num_experts=4, top_k=2)),
        "recursive": dict(num_layers=3, stack="recursive", mor=dict(num_recursions=1, routing="none")),
    }[kind]
    cfg = tiny_config(model=model)
    from flax import nnx

    gd = split_model(nnx.eval_shape(lambda: build_model(cfg)))[0]
    params, ms = jax.jit(lambda: split_model(build_model(cfg))[1:])()  # jit: eager is slow
    return gd, params, ms


def _rows():
    prompts = [[TOK.bos_id, 40, 41, 42], [TOK.bos_id, 50], [TOK.bos_id, 60, 61]]
    responses = [[70, 71, TOK.eos_id, 99], [72, 73, 74, 75], [TOK.eos_id, 5, 6, 7]]
    return prompts, responses


def _slow_logprobs(gd, params, ms, prompts, responses, lengths):
    """log pi of each response token, picked one by one from a forward pass over the
    row alone (no padding, positions 0..n-1; causal, so logits at t see only t's prefix)."""
    from flax import nnx

    model = nnx.merge(gd, params, ms)
    out = []
    for p, r, n in zip(prompts, responses, lengths):
        logits, _ = model(jnp.asarray([p + r[:n]], jnp.int32))
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        out.append([logp[len(p) - 1 + t, r[t]] for t in range(n)])
    return out


@pytest.mark.parametrize("kind", ["dense", "recursive"])  # MoE: same code path, in the sweep check
def test_batched_logprobs_match_per_prefix_forward(kind):
    gd, params, ms = _model(kind)
    prompts, responses = _rows()
    b = objective.build_batch(prompts, responses, 8, TOK.eos_id, TOK.pad_id)
    assert b["lengths"].tolist() == [3, 4, 1]
    fast = jax.jit(
        lambda p: objective.token_logprobs(gd, p, ms, jnp.asarray(b["tokens"]), jnp.asarray(b["valid"]))[0]
    )(params)
    slow = jax.jit(lambda p: _slow_logprobs(gd, p, ms, prompts, responses, b["lengths"]))(params)
    for i in range(3):
        got = np.asarray(fast[i])[b["mask"][i]]
        np.testing.assert_allclose(got, np.asarray(slow[i]), rtol=1e-4, atol=1e-5)


def test_grpo_loss_from_params_matches_slow_reference_with_gradients():
    """The whole objective from the model's parameters (left-padded batch, masks, clip,
    k3 KL) against a per-token loop over unpadded prefixes: values and gradients."""
    gd, params, ms = _model("dense")
    _, ref_params, _ = _model("dense")
    ref_params = jax.tree.map(lambda x: x * 1.05, ref_params)  # a different frozen model
    prompts, responses = _rows()
    b = objective.build_batch(prompts, responses, 8, TOK.eos_id, TOK.pad_id)
    adv = jnp.asarray([1.0, -0.7, 0.4], jnp.float32)
    tokens, valid = jnp.asarray(b["tokens"]), jnp.asarray(b["valid"])
    logprobs = jax.jit(lambda p: objective.token_logprobs(gd, p, ms, tokens, valid)[0])
    ref_fast, cur = logprobs(ref_params), logprobs(params)
    ref_slow = jax.jit(lambda p: _slow_logprobs(gd, p, ms, prompts, responses, b["lengths"]))(ref_params)
    old_fast = cur + 0.25 * jnp.sin(jnp.arange(cur.size).reshape(cur.shape))  # off-policy
    eps, beta = 0.2, 0.1

    def fast(p):
        lp, _ = objective.token_logprobs(gd, p, ms, tokens, valid)
        return objective.grpo_loss(
            lp, old_fast, ref_fast, adv, jnp.asarray(b["mask"]), clip_eps=eps, kl_coef=beta
        )[0]

    def slow(p):
        lp = _slow_logprobs(gd, p, ms, prompts, responses, b["lengths"])
        olds = [[old_fast[i][j] for j in np.flatnonzero(b["mask"][i])] for i in range(3)]
        mask = [[True] * len(r) for r in lp]
        return slow_loss(lp, olds, ref_slow, adv, mask, eps=eps, beta=beta, agg="sequence")

    v, g = jax.jit(jax.value_and_grad(fast))(params)
    sv, sg = jax.jit(jax.value_and_grad(slow))(params)
    np.testing.assert_allclose(v, sv, rtol=1e-4)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(sg)):
        np.testing.assert_allclose(a, c, rtol=2e-3, atol=1e-6)


def test_group_advantages_and_batch_layout():
    a = objective.group_advantages(np.array([[1, 0, 0, 1], [1, 1, 1, 1]], np.float32))
    np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-3)
    np.testing.assert_allclose(a[1], 0.0)
    np.testing.assert_allclose(objective.group_advantages(np.array([[2.0, 0.0]]), scale=False), [[1.0, -1.0]])
    b = objective.build_batch([[1, 5], [1]], [[7, 2, 9], [8, 8, 8]], 4, eos_id=2, pad_id=0)
    assert b["tokens"].tolist() == [[0, 0, 1, 5, 7, 2, 9], [0, 0, 0, 1, 8, 8, 8]]
    # targets 3..: response tokens; row 0 stops after its EOS
    assert b["mask"].astype(int).tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    ex = Example(prompt="q", answer="3", working="<think>x</think>")
    assert objective.format_ok("<think>x</think><answer>3</s>", ex)
    assert not objective.format_ok("<think>x</think><answer>3", ex)
    assert not objective.format_ok("<answer>3</s>", ex)


# ---------------------------------------------------------------- countdown


def test_countdown_verifier():
    nums, target = [2, 3, 5], 16
    assert verify("(3+5)*2", nums, target)
    assert verify(" ( 3 + 5 ) * 2 ", nums, target)
    assert not verify("(3+5)*2+0", nums, target)  # 0 is not given
    assert not verify("3*5+1", nums, target)  # 1 is not given
    assert verify("3*5+2-2", [3, 5, 2, 2], 15) and not verify("3*5+2-2", nums, 15)  # at most once
    assert verify("10/4*2", [10, 4, 2], 5)  # exact rational arithmetic: 2.5 * 2
    assert not verify("10/4", [10, 4], 2)  # 2.5 is not 2 (no integer division)
    assert not verify("6/(3-3)", [6, 3, 3], 1)  # division by zero
    for bad in ("", "3+", "(3+5", "3+5)", "-3+5", "3 5", "2**3", "import os", "3.0+1"):
        assert not verify(bad, [3, 5, 1, 2, 0], 8), bad
    assert verify("5+3", nums, 8) and not verify("5+3", nums, 8, use_all=True)
    assert verify("(5+3)*2", nums, 16, use_all=True)
    assert parse_expression("2*(3+4)-1")[0] == 13


def test_countdown_task_solutions_verify_and_vote_keys():
    task = make_task("countdown", tiny_config(data=dict(mixture="countdown:1")).data)
    assert isinstance(task, CountdownTask)
    for i in range(200):
        ex = task.train_example(i)
        assert task.check(ex.completion + "</s>", ex), ex
        assert not task.is_eval_problem(ex.prompt)
    ex = task.eval_example(0)
    assert task.is_eval_problem(ex.prompt) and task.check(ex.completion, ex)
    assert task.vote_key("<answer>" + ex.answer, ex) == f"={parse_expression(ex.answer)[0]}"
    assert task.vote_key("<answer>1+", ex).startswith("invalid:")


# -------------------------------------------------------------- rl command


def _rl_args(src, dst, *extra):
    from moe_lab.cli.rl import add_rl_parser

    p = argparse.ArgumentParser()
    add_rl_parser(p.add_subparsers())
    return p.parse_args(["rl", "--from", src, "--to", dst, *extra])


RL = {
    "steps": "2",
    "prompts_per_step": "2",
    "num_rollouts": "2",
    "max_new_tokens": "8",
    "eval_examples": "2",
    "eval_every": "2",
    "checkpoint_every": "1",
    "devices": "one",
    "lr": "1e-3",
    "kl_coef": "0.01",
}


def test_rl_command_creates_refuses_and_resumes(tmp_path, capsys):
    from moe_lab.eval.evaluate import load_run
    from moe_lab.train.metrics import read_metrics

    src = make_run(str(tmp_path / "base"), tiny_model_config())
    dst = str(tmp_path / "rl")
    args = _rl_args(src, dst, "--max-steps", "1")
    assert args.fn(args, RL) == 0  # interrupted after one step
    assert [r["step"] for r in read_metrics(dst)] == [0, 1]
    assert os.path.isdir(os.path.join(dst, "reference", "checkpoints", "0"))
    args = _rl_args(src, dst)
    assert args.fn(args, RL) == 0  # resumes
    rows = read_metrics(dst)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for k in ("reward", "accuracy", "kl", "response_length", "clip_fraction"):
        assert all(math.isfinite(r[k]) for r in rows[1:]), k
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[2]
    cfg, _, state, step = load_run(dst)  # an ordinary run dir: eval loads it
    assert step == 2 and int(state["step"]) == 2 and cfg.train.lr == 1e-3
    with open(os.path.join(dst, "rl.json")) as f:
        assert json.load(f)["parent_step"] == 1
    # an uninterrupted run reproduces the resumed one (rollouts are functions of (seed,
    # step); the compiled steps are reused, so this costs two steps)
    whole = str(tmp_path / "rl_whole")
    args = _rl_args(src, whole)
    assert args.fn(args, RL) == 0
    for a, b in zip(read_metrics(whole), rows, strict=True):
        assert a.keys() == b.keys()
        for k in set(a) & {"reward", "loss", "kl", "grad_norm", "eval_accuracy"}:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    # refusals: a non-empty dir that is not a GRPO run; a changed config
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    args = _rl_args(src, str(other))
    with pytest.raises(ConfigError, match="not empty"):
        args.fn(args, RL)
    args = _rl_args(src, dst)
    with pytest.raises(ConfigError, match="different config"):
        args.fn(args, {**RL, "kl_coef": "0.5"})
    with pytest.raises(ConfigError, match="unknown config key"):
        args.fn(args, {**RL, "bogus": "1"})
    assert "summary" in capsys.readouterr().out
