"""End-to-end training: learning, exact resume after interruption, SIGTERM, SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, tiny_config

from moe_lab.config.schema import ConfigError
from moe_lab.train import loop
from moe_lab.train.loop import train
from moe_lab.train.metrics import read_metrics
from moe_lab.train.trainer import jit_cache


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_loss_decreases_on_facts(tmp_path):
    cfg = tiny_config(
        data=dict(mixture="facts:1"),
        train=dict(steps=150, eval_every=150, checkpoint_every=150, log_every=10, profile="3:5"),
    )
    summary = train(cfg, str(tmp_path / "run"))
    # train.profile: a jax.profiler trace of steps 3..4 for TensorBoard / XProf
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    losses = _losses(str(tmp_path / "run"))
    assert losses[10] > 2.0 and losses[150] < 0.6 * losses[10], losses
    assert summary["eval/facts/loss"] < 2.0
    rows = read_metrics(str(tmp_path / "run"))
    assert {"lr", "grad_norm", "tokens_per_sec", "mfu", "flops_spent", "loss/facts"} <= set(rows[0])
    assert os.path.isdir(tmp_path / "run" / "tb")


# tiny_config's train losses (8 fake CPU devices, float32); see the test for when to update
GOLDEN_LOSSES = {1: 5.62347, 10: 4.70898, 20: 4.28695}


def test_interrupted_run_resumes_with_identical_losses(tmp_path):
    cfg = tiny_config(train=dict(steps=20, log_every=1, checkpoint_every=10, eval_every=10))
    train(cfg, str(tmp_path / "full"))
    compiled = dict(jit_cache("train"))
    # the retrace check: 20 steps (and two evals) traced the train step once; a batch,
    # state or metric whose shape, dtype or weak type drifted between steps would add one
    assert compiled["train"]._cache_size() == 1 and compiled["eval"]._cache_size() == 1
    # golden metrics (nanodo's regression test): this config's losses, pinned
    got = {s: _losses(str(tmp_path / "full"))[s] for s in GOLDEN_LOSSES}
    np.testing.assert_allclose(
        list(got.values()),
        list(GOLDEN_LOSSES.values()),
        rtol=2e-3,
        err_msg=f"losses at steps 1, 10, 20 moved: {got}. Update GOLDEN_LOSSES only for a "
        "change meant to alter training (init, data order, optimizer, loss), and say so "
        "in the commit; any other change that moves them is a regression",
    )
    train(cfg, str(tmp_path / "split"), max_steps=13)  # stops after step 13 (and saves it) ...
    # same config in the same process: the jitted steps are reused, not compiled again
    assert jit_cache("train")["train"] is compiled["train"]
    assert jit_cache("train")["eval"] is compiled["eval"]
    assert max(_losses(str(tmp_path / "split"))) == 13
    # ... as if killed before that save: the last checkpoint is 10
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "13")
    train(cfg, str(tmp_path / "split"))  # ... resumes from checkpoint 10, re-logs 11..13
    full, split = _losses(str(tmp_path / "full")), _losses(str(tmp_path / "split"))
    assert sorted(split) == list(range(1, 21))  # no duplicated or missing rows
    np.testing.assert_array_equal([full[s] for s in range(1, 21)], [split[s] for s in range(1, 21)])


def test_row_of_a_checkpointed_step_survives_a_kill_right_after_its_save(tmp_path, monkeypatch):
    """The metrics row of step s is written before checkpoint s: a resume from s
    re-logs only s+1.., so a kill between the two must not lose row s."""
    from moe_lab.train import checkpoint as ck

    save = ck.Checkpointer.save

    def save_then_die(self, step, *args, **kw):
        out = save(self, step, *args, **kw)
        if step == 5:
            self.wait()
            raise KeyboardInterrupt  # killed right after checkpoint 5 is on disk
        return out

    monkeypatch.setattr(ck.Checkpointer, "save", save_then_die)
    cfg = tiny_config(train=dict(steps=8, log_every=1, checkpoint_every=5, eval_every=100))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "r"))
    monkeypatch.setattr(ck.Checkpointer, "save", save)
    assert max(_losses(str(tmp_path / "r"))) == 5
    train(cfg, str(tmp_path / "r"))
    assert sorted(_losses(str(tmp_path / "r"))) == list(range(1, 9))


def test_resume_with_other_data_or_batches_is_refused(tmp_path):
    train(tiny_config(train=dict(steps=2)), str(tmp_path / "r"))
    step_fn = jit_cache("train")["train"]
    with pytest.raises(ConfigError, match=r"different data \(data.mixture"):
        train(tiny_config(data=dict(mixture="facts:1"), train=dict(steps=4)), str(tmp_path / "r"))
    with pytest.raises(ConfigError, match=r"different batch \(train.batch_size"):
        train(tiny_config(train=dict(steps=4, batch_size=16)), str(tmp_path / "r"))
    train(tiny_config(train=dict(steps=4, lr=1e-3)), str(tmp_path / "r"))  # steps, lr: fine
    # another schedule: a new step, never the cached one of the old config
    assert jit_cache("train")["train"] is not step_fn


def test_config_that_cannot_build_leaves_no_workdir(tmp_path, monkeypatch):

    def broken(cfg, mesh, tok=None):
        raise ConfigError("cannot build")

    monkeypatch.setattr(loop, "make_setup", broken)
    with pytest.raises(ConfigError, match="cannot build"):
        train(tiny_config(train=dict(steps=2)), str(tmp_path / "r"))
    assert not os.path.exists(tmp_path / "r" / "config.json")


def test_workdir_of_another_model_is_refused(tmp_path):
    train(tiny_config(train=dict(steps=2)), str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="different model"):
        train(tiny_config(model=dict(d_model=64), train=dict(steps=2)), str(tmp_path / "r"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no moe_lab run"):
        train(tiny_config(train=dict(steps=2)), str(tmp_path / "other"))


def _cli_train(workdir, steps, extra=()):
    args = [
        sys.executable,
        "-m",
        "moe_lab",
        "train",
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        f"--config.train.steps={steps}",
        "--config.model.d_model=32",
        "--config.model.num_layers=1",  # faults, not depth: one layer compiles faster
        "--config.model.mlp_hidden=64",
        "--config.data.seq_len=32",
        "--config.train.batch_size=8",
        "--config.train.checkpoint_every=5",
        "--config.train.log_every=1",
        "--config.train.eval_every=1000",
        "--config.train.progress=false",
        "--config.eval.at_end=false",
        *extra,
    ]
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for_step(workdir, step, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = read_metrics(str(workdir)) if os.path.exists(workdir / "metrics.jsonl") else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """SIGKILL at an arbitrary moment (possibly mid-save): the last complete
    checkpoint resumes and the losses equal an uninterrupted run's."""
    ref = _cli_train(tmp_path / "ref", 30)
    killed = _cli_train(tmp_path / "killed", 30)
    _wait_for_step(tmp_path / "killed", 13, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait() == 0, ref.stdout.read()
    resumed = _cli_train(tmp_path / "killed", 30)
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resuming from" in out
    full, res = _losses(str(tmp_path / "ref")), _losses(str(tmp_path / "killed"))
    assert sorted(res) == sorted(full)
    np.testing.assert_array_equal([full[s] for s in sorted(full)], [res[s] for s in sorted(full)])


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = _cli_train(tmp_path / "t", 100000)
    _wait_for_step(tmp_path / "t", 7, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    last = max(_losses(str(tmp_path / "t")))
    steps = sorted(int(p) for p in os.listdir(tmp_path / "t" / "checkpoints") if p.isdigit())
    assert steps[-1] == last and last > 7
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["train"]["steps"] == 100000


@pytest.mark.parametrize(
    "content, needle", [("", "no documents"), ('{"text": "a"}\n{broken\n', ":2: invalid JSON")]
)
def test_a_bad_data_file_is_refused_before_any_output_or_write(content, needle, tmp_path, capfd):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    cfg = tiny_config(data=dict(mixture="file:1", files=str(data)), train=dict(steps=2))
    with pytest.raises(ConfigError, match=needle):
        train(cfg, str(tmp_path / "run"))
    assert capfd.readouterr().out == ""  # no start-up lines before the refusal
    assert not (tmp_path / "run").exists()  # and no config.json left to block the fixed rerun
