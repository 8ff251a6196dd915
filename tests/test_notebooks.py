"""CI executes every notebook on results of a micro-sweep made here: a notebook
that breaks (or stops producing its figures) fails the suite."""

import glob
import importlib.util
import os

import nbformat
import pytest
from nbclient import NotebookClient
from test_sweep import REPO, compile_cache, write_config

from moe_lab import sweep


def sparsity_post_stages(scale):
    path = os.path.join(REPO, "configs", "sparsity_sweep.py")
    spec = importlib.util.spec_from_file_location("sparsity_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.post_stages(scale)


NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
FIGURES = {"sparsity_vs_reasoning": ("loss_vs_total_params.png", "accuracy_vs_pretrain_loss.png",
                                     "accuracy_vs_tpp.png", "ttc_grpo_vs_sparsity.png"),
           "sunk_compute": ("sunk_compute.png",),
           # without *-ttc.json next to the results it draws labelled empty panels
           "test_time_compute": ("ttc_curves.png", "budget_forcing.png")}
# two sparsities (k = 1, 2) and a tiny sunk-compute study on the same base run; one
# point also runs the +post stages (test-time compute, GRPO) of configs/sparsity_sweep.py
POINTS = [{"name": "base", "model.moe.num_experts": 2, "model.moe.top_k": 1,
           "tags": {"study": "base", "grown_at": None}},
          {"name": "scratch", "model.moe.num_experts": 4, "model.moe.top_k": 2,
           "tags": {"study": "grow", "grown_at": 0}, "post": sparsity_post_stages("micro")},
          {"name": "g2", "from": {"run": "base", "step": 2, "grow": {"width": {}}},
           "tags": {"study": "grow", "grown_at": 2}},
          {"name": "g4", "from": {"run": "base", "step": 4, "grow": {"width": {}}},
           "tags": {"study": "grow", "grown_at": 4}}]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    cfg_path = write_config(root / "cfg.py", POINTS)
    with compile_cache():
        status = sweep.run_sweep(cfg_path, str(root / "sw"), isolate="inprocess",
                                 log=lambda *_: None)
    assert status["ran"] == ["base", "scratch", "g2", "g4"], status
    return str(root / "sw" / "results.jsonl")


def test_every_notebook_is_covered():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
    assert names == set(FIGURES), "add the new notebook's figures to FIGURES"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, results, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_RESULTS", results)
    monkeypatch.setenv("MOE_LAB_FIGURES", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # analysis only: no training or model code in notebooks
        assert "train(" not in cell.source and "moe_lab.train" not in cell.source
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    name = os.path.splitext(os.path.basename(path))[0]
    for png in FIGURES[name]:
        assert os.path.getsize(tmp_path / png) > 1000, png
