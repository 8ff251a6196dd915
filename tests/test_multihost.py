"""Multi-host, simulated: 2 local processes x 4 CPU devices with a localhost
coordinator train and checkpoint like 1 process x 8 devices; checkpoints restore
under another process count and mesh (resharding) and the losses continue."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
from conftest import FAST_COMPILE_FLAGS

from moe_lab.train.metrics import read_metrics

TINY = [
    "--config",
    "configs/tiny.py",
    "--config.model.d_model=32",
    "--config.model.num_layers=1",  # one layer: four processes compile it
    "--config.model.mlp_hidden=64",
    "--config.data.seq_len=32",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=1000",
    "--config.eval.at_end=false",
    "--config.train.checkpoint_every=3",
    "--config.train.progress=false",
    # constant LR: the runs compared below differ in their total step count
    "--config.train.schedule=constant",
    "--config.train.warmup_steps=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(workdir, steps, extra=()):
    return [
        sys.executable,
        "-m",
        "moe_lab",
        "train",
        *TINY,
        "--workdir",
        str(workdir),
        f"--config.train.steps={steps}",
        *extra,
    ]


def _env(devices):
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _run(cmd, devices):
    r = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def _two_processes(workdir, steps, extra=()):
    """Two local processes x 4 CPU devices with a localhost coordinator."""
    port = _free_port()
    return [
        subprocess.Popen(
            _cmd(
                workdir,
                steps,
                [
                    "--coordinator",
                    f"localhost:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                    *extra,
                ],
            ),
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_match_one_stop_together_and_reshard(tmp_path):
    """2 processes x 4 devices (fsdp=2) log the losses of 1 process x 8 devices; a
    SIGTERM to host 1 alone stops both at the same step, saved together (preemption
    notices reach hosts at different moments: they agree at the next log step, where
    a host leaving alone would hang the others in the collective save); that
    checkpoint resumes on 1 process, 1 device (resharded) and the losses continue."""
    import signal
    import time

    two = tmp_path / "two"
    procs = _two_processes(two, 2000, ["--config.mesh.fsdp=2"])
    try:
        t0 = time.time()
        while not (two / "metrics.jsonl").exists() or max(_losses(two), default=0) < 4:
            assert time.time() - t0 < 240 and procs[0].poll() is None, "no progress"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # host 1 only
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "SIGTERM on another host: saving step" in outs[0]
    assert "summary:" in outs[0] and "summary:" not in outs[1]  # only process 0 reports
    l2 = _losses(two)
    stop = max(l2)
    saved = sorted(int(s) for s in os.listdir(two / "checkpoints") if s.isdigit())
    assert saved[-1] == stop < 2000 and sorted(l2) == list(range(1, stop + 1))
    one = tmp_path / "one"
    _run(_cmd(one, stop + 3, ["--config.mesh.fsdp=2"]), 8)
    l1 = _losses(one)
    np.testing.assert_allclose(
        [l2[s] for s in range(1, stop + 1)], [l1[s] for s in range(1, stop + 1)], rtol=1e-5
    )
    shutil.copytree(two, tmp_path / "resharded")
    _run(_cmd(tmp_path / "resharded", stop + 3, ["--config.mesh.fsdp=1", "--config.mesh.data=-1"]), 1)
    lr = _losses(tmp_path / "resharded")
    after = range(stop + 1, stop + 4)
    np.testing.assert_allclose([lr[s] for s in after], [l1[s] for s in after], rtol=1e-5)
