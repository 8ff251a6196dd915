"""Growth cost: `grow` (depth interposition x2) on a >= 200 MB checkpoint against an
Orbax restore + save of the same checkpoint (the cheapest thing that rewrites it).

Each side runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; the
RSS of a process that only imports moe_lab is subtracted. Targets (issue 4):
time(grow) / time(restore+save) <= 1.5, peak memory <= 2.5 x the grown
checkpoint's size.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from moe_lab.bench.common import print_targets, target
from moe_lab.train.run_dir import CHECKPOINTS  # json/os only: no jax in the parent


def _config(quick: bool):
    from moe_lab.config.schema import Config, DataConfig, MeshConfig, ModelConfig, MoEConfig, TrainConfig
    from moe_lab.train.state import resolve_config

    d = 64 if quick else 256
    moe = MoEConfig(num_experts=8 if quick else 24, top_k=2, expert_hidden=2 * d)
    return resolve_config(
        Config(
            model=ModelConfig(
                d_model=d, num_layers=4, num_heads=4, num_kv_heads=4, ffn="moe", moe=moe, max_seq_len=64
            ),
            data=DataConfig(seq_len=64, mixture="arith:1"),
            train=TrainConfig(steps=10, batch_size=8, async_checkpoint=False),
            mesh=MeshConfig(data=1),
        )
    )


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _make_source(workdir: str, quick: bool) -> None:
    import jax

    from moe_lab.parallel import sharding
    from moe_lab.train.checkpoint import write_checkpoint
    from moe_lab.train.run_dir import config_path, write_json_atomic
    from moe_lab.train.state import make_setup

    cfg = _config(quick)
    setup = make_setup(cfg, sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    state = setup.init_state()
    # Adam moments of a trained run are not zeros (zeros would compress on disk and
    # flatter both sides): fill them like a checkpoint from mid-training.
    key = jax.random.key(1)
    state["opt_state"] = jax.tree.map(
        lambda x: (
            jax.random.normal(key, x.shape, x.dtype) * 1e-3
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
            else x
        ),
        state["opt_state"],
    )
    os.makedirs(workdir)
    write_json_atomic(config_path(workdir), cfg.to_dict())
    write_checkpoint(workdir, 10, state, {"step": 10, "flops_spent": 1.0, "tokens_seen": 1.0})


def _child(mode: str, src: str, dst: str) -> None:
    """Runs one side and prints {"seconds", "maxrss_bytes"}."""
    t0 = time.perf_counter()
    if mode == "restore_save":
        from moe_lab.train.checkpoint import Checkpointer, write_checkpoint

        ck = Checkpointer(src, create=False)
        state = ck.restore_raw()
        meta = ck.restore_meta()
        ck.close()
        write_checkpoint(dst, 10, state, meta)
    elif mode == "grow":
        from moe_lab.growth.grow import grow_run
        from moe_lab.growth.options import DepthGrowth, GrowOptions

        grow_run(src, dst, GrowOptions(depth=DepthGrowth()), verify=False, log=lambda *a: None)
    elif mode == "baseline":
        import moe_lab.growth.grow
        import moe_lab.train.checkpoint  # noqa: F401  (imported for its start-up cost only)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "maxrss_bytes": rss}))


def _run_child(mode: str, src: str, dst: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "moe_lab.bench.growth", "--child", mode, src, dst],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode:
        raise RuntimeError(f"bench growth child '{mode}' failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    tmp = tempfile.mkdtemp(prefix="moe_lab_bench_growth_")
    try:
        src = os.path.join(tmp, "src")
        make = f"from moe_lab.bench.growth import _make_source; _make_source({src!r}, {quick})"
        _run_make = subprocess.run(
            [sys.executable, "-c", make],
            capture_output=True,
            text=True,
            env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
        )
        if _run_make.returncode:
            raise RuntimeError(_run_make.stderr[-2000:])
        base = _run_child("baseline", src, os.path.join(tmp, "none"))
        rs = _run_child("restore_save", src, os.path.join(tmp, "copy"))
        gr = _run_child("grow", src, os.path.join(tmp, "grown"))
        src_bytes = _dir_bytes(os.path.join(src, CHECKPOINTS))
        grown_bytes = _dir_bytes(os.path.join(tmp, "grown", CHECKPOINTS))
        # memory is compared with the grown state's size in memory (params + Adam
        # moments, f32), not its (compressed) size on disk
        from moe_lab.accounting import flops
        from moe_lab.growth.transforms import depth_plan

        grown_cfg = depth_plan(_config(quick), method="interpose", factor=2).cfg
        grown_state_bytes = 3 * 4 * flops.param_counts(grown_cfg.model)["total"]
        grow_mem = gr["maxrss_bytes"] - base["maxrss_bytes"]
        ratio = gr["seconds"] / rs["seconds"]
        return {
            "name": "growth",
            "source_checkpoint_mb": src_bytes / 2**20,
            "grown_checkpoint_mb": grown_bytes / 2**20,
            "grown_state_mb": grown_state_bytes / 2**20,
            "restore_save_seconds": rs["seconds"],
            "grow_seconds": gr["seconds"],
            "restore_save_peak_mb": (rs["maxrss_bytes"] - base["maxrss_bytes"]) / 2**20,
            "grow_peak_mb": grow_mem / 2**20,
            "import_rss_mb": base["maxrss_bytes"] / 2**20,
            "targets": [
                target("time grow / (restore+save)", ratio, 1.5),
                target("grow peak memory / grown state size", grow_mem / grown_state_bytes, 2.5),
            ]
            + ([] if quick else [target("source checkpoint MB", src_bytes / 2**20, 200, at_least=True)]),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_print(r: dict) -> None:
    print(
        f"growth benchmark: source {r['source_checkpoint_mb']:.0f} MB -> grown "
        f"{r['grown_checkpoint_mb']:.0f} MB (depth interpose x2)"
    )
    print(
        f"  restore+save {r['restore_save_seconds']:.2f}s peak +{r['restore_save_peak_mb']:.0f} MB | "
        f"grow {r['grow_seconds']:.2f}s peak +{r['grow_peak_mb']:.0f} MB "
        f"(process after imports: {r['import_rss_mb']:.0f} MB)"
    )
    print_targets(r["targets"])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        main_print(run(quick="--quick" in sys.argv))
