"""Sharding: the rule table gives the expected specs, and a data x fsdp x tensor mesh
of 8 fake devices computes the same losses as one device."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from moe_lab.bench.train_step import _random_batch
from moe_lab.config.schema import ConfigError, MeshConfig
from moe_lab.parallel import sharding
from moe_lab.train.state import make_setup
from moe_lab.train.step import make_train_step


def _cfg(mesh: dict, **model):
    return tiny_config(mesh=mesh, model=model)


def test_expected_partition_specs():
    cfg = _cfg(dict(data=2, fsdp=2, tensor=2))
    mesh = sharding.make_mesh(cfg.mesh)
    specs = make_setup(cfg, mesh).specs["params"]
    layer = specs["blocks"]["layers"]
    assert layer["attn"]["q_DHK"] == P(None, "fsdp", "tensor", None)
    assert layer["attn"]["o_HKD"] == P(None, "tensor", None, "fsdp")
    assert layer["ffn"]["gate_DF"] == P(None, "fsdp", "tensor")
    assert layer["ffn"]["down_FD"] == P(None, "tensor", "fsdp")
    assert specs["embed_VD"] == P("tensor", "fsdp")
    assert sharding.batch_spec(cfg.mesh.rules, mesh) == P(("data", "fsdp"), None)
    # size-1 axes drop out of the specs entirely
    one = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    assert sharding.logical_to_spec(("embed", "mlp"), cfg.mesh.rules, one) == P(None, None)


def test_indivisible_dimension_is_a_clear_error():
    cfg = _cfg(dict(data=1, tensor=8))  # kv_heads=2 cannot split 8 ways
    mesh = sharding.make_mesh(cfg.mesh)
    with pytest.raises(ConfigError, match="kv_heads"):
        make_setup(cfg, mesh)


def _losses(cfg, devices, steps=3):
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    setup = make_setup(cfg, mesh)
    state = setup.init_state()
    with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules, mesh):
        step = jax.jit(
            make_train_step(setup.graphdef, setup.tx, cfg, 1, setup.schedule),
            in_shardings=(setup.shardings, setup.batch_sharding),
            out_shardings=(setup.shardings, None),
        )
        losses = []
        for i in range(steps):
            batch = jax.device_put(_random_batch(cfg, seed=i), setup.batch_sharding)
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    shard = state["params"]["blocks"]["layers"]["attn"]["q_DHK"].sharding
    return np.array(losses), shard


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=-1, fsdp=8)])
def test_sharded_equals_single_device(mesh):
    cfg1 = _cfg(dict(data=1), num_heads=4, num_kv_heads=2)
    cfg8 = dataclasses.replace(cfg1, mesh=MeshConfig(**mesh))
    l1, _ = _losses(cfg1, jax.devices()[:1])
    l8, s8 = _losses(cfg8, jax.devices())
    assert len(s8.device_set) == 8
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l1[-1] < l1[0]  # it trains


def test_expert_parallel_equals_single_device():
    """Experts split over the mesh's expert axis (data parallel on the rest), dropless:
    the ring of experts under shard_map in a whole train step gives one device's losses
    (capacity's all-to-all and the ring layer by layer: tests/test_expert_parallel.py)."""
    moe = dict(
        ffn="moe",
        moe=dict(num_experts=8, top_k=2, expert_hidden=32, dispatch="dropless", capacity_factor=2.0),
    )
    cfg1 = _cfg(dict(data=1), **moe)
    cfg8 = dataclasses.replace(cfg1, mesh=MeshConfig(data=2, expert=4))
    l1, _ = _losses(cfg1, jax.devices()[:1])
    mesh = sharding.make_mesh(cfg8.mesh)
    specs = make_setup(cfg8, mesh).specs["params"]["blocks"]["layers"]["ffn"]
    assert specs["gate_EDF"] == P(None, "expert", None, None)
    assert specs["down_EFD"] == P(None, "expert", None, None)
    l8, _ = _losses(cfg8, jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
