"""Benchmarks run end to end at their quick shapes; the host allocator tuning is in effect."""

import os
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.bench_smoke
def test_moe_bench_quick_reports_ratios_from_its_own_measurements():
    from moe_lab.bench import moe

    r = moe.run(quick=True)
    times = {(x["dispatch"], x["experts"]): x["time_s"] for x in r["results"]}
    assert all(t > 0 for t in times.values())
    assert [t["name"] for t in r["targets"]] == [
        "capacity time(E=8)/time(E=4)",
        "dropless time(E=8)/time(E=4)",
        "capacity(E=4)/dense",
        "dropless(E=4)/dense",
        "dropless E=8/E=4 over the ideal layer's",
        "dropless(E=4)/HF(E=4)",  # the dev extras install transformers: the peer runs
        "dropless(E=8)/HF(E=8)",
    ]
    assert times[("torch", 4)] > 0 and r["peer"]["transformers"]
    # the breakdown: each stage timed, the rest is what the layer spends beyond them
    for e in (4, 8):
        b = r["breakdown_ms"][e]
        assert all(b[st] > 0 for st in moe.STAGES) and b["router"] == round(1e3 * times[("f32", e)], 2)
        assert b["rest"] == pytest.approx(b["layer"] - sum(b[st] for st in moe.STAGES), abs=0.02)
    assert all(0 < t["value"] < 100 and t["ok"] == (t["value"] <= t["limit"]) for t in r["targets"])
    assert 0 < r["floor_ratio"] < 100 and 0 < r["ideal_ratio"] < 100
    assert times[("f32", 4)] > 0 and times[("f32", 8)] > 0  # the router alone, timed
    assert r["router_share"] == pytest.approx(
        (times[("f32", 8)] - times[("f32", 4)]) / times[("capacity", 4)], abs=1e-4
    )
    for t in r["targets"]:  # the median of the pairs, inside their interquartile range
        assert "iqr" not in t or (t["pairs"] == 3 and t["iqr"][0] <= t["value"] <= t["iqr"][1])
    assert all(v > 0 for v in r["copy_bandwidth_gbs"].values())


def test_spread_and_target_judge_the_median_and_keep_the_range():
    from moe_lab.bench import common

    st = common.spread([1.0, 1.2, 1.4, 2.0, 9.0])
    assert (st["median"], st["q25"], st["q75"], st["pairs"]) == (1.4, 1.2, 2.0, 5)
    t = common.target("x", st, 1.3)
    assert (t["value"], t["ok"], t["iqr"]) == (1.4, False, [1.2, 2.0])
    assert common.target("x", st, 1.5)["ok"] and common.target("y", 1.4, 1.3)["ok"] is False


def test_paired_ratio_measures_the_ratio_of_two_functions(monkeypatch):
    """On a fake clock the functions advance by 3 and 1 units (plus drift that both
    members of a pair share): the paired ratio is exactly 3 despite the drift."""
    from moe_lab.bench import common

    clock = {"t": 0.0, "calls": 0}

    def run(cost):
        def fn():
            clock["calls"] += 1
            clock["t"] += cost * (1 + (clock["calls"] - 1) // 2)  # load grows pair by pair

        return fn, ()

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["t"])
    assert common.paired_ratio(run(3.0), run(1.0), pairs=5) == pytest.approx(3.0)
    assert common.paired_ratio(run(1.0), run(3.0), pairs=4) == pytest.approx(1 / 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_host_allocator_tuned_by_the_entry_point_not_on_import_and_opt_out():
    # train tunes it (a config file that does not exist: it stops right after); prepare,
    # a host-only command, does not
    code = (
        "import moe_lab.parallel.host_allocator as h, moe_lab; assert h._applied is None; "
        "from moe_lab.cli.main import main; main(['prepare', '--input', 'nothing*', "
        "'--out', 'x']); assert h._applied is None; "
        "main(['train', '--config', 'nope.py', '--workdir', 'x']); print(h._applied)"
    )
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = {**os.environ, "MOE_LAB_SYSTEM_MALLOC": "1"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert on.stdout.strip() == "True"
    assert off.stdout.strip() == "False"


@pytest.mark.bench_smoke
def test_attention_bench_quick_reports_compiled_memory_per_implementation():
    from moe_lab.bench import attention

    r = attention.run(quick=True)
    assert {"xla", "chunked", "tokamax"} <= set(r["layer_temp_mib"])
    assert all(v > 0 for d in r["layer_temp_mib"].values() for v in d.values())
    assert set(r["train_step_temp_mib"]) == {"xla", "chunked"}
    assert all(t["ok"] == (t["value"] <= t["limit"]) for t in r["targets"])


@pytest.mark.bench_smoke
def test_decode_bench_quick_reports_paired_speedups_and_kv_ratios():
    from moe_lab.bench import decode

    r = decode.run(quick=True, d_model=64, batch=4, new_tokens=4, fit_steps=2)
    assert set(r["models"]) == {"vanilla", "vanilla_plain_path", "mor_recursion_wise", "mor_kv_shared"}
    assert all(m["tokens_per_sec"] > 0 and m["end_to_end_tokens_per_sec"] > 0 for m in r["models"].values())
    for key in ("speedup_recursion_wise", "speedup_kv_shared", "speedup_kv_shared_equal_kv_memory"):
        assert 0.05 < r[key] < 20
    # KV sharing stores step 1's KV only: 1/N_r of the recursive part, half the buffers
    assert r["models"]["mor_kv_shared"]["kv_stored_ratio_recursive_part"] == pytest.approx(1 / 3)
    assert r["kv_alloc_ratio_shared"] == pytest.approx(0.5)
    assert [
        t["ok"] == (t["value"] >= t["limit"] if t["op"] == ">=" else t["value"] <= t["limit"])
        for t in r["targets"]
    ] == [True] * 4


@pytest.mark.bench_smoke
def test_data_bench_quick_measures_prepare_iterator_and_startup():
    from moe_lab.bench import data

    r = data.run(quick=True)
    assert 8 < r["tokens_big"] / r["tokens_small"] < 12 and r["prepare_shards"] >= 1  # 10x docs
    for key in (
        "encode_tokens_per_sec",
        "prepare_tokens_per_sec",
        "iterator_tokens_per_sec",
        "iterator_workers2_tokens_per_sec",
        "train_step_tokens_per_sec",
    ):
        assert r[key] > 0, key
    for k in ("startup_small", "startup_big"):
        assert r[k]["seconds"] > 0 and r[k]["rss_kib"] > 0
    # each target is the ratio of this run's own measurements
    prep_tps, enc = r["prepare_tokens_per_sec"], r["encode_tokens_per_sec"]
    ratios = [
        prep_tps / enc,
        r["iterator_tokens_per_sec"] / r["train_step_tokens_per_sec"],
        r["startup_big"]["seconds"] / r["startup_small"]["seconds"],
        r["startup_big"]["rss_kib"] / r["startup_small"]["rss_kib"],
    ]
    assert [t["value"] for t in r["targets"]] == pytest.approx(ratios, abs=1e-4)


@pytest.mark.bench_smoke
def test_interop_bench_quick_measures_import_and_export_against_baselines():
    from moe_lab.bench import interop

    r = interop.run(quick=True, pairs=2)
    for case in ("read+save", "import", "restore+save", "export"):
        assert r[case]["seconds"] > 0 and r[case]["peak"] >= r[case]["base"] > 0, case
        assert len(r[case]["all_seconds"]) == 2
    # each target is a ratio of this run's own measurements: times paired run by run
    nbytes = r["checkpoint_bytes"]
    for case, base, key in (
        ("import", "read+save", "import_time_ratios"),
        ("export", "restore+save", "export_time_ratios"),
    ):
        assert r[key] == pytest.approx(
            [a / b for a, b in zip(r[case]["all_seconds"], r[base]["all_seconds"], strict=True)]
        )
    ratios = [
        float(np.median(r["import_time_ratios"])),
        (r["import"]["peak"] - r["import"]["base"]) / nbytes,
        float(np.median(r["export_time_ratios"])),
        (r["export"]["peak"] - r["export"]["base"]) / nbytes,
    ]
    assert [t["value"] for t in r["targets"]] == pytest.approx(ratios, abs=1e-4)


def test_every_bench_result_names_the_commit_it_ran_on():
    from moe_lab.bench import common

    p = common.provenance()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert p["commit"] == head.stdout.strip() and isinstance(p["dirty"], bool)
    else:
        assert p["commit"].startswith("unknown")
    assert p["date"].endswith("Z") and p["jax"] and p["host_cores"] >= 1
