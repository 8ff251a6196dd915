"""lm-evaluation-harness: moe_lab's model class against the harness's own HF backend on
an imported tiny HF model, and `moe-lab eval --lm-eval` on the shipped offline tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hf_models import make_hf_model

from moe_lab.cli.main import main


def _lm_eval():
    """lm_eval, imported by the tests (not at collection: every xdist worker collects
    every module, and the HF stack takes ~13-25 s to import)."""
    pytest.importorskip("transformers")
    return pytest.importorskip("lm_eval")


MAX_LEN = 24  # short, so rolling windows and context truncation are exercised


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir, run = str(root / "hf"), str(root / "run")
    make_hf_model("Qwen3MoeForCausalLM", hf_dir, seed=1)
    assert main(["import", "--hf", hf_dir, "--to", run]) == 0
    return hf_dir, run


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_and_greedy_text_match_the_harness_hf_backend(imported):
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    from moe_lab.eval.lm_eval_model import MoeLabLM

    hf_dir, run = imported
    ours = MoeLabLM(run, batch_size=4, max_length=MAX_LEN)
    theirs = HFLM(pretrained=hf_dir, dtype="float32", batch_size=4, max_length=MAX_LEN, device="cpu")
    pairs = [
        ("the cat sat on", " the mat"),
        ("question: what is two plus three? answer:", " five"),
        ("", "a dog ran"),
        ("numbers 0 1 2 ", "3 4"),
        ("a dog ran to the park and back " * 3, " the cat"),
    ]  # the last one is truncated
    got = ours.loglikelihood(_requests("loglikelihood", pairs))
    want = theirs.loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]
    texts = [("the cat sat on the mat " * 4,), ("a dog",)]  # 2+ windows, and one
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)),
        theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)),
        atol=1e-4,
        rtol=0,
    )
    gen = [
        ("the cat sat", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
        ("numbers 0 1", {"until": [" 5"], "max_gen_toks": 6, "do_sample": False}),
    ]
    assert ours.generate_until(_requests("generate_until", gen)) == theirs.generate_until(
        _requests("generate_until", gen)
    )


def test_eval_lm_eval_runs_the_shipped_tasks_on_local_files(imported, tmp_path, capsys):
    _lm_eval()
    _, run = imported
    gsm, hs = tmp_path / "gsm8k.jsonl", tmp_path / "hellaswag.jsonl"
    gsm.write_text(
        "".join(
            json.dumps({"question": f"what is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
            + "\n"
            for i in range(4)
        )
    )
    hs.write_text(
        "".join(
            json.dumps({"ctx": f"the cat {i} sat on the", "endings": ["mat", "dog", "park"], "label": i % 3})
            + "\n"
            for i in range(4)
        )
    )
    assert (
        main(
            [
                "eval",
                "--workdir",
                run,
                "--lm-eval",
                "gsm8k_local,hellaswag_local",
                "--lm-eval-data",
                f"gsm8k_local={gsm},hellaswag_local={hs}",
                "--limit",
                "3",
                "--num-fewshot",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "gsm8k_local" in out and "acc_norm" in out
    result = json.load(open(f"{run}/eval/0-lm_eval.json"))
    r = result["results"]
    assert 0 <= r["gsm8k_local"]["exact_match,strict-match"] <= 1
    assert 0 <= r["hellaswag_local"]["acc,none"] <= 1
    assert result["n_samples"]["hellaswag_local"]["effective"] == 3
    # a task that is not available offline: one line, exit 2
    assert main(["eval", "--workdir", run, "--lm-eval", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not available offline" in err[0] and "gsm8k_local" in err[0]
    assert main(["eval", "--workdir", run, "--lm-eval", "triviaqa_local"]) == 2  # no file
    assert "data/lm_eval/triviaqa.jsonl, which does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"  # a malformed row: named by file and line, one line
    bad.write_text(gsm.read_text() + '{"question": "broken\n')
    assert (
        main(
            [
                "eval",
                "--workdir",
                run,
                "--lm-eval",
                "gsm8k_local",
                "--lm-eval-data",
                f"gsm8k_local={bad}",
                "--limit",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:5: invalid JSON" in err, err


def test_a_wheel_install_ships_the_task_yamls(tmp_path):
    """setup.py installs configs/lm_eval/ as moe_lab.lm_eval_tasks: in the package tree
    a wheel is made of (build_py), away from the source tree, tasks_dir() finds every
    shipped file."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    found = subprocess.run(
        [sys.executable, "-c", "from moe_lab.eval.lm_eval_model import tasks_dir; print(tasks_dir())"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(lib)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert found == str(lib / "moe_lab" / "lm_eval_tasks")

    def tasks(d):
        return sorted(f for f in os.listdir(d) if f.endswith((".yaml", ".py")))

    assert tasks(found) == tasks(os.path.join(repo, "configs", "lm_eval")) != []
