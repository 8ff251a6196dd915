"""experiments/accelerator_check/run.py, the script run on GPU hosts, keeps working
(on CPU here: its dispatch-vs-reference table for the GPU dropless kernel, and
its train-step MFU path at a tiny size)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "accelerator_check" / "run.py"


@pytest.mark.bench_smoke
def test_accelerator_check_runs_and_reports(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "check.json"
    assert mod.main(["--cases", "blocks", "--mfu-size", "tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["dispatch"] if r["case"].startswith("token choice")]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    attention = {(r["case"], r["dtype"]): r for r in result["dispatch"] if "attention" in r["case"]}
    assert {c for c, _ in attention} == {"attention xla", "attention chunked", "attention tokamax"}
    assert all(r["ok"] for r in attention.values())
    assert rows[0]["max"] < 1e-5 < rows[1]["max"] < 3e-2  # f32 exact-ish, bf16 rounding
    assert "token choice blocks, dropless" in capsys.readouterr().out
    for ffn in ("dense", "moe"):  # the MFU path runs end to end (tiny model, CPU)
        assert 0 < result["mfu"][ffn]["mfu"] < 1
    moe = result["mfu"]["moe"]
    assert moe["active_params"] < moe["params"]  # top-2 of 4 experts
