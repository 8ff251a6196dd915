"""Nothing lost under faults: one writer per run directory (train/run_lock.py), and the
leftovers of killed builders removed by the next one (train/run_dir.py: building)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import run_cli

from moe_lab.config.schema import ConfigError
from moe_lab.train import run_lock
from moe_lab.train.run_dir import building
from moe_lab.train.run_lock import DirLock, lock_path_beside

HOLD = """
import sys, time
from moe_lab.train.run_lock import DirLock
with DirLock(sys.argv[1], "moe-lab train"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """Two processes: a holder of the run's lock, then `moe-lab train` on the same
    workdir, refused in one line naming the holder; after kill -9 of the holder the
    lock is taken over (its PID is gone on this host)."""
    workdir = str(tmp_path / "run")
    lock = lock_path_beside(workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, lock],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run(
            [sys.executable, "-m", "moe_lab", "train", "--config", "configs/tiny.py", "--workdir", workdir],
            capture_output=True,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"in use by moe-lab train (pid {holder.pid} on {socket.gethostname()}" in r.stderr
        assert not os.path.exists(workdir)  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    with DirLock(lock, "moe-lab train", log=said.append):
        assert json.load(open(lock))["pid"] == os.getpid()
        assert said == [
            f"took over the lock of {workdir}: its holder (pid {holder.pid} on "
            f"{socket.gethostname()}) is gone"
        ]
    assert not os.path.exists(lock)  # released


def test_a_lock_whose_heartbeat_stopped_is_stale(tmp_path, monkeypatch):
    """A holder on another host (its PID cannot be checked) holds the lock while its
    heartbeat is fresh; once older than STALE_S the lock is taken over."""
    lock = str(tmp_path / ".run.moe_lab.lock")
    with open(lock, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "what": "moe-lab train", "since": "x"}, f)
    with pytest.raises(ConfigError, match=r"in use by moe-lab train \(pid 1 on elsewhere"):
        DirLock(lock, "moe-lab train").acquire()
    old = time.time() - 2 * run_lock.STALE_S
    os.utime(lock, (old, old))
    said = []
    with DirLock(lock, "moe-lab grow", log=said.append):
        assert "heartbeat" in said[0]


def test_building_removes_the_leftovers_of_killed_builders(tmp_path):
    dst = str(tmp_path / "imported")
    dead = f"{dst}.importing-999999999"
    os.makedirs(os.path.join(dead, "checkpoints"))
    mine = str(tmp_path / "imported.final-2")  # not a builder's: left alone
    os.makedirs(mine)
    said = []
    with building(dst, "importing", log=said.append) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert said == [f"removed {dead}, left by a killed importing"]
    assert sorted(os.listdir(tmp_path)) == ["imported", "imported.final-2"]


def test_usage_errors_are_one_line(capsys):
    for argv, needle in (
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (
            ("prepare", "--input", "x", "--tokenizer", "byte", "--out", "y", "--format", "csv"),
            "argument --format",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and needle in err and "--help" in err


def test_text_with_no_usable_document_is_refused(tmp_path, capsys):
    """tokenizer train and prepare refuse inputs without a document, counting each kind
    of skipped row, and leave nothing behind."""
    (tmp_path / "b.txt").write_bytes(bytes(range(128, 256)) * 40)  # not UTF-8
    code, _, err = run_cli(
        capsys,
        "tokenizer",
        "train",
        "--input",
        str(tmp_path / "b.txt"),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "t.json"),
    )
    assert code == 2 and "no usable text" in err and "not UTF-8" in err, err
    assert not (tmp_path / "t.json").exists()
    rows = ['{"text": 123}', '{"other": "x"}', '{"text": ""}', '{"text": null}']
    (tmp_path / "n.jsonl").write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(
        capsys,
        "prepare",
        "--input",
        str(tmp_path / "n.jsonl"),
        "--tokenizer",
        "byte",
        "--out",
        str(tmp_path / "p"),
        "--workers",
        "1",
    )
    assert code == 2 and err.count("\n") == 1, err
    for said in (
        "1 row whose text is not a string",
        "2 rows without the text field",
        "1 row with an empty text",
    ):
        assert said in err, err
    assert not (tmp_path / "p").exists()


def test_a_failed_prepare_is_replaced_by_the_same_command_on_fixed_inputs(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "one"}\n{"text": "two"\n')  # a broken line
    argv = ("prepare", "--input", str(src), "--tokenizer", "byte", "--out", str(tmp_path / "p"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "invalid JSON" in err
    src.write_text('{"text": "one"}\n{"text": "two"}\n')  # fixed
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "replacing the unfinished prepare" in out, err
    assert json.load(open(tmp_path / "p" / "meta.json"))["documents"] == 2
    src.write_text('{"text": "three"}\n')  # a finished corpus is never replaced
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "holds a prepare of other inputs" in err


def test_unreadable_input_is_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "one"}\n')
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(src) and real(p, mode))
    for argv in (
        ("prepare", "--input", str(src), "--tokenizer", "byte", "--out", str(tmp_path / "p")),
        ("tokenizer", "train", "--input", str(src), "--vocab-size", "300", "--out", str(tmp_path / "t.json")),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err == f"moe-lab: error: --input {src} is not readable (permissions)\n"
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_init_from_refuses_overrides_of_what_it_takes(tmp_path, capsys):
    for override in ("--config.model.vocab_size=1024", "--config.data.tokenizer=tok.json"):
        code, _, err = run_cli(
            capsys,
            "train",
            "--config",
            "configs/tiny.py",
            "--init-from",
            str(tmp_path / "src"),
            override,
            "--workdir",
            str(tmp_path / "f"),
        )
        assert code == 2 and "takes the model and tokenizer of that run" in err, err
    assert not (tmp_path / "f").exists()


SLEEPING_POOL = """
import multiprocessing, os, time
from moe_lab.data import prepare
if __name__ == "__main__":
    pool = multiprocessing.get_context("spawn").Pool(1, **prepare.worker_options())
    pid = pool.apply(os.getpid)
    pool.apply_async(time.sleep, (60,))
    print(pid, flush=True)
    time.sleep(60)
"""


def test_a_busy_prepare_worker_dies_with_its_parent(tmp_path):
    """The pool prepare makes (prepare.worker_options): a worker in the middle of a long
    unit is killed with its parent, not left to finish it."""
    script = tmp_path / "pool.py"
    script.write_text(SLEEPING_POOL)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    worker = int(proc.stdout.readline())
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    deadline = time.time() + 3
    while os.path.exists(f"/proc/{worker}") and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}")
