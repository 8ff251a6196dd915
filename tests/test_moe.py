"""MoE layer: every router x every dispatch against the dense reference (outputs and
gradients), capacity drops, aux metrics against numpy, expert choice, loss-free
bias balancing, expert parallelism on 8 fake devices.

Legend: N tokens, D d_model, F expert hidden, E experts, K top-k, C capacity.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_lab.config.schema import ModelConfig, MoEConfig
from moe_lab.layers import routing
from moe_lab.layers.moe import MoE

ROUTERS = ["topk_softmax", "softmax_topk", "sigmoid", "expert_choice"]
# (dispatch, impl): impl "loop" is the CPU kernel; the accelerator kernels are the
# [E, C, D] buffers (capacity), ragged_dot, blocks and tokamax.ragged_dot (dropless; tokamax
# runs its XLA ragged_dot on CPU),
# slow but correct on CPU.  "auto" is "dropless" with impl "auto" (= "loop" on CPU).
# The accelerator kernels do not look at the router (they see expert_NK / gate_NK
# only), so they are run for two routers to keep the file fast.
FAST = [("capacity", "loop"), ("dropless", "loop")]
ACCEL = [("capacity", "accelerator"), ("dropless", "ragged"), ("dropless", "blocks"), ("dropless", "tokamax")]
ACCEL_ROUTERS = ("softmax_topk", "expert_choice")


def make_cfg(
    router="softmax_topk",
    dispatch="reference",
    *,
    e=4,
    k=2,
    d=16,
    f=8,
    shared=0,
    cf=100.0,
    renormalize=True,
    jitter=0.0,
    std=0.3,
):
    return ModelConfig(
        d_model=d,
        ffn="moe",
        init_std=std,
        moe=MoEConfig(
            num_experts=e,
            top_k=k,
            expert_hidden=f,
            num_shared_experts=shared,
            router=router,
            dispatch=dispatch,
            capacity_factor=cf,
            renormalize=renormalize,
            router_jitter=jitter,
        ),
    )


def make_moe(cfg, impl="auto", bias_seed=3):
    m = MoE(cfg, rngs=nnx.Rngs(0))
    m.impl = impl
    if cfg.moe.router == "sigmoid":  # non-zero selection bias
        m.bias_E[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(bias_seed), m.bias_E.shape)
    return m


def value_and_grads(m, x_BTD, ct_BTD):
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, x_BTD):
        y, aux = nnx.merge(graphdef, params, rest)(x_BTD, train=False)
        return jnp.sum(y * ct_BTD) + aux["aux_loss"], (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x_BTD)
    return y, aux, grads


def assert_trees_close(a, b, rtol=2e-5, atol=2e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def inputs(cfg, b=2, t=6, seed=1):
    kx, kc = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(kx, (b, t, cfg.d_model)), jax.random.normal(kc, (b, t, cfg.d_model)))


@pytest.mark.parametrize("router", ROUTERS)
def test_every_dispatch_matches_reference(router):
    shared = 0 if router == "expert_choice" else 1
    x, ct = inputs(make_cfg())
    ref = value_and_grads(make_moe(make_cfg(router, "reference", shared=shared)), x, ct)
    assert float(jnp.max(jnp.abs(ref[0]))) > 1e-2  # not trivially small
    for dispatch, impl in FAST + (ACCEL if router in ACCEL_ROUTERS else []):
        got = value_and_grads(make_moe(make_cfg(router, dispatch, shared=shared), impl), x, ct)
        assert_trees_close(got[0], ref[0])  # outputs
        assert_trees_close(got[2], ref[2])  # grads w.r.t. params and x
        assert_trees_close(got[1], ref[1])  # aux metrics
        assert float(got[1]["drop_fraction"]) == 0.0


@pytest.mark.parametrize(
    "tiles, empty",
    [
        ((32, 8), False),
        ((128, 32), False),
        ((70, 70), False),
        ((24, 16), False),
        ((40, 8), False),
        ((32, 8), True),
    ],
)
def test_loop_kernel_multi_tile_vs_reference(tiles, empty, capacity=70):
    """Groups spanning several full tiles plus a window, or one window larger than
    the group, of every size (the tiny configs above only run the latter), window
    sizes that do not divide W (24, 16), (empty) an expert between two others that
    gets no token; with capacity 70 of ~100 rows per expert, some rows are dropped
    (dropped rows sit between the groups: the hardest layout)."""
    from moe_lab.layers.moe_kernels.cpu_loop import _window_sizes, choose_tiles
    from moe_lab.layers.moe_kernels.dispatch import token_choice_moe
    from moe_lab.layers.moe_kernels.reference import dense_gates, reference_moe

    n, d, f, e, k = 150, 8, 16, 3 + empty, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x_ND = jax.random.normal(keys[0], (n, d))
    expert_NK = jnp.argsort(jax.random.uniform(keys[1], (n, 3)), axis=1)[:, :k].astype(jnp.int32)
    if empty:  # experts 0, 2, 3 hold the rows; expert 1 none
        expert_NK = jnp.where(expert_NK >= 1, expert_NK + 1, expert_NK)
    gate_NK = jax.random.uniform(keys[2], (n, k))
    weights = tuple(
        jax.random.normal(kk, s) * 0.5 for kk, s in zip(keys[3:], [(e, d, f), (e, d, f), (e, f, d)])
    )
    assert choose_tiles(100) == (152, 16)  # one window up to 1.5x the expected rows
    assert choose_tiles(100, 125) == (128, 8)  # ... or covering the capacity
    assert choose_tiles(1000) == (256, 24)  # full tiles of ~half, then a window
    assert choose_tiles(160, 200, row_macs=256 * 512) == (200, 16)  # <= 16 window sizes
    assert choose_tiles(100, row_macs=32 * 64) == (152, 152)  # tiny: one window size
    assert _window_sizes((24, 16)) == [16, 24]

    def fast(x_ND, gate_NK, weights):
        y, layout = token_choice_moe(
            x_ND, expert_NK, gate_NK, weights, capacity=capacity, impl="loop", tiles=tiles
        )
        return jnp.sum(y**2), layout.keep_NK

    def ref(x_ND, gate_NK, weights):
        _, keep_NK = fast(x_ND, gate_NK, weights)
        gates_NE = dense_gates(expert_NK, jnp.where(keep_NK, gate_NK, 0), e)
        return jnp.sum(reference_moe(x_ND, gates_NE, *weights) ** 2), keep_NK

    (v1, keep), g1 = jax.jit(jax.value_and_grad(fast, argnums=(0, 1, 2), has_aux=True))(
        x_ND, gate_NK, weights
    )
    (v2, _), g2 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True))(x_ND, gate_NK, weights)
    assert bool(jnp.all(keep)) == (capacity is None)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    assert_trees_close(g1, g2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skew", ["balanced", "one_expert_most", "an_expert_empty"])
def test_bulk_and_loop_kernel_vs_reference(skew):
    """The CPU dropless path at enough rows per expert (layout.bulk_layout): the first
    C0 rows of every expert at static offsets in one batched einsum, the rest through
    the loop; (one_expert_most) an expert whose overflow spans several full loop tiles
    while others leave bulk slots empty; (an_expert_empty) an expert with no row."""
    from moe_lab.layers.moe_kernels.dispatch import token_choice_moe
    from moe_lab.layers.moe_kernels.layout import bulk_rows
    from moe_lab.layers.moe_kernels.reference import dense_gates, reference_moe

    n, d, f, e, k = 1024, 8, 16, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x_ND = jax.random.normal(keys[0], (n, d))
    logits_NE = (
        jax.random.normal(keys[1], (n, e))
        + {
            "balanced": 0.0,
            "one_expert_most": jnp.array([3.0, 0, 0, 0]),
            "an_expert_empty": jnp.array([0, -1e9, 0, 0]),
        }[skew]
    )
    expert_NK = jax.lax.top_k(logits_NE, k)[1].astype(jnp.int32)
    gate_NK = jax.random.uniform(keys[2], (n, k))
    weights = tuple(
        jax.random.normal(kk, sh) * 0.5 for kk, sh in zip(keys[3:], [(e, d, f), (e, d, f), (e, f, d)])
    )
    c0 = bulk_rows(n * k, e)
    assert c0 == 456  # the bulk path runs (0.9 x 512 expected rows, a multiple of 8)

    def fast(x_ND, gate_NK, weights):
        y, layout = token_choice_moe(x_ND, expert_NK, gate_NK, weights, capacity=None, impl="loop")
        assert layout.valid_S.shape[0] >= e * c0 + n * k  # bulk slots, then the worst-case overflow
        return jnp.sum(y**2), y

    def ref(x_ND, gate_NK, weights):
        y = reference_moe(x_ND, dense_gates(expert_NK, gate_NK, e), *weights)
        return jnp.sum(y**2), y

    (v1, y1), g1 = jax.jit(jax.value_and_grad(fast, argnums=(0, 1, 2), has_aux=True))(x_ND, gate_NK, weights)
    (v2, y2), g2 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True))(x_ND, gate_NK, weights)
    assert_trees_close(y1, y2, rtol=1e-4, atol=1e-4)  # outputs, every token
    load_E = np.bincount(np.asarray(expert_NK).ravel(), minlength=e)
    if skew == "one_expert_most":
        # the loop runs the overflow in 88-row tiles here (choose_tiles of 56 expected rows):
        # expert 0's overflow spans several full tiles; the others leave bulk slots empty
        assert load_E.max() - c0 > 4 * 88 and load_E.min() < c0
    if skew == "an_expert_empty":
        assert load_E[1] == 0
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    assert_trees_close(g1, g2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skew, n", [(False, 150), (True, 150), (False, 2)])
def test_block_kernel_vs_reference(skew, n):
    """The GPU dropless kernel: groups of several blocks, partial last blocks,
    (skew) one expert taking every token's first choice, and (n=2) fewer
    assignments than experts, as in decoding: the static block bound must hold."""
    from moe_lab.layers.moe_kernels.dispatch import token_choice_moe
    from moe_lab.layers.moe_kernels.layout import block_layout, choose_block
    from moe_lab.layers.moe_kernels.reference import dense_gates, reference_moe

    d, f, e, k = 8, 16, 5, 2
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    x_ND = jax.random.normal(keys[0], (n, d))
    expert_NK = jnp.argsort(jax.random.uniform(keys[1], (n, e)), axis=1)[:, :k].astype(jnp.int32)
    if skew:
        expert_NK = jnp.stack([jnp.zeros((n,), jnp.int32), 1 + expert_NK[:, 1] % (e - 1)], 1)
    gate_NK = jax.random.uniform(keys[2], (n, k))
    weights = tuple(
        jax.random.normal(kk, s) * 0.5 for kk, s in zip(keys[3:], [(e, d, f), (e, d, f), (e, f, d)])
    )
    block = choose_block(n * k, e)
    assert block == 16
    layout, block_expert_J = block_layout(expert_NK, e, block)
    load = np.bincount(np.asarray(expert_NK).ravel(), minlength=e)
    assert int(np.sum(-(-load // block))) <= block_expert_J.shape[0]
    if n == 2:
        assert block_expert_J.shape[0] == min(e, n * k)  # one block per non-empty expert
    rows = np.asarray(layout.row_NK)
    assert len(set(rows.ravel().tolist())) == n * k  # every assignment its own row
    # each assignment's row sits in a block of its expert
    np.testing.assert_array_equal(np.asarray(block_expert_J)[rows // block], np.asarray(expert_NK))
    assert int(np.sum(np.asarray(layout.valid_S))) == n * k

    def fast(x_ND, gate_NK, weights):
        y, _ = token_choice_moe(x_ND, expert_NK, gate_NK, weights, capacity=None, impl="blocks")
        return jnp.sum(y**2)

    def ref(x_ND, gate_NK, weights):
        return jnp.sum(reference_moe(x_ND, dense_gates(expert_NK, gate_NK, e), *weights) ** 2)

    v1, g1 = jax.jit(jax.value_and_grad(fast, argnums=(0, 1, 2)))(x_ND, gate_NK, weights)
    v2, g2 = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(x_ND, gate_NK, weights)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    assert_trees_close(g1, g2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dropless only"):
        token_choice_moe(x_ND, expert_NK, gate_NK, weights, capacity=2, impl="blocks")


def test_kernel_config_reaches_the_layer():
    """model.moe.kernel picks the layer's kernels (here the GPU dropless one, on CPU)."""
    cfg = make_cfg("softmax_topk", "dropless")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, kernel="blocks"))
    m = MoE(cfg, rngs=nnx.Rngs(0))
    assert m.impl == "blocks"
    x, ct = inputs(cfg)
    ref = value_and_grads(make_moe(make_cfg("softmax_topk", "reference")), x, ct)
    got = value_and_grads(m, x, ct)
    assert_trees_close(got[0], ref[0])
    assert_trees_close(got[2], ref[2])


# ------------------------------------------------------------------ numpy side


def np_swiglu(x_ND, g_DF, u_DF, d_FD):
    a = x_ND @ g_DF
    return (a / (1 + np.exp(-a)) * (x_ND @ u_DF)) @ d_FD


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_route(router, logits_NE, k, renormalize, bias_E=None):
    """Slow numpy token-choice routing: (expert_NK, gate_NK, probs_NE)."""
    n, _e = logits_NE.shape
    expert_NK, gate_NK = np.zeros((n, k), int), np.zeros((n, k))
    if router == "sigmoid":
        scores = 1 / (1 + np.exp(-logits_NE))
        probs = scores / scores.sum(-1, keepdims=True)
    else:
        probs = np_softmax(logits_NE)
    for i in range(n):
        if router == "topk_softmax":
            idx = np.argsort(-logits_NE[i], kind="stable")[:k]
            gate = np_softmax(logits_NE[i, idx])
        elif router == "softmax_topk":
            idx = np.argsort(-probs[i], kind="stable")[:k]
            gate = probs[i, idx] / (probs[i, idx].sum() if renormalize else 1.0)
        else:
            idx = np.argsort(-(scores[i] + bias_E), kind="stable")[:k]
            gate = scores[i, idx] / (scores[i, idx].sum() if renormalize else 1.0)
        expert_NK[i], gate_NK[i] = idx, gate
    return expert_NK, gate_NK, probs


def np_aux(logits_NE, probs_NE, expert_NK, balance=True):
    e = logits_NE.shape[1]
    load = np.bincount(expert_NK.reshape(-1), minlength=e).astype(float)
    f = load / load.sum()
    lb = e * np.sum(f * probs_NE.mean(0)) if balance else 0.0
    m = logits_NE.max(-1)
    lse = m + np.log(np.exp(logits_NE - m[:, None]).sum(-1))
    ent = -np.mean(np.sum(probs_NE * np.log(probs_NE), -1))
    return {
        "load_balance_loss": lb,
        "z_loss": np.mean(lse**2),
        "tokens_per_expert_E": f,
        "router_entropy": ent,
        "max_violation": load.max() / load.mean() - 1,
    }


@nnx.jit
def apply(m, x_BTD):
    return m(x_BTD, train=False)


def np_weights(m):
    return [np.asarray(v[...], np.float64) for v in (m.gate_EDF, m.up_EDF, m.down_EFD)]


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gates_and_aux_match_numpy(router, renormalize):
    cfg = make_cfg(router, "dropless", e=5, k=2, renormalize=renormalize, std=1.0)
    m = make_moe(cfg)
    x, _ = inputs(cfg, b=1, t=7)
    x_ND = x.reshape(-1, cfg.d_model)
    logits = np.asarray(m.router_logits(x_ND, train=False, rng=None), np.float64)
    bias = np.asarray(m.bias_E[...]) if router == "sigmoid" else None
    expert, gate, probs = np_route(router, logits, 2, renormalize, bias)
    tc = routing.TOKEN_CHOICE_ROUTERS[router](
        jnp.asarray(logits, jnp.float32),
        None if bias is None else jnp.asarray(bias),
        top_k=2,
        renormalize=renormalize,
    )
    np.testing.assert_array_equal(np.asarray(tc.expert_NK), expert)
    np.testing.assert_allclose(np.asarray(tc.gate_NK), gate, rtol=1e-5)
    y, aux = apply(m, x)
    want = np_aux(logits, probs, expert)
    for key, v in want.items():
        np.testing.assert_allclose(np.asarray(aux[key]), v, rtol=1e-4, atol=1e-6, err_msg=key)
    mc = cfg.moe
    np.testing.assert_allclose(
        float(aux["aux_loss"]),
        mc.aux_loss_weight * want["load_balance_loss"] + mc.z_loss_weight * want["z_loss"],
        rtol=1e-5,
    )
    g, u, d = np_weights(m)
    xn = np.asarray(x_ND, np.float64)
    y_np = np.zeros_like(xn)
    for n in range(xn.shape[0]):
        for j in range(2):
            y_np[n] += (
                gate[n, j] * np_swiglu(xn[n : n + 1], g[expert[n, j]], u[expert[n, j]], d[expert[n, j]])[0]
            )
    np.testing.assert_allclose(np.asarray(y).reshape(xn.shape), y_np, rtol=1e-4, atol=1e-5)


def test_topk_softmax_vs_softmax_topk():
    logits = jax.random.normal(jax.random.PRNGKey(0), (16, 6)) * 2
    a = routing.TOKEN_CHOICE_ROUTERS["topk_softmax"](logits, None, top_k=2, renormalize=False)
    b = routing.TOKEN_CHOICE_ROUTERS["softmax_topk"](logits, None, top_k=2, renormalize=False)
    c = routing.TOKEN_CHOICE_ROUTERS["softmax_topk"](logits, None, top_k=2, renormalize=True)
    np.testing.assert_array_equal(a.expert_NK, b.expert_NK)  # same selection (monotone)
    np.testing.assert_allclose(jnp.sum(a.gate_NK, -1), 1.0, rtol=1e-6)
    assert float(jnp.max(jnp.sum(b.gate_NK, -1))) < 1.0 - 1e-3  # not renormalised
    np.testing.assert_allclose(c.gate_NK, a.gate_NK, rtol=1e-5)  # renorm == softmax over top-k


@pytest.mark.parametrize("impl", ["loop", "accelerator"])
def test_capacity_drops_match_hand_count(impl):
    cfg = make_cfg("softmax_topk", "capacity", e=4, k=2, cf=0.5, std=1.0)
    m = make_moe(cfg, impl)
    x, _ = inputs(cfg, b=2, t=8)
    x_ND = np.asarray(x.reshape(-1, cfg.d_model), np.float64)
    n = x_ND.shape[0]
    cap = routing.capacity(n, 2, 4, 0.5)
    assert cap == 4
    logits = np.asarray(m.router_logits(x.reshape(n, -1), train=False, rng=None), np.float64)
    expert, gate, _ = np_route("softmax_topk", logits, 2, True)
    # per expert: every token's first choice before any second choice (GShard),
    # first come first served within a rank
    seen, kept = np.zeros(4, int), np.zeros((n, 2), bool)
    for j in range(2):
        for i in range(n):
            kept[i, j] = seen[expert[i, j]] < cap
            seen[expert[i, j]] += 1
    assert (~kept).sum() > 0 and (~kept[:, 1]).sum() > (~kept[:, 0]).sum()
    y, aux = apply(m, x)
    np.testing.assert_allclose(float(aux["drop_fraction"]), (~kept).mean(), rtol=1e-6)
    g, u, d = np_weights(m)
    y_np = np.zeros_like(x_ND)
    for i in range(n):
        for j in range(2):
            if kept[i, j]:
                e = expert[i, j]
                y_np[i] += gate[i, j] * np_swiglu(x_ND[i : i + 1], g[e], u[e], d[e])[0]
    np.testing.assert_allclose(np.asarray(y).reshape(n, -1), y_np, rtol=1e-4, atol=1e-5)
    # tokens_per_expert is measured before drops
    np.testing.assert_allclose(aux["tokens_per_expert_E"], seen / seen.sum(), rtol=1e-6)


def test_expert_choice_takes_exactly_c_tokens():
    cfg = make_cfg("expert_choice", "dropless", e=4, k=2, cf=1.0, std=1.0)
    m = make_moe(cfg, "loop")
    x, _ = inputs(cfg, b=2, t=5)
    n = 10
    cap = routing.capacity(n, 2, 4, 1.0)  # ceil(1.0 * 10 * 2 / 4) = 5
    assert cap == 5
    logits = m.router_logits(x.reshape(n, -1), train=False, rng=None)
    ec = routing.ExpertChoiceRouter()(logits, capacity=cap)
    assert ec.token_EC.shape == (4, cap)
    probs = np_softmax(np.asarray(logits, np.float64))
    g, u, d = np_weights(m)
    x_ND = np.asarray(x.reshape(n, -1), np.float64)
    y_np = np.zeros_like(x_ND)
    for e in range(4):
        top = np.argsort(-probs[:, e], kind="stable")[:cap]
        assert len(set(np.asarray(ec.token_EC[e]).tolist())) == cap
        np.testing.assert_array_equal(np.sort(np.asarray(ec.token_EC[e])), np.sort(top))
        np.testing.assert_allclose(np.sort(np.asarray(ec.gate_EC[e])), np.sort(probs[top, e]), rtol=1e-5)
        y_np[top] += probs[top, e][:, None] * np_swiglu(x_ND[top], g[e], u[e], d[e])
    y, aux = apply(m, x)
    np.testing.assert_allclose(np.asarray(y).reshape(n, -1), y_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["tokens_per_expert_E"], 0.25)
    assert float(aux["load_balance_loss"]) == 0.0 and float(aux["max_violation"]) == 0.0
    picked = np.zeros(n, bool)
    picked[np.asarray(ec.token_EC).reshape(-1)] = True
    np.testing.assert_allclose(float(aux["drop_fraction"]), 1 - picked.mean(), rtol=1e-6)


def test_loss_free_bias_update_hand_example():
    bias = jnp.array([0.0, 0.1, -0.1, 0.0])
    load = jnp.array([0.4, 0.1, 0.25, 0.25])  # mean 0.25: expert 0 hot, 1 cold, 2/3 balanced
    new = routing.loss_free_bias_update(bias, load, 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.11, -0.1, 0.0], atol=1e-7)
    # repeated updates rebalance the sigmoid router's selection (k=1, all on expert 0)
    logits_NE = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    router = routing.TOKEN_CHOICE_ROUTERS["sigmoid"]

    def max_violation(bias_E):
        expert_NK = router(logits_NE, bias_E, top_k=1, renormalize=True).expert_NK
        load_E = jnp.bincount(expert_NK.reshape(-1), length=4)
        return load_E, jnp.max(load_E) / jnp.mean(load_E) - 1

    def step(_, bias_E):
        return routing.loss_free_bias_update(bias_E, max_violation(bias_E)[0], 0.05)

    bias = jnp.array([10.0, 0.0, 0.0, 0.0])
    assert float(max_violation(bias)[1]) == pytest.approx(3.0)
    bias = jax.jit(lambda b: jax.lax.fori_loop(0, 300, step, b))(bias)
    assert float(max_violation(bias)[1]) < 0.5


def test_jitter_needs_rng_and_changes_routing_inputs():
    cfg = make_cfg("softmax_topk", "dropless", jitter=0.1)
    m = make_moe(cfg)
    x, _ = inputs(cfg)
    with pytest.raises(ValueError, match="rng"):
        m(x, train=True)
    train = nnx.jit(lambda m, x, rng: m(x, train=True, rng=rng)[0])
    y0, _ = apply(m, x)
    y1 = train(m, x, jax.random.PRNGKey(0))
    y2 = train(m, x, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y0, y1)


def test_param_names_axes_and_stacked_scan():
    from moe_lab.parallel.sharding import logical_axes_of

    cfg = make_cfg("sigmoid", "dropless", shared=1)
    m = make_moe(cfg)
    assert logical_axes_of(m.router_DE) == ("embed", None)
    assert logical_axes_of(m.gate_EDF) == ("expert", "embed", "mlp")
    assert logical_axes_of(m.down_EFD) == ("expert", "mlp", "embed")
    assert isinstance(m.bias_E, routing.RouterBias) and logical_axes_of(m.bias_E) == (None,)
    assert not isinstance(m.bias_E, nnx.Param)
    assert m.shared.gate_DF.shape == (cfg.d_model, cfg.resolved_expert_hidden)

    # created with nnx.vmap, applied with lax.scan (the model's usage); aux stacks
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return MoE(cfg, rngs=nnx.Rngs(key))

    stack = create(jax.random.split(jax.random.PRNGKey(0), 3))
    graphdef, state = nnx.split(stack)
    x, _ = inputs(cfg)

    def body(h, layer_state):
        y, aux = nnx.merge(graphdef, layer_state)(h, train=False)
        return h + y, aux

    _, aux = jax.jit(lambda s, h: jax.lax.scan(body, h, s))(state, x)
    assert aux["tokens_per_expert_E"].shape == (3, cfg.moe.num_experts)
    assert aux["aux_loss"].shape == (3,)


def test_expert_parallel_matches_unsharded():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    cfg = make_cfg("softmax_topk", "dropless", e=8, k=2, shared=1)
    x, ct = inputs(cfg, b=4, t=8)
    want = value_and_grads(make_moe(cfg), x, ct)
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    for dispatch in ("dropless",):
        m = make_moe(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch)))
        with jax.set_mesh(mesh):
            for name in ("gate_EDF", "up_EDF", "down_EFD"):
                v = getattr(m, name)
                v[...] = jax.device_put(v[...], NamedSharding(mesh, P("expert")))
            got = value_and_grads(m, x, ct)
        assert "expert" in str(m.gate_EDF[...].sharding.spec)
        assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert_trees_close(got[2], want[2], rtol=1e-5, atol=1e-5)
