"""The fault pass: kill -9 of prepare, import, grow, export and a sweep at random moments,
then the same command again; its result must equal an uninterrupted run's, byte for byte.

    python experiments/faults/run.py [--kills 3] [--seed 0] [--work /tmp/moe_lab_faults]

Compared: prepare's shards and meta.json; import, grow and export through the HF
export of the result (model.safetensors, config.json, tokenizer files: Orbax's own file
names are random); the sweep's per-point losses (metrics.jsonl) and results rows.  Each
kill lands uniformly in (0.1 s, the clean run's duration); the table gives how many
kills hit each command, how many reruns needed a leftover removed or a lock taken over,
and whether every result was identical.  Writes results.json beside this file.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
MOE_LAB = [sys.executable, "-m", "moe_lab"]


def run(cmd, **kw):
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, **kw)


def timed(cmd) -> float:
    t0 = time.perf_counter()
    r = run(cmd)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def kill_at(cmd, seconds: float) -> bool:
    """Starts cmd, kill -9 after `seconds`; True if it was still running then."""
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and any workers it spawned
        proc.wait()
        return True


def same_tree(a: str, b: str, names=None) -> bool:
    """Every file (or the given names) under a equals b's, byte for byte."""
    names = names or sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names) and bool(
        names
    )


def exported(run_dir: str, out: str) -> str:
    shutil.rmtree(out, ignore_errors=True)
    r = run(MOE_LAB + ["export", "--workdir", run_dir, "--to", out])
    if r.returncode:
        raise SystemExit(f"export of {run_dir} failed: {r.stderr[-1000:]}")
    return out


def losses(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def case(name, clean_cmd, killed_cmd, compare, kills, rng, prepare_target):
    """Clean run once, then `kills` x (kill at a random moment, rerun, compare)."""
    clean_s = timed(clean_cmd)
    rows = []
    for i in range(kills):
        prepare_target()
        at = rng.uniform(0.1, clean_s)
        hit = kill_at(killed_cmd, at)
        r = run(killed_cmd)
        said = r.stdout + r.stderr
        # a command killed after its result was complete (renamed into place) refuses to
        # write over it: the rerun's "not empty" is right, and that result is compared
        done_before = r.returncode == 2 and ("not empty" in said or "exists" in said)
        rows.append(
            {
                "kill_at_s": round(at, 2),
                "killed_mid_run": hit,
                "rerun_rc": r.returncode,
                "result_complete_before_kill": done_before,
                "took_over_lock": "took over the lock" in said,
                "removed_leftover": "left by a killed" in said,
                "rerun_error": r.stderr.strip().splitlines()[-1][:200] if r.returncode else "",
                "identical": (r.returncode == 0 or done_before) and compare(),
            }
        )
        print(f"{name} #{i + 1}: {rows[-1]}", flush=True)
    return {"clean_s": round(clean_s, 1), "runs": rows}


def main() -> int:
    from hf_models import make_hf_model  # tests/hf_models.py: tiny random HF models

    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/moe_lab_faults")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    out = {}

    # prepare: 3 jsonl files, 2 workers
    rows = "".join(json.dumps({"text": f"document {i} " + "word " * 80}) + "\n" for i in range(20000))
    for i in range(3):
        with open(f"{w}/in{i}.jsonl", "w") as f:
            f.write(rows)

    def prep(o):
        return MOE_LAB + [
            "prepare",
            "--input",
            f"{w}/in*.jsonl",
            "--tokenizer",
            "byte",
            "--out",
            f"{w}/{o}",
            "--workers",
            "2",
        ]

    def same_corpus():  # shards and meta.json (units/*.json also hold their seconds)
        names = [n for n in os.listdir(f"{w}/p_clean") if n.endswith(".array_record")]
        return same_tree(f"{w}/p_clean", f"{w}/p", names + ["meta.json"]) and sorted(
            os.listdir(f"{w}/p_clean")
        ) == sorted(os.listdir(f"{w}/p"))

    out["prepare"] = case(
        "prepare",
        prep("p_clean"),
        prep("p"),
        same_corpus,
        args.kills,
        rng,
        lambda: shutil.rmtree(f"{w}/p", ignore_errors=True),
    )

    # import: a tiny Mixtral
    make_hf_model("MixtralForCausalLM", f"{w}/hf")
    imp = lambda o: MOE_LAB + ["import", "--hf", f"{w}/hf", "--to", f"{w}/{o}"]
    out["import"] = case(
        "import",
        imp("i_clean"),
        imp("i"),
        lambda: same_tree(exported(f"{w}/i_clean", f"{w}/ei_clean"), exported(f"{w}/i", f"{w}/ei")),
        args.kills,
        rng,
        lambda: shutil.rmtree(f"{w}/i", ignore_errors=True),
    )

    # grow: the imported model, 2x deeper and 2x wider
    grow = lambda o: (
        MOE_LAB
        + [
            "grow",
            "--from",
            f"{w}/i_clean",
            "--to",
            f"{w}/{o}",
            "--depth",
            "interpose",
            "--width-factor",
            "2",
            "--noise",
            "0.01",
        ]
    )
    out["grow"] = case(
        "grow",
        grow("g_clean"),
        grow("g"),
        lambda: same_tree(exported(f"{w}/g_clean", f"{w}/eg_clean"), exported(f"{w}/g", f"{w}/eg")),
        args.kills,
        rng,
        lambda: shutil.rmtree(f"{w}/g", ignore_errors=True),
    )

    # export
    exp = lambda o: MOE_LAB + ["export", "--workdir", f"{w}/g_clean", "--to", f"{w}/{o}"]
    out["export"] = case(
        "export",
        exp("x_clean"),
        exp("x"),
        lambda: same_tree(f"{w}/x_clean", f"{w}/x"),
        args.kills,
        rng,
        lambda: shutil.rmtree(f"{w}/x", ignore_errors=True),
    )

    # sweep: configs/sparsity_sweep.py:micro at 40 steps
    sw = lambda o: (
        MOE_LAB
        + [
            "sweep",
            "--config",
            "configs/sparsity_sweep.py:micro",
            "--workdir",
            f"{w}/{o}",
            "--config.train.steps=40",
            "--config.train.checkpoint_every=10",
            "--config.train.eval_every=40",
        ]
    )

    def same_sweep():
        a, b = f"{w}/s_clean", f"{w}/s"
        points = sorted(d for d in os.listdir(a) if os.path.isfile(f"{a}/{d}/metrics.jsonl"))
        return bool(points) and all(losses(f"{a}/{p}") == losses(f"{b}/{p}") for p in points)

    out["sweep"] = case(
        "sweep",
        sw("s_clean"),
        sw("s"),
        same_sweep,
        args.kills,
        rng,
        lambda: shutil.rmtree(f"{w}/s", ignore_errors=True),
    )

    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\n| command | clean run s | kills mid-run | identical after rerun |")
    print("|---|---:|---:|---:|")
    for name, c in out.items():
        hits = sum(r["killed_mid_run"] for r in c["runs"])
        same = sum(r["identical"] for r in c["runs"])
        print(f"| {name} | {c['clean_s']} | {hits}/{len(c['runs'])} | {same}/{len(c['runs'])} |")
    return 0 if all(r["identical"] for c in out.values() for r in c["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
