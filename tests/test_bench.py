"""Benchmarks run end to end at their quick shapes; the host allocator tuning is in effect."""

import os
import subprocess
import sys

import pytest


def test_moe_bench_quick_reports_ratios_from_its_own_measurements():
    from moe_lab.bench import moe

    r = moe.run(quick=True)
    times = {(x["dispatch"], x["experts"]): x["time_s"] for x in r["results"]}
    assert all(t > 0 for t in times.values())
    cap = next(t for t in r["targets"] if t["name"].startswith("capacity time"))
    assert cap["value"] == pytest.approx(times[("capacity", 8)] / times[("capacity", 4)], rel=1e-3)
    assert r["floor_ratio"] == pytest.approx(times[("balanced", 8)] / times[("balanced", 4)], rel=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_host_allocator_tuned_on_import_and_opt_out():
    code = "import moe_lab.host_allocator as h, moe_lab; print(h._applied)"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = {**os.environ, "MOE_LAB_SYSTEM_MALLOC": "1"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert on.stdout.strip() == "True"
    assert off.stdout.strip() == "False"
