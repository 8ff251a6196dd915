"""Expert parallelism by all-to-all (moe_lab/layers/expert_parallel.py) on 8 fake devices.

Mesh data=2 x expert=4: tokens in 8 shards, experts in 4.  Checked against the
single-device kernels: without drops the layer equals the unsharded one; with
drops it equals the unsharded capacity layer applied to each token shard alone
(capacity is per device, as in GShard), outputs and gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_lab.config.schema import (
    DEFAULT_RULES,
    MESH_AXES,
    ConfigError,
    MeshConfig,
    ModelConfig,
    MoEConfig,
)
from moe_lab.config.validate import validate
from moe_lab.layers import expert_parallel as ep
from moe_lab.layers import routing
from moe_lab.layers.moe import MoE
from moe_lab.layers.moe_kernels.dispatch import token_choice_moe
from moe_lab.parallel import sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

N, D, F, E, K = 64, 8, 16, 8, 2
SHARDS = 8  # token shards: data (2) x expert (4)


def _mesh():
    return jax.make_mesh((2, 1, 4, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _problem(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x_ND = jax.random.normal(keys[0], (N, D))
    gate_NK, expert_NK = jax.lax.top_k(jax.nn.softmax(2 * jax.random.normal(keys[1], (N, E))), K)
    weights = tuple(
        0.5 * jax.random.normal(k, s) for k, s in zip(keys[2:5], ((E, D, F), (E, D, F), (E, F, D)))
    )
    ct_ND = jax.random.normal(keys[5], (N, D))
    return x_ND, gate_NK, expert_NK.astype(jnp.int32), weights, ct_ND


def _per_shard_reference(x_ND, gate_NK, weights, expert_NK, cf):
    """The single-device capacity layer on each token shard alone, concatenated."""
    n = N // SHARDS
    cap = routing.capacity(n, K, E, cf)
    ys, keeps = [], []
    for s in range(SHARDS):
        sl = slice(s * n, (s + 1) * n)
        y, layout = token_choice_moe(
            x_ND[sl], expert_NK[sl], gate_NK[sl], weights, capacity=cap, impl="buffer"
        )
        ys.append(y)
        keeps.append(layout.keep_NK)
    return jnp.concatenate(ys), jnp.concatenate(keeps)


@pytest.mark.parametrize("path, cf", [("all_to_all", 0.5), ("all_to_all", 100.0), ("shard_map", 0.5)])
def test_capacity_paths_match_per_shard_capacity_layer(cf, path):
    """Capacity per device (GShard's groups) on 8 token shards: the all-to-all over
    data 2 x expert 4, and sharded_moe on data 8 (no expert axis: every device runs
    every expert on its own tokens), both against the per-shard single-device layer."""
    x_ND, gate_NK, expert_NK, weights, ct_ND = _problem()
    mesh = (
        _mesh()
        if path == "all_to_all"
        else jax.make_mesh((8, 1, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    )
    moe = ep.all_to_all_moe if path == "all_to_all" else functools.partial(ep.sharded_moe, impl="auto")

    def loss_ep(x_ND, gate_NK, weights):
        y, keep = moe(x_ND, expert_NK, gate_NK, weights, capacity_factor=cf)
        return jnp.sum(y * ct_ND), keep

    def loss_ref(x_ND, gate_NK, weights):
        y, keep = _per_shard_reference(x_ND, gate_NK, weights, expert_NK, cf)
        return jnp.sum(y * ct_ND), keep

    grad_ref = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True))
    (v_ref, keep_ref), g_ref = grad_ref(x_ND, gate_NK, weights)
    with jax.set_mesh(mesh), sharding.use_rules(DEFAULT_RULES, mesh):
        grad_ep = jax.jit(jax.value_and_grad(loss_ep, argnums=(0, 1, 2), has_aux=True))
        if path == "all_to_all":
            assert "all-to-all" in grad_ep.lower(x_ND, gate_NK, weights).compile().as_text()
        (v_ep, keep_ep), g_ep = grad_ep(x_ND, gate_NK, weights)
    np.testing.assert_array_equal(np.asarray(keep_ep), np.asarray(keep_ref))
    assert bool(jnp.all(keep_ref)) == (cf > 1)  # cf 0.5 drops some assignments
    np.testing.assert_allclose(v_ep, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_moe_layer_takes_the_all_to_all_path_and_matches_unsharded():
    cfg = ModelConfig(
        d_model=D,
        ffn="moe",
        init_std=0.3,
        moe=MoEConfig(num_experts=E, top_k=K, expert_hidden=F, dispatch="capacity", capacity_factor=100.0),
    )
    x_BTD = jax.random.normal(jax.random.PRNGKey(3), (8, 8, D))
    m = MoE(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def loss(params, x_BTD):
        y, aux = nnx.merge(graphdef, params, rest)(x_BTD, train=True)
        return jnp.sum(y**2) + aux["aux_loss"], aux["drop_fraction"]

    fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (v_want, drop_want), g_want = jax.jit(fn)(params, x_BTD)
    mesh = _mesh()
    with jax.set_mesh(mesh), sharding.use_rules(DEFAULT_RULES, mesh):
        assert ep.why_not_all_to_all(cfg.moe, DEFAULT_RULES, mesh, 64) == ""
        assert "do not divide" in ep.why_not_all_to_all(cfg.moe, DEFAULT_RULES, mesh, 60)
        assert "all-to-all" in jax.jit(fn).lower(params, x_BTD).compile().as_text()
        (v_got, drop_got), g_got = jax.jit(fn)(params, x_BTD)
    assert float(drop_got) == float(drop_want) == 0.0
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "router, shared, mesh",
    [
        ("softmax_topk", 0, dict(expert=8)),
        ("topk_softmax", 0, dict(data=2, expert=4)),
        ("sigmoid", 1, dict(data=4, expert=2)),
        ("softmax_topk", 1, dict(data=8)),
        ("softmax_topk", 0, dict(fsdp=2, expert=4)),
    ],
)
def test_dropless_shard_map_equals_the_reference(router, shared, mesh):
    """Dropless MoE under shard_map (sharded_moe: per-device sort, ring of experts over
    expert sizes 1, 2, 4, 8) against reference_moe on one device: outputs, gradients of
    the input and every weight, aux losses and load."""
    moe = MoEConfig(
        num_experts=E,
        top_k=K,
        expert_hidden=F,
        router=router,
        dispatch="dropless",
        num_shared_experts=shared,
        aux_loss_weight=1e-2,
        z_loss_weight=1e-3,
    )
    cfg = ModelConfig(d_model=D, ffn="moe", init_std=0.3, moe=moe)
    ref_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(moe, dispatch="reference"))
    x_BTD = jax.random.normal(jax.random.PRNGKey(4), (8, 8, D))
    graphdef, params, rest = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    ref_graphdef = nnx.split(MoE(ref_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[0]

    def fn(gd):
        def loss(params, x_BTD):
            y, aux = nnx.merge(gd, params, rest)(x_BTD, train=True)
            return jnp.sum(jnp.sin(y)) + aux["aux_loss"], aux

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (v_want, aux_want), g_want = fn(ref_graphdef)(params, x_BTD)
    mcfg = MeshConfig(**mesh)
    m = sharding.make_mesh(mcfg)
    with jax.set_mesh(m), sharding.use_rules(DEFAULT_RULES, m):
        assert ep.why_not_local(moe, DEFAULT_RULES, m, 64) == ""
        (v_got, aux_got), g_got = fn(graphdef)(params, x_BTD)
    np.testing.assert_allclose(v_got, v_want, rtol=2e-5)
    for key in ("tokens_per_expert_E", "load_balance_loss", "z_loss", "aux_loss"):
        np.testing.assert_allclose(aux_got[key], aux_want[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_all_to_all_config_needs_token_choice_capacity():
    from moe_lab.config.schema import Config

    moe = MoEConfig(dispatch="dropless", expert_parallel="all_to_all")
    cfg = Config(model=ModelConfig(ffn="moe", moe=moe))
    with pytest.raises(ConfigError, match="expert_parallel='all_to_all' needs token-choice"):
        validate(cfg)
    validate(
        dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, moe=dataclasses.replace(moe, dispatch="capacity"))
        )
    )


def test_plan_line_says_which_expert_parallelism_runs():
    """Printed at train start and by `moe-lab info` (abstract mesh: no devices needed)."""
    from moe_lab.config.load import load_config

    def line(arg, **mesh):
        cfg = load_config("configs/moe_tiny.py" + arg, {f"mesh.{k}": str(v) for k, v in mesh.items()})
        return ep.plan_line(cfg, sharding.make_abstract_mesh(cfg.mesh, 8))

    cap = line(":capacity", data=2, expert=4)
    # moe_tiny: batch 16 x seq 128 over 8 token shards; C = ceil(1.25 * 256 * 2 / 8)
    assert "kernel buffer | all-to-all over expert=4: 256 tokens per device, capacity 80" in cap
    # dropless: every device sorts its own tokens, experts by a ring (sharded_moe)
    assert "each device sorts its own 256 tokens, experts over expert=4 by a ring of 4 steps" in line(
        "", data=2, expert=4
    )
    assert "each device sorts its own 256 tokens, every expert on every device" in line(":capacity", data=-1)
    assert "by GSPMD (global sort)" in line(":expert_choice", data=2, expert=4)
    # custom rules that do not split the batch over `expert`: GSPMD, said so
    cfg = load_config("configs/moe_tiny.py:capacity", {"mesh.data": "2", "mesh.expert": "4"})
    rules = tuple((k, ("data",) if k == "batch" else v) for k, v in cfg.mesh.rules)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=rules))
    mesh = sharding.make_abstract_mesh(cfg.mesh, 8)
    assert "tokens not split over expert" in ep.plan_line(cfg, mesh)
    assert "tokens not split" in ep.why_not_all_to_all(cfg.model.moe, rules, mesh, 2048)
    # asked for explicitly, the all-to-all must apply to the training batch: an error
    from moe_lab.train.loop import _check_expert_parallel

    _check_expert_parallel(cfg, mesh)  # auto: falls back, says so above
    explicit = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, moe=dataclasses.replace(cfg.model.moe, expert_parallel="all_to_all")
        ),
    )
    with pytest.raises(ConfigError, match="'all_to_all' cannot apply to the training batch"):
        _check_expert_parallel(explicit, mesh)


def test_rules_travel_with_the_model():
    """A Transformer traced under `jax.set_mesh` alone (a notebook, a new script: no
    `use_rules`) keeps its rule table: the expert all-to-all is in the compiled step, and
    the logits equal those traced inside `use_rules`."""
    from moe_lab.models.transformer import Transformer

    cfg = ModelConfig(
        vocab_size=64,
        d_model=D,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        max_seq_len=8,
        ffn="moe",
        moe=MoEConfig(num_experts=E, top_k=K, expert_hidden=F, dispatch="capacity", capacity_factor=100.0),
    )
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), rules=DEFAULT_RULES))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (8, 8), 0, 64)

    def logits(state, tokens_BT):
        return nnx.merge(graphdef, state)(tokens_BT, train=True)[0]

    mesh = _mesh()
    with jax.set_mesh(mesh):
        assert sharding.active_rules_and_mesh() == (None, None)  # nothing set by the caller
        assert "all-to-all" in jax.jit(logits).lower(state, tokens_BT).compile().as_text()
        got = jax.jit(logits)(state, tokens_BT)
        with sharding.use_rules(DEFAULT_RULES, mesh):
            want = jax.jit(logits)(state, tokens_BT)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_standalone_moe_layer_keeps_its_rules():
    """The MoE layer traced by itself under `jax.set_mesh` (a benchmark, a notebook)
    runs its expert all-to-all too, and equals the single-device layer."""
    cfg = ModelConfig(
        d_model=D,
        ffn="moe",
        moe=MoEConfig(num_experts=E, top_k=K, expert_hidden=F, dispatch="capacity", capacity_factor=100.0),
    )
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    x_BTD = jax.random.normal(jax.random.PRNGKey(1), (8, 8, D))

    def apply(state, x_BTD):
        return nnx.merge(graphdef, state)(x_BTD, train=True)[0]

    want = jax.jit(apply)(state, x_BTD)  # no mesh: one device
    with jax.set_mesh(_mesh()):
        assert "all-to-all" in jax.jit(apply).lower(state, x_BTD).compile().as_text()
        got = jax.jit(apply)(state, x_BTD)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
