"""Mixture-of-Recursions: sharing schedules, N_r=1 == plain transformer, expert-choice
gather vs dense reference, token choice vs a per-row Python reference (outputs and
grads), cached decode == no-cache reference for each KV strategy, training, config errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from moe_lab.config.load import load_config
from moe_lab.config.schema import ConfigError
from moe_lab.eval.generate import generate
from moe_lab.layers import recursion_routing as rr
from moe_lab.models.recursive import layer_sequence
from moe_lab.train.state import build_model, split_model

B, T = 2, 16
# tiny models: XLA's backend optimisations cost more compile time than they save here
_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


# MoE feed-forwards inside the shared block (dropless: a token's output does not
# depend on which other tokens the step runs, so gathered / cached paths must match)
MOE_FFN = dict(ffn="moe", moe=dict(num_experts=4, top_k=2, expert_hidden=32, dispatch="dropless"))


def _mor(num_layers=5, init_std=0.02, model_extra=None, **mor):
    return tiny_config(
        model=dict(
            stack="recursive", num_layers=num_layers, init_std=init_std, mor=mor, **(model_extra or {})
        ),
        data=dict(seq_len=T),
    )


def _batch(seed=0, packed=True):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, 200, (B, T)), jnp.int32)
    seg = np.ones((B, T), np.int32)
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    if packed:  # row 0: two documents; row 1: trailing padding
        seg[0, 9:] = 2
        pos[0, 9:] = np.arange(T - 9)
        seg[1, 13:] = 0
    return tokens, jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def _forward_fn(graphdef, rest, train=True):
    def f(params, tokens, pos, seg):
        return nnx.merge(graphdef, params, rest)(tokens, pos, seg, train=train)

    return f


def _assert_close_trees(a, b, atol):
    for (pa, x), (_, y) in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    ):
        np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4, err_msg=jax.tree_util.keystr(pa))


def test_layer_sequences():
    s = lambda *ix: [("shared", i) for i in ix]
    assert layer_sequence(6, 3, "cycle") == s(0, 1, 0, 1, 0, 1)
    assert layer_sequence(6, 3, "sequence") == s(0, 0, 0, 1, 1, 1)
    assert layer_sequence(8, 3, "middle_cycle") == [("first", 0), *s(0, 1, 0, 1, 0, 1), ("last", 0)]
    assert layer_sequence(8, 3, "middle_sequence") == [("first", 0), *s(0, 0, 0, 1, 1, 1), ("last", 0)]
    assert layer_sequence(4, 1, "cycle") == s(0, 1, 2, 3)


@pytest.mark.parametrize("num_layers,n_r,sharing", [(2, 1, "cycle"), (6, 2, "middle_cycle")])
def test_fixed_depth_equals_plain_with_mapped_params(num_layers, n_r, sharing):
    """routing none: the recursive model IS the plain model whose layer l holds the pool
    layer of the schedule; N_r=1 cycle is the plain transformer with the same params."""
    cfg = _mor(num_layers, routing="none", num_recursions=n_r, sharing=sharing)
    gd, params, rest = split_model(build_model(cfg))
    seq = layer_sequence(num_layers, n_r, sharing)
    plain_cfg = tiny_config(model=dict(num_layers=len(seq)), data=dict(seq_len=T))
    pgd, pparams, prest = split_model(build_model(plain_cfg))
    rec = params["recursive"]
    layers = [jax.tree.map(lambda a, i=i: a[i], rec[name]["layers"]) for name, i in seq]
    pparams = {
        **{k: v for k, v in params.items() if k != "recursive"},
        "blocks": {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)},
    }
    batch = _batch()
    lp, _ = _jit(_forward_fn(pgd, prest, train=False))(pparams, *batch)
    lr, aux = _jit(_forward_fn(gd, rest, train=False))(params, *batch)
    np.testing.assert_allclose(lr, lp, atol=1e-5, rtol=1e-5)
    assert float(aux["mor"]["mean_depth"]) == n_r


def test_ec_topk_hierarchical_causal():
    z = jax.random.normal(jax.random.key(0), (B, T))
    cand = jnp.ones((B, T), bool)
    valid = jnp.ones((B, T), bool)
    for k in (11, 6, 2):
        idx, sel = rr.ec_topk(z, cand, valid, k)
        assert idx.shape == (B, k) and np.all(np.diff(np.asarray(idx), axis=1) > 0)  # causal order
        assert np.all(np.asarray(sel).sum(1) == k) and np.all(np.asarray(sel) <= np.asarray(cand))
        cand = sel


def _reference_forward(model, tokens, pos, seg, kept_RBT, tc_depth=None):
    """Slow reference: per row and step, gather the kept tokens (concrete indices) and
    run the plain Block.__call__ on them (causal order = index order, original positions)."""
    rs, mor = model.recursive, model.cfg.mor
    x = model.embed(tokens)
    if rs.schedule.first:
        x, _ = rs.first(x, pos, seg, train=False)
    x1 = x  # H^1, the recursion's input: token choice's exit adds to it
    graphdef, state = nnx.split(rs.shared.layers)
    kept = np.asarray(kept_RBT)
    if tc_depth is not None:
        probs = jax.nn.softmax(rs.router(x), axis=-1)
        gate_tc = (
            mor.token_choice_alpha
            * jnp.take_along_axis(probs, jnp.asarray(tc_depth - 1)[..., None], axis=-1)[..., 0]
        )
    for r in range(mor.num_recursions):
        g = gate_tc if tc_depth is not None else rr.ec_gate(rs.router(x, r), "sigmoid", mor.alpha)
        for b in range(B):
            act = np.nonzero(kept[r, b])[0]
            h = x[b, act][None]
            y = h
            for i in rs.schedule.steps[r]:
                blk = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                y, _ = blk(y, pos[b, act][None], seg[b, act][None], train=False)
            gb = g[b, act][None, :, None]
            # token choice: H^1 + g f^d(H^1) at a token's last step, f before it
            base = x1[b, act][None] if tc_depth is not None else h
            new = base + gb * (y - base) if mor.update == "interpolate" else base + gb * y
            if tc_depth is not None:
                last = (np.asarray(tc_depth)[b, act] == r + 1)[None, :, None]
                new = jnp.where(last, new, y)
            x = x.at[b, act].set(new[0])
    if rs.schedule.last:
        x, _ = rs.last(x, pos, seg, train=False)
    return model.logits(x)


def _affine_block(self, r, x_BTD, *args, **kwargs):
    """The shared step replaced by f(h) = 2h + 1 (what 2507.10524's equations are
    checked with below): a closed form f^d(h) = 2^d h + 2^d - 1, no attention."""
    return 2.0 * x_BTD + 1.0, {}, None


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_recursion_updates_follow_the_paper_equations(routing, monkeypatch):
    """With f(h) = 2h + 1, a reference written from 2507.10524 sec. 2.2.1 and its
    released code, not from moe_lab's, in numpy:
      token choice: a token of depth d (argmax of the softmax router on H^1) ends at
        H^1 + g f^d(H^1), g = alpha p_d (interpolate: H^1 + g (f^d(H^1) - H^1));
      expert choice: step r keeps the top floor(cap_r T) of step r-1's tokens by
        z_r = w_r . h and updates h + g f(h), g = alpha sigmoid(z_r) (interpolate:
        h + g (f(h) - h)); the aux BCE is the per-step mean over the candidates
        summed over all N_r steps, the capacity-1 step (targets 1) included."""
    from moe_lab.models.recursive import RecursiveStack

    monkeypatch.setattr(RecursiveStack, "_layers", _affine_block)
    tokens, pos, seg = _batch(packed=False)
    for update in ("add", "interpolate"):
        cfg = _mor(
            num_layers=3, init_std=0.5, sharing="cycle", routing=routing, update=update, balance_weight=0.0
        )
        model = build_model(cfg)
        rs, mor = model.recursive, cfg.model.mor
        h1 = model.embed(tokens)
        out, aux = rs(h1, pos, seg, train=True)
        h1 = np.asarray(h1, np.float64)
        gated = (
            (lambda base, f, g: base + g * (f - base))
            if update == "interpolate"
            else (lambda base, f, g: base + g * f)
        )
        if routing == "token_choice":
            z = h1 @ np.asarray(rs.router.w_DR[...], np.float64)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            d = p.argmax(-1) + 1
            assert len(np.unique(d)) > 1  # several depths in the batch
            np.testing.assert_array_equal(np.asarray(aux["mor"]["kept_RBT"]).sum(0), d)
            f_d = 2.0 ** d[..., None] * h1 + 2.0 ** d[..., None] - 1
            g = mor.token_choice_alpha * np.take_along_axis(p, d[..., None] - 1, -1)
            want = gated(h1, f_d, g)
        else:
            h, cand, bce = h1, np.ones((B, T), bool), 0.0
            for r, cap in enumerate((1.0, 2 / 3, 1 / 3)):
                z = h @ np.asarray(rs.router.w_RD[r], np.float64)
                k = int(np.floor(cap * T + 1e-9))
                kept = np.zeros((B, T), bool)
                for b in range(B):
                    idx = np.nonzero(cand[b])[0]
                    kept[b, idx[np.argsort(-z[b, idx], kind="stable")[:k]]] = True
                bce += np.mean(np.where(kept, np.logaddexp(0, -z), np.logaddexp(0, z))[cand])
                g = mor.alpha / (1 + np.exp(-z))
                h = np.where(kept[..., None], gated(h, 2 * h + 1, g[..., None]), h)
                cand = kept
            want = h
            np.testing.assert_allclose(float(aux["mor"]["bce_loss"]), bce, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5, err_msg=update)


def _vag(fwd, w):
    """(logits, aux) and d/dparams of sum(logits * w) + aux loss, in one jit."""

    def loss(params, *batch):
        logits, aux = fwd(params, *batch)
        return jnp.sum(logits * w) + aux["mor"]["aux_loss"], (logits, aux)

    return _jit(jax.value_and_grad(loss, has_aux=True))


# (the plain expert-choice case is the MoE-FFN one's path with a dense FFN: the suite's
# time budget keeps the two that differ in what the gather has to get right)
@pytest.mark.parametrize(
    "mor,extra",
    [
        (
            dict(routing="expert_choice", kv_cache="shared", update="interpolate", capacities="1,0.5,0.25"),
            None,
        ),
        (dict(routing="expert_choice"), MOE_FFN),
    ],
)
def test_expert_choice_gather_matches_dense_reference(mor, extra):
    """Exactly k_r tokens per step, hierarchical; gathered fast path == dense masked
    reference (outputs and gradients), for both updates and both KV patterns, and
    with an MoE feed-forward in the shared block."""
    cfg = _mor(model_extra=extra, **mor)
    gd, params, rest = split_model(build_model(cfg))
    # the reference: the same variables in the model built with the dense path
    gd_dense, _, _ = split_model(build_model(_mor(model_extra=extra, expert_choice_impl="dense", **mor)))
    batch = _batch()
    w = jax.random.normal(jax.random.key(1), (B, T, cfg.model.vocab_size))
    (_, (logits, aux)), g_fast = _vag(_forward_fn(gd, rest), w)(params, *batch)
    kept = np.asarray(aux["mor"]["kept_RBT"])
    caps = [float(c) for c in mor.get("capacities", "1,0.6666667,0.3333334").split(",")]
    for r, c in enumerate(caps):
        assert np.all(kept[r].sum(1) == rr.capacity_tokens(c, T))
        if r:
            assert np.all(kept[r] <= kept[r - 1])  # hierarchical filtering
    (_, (logits_d, aux_d)), g_dense = _vag(_forward_fn(gd_dense, rest), w)(params, *batch)
    np.testing.assert_allclose(logits_d, logits, atol=1e-5)
    _assert_close_trees(g_fast, g_dense, 1e-4)
    if extra is not None:  # MoE statistics count the tokens a step runs, in both paths
        for key in ("tokens_per_expert_E", "load_balance_loss", "z_loss", "router_entropy"):
            np.testing.assert_allclose(aux_d["shared"][key], aux["shared"][key], atol=1e-5, err_msg=key)
    if mor.get("kv_cache") != "shared" and extra is None:  # and an independent one: a
        # per-row Python loop (slow; the MoE case is covered by the dense path above)
        ref = _reference_forward(nnx.merge(gd, params, rest), *batch, kept)
        np.testing.assert_allclose(ref, logits, atol=1e-5)


def test_token_choice_matches_per_row_reference():
    """Token choice's dense masked path == per-row Python loop gathering the active
    tokens and running the plain Block (outputs and gradients)."""
    cfg = _mor(routing="token_choice", balance_weight=0.0)  # the reference has no aux loss
    gd, params, rest = split_model(build_model(cfg))
    batch = _batch()
    w = jax.random.normal(jax.random.key(1), (B, T, cfg.model.vocab_size))
    (_, (logits, aux)), g_fast = _vag(_forward_fn(gd, rest), w)(params, *batch)
    kept = np.asarray(aux["mor"]["kept_RBT"])
    assert 0 < kept[2].sum() < kept[0].sum()  # routed: some tokens stop early
    tc_depth = kept.sum(0)

    def ref(p, *b):
        logits = _reference_forward(nnx.merge(gd, p, rest), *b, kept, tc_depth)
        return jnp.sum(logits * w), logits

    (_, logits_ref), g_ref = _jit(jax.value_and_grad(ref, has_aux=True))(params, *batch)
    np.testing.assert_allclose(logits_ref, logits, atol=1e-5)
    _assert_close_trees(g_fast, g_ref, 1e-4)


PROMPTS = [[5, 17, 33, 80, 81, 100], [7, 8], [200, 201, 202, 9]]


@pytest.mark.parametrize(
    "mor,temperature,extra,layers",
    [
        (
            dict(routing="expert_choice", kv_cache="shared", causal_aux="aux_router", decode_buckets=0),
            0.0,
            None,
            5,
        ),
        (dict(routing="token_choice", kv_cache="recursion_wise"), 0.0, None, 5),
        (dict(routing="expert_choice", kv_cache="recursion_wise"), 0.0, MOE_FFN, 5),
        # a pool of 2 layers per step: each layer has its own cache slot in the step's buffer
        # (and sampling at temperature 1: the cached and reference paths draw the same tokens)
        (dict(routing="expert_choice", kv_cache="recursion_wise"), 1.0, None, 8),
        (dict(routing="expert_choice", kv_cache="shared"), 0.0, None, 8),
    ],
)
def test_cached_decode_matches_reference(mor, temperature, extra, layers):
    """Cached decode (threshold routing, depth-wise row buckets) == the no-cache
    reference decode, which runs the full forward with the same threshold routing
    (also with MoE feed-forwards in the shared block, and pools of several layers)."""
    cfg = _mor(num_layers=layers, init_std=0.2, model_extra=extra, **mor)
    gd, params, rest = split_model(build_model(cfg))
    kw = dict(max_new_tokens=5, temperature=temperature, seed=3)
    fast = generate(gd, params, rest, PROMPTS, use_cache=True, **kw)
    slow = generate(gd, params, rest, PROMPTS, use_cache=False, **kw)
    assert fast == slow
    if mor["routing"] == "expert_choice" and mor["kv_cache"] == "recursion_wise":
        # threshold routing really exits tokens early at decode
        def prefill(p, tokens):
            model = nnx.merge(gd, p, rest)
            cache = model.init_cache(4, 8)["recursive"]
            pos = jnp.broadcast_to(jnp.arange(8), (4, 8))
            return model.recursive.decode(
                model.embed(tokens), pos, jnp.ones((4, 8), bool), cache, 0, stats=True
            )[2]

        kept = _jit(prefill)(params, jnp.asarray(np.arange(32).reshape(4, 8) + 3, jnp.int32))
        frac = np.asarray(kept).mean(axis=(1, 2))
        assert frac[0] == 1.0 and 0 < frac[2] <= frac[1] < 1.0


def test_depthwise_batching_decodes_the_reference_tokens():
    """Continuous depth-wise batching (a FIFO of tokens at any depth, 2 per shared-block
    call for 3 sequences; a pool of 2 layers with MoE feed-forwards) == the no-cache
    reference decode; tokens really exit early; other MoR variants are refused."""
    from moe_lab.eval.depthwise import generate_depthwise

    cfg = _mor(num_layers=8, init_std=0.2, model_extra=MOE_FFN, routing="expert_choice")
    gd, params, rest = split_model(build_model(cfg))
    stats = {}
    fast = generate_depthwise(gd, params, rest, PROMPTS, 5, slots=2, stats=stats)
    assert fast == generate(gd, params, rest, PROMPTS, max_new_tokens=5, use_cache=False)
    fed = len(PROMPTS) * 4  # tokens fed back through the recursion
    assert fed <= stats["filled_slots"] < 3 * fed  # each takes 1..3 steps, some fewer than 3
    with pytest.raises(ConfigError, match="needs expert-choice recursion routing"):
        tc = _mor(routing="token_choice")
        generate_depthwise(*split_model(build_model(tc)), PROMPTS, 2)
    from moe_lab.eval.depthwise import depthwise_error

    assert "first capacity at 1" in depthwise_error(_mor(capacities="0.5,0.25,0.1").model)


def test_mor_tiny_trains_and_logs_depth_histogram():
    from moe_lab.parallel import sharding
    from moe_lab.train.state import make_setup, resolve_config
    from moe_lab.train.step import make_train_step

    cfg = load_config(
        "configs/mor_tiny.py",
        {
            "model.d_model": 32,
            "model.mlp_hidden": 64,
            "model.num_heads": 4,
            "data.seq_len": 16,
            "train.batch_size": 4,
            "train.steps": 30,
            "train.warmup_steps": 2,
            "mesh.data": 1,
        },
    )
    cfg = resolve_config(cfg)
    setup = make_setup(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    step = _jit(make_train_step(setup.graphdef, setup.tx, cfg, 1, setup.schedule))
    state = setup.init_state()
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 40, (4, 17)).astype(np.int32)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((4, 16), np.float32),
        "segment_ids": np.ones((4, 16), np.int32),
        "task_ids": np.zeros((4, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)).copy(),
        "answer_mask": np.zeros((4, 16), np.float32),
    }
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    hist = np.asarray(m["mor/depth_hist"])
    assert hist.shape == (4,) and abs(hist.sum() - 1) < 1e-5
    np.testing.assert_allclose(hist[1:], [6 / 16, 5 / 16, 5 / 16], atol=1e-6)  # k_r = 16, 10, 5
    assert {"mor/dead_token_ratio", "mor/sampling_accuracy", "mor/bce_loss"} <= set(m)


@pytest.mark.parametrize("stack", ["plain", "recursive"])
def test_train_step_updates_every_sigmoid_router_bias(stack):
    """Loss-free balancing (DeepSeek-V3) through the train step: every MoE layer's
    selection bias moves by rate * sign(mean load - load).  In a recursive stack the
    biases live under model_state["recursive"] and a pool layer's load is the mean
    over its applications (this update used to be skipped there)."""
    from moe_lab.parallel import sharding
    from moe_lab.train.state import make_setup, resolve_config
    from moe_lab.train.step import make_train_step

    moe = dict(
        num_experts=4, top_k=2, expert_hidden=16, router="sigmoid", dispatch="dropless", bias_update_rate=0.01
    )
    cfg = resolve_config(
        tiny_config(
            model=dict(num_layers=5, stack=stack, ffn="moe", moe=moe, mor=dict(routing="token_choice")),
            train=dict(batch_size=4),
            data=dict(seq_len=16),
        )
    )
    setup = make_setup(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    step = _jit(make_train_step(setup.graphdef, setup.tx, cfg, 1, setup.schedule))
    state = setup.init_state()
    toks = np.random.default_rng(0).integers(3, 40, (4, 17)).astype(np.int32)
    batch = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((4, 16), np.float32),
        "segment_ids": np.ones((4, 16), np.int32),
        "task_ids": np.zeros((4, 16), np.int32),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16)).copy(),
        "answer_mask": np.zeros((4, 16), np.float32),
    }
    new, _ = step(state, batch)
    before = jax.tree_util.tree_leaves_with_path(state["model_state"])
    after = dict(jax.tree_util.tree_leaves_with_path(new["model_state"]))
    biases = [(path, b) for path, b in before if "bias_E" in jax.tree_util.keystr(path)]
    assert len(biases) == (3 if stack == "recursive" else 1)  # first / shared / last stacks
    for path, b in biases:
        moved = np.abs(np.asarray(after[path]) - np.asarray(b))
        assert np.all((moved == 0.0) | np.isclose(moved, 0.01)), jax.tree_util.keystr(path)
        assert np.any(moved > 0), jax.tree_util.keystr(path)


def test_pool_bias_update_weighs_applications_by_their_tokens():
    """A pool layer's load sums its applications' assignments: a step that ran 2
    tokens must not outvote one that ran 1000 (as a mean of fractions would)."""
    from moe_lab.train.step import moe_metrics, update_router_biases

    frac = jnp.asarray([[0.3, 0.3, 0.2, 0.2], [0.0, 0.0, 0.5, 0.5]])
    aux = {"shared": {"tokens_per_expert_E": frac, "num_tokens": jnp.asarray([1000.0, 2.0])}}
    state = {"recursive": {"shared": {"layers": {"ffn": {"bias_E": jnp.zeros((1, 4))}}}}}
    new = update_router_biases(state, aux, 0.1, shared_pool_ids=(0, 0))
    np.testing.assert_allclose(
        new["recursive"]["shared"]["layers"]["ffn"]["bias_E"], [[-0.1, -0.1, 0.1, 0.1]]
    )  # totals 300, 300, 201, 201
    # logged averages weigh rows by their tokens; a row that ran none does not count
    scalars = {
        k: jnp.asarray([1.0, 5.0, 9.0])
        for k in ("load_balance_loss", "z_loss", "drop_fraction", "router_entropy", "max_violation")
    }
    m = moe_metrics(
        {
            "shared": {
                **scalars,
                "num_tokens": jnp.asarray([3.0, 1.0, 0.0]),
                "tokens_per_expert_E": jnp.eye(3),
            }
        },
        per_layer=False,
    )
    assert float(m["moe/z_loss"]) == 2.0 and float(m["moe/max_violation"]) == 5.0
    np.testing.assert_allclose(m["moe/tokens_per_expert_E"], [0.75, 0.25, 0.0])


def test_token_choice_loss_free_bias_and_warmup_state():
    from moe_lab.train.step import update_mor_state

    cfg = _mor(routing="token_choice", balance="loss_free", warmup_steps=2)
    gd, params, rest = split_model(build_model(cfg))
    _, aux = _jit(_forward_fn(gd, rest))(params, *_batch())
    assert float(aux["mor"]["mean_depth"]) == 3.0  # warm-up: every token at full depth
    new = update_mor_state(rest, aux, 1e-3)
    assert int(new["recursive"]["steps_seen"]) == 1
    # forced full depth says nothing about balance: the bias must not move in warm-up
    # (it used to drift towards the shallow depths by 1e-3 per warm-up step)
    np.testing.assert_array_equal(np.asarray(new["recursive"]["bias_R"]), 0.0)
    done = update_mor_state(update_mor_state(new, aux, 1e-3), aux, 1e-3)
    _, aux_after = _jit(_forward_fn(gd, done))(params, *_batch())
    assert float(aux_after["mor"]["warming_up"]) == 0.0
    after = update_mor_state(done, aux_after, 1e-3)
    load = np.asarray(aux_after["mor"]["tokens_per_depth_R"])
    np.testing.assert_allclose(
        np.asarray(after["recursive"]["bias_R"]), 1e-3 * np.sign(load.mean() - load), atol=1e-7
    )


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"model.num_layers": 6}, "does not divide the 4 shared layers"),
        ({"model.mor.sharing": "cycle", "model.num_layers": 4}, "does not divide the 4 shared"),
        ({"model.mor.capacities": "1,0.5,0.7"}, "non-increasing"),
        ({"model.mor.capacities": "1,0.5,0"}, r"in \(0, 1\]"),
        ({"model.mor.capacities": "1.2,0.5,0.2"}, r"in \(0, 1\]"),
        ({"model.mor.capacities": "1,0.5"}, "need num_recursions=3"),
        ({"model.mor.capacities": "0.9,0.5,0.2", "model.mor.kv_cache": "shared"}, "kv_cache='shared'"),
        ({"model.mor.routing": "token_choice", "model.mor.router_func": "tanh"}, "softmax or sigmoid"),
        ({"model.mor.sharing": "diagonal"}, "is not one of"),
        ({"model.ffn": "moe", "model.moe.dispatch": "capacity"}, "needs token-choice dropless MoE"),
        ({"model.ffn": "moe", "model.moe.router": "expert_choice"}, "needs token-choice dropless"),
        ({"model.mor.update": "paper"}, "was renamed: it named h \\+ g \\(f\\(h\\) - h\\)"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("configs/mor_tiny.py", overrides)
    assert "\n" not in str(e.value)


def test_stored_runs_keep_the_update_they_trained_with(tmp_path):
    """A run dir written when 'paper' named h + g (f(h) - h) loads as 'interpolate'."""
    import json

    from moe_lab.cli.args import config_from_args
    from moe_lab.config.load import config_from_json

    raw = load_config("configs/mor_tiny.py").to_dict()
    for old, new in (("paper", "interpolate"), ("released", "add")):
        raw["model"]["mor"]["update"] = old
        (tmp_path / "config.json").write_text(json.dumps(raw))
        assert config_from_json(str(tmp_path / "config.json")).model.mor.update == new
        args = type("Args", (), {"config": None, "workdir": str(tmp_path)})()  # --workdir
        assert config_from_args(args, {}).model.mor.update == new


def test_flops_count_routed_recursions():
    from moe_lab.accounting import flops

    cfg = _mor(num_layers=5)
    fixed = dataclasses.replace(cfg.model, mor=dataclasses.replace(cfg.model.mor, routing="none"))
    plain = dataclasses.replace(cfg.model, stack="plain")
    c_mor, c_plain = flops.param_counts(cfg.model), flops.param_counts(plain)
    layer = (c_plain["total_non_embedding"] - cfg.model.d_model) // 5
    assert c_plain["total_non_embedding"] - c_mor["total_non_embedding"] == 2 * layer - 3 * 32
    f_fixed = flops.forward_flops_per_token(fixed, T)
    f_mor = flops.forward_flops_per_token(cfg.model, T)
    assert f_fixed == pytest.approx(flops.forward_flops_per_token(plain, T))
    assert f_mor < f_fixed
    # MLP routers are the released code's: hidden width 2d, no biases, counted exactly
    for routing in ("expert_choice", "token_choice"):
        cfg = _mor(num_layers=5, routing=routing, router_type="mlp")
        _, params, _ = split_model(build_model(cfg))
        w1 = params["recursive"]["router"]["w1_RDH" if routing == "expert_choice" else "w1_DH"]
        assert w1.shape[-1] == 2 * cfg.model.d_model
        assert sum(x.size for x in jax.tree.leaves(params)) == flops.param_counts(cfg.model)["total"]


def test_iso_flop_steps_reproduce_the_released_configs():
    """The paper configs' step counts at vanilla's FLOPs, in 2507.10524's convention
    (no LM head, K/V at d x d), against the released configs' hard-coded steps."""
    released = {"vanilla": 9438, "2": 12619, "3": 14161, "4": 14216, "3,kv_shared": 14672, "3,fixed": 9438}
    for arg, steps in released.items():
        assert abs(load_config(f"configs/paper/mor_360m.py:{arg}").train.steps - steps) <= 2, arg


def test_capacity_warmup_runs_full_depth_first_then_routed(tmp_path):
    """Expert-choice capacity warm-up: steps 1-2 at full depth (all capacities 1, counted
    with full-depth FLOPs), then the configured capacities, in one `train` run."""
    import json

    from moe_lab.train.loop import train

    cfg = tiny_config(
        model=dict(stack="recursive", num_layers=5, mor=dict(capacity_warmup_steps=2)),
        data=dict(seq_len=16),
        train=dict(steps=4, batch_size=8, log_every=1, eval_every=100, checkpoint_every=100),
    )
    train(cfg, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = {r["step"]: r for r in rows if "mor/mean_depth" in r}
    assert [rows[s]["mor/mean_depth"] for s in (1, 2)] == [3.0, 3.0]
    assert all(rows[s]["mor/mean_depth"] < 2.5 for s in (3, 4))  # capacities 1, 2/3, 1/3
    f = [rows[s]["flops_spent"] for s in (1, 2, 3, 4)]
    assert f[1] - f[0] == pytest.approx(f[0]) and f[3] - f[2] < 0.9 * (f[1] - f[0])


def test_capacity_warmup_needs_expert_choice():
    with pytest.raises(ConfigError, match="capacity_warmup_steps are only used by"):
        load_config(
            "configs/mor_tiny.py", {"model.mor.routing": "token_choice", "model.mor.capacity_warmup_steps": 5}
        )
