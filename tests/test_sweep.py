"""Sweep runner: expansion, naming, shards, dry run, resume, failures, results, stages;
and every notebook executed on the micro-sweep's results (one micro-sweep serves both:
a notebook that breaks, or stops producing its figures, fails the suite)."""

import contextlib
import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

from moe_lab.cli import sweep as sweep_cli
from moe_lab.config.schema import ConfigError
from moe_lab.sweep import points as sweep_points
from moe_lab.sweep import results
from moe_lab.sweep import runner as sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def compile_cache():
    """Marks the blocks whose speed depends on compilation; the persistent cache is
    off for the suite (see tests/conftest.py), so this is a no-op."""
    yield None


MICRO = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "micro"
    c.model = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, max_seq_len=64,
                   ffn="moe", moe=dict(num_experts=2, top_k=1, expert_hidden=32))
    c.data = dict(mixture="facts:1,arith:1", seq_len=48, facts_num_entities=20,
                  arith_num_steps=2, arith_eval_num_steps=2, arith_modulus=11)
    c.train = dict(steps=4, batch_size=8, warmup_steps=1, log_every=1, eval_every=4,
                   checkpoint_every=2, keep_last=1, keep_every=2, eval_batches=1,
                   progress=False, async_checkpoint=False)
    c.eval = dict(num_examples=4, batch_size=4, max_new_tokens=8, at_end=False)
    c.mesh = dict(data=-1)
    return c

def get_sweep(arg=None):
    return POINTS
"""


def write_config(path, points) -> str:
    path.write_text(MICRO.replace("POINTS", repr(points)))
    return str(path)


def sparsity_post_stages(scale):
    path = os.path.join(REPO, "configs", "sparsity_sweep.py")
    spec = importlib.util.spec_from_file_location("sparsity_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.post_stages(scale)


def grown_from_e2_k1(name, step):
    """A width-grown e2_k1 (-> the e4_k2 architecture), tagged for the sunk-compute notebook."""
    return {
        "name": name,
        "from": {"run": "e2_k1", "step": step, "grow": {"width": {"factor": 2, "noise": 0.0}}},
        "tags": {"study": "grow", "grown_at": step},
    }


# two sparsities (k = 1, 2), a bad point and a tiny sunk-compute study grown from e2_k1;
# e4_k2, the study's from-scratch baseline, also runs the +post stages (test-time
# compute, GRPO) of configs/sparsity_sweep.py
GROWN = grown_from_e2_k1("grown", 4)
POINTS = [
    {"model.moe.num_experts": 2, "model.moe.top_k": 1, "tags": {"study": "base", "grown_at": None}},
    {
        "model.moe.num_experts": 4,
        "model.moe.top_k": 2,
        "tags": {"study": "grow", "grown_at": 0},
        "post": sparsity_post_stages("micro"),
    },
    {"name": "bad", "model.moe.num_experts": 2, "model.moe.top_k": 3},
    GROWN,
    grown_from_e2_k1("g2", 2),
]


@pytest.fixture(scope="module")
def micro_sweep(tmp_path_factory):
    """POINTS in-process; e2_k1 is interrupted after 2 steps before the sweep starts."""
    from moe_lab.config.load import apply_overrides
    from moe_lab.train.loop import train

    root = tmp_path_factory.mktemp("sweep")
    cfg_path = write_config(root / "micro_cfg.py", POINTS)
    sweep_dir = str(root / "sw")
    lines = []
    with compile_cache():
        base, points = sweep_points.load_sweep(cfg_path)
        cfg = sweep.resolved_config(apply_overrides(base, points[0].overrides))
        train(cfg, os.path.join(sweep_dir, "e2_k1"), max_steps=2)  # "killed" at step 2
        status = sweep.run_sweep(cfg_path, sweep_dir, isolate="inprocess", log=lines.append)
    # every test of this module, the notebooks' too, reads a complete sweep
    assert status["ran"] == ["e2_k1", "e4_k2", "grown", "g2"] and status["failed"] == ["bad"]
    return {"dir": sweep_dir, "config": cfg_path, "status": status, "log": lines}


def test_names_and_expansion():
    assert sweep_points.run_name({"model.moe.num_experts": 8, "model.moe.top_k": 2}) == "e8_k2"
    assert sweep_points.run_name({"train.lr": 0.001, "data.mixture": "facts:1"}) == "lr0.001_mixfacts-1"
    assert sweep_points.run_name({"budget_flops": 1.5e12}) == "B1.5e12"
    pts = sweep_points.make_points(
        [GROWN, {"model.moe.num_experts": 2, "model.moe.top_k": 1}, {"name": "x", "from": {"run": "grown"}}]
    )
    assert [p.name for p in pts] == ["e2_k1", "grown", "x"]  # parents first
    assert pts[1].parent == "e2_k1" and pts[0].index == 1
    with pytest.raises(ConfigError, match="same name"):
        sweep_points.make_points([{"train.lr": 1}, {"train.lr": 1}])
    with pytest.raises(ConfigError, match="not a point"):
        sweep_points.make_points([{"name": "a", "from": {"run": "zzz"}}])
    with pytest.raises(ConfigError, match="cycle"):
        sweep_points.make_points([{"name": "a", "from": {"run": "b"}}, {"name": "b", "from": {"run": "a"}}])
    with pytest.raises(ConfigError, match="unknown key"):
        sweep_points.make_points([{"steps": 3}])


def test_shards_split_the_points():
    pts = sweep_points.make_points([{"train.seed": s} for s in range(7)])
    shards = [sweep_points.shard_points(pts, (i, 3)) for i in range(3)]
    assert [p.name for p in shards[1]] == ["seed1", "seed4"]
    assert sorted(p.name for s in shards for p in s) == sorted(p.name for p in pts)
    assert sweep_points.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            sweep_points.parse_shard(bad)


def test_dry_run_prints_commands(tmp_path):
    cfg_path = write_config(
        tmp_path / "c.py", POINTS + [{"name": "budget", "from": {"run": "e2_k1"}, "budget_flops": 4e9}]
    )
    out = []
    sweep.run_sweep(
        cfg_path, str(tmp_path / "sw"), dry_run=True, overrides={"train.lr": "0.01"}, log=out.append
    )
    text = "\n".join(out)
    assert (
        f"moe-lab train --config {cfg_path} --workdir {tmp_path}/sw/e4_k2 --config.train.lr=0.01 "
        "--config.model.moe.num_experts=4 --config.model.moe.top_k=2" in text
    )
    assert (
        f"moe-lab grow --from {tmp_path}/sw/e2_k1 --to {tmp_path}/sw/grown --step 4 "
        "--width-factor 2 --noise 0.0" in text
    )
    assert f"moe-lab eval --workdir {tmp_path}/sw/grown --step 4" in text
    assert "invalid point" in text  # the bad point is reported, not fatal
    # the budget point: steps = budget / FLOPs per step of its model
    base, points = sweep_points.load_sweep(cfg_path)
    by_name = {p.name: p for p in points}
    cfg, _ = sweep.planned_config(by_name["budget"], base, by_name)
    assert cfg.train.steps == round(4e9 / sweep.flops_per_step(cfg))
    assert f"--config.train.steps={cfg.train.steps}" in text
    assert not os.path.exists(tmp_path / "sw")
    out = []
    sweep.run_sweep(cfg_path, str(tmp_path / "sw"), dry_run=True, shard=(1, 2), log=out.append)
    assert [line.split()[2] for line in out if line.startswith("# [")] == ["e4_k2", "grown", "budget"]


def test_micro_sweep_runs_records_and_isolates_failures(micro_sweep):
    d, status = micro_sweep["dir"], micro_sweep["status"]  # ran / failed: see the fixture
    for name in status["ran"]:
        assert sweep.is_finished(os.path.join(d, name))
    with open(os.path.join(d, "failures.jsonl")) as f:
        fails = [json.loads(line) for line in f]
    assert fails[0]["run"] == "bad" and "top_k=3" in fails[0]["error"]
    # e2_k1 resumed from its step-2 checkpoint: every step logged once
    with open(os.path.join(d, "e2_k1", "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2, 3, 4]
    df = results.load_results(d)
    assert list(df["run"]) == ["e2_k1", "e4_k2", "grown", "g2"]
    want = {
        "run",
        "model.moe.num_experts",
        "model.moe.top_k",
        "num_experts",
        "top_k",
        "params_total",
        "params_active",
        "sparsity",
        "tpp",
        "train_flops",
        "train_loss",
        "eval_loss",
        "facts_eval_loss",
        "facts_task_loss_bits",
        "facts_accuracy",
        "arith_accuracy",
        "memorization_accuracy",
        "reasoning_accuracy",
        "reasoning_task_loss_bits",
        "sunk_flops",
        "total_flops",
    }
    assert want <= set(df.columns), want - set(df.columns)
    row = df.set_index("run").loc["e4_k2"]
    assert row["sparsity"] == 0.5 and row["params_active"] < row["params_total"]
    assert 0 <= row["reasoning_accuracy"] <= 1
    grown = df.set_index("run").loc["grown"]
    assert grown["num_experts"] == 4 and grown["top_k"] == 2 and grown["parent_step"] == 4
    assert grown["parent_run"] == "e2_k1" and grown["sunk_flops"] > 0
    assert grown["params_total"] == row["params_total"]
    with open(os.path.join(d, "grown", "lineage.json")) as f:
        assert json.load(f)["transforms"][0]["kind"] == "width"


def test_rerun_skips_finished_points_and_resumes_the_rest(micro_sweep):
    d, cfg_path = micro_sweep["dir"], micro_sweep["config"]
    evals = {n: os.path.join(d, n, "eval", "4.json") for n in ("e2_k1", "e4_k2", "grown", "g2")}
    mtimes = {n: os.stat(p).st_mtime_ns for n, p in evals.items()}
    os.remove(evals["e4_k2"])  # killed between training and evaluation
    with compile_cache():
        status = sweep.run_sweep(cfg_path, d, isolate="inprocess", log=lambda *_: None)
    assert status["done"] == ["e2_k1", "grown", "g2"] and status["ran"] == ["e4_k2"]
    for name in ("e2_k1", "grown", "g2"):
        assert os.stat(evals[name]).st_mtime_ns == mtimes[name]
    with open(os.path.join(d, "results.jsonl")) as f:
        names = [json.loads(line)["run"] for line in f]
    assert sorted(names) == ["e2_k1", "e4_k2", "g2", "grown"]  # no duplicates
    # a shard whose points' parent is unfinished skips it with a message
    status = sweep.run_sweep(
        cfg_path, d + "_other", isolate="inprocess", shard=(3, 4), log=(out := []).append
    )
    assert "grown" in status["skipped"] and any("parent 'e2_k1'" in s for s in out)


def test_results_dedupe_and_load_results(tmp_path):
    results.record_result(str(tmp_path), {"run": "a", "x": 1, "sweep_index": 1})
    results.record_result(str(tmp_path), {"run": "b", "x": 2, "sweep_index": 0})
    results.record_result(str(tmp_path), {"run": "a", "x": 1, "sweep_index": 1})  # identical: no-op
    results.record_result(str(tmp_path), {"run": "a", "x": 3, "sweep_index": 1})  # changed: replaced
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"run": "b", "x": 5, "sweep_index": 0}\n{"run": "tor')  # a racing writer + torn line
    df = results.load_results(str(tmp_path / "results.jsonl"))
    assert list(df["run"]) == ["b", "a"] and list(df["x"]) == [5, 3]
    with pytest.raises(FileNotFoundError):
        results.load_results(str(tmp_path / "nothing"))


def test_subprocess_isolation_records_a_crashing_point(tmp_path):
    cfg_path = write_config(tmp_path / "c.py", [{"name": "bad", "model.moe.top_k": 5}])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-m", "moe_lab.cli.sweep", "--config", cfg_path, "--workdir", str(tmp_path / "sw")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    with open(tmp_path / "sw" / "failures.jsonl") as f:
        fails = [json.loads(line) for line in f]
    assert len(fails) == 1 and "top_k=5" in fails[0]["error"]
    assert os.path.isfile(tmp_path / "sw" / "logs" / "bad.log")
    # a config error is one line in the sweep's output and failures.jsonl, no traceback
    assert "Traceback" not in r.stdout + r.stderr and "traceback" not in fails[0]["error"]
    assert sum("top_k=5" in line for line in r.stdout.splitlines()) <= 3


def test_sweep_configs_expand():
    for arg, n in (("tiny", 16), ("tiny_steps", 8), ("reason", 48), ("micro", 3), ("paper", 63)):
        _, pts = sweep_points.load_sweep(f"{REPO}/configs/sparsity_sweep.py:{arg}")
        assert len(pts) == n
    base, pts = sweep_points.load_sweep(f"{REPO}/configs/growth_sunk_compute.py:tiny")
    by_name = {p.name: p for p in pts}
    assert {"base", "scratch", "g600", "g2400", "stack_g1800", "total_g600", "total_scratch"} <= set(by_name)
    assert [p.name for p in pts].index("base") == 0
    g, sunk = sweep.planned_config(by_name["g600"], base, by_name)
    scratch, _ = sweep.planned_config(by_name["scratch"], base, by_name)
    assert g.model == scratch.model and g.train.steps == scratch.train.steps
    assert g.train.schedule == "constant" and sunk > 0
    total_g, _ = sweep.planned_config(by_name["total_g600"], base, by_name)
    total_s, _ = sweep.planned_config(by_name["total_scratch"], base, by_name)
    assert total_g.train.steps < total_s.train.steps  # the sunk FLOPs count against the total
    _, pts = sweep_points.load_sweep(f"{REPO}/configs/growth_sunk_compute.py:paper")
    assert len(pts) == 15


def test_sweep_cli_parser():
    import argparse

    p = argparse.ArgumentParser()
    sweep_cli.add_sweep_parser(p.add_subparsers())
    args = p.parse_args(["sweep", "--config", "c.py", "--workdir", "w", "--shard", "1/4", "--dry-run"])
    assert args.fn is sweep_cli.cmd_sweep and args.shard == "1/4" and args.dry_run
    assert textwrap.dedent(sweep.__doc__).startswith("Sweeps")


NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
FIGURES = {
    "sparsity_vs_reasoning": (
        "loss_vs_total_params.png",
        "accuracy_vs_pretrain_loss.png",
        "accuracy_vs_tpp.png",
        "ttc_grpo_vs_sparsity.png",
    ),
    "sunk_compute": ("sunk_compute.png",),
    # without *-ttc.json next to the results it draws labelled empty panels
    "test_time_compute": ("ttc_curves.png", "budget_forcing.png"),
}


def test_every_notebook_is_covered():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
    assert names == set(FIGURES), "add the new notebook's figures to FIGURES"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, micro_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_RESULTS", os.path.join(micro_sweep["dir"], "results.jsonl"))
    monkeypatch.setenv("MOE_LAB_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # analysis only: no training or model code in notebooks
        assert "train(" not in cell.source and "moe_lab.train" not in cell.source
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.dirname(path)}}
    ).execute()
    name = os.path.splitext(os.path.basename(path))[0]
    for png in FIGURES[name]:
        assert os.path.getsize(tmp_path / png) > 1000, png
