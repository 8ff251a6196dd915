"""`moe-lab info`: the per-device memory plan equals the actual sharded arrays, and
planning for a pod works on a laptop (abstract mesh)."""

import subprocess
import sys

import jax
import pytest
from conftest import tiny_config

from moe_lab.accounting.plan import memory_plan
from moe_lab.parallel import sharding
from moe_lab.train.state import make_setup


def _device0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=2, expert=4)])
def test_memory_plan_matches_sharded_arrays(mesh):
    cfg = tiny_config(mesh=mesh, model=dict(ffn="moe", moe=dict(num_experts=8, top_k=2, expert_hidden=32)))
    m = sharding.make_mesh(cfg.mesh)
    setup = make_setup(cfg, m)
    state = setup.init_state()
    plan = memory_plan(cfg, setup, m)
    assert plan["params"] == _device0_bytes(state["params"])
    assert plan["opt_state"] == _device0_bytes(state["opt_state"])
    # the abstract (device-less) mesh gives the same plan
    plan_abstract = memory_plan(
        cfg,
        make_setup(cfg, sharding.make_abstract_mesh(cfg.mesh, 8)),
        sharding.make_abstract_mesh(cfg.mesh, 8),
    )
    assert plan_abstract == plan


def test_info_plans_a_pod_config_on_a_laptop():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_lab",
            "info",
            "--config",
            "configs/sparsity_sweep.py:paper",
            "--devices",
            "256",
            "--hardware",
            "tpu-v5p",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "params: total 6,511,199,232  active 1,679,361,024" in r.stdout
    assert "on 256 x tpu-v5p" in r.stdout and "fits" in r.stdout
