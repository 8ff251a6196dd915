"""Checkpoint round trips, resharding, data-iterator state, retention, errors
and crash safety (a save killed mid-write is never listed)."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_lab.config.schema import ConfigError
from moe_lab.train.checkpoint import (
    Checkpointer,
    LazyArray,
    checkpoint_steps,
    grown_steps,
    write_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(shape=(2, 4), devices=None):
    if devices is None:
        return jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
    return jax.sharding.Mesh(
        np.asarray(devices).reshape(shape),
        ("data", "fsdp"),
        axis_types=(AxisType.Explicit,) * 2,
    )


def _specs():
    return {
        "params": {"w": P("data", "fsdp"), "emb": P("fsdp", None)},
        "opt_state": {"mu": {"w": P("data", "fsdp")}, "count": P()},
        "model_state": {"bias": P("fsdp")},
        "step": P(),
    }


def _state(mesh, step=7):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    values = {
        "params": {
            "w": jax.random.normal(k1, (16, 8), jnp.float32),
            "emb": jax.random.normal(k2, (8, 16), jnp.bfloat16),
        },
        "opt_state": {
            "mu": {"w": jax.random.normal(k3, (16, 8))},
            "count": jnp.int32(3),
        },
        "model_state": {"bias": jnp.arange(8, dtype=jnp.float32)},
        "step": jnp.int32(step),
    }
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), values, _specs())


def _abstract(state, mesh, specs=None):
    specs = specs or _specs()
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        state,
        specs,
    )


def _assert_bit_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8),
            np.asarray(y).reshape(-1).view(np.uint8),
        )


def test_round_trip_and_resharding(tmp_path):
    mesh = _mesh()
    state = _state(mesh)
    with Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.save(7, state, meta={"tokens_seen": 123, "lr": np.float32(0.5)})
        ckpt.wait()
        assert ckpt.latest_step() == 7 and checkpoint_steps(str(tmp_path)) == [7]

    ckpt = Checkpointer(str(tmp_path))  # fresh manager, as on resume
    restored, meta = ckpt.restore(None, _abstract(state, mesh))
    _assert_bit_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert meta == {"step": 7, "tokens_seen": 123, "lr": 0.5}
    assert ckpt.restore_meta() == meta

    # 8 devices -> one device, replicated.
    one = _mesh((1, 1), jax.devices()[:1])
    specs1 = jax.tree.map(lambda _: P(), _specs())
    r1, _ = ckpt.restore(7, _abstract(state, one, specs1))
    _assert_bit_equal(r1, state)
    assert r1["params"]["w"].sharding.mesh.size == 1

    # Same devices, transposed mesh and different PartitionSpecs.
    other = _mesh((4, 2))
    specs2 = _specs()
    specs2["params"] = {"w": P("fsdp", "data"), "emb": P(None, ("data", "fsdp"))}
    r2, _ = ckpt.restore(7, _abstract(state, other, specs2))
    _assert_bit_equal(r2, state)
    assert r2["params"]["emb"].sharding.spec == P(None, ("data", "fsdp"))

    raw = ckpt.restore_raw()
    assert isinstance(raw["params"]["w"], np.ndarray)
    _assert_bit_equal(raw, state)
    ckpt.close()


def test_async_save_copies_state_and_close_waits(tmp_path):
    mesh = _mesh()
    state = _state(mesh, step=1)
    big = jax.device_put(jnp.ones((1024, 1024), jnp.float32), NamedSharding(mesh, P("data", "fsdp")))
    expected = jax.tree.map(np.asarray, state)
    state["params"]["big"] = big
    ckpt = Checkpointer(str(tmp_path), async_save=True)
    assert ckpt.save(1, state)
    # The caller may donate its buffers as soon as save() returns.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    # Same step, even in flight or forced: never overwritten.
    assert ckpt.save(1, {"x": jnp.zeros(2)}) is False
    assert ckpt.save(1, {"x": jnp.zeros(2)}, force=True) is False
    ckpt.close()  # must wait for the background write
    assert checkpoint_steps(str(tmp_path)) == [1]
    raw = Checkpointer(str(tmp_path)).restore_raw(1)
    assert raw["params"]["big"].sum() == 1024 * 1024
    del raw["params"]["big"]
    _assert_bit_equal(raw, expected)


def test_data_iterator_state(tmp_path):
    def make():
        return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4))

    it = make()
    for _ in range(3):
        next(it)
    mesh = _mesh()
    state = _state(mesh)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(3, state, data_iterator=it)
        expected = next(it)  # the iterator keeps going while the save runs
        next(it)
    fresh = make()
    _, meta = Checkpointer(str(tmp_path)).restore(3, _abstract(state, mesh), data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh), expected)
    assert meta["step"] == 3

    # A checkpoint without data state (as written by `grow`) leaves the iterator alone.
    write_checkpoint(str(tmp_path / "grown"), 0, state, {"grown": True})
    fresh = make()
    Checkpointer(str(tmp_path / "grown")).restore(0, _abstract(state, mesh), data_iterator=fresh)
    np.testing.assert_array_equal(next(fresh), next(make()))


def test_retention_keep_last_and_every(tmp_path):
    small = {"x": jnp.arange(4)}
    with Checkpointer(str(tmp_path), keep_last=2, keep_every=5) as ckpt:
        for step in range(1, 13):
            assert ckpt.save(step, small)
    assert checkpoint_steps(str(tmp_path)) == [5, 10, 11, 12]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "11", "12", "5"]


def test_training_retention_keeps_the_checkpoint_grow_made(tmp_path):
    small = {"x": jnp.arange(4)}
    write_checkpoint(str(tmp_path), 0, small, {"grown_from": "parent"})
    assert grown_steps(str(tmp_path)) == (0,)
    with Checkpointer(str(tmp_path), keep_last=2, keep_steps=grown_steps(str(tmp_path))) as ckpt:
        for step in (2, 4, 6):
            assert ckpt.save(step, small)
    assert checkpoint_steps(str(tmp_path)) == [0, 4, 6]


def test_damaged_checkpoint_is_a_one_line_error(tmp_path):
    mesh = _mesh()
    state = _state(mesh)
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, state)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "state" / "d")  # the array data
    for read in (lambda c: c.restore(3, _abstract(state, mesh)), lambda c: c.restore_raw(3)):
        with pytest.raises(ConfigError) as e:
            read(Checkpointer(str(tmp_path)))
        assert "checkpoint step 3" in str(e.value) and "\n" not in str(e.value)


def test_errors_are_one_line_config_errors(tmp_path):
    mesh = _mesh()
    state = _state(mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(ConfigError, match=r"no checkpoint in"):
        ckpt.restore(None, _abstract(state, mesh))
    ckpt.save(2, state)

    with pytest.raises(ConfigError, match=r"no checkpoint at step 5 in .* \(available: 2\)"):
        ckpt.restore(5, _abstract(state, mesh))
    with pytest.raises(ConfigError, match=r"available: 2"):
        ckpt.restore_raw(3)

    bad = _abstract(state, mesh)
    bad["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=bad["params"]["w"].sharding)
    with pytest.raises(ConfigError) as e:
        ckpt.restore(2, bad)
    msg = str(e.value)
    assert "\n" not in msg and "'params/w'" in msg and "(16, 8)" in msg and "(8, 8)" in msg

    missing = _abstract(state, mesh)
    missing["params"]["extra"] = missing["params"]["w"]
    del missing["model_state"]
    with pytest.raises(ConfigError) as e:
        ckpt.restore(2, missing)
    msg = str(e.value)
    assert "\n" not in msg and "'model_state/bias'" in msg and "not in abstract_state" in msg
    ckpt.close()

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        Checkpointer(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="already exists"):
        write_checkpoint(str(tmp_path), 2, state, {})


def test_write_checkpoint_numpy_state_restores_sharded(tmp_path):
    mesh = _mesh()
    state = _state(mesh)
    host = jax.tree.map(np.asarray, state)
    write_checkpoint(str(tmp_path), 0, host, {"lineage": "parent"})
    ckpt = Checkpointer(str(tmp_path), create=False)
    restored, meta = ckpt.restore(0, _abstract(state, mesh))
    _assert_bit_equal(restored, state)
    assert restored["params"]["w"].sharding == state["params"]["w"].sharding
    assert meta == {"step": 0, "lineage": "parent"}
    assert Checkpointer(str(tmp_path / "nope"), create=False).all_steps() == []


def test_lazy_leaves_are_written_one_at_a_time_and_restore_like_any_other(tmp_path):
    """`moe-lab import`'s streamed save: each LazyArray is made once, only when its turn
    comes, after the one before it was dropped; the checkpoint restores sharded, raw,
    and leaf by leaf (export's read) to the same bits as the arrays it was made of, a
    compressed leaf too."""
    import time
    import weakref

    mesh = _mesh()
    state = _state(mesh)
    state["params"]["x"] = state["params"]["w"] + 1  # a third leaf of the same sharding
    specs = _specs()
    specs["params"]["x"] = specs["params"]["w"]
    host = jax.tree.map(np.asarray, state)
    made, alive = [], []

    def lazy(path, a):
        def make():
            # tensorstore lets go of a written array in its own thread, a moment after
            # the write resolves: wait for that, not for ever
            for _ in range(200):
                if all(ref() is None for ref in alive):
                    break
                time.sleep(0.01)
            assert all(ref() is None for ref in alive), "a leaf made before the last was dropped"
            copy = np.array(a)
            made.append(jax.tree_util.keystr(path))
            alive.append(weakref.ref(copy))
            return copy

        return LazyArray(a.shape, a.dtype, make, compress=path[-1].key == "w")

    lazy_params = jax.tree_util.tree_map_with_path(lazy, host["params"])
    write_checkpoint(str(tmp_path), 0, {**host, "params": lazy_params}, {})
    assert sorted(made) == ["['emb']", "['w']", "['x']"]  # each once
    assert not any(ref() for ref in alive)  # nothing kept once written
    ckpt = Checkpointer(str(tmp_path), create=False)
    restored, _ = ckpt.restore(0, _abstract(state, mesh, specs))
    _assert_bit_equal(restored, state)
    assert restored["params"]["x"].sharding == state["params"]["x"].sharding
    _assert_bit_equal(ckpt.restore_raw(0), host)
    _assert_bit_equal(ckpt.restore_leaf(0, ("params", "emb")), host["params"]["emb"])
    assert ckpt.saved_shapes(0)["params"]["w"].shape == (16, 8)
    with pytest.raises(ConfigError, match="has no leaf params/nope"):
        ckpt.restore_leaf(0, ("params", "nope"))
    bad = LazyArray((3,), np.float32, lambda: np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="declared"):
        write_checkpoint(str(tmp_path / "bad"), 0, {"w": bad}, {})
    assert checkpoint_steps(str(tmp_path / "bad")) == []


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from moe_lab.train.checkpoint import Checkpointer
    ckpt = Checkpointer({workdir!r})
    ckpt.save(1, {{"w": jnp.ones((4, 4))}})
    ckpt.wait()
    ckpt.save(2, {{"w": jnp.ones((4, 4)), "big": jnp.ones((32, 1024, 1024), jnp.float32)}})
    # the async save makes its tmp dir in a background thread: kill once it exists
    # (killing before it did left nothing mid-write to check; CI saw that once)
    import time
    ckpts = os.path.join({workdir!r}, "checkpoints")
    for _ in range(1000):
        if any(".orbax-checkpoint-tmp" in n for n in os.listdir(ckpts)):
            break
        time.sleep(0.005)
    print("started", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_save_killed_mid_write_is_never_listed(tmp_path):
    workdir = str(tmp_path)
    script = _KILLED_SAVE.format(repo=REPO, workdir=workdir)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAGS}"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "started" in proc.stdout
    leftovers = os.listdir(tmp_path / "checkpoints")
    assert any(".orbax-checkpoint-tmp" in name for name in leftovers), leftovers

    ckpt = Checkpointer(workdir)
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=NamedSharding(_mesh(), P()))}
    restored, meta = ckpt.restore(None, abstract)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((4, 4)))
    assert meta["step"] == 1
    # The writer removes the stale tmp dir and can save the step again.
    assert ckpt.save(2, {"w": jnp.zeros((4, 4))})
    ckpt.close()
    assert ckpt.all_steps() == [1, 2]
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints"))
