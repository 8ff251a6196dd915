"""Train-step throughput and MFU; compile time against depth.

- tokens/s and MFU (model FLOPs, see accounting/flops.py, over the matmul peak this same
  process measures) for the tiny config and a small dense config (d_model 512,
  8 layers, seq 256). Target: MFU >= 40% for the small dense config on CPU.
- compile time of the train step at 24 layers vs 4 layers: the stack is a scan,
  so the ratio should stay near 1 (target <= 1.5).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from moe_lab.accounting import flops
from moe_lab.accounting.hardware import matmul_peak_flops
from moe_lab.accounting.timing import time_fn
from moe_lab.bench.common import print_targets, target
from moe_lab.config.schema import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from moe_lab.config.validate import validate
from moe_lab.parallel import sharding
from moe_lab.train.state import make_setup, resolve_config
from moe_lab.train.step import make_train_step


def _config(d_model, layers, heads, kv, seq, batch, mlp_hidden=0) -> Config:
    cfg = Config(
        model=ModelConfig(
            d_model=d_model,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            mlp_hidden=mlp_hidden,
            max_seq_len=seq,
        ),
        data=DataConfig(seq_len=seq, mixture="arith:1"),
        train=TrainConfig(steps=1000, batch_size=batch, warmup_steps=10),
        mesh=MeshConfig(data=1),
    )
    return resolve_config(validate(cfg))


def _random_batch(cfg: Config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.integers(3, V, size=(B, T + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((B, T), np.float32),
        "answer_mask": np.zeros((B, T), np.float32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "task_ids": np.zeros((B, T), np.int32),
    }


def _jitted_step(cfg: Config):
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    setup = make_setup(cfg, mesh)
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, cfg, 1, setup.schedule), donate_argnums=0)
    return setup, step


def measure_throughput(cfg: Config, peak: float, iters: int) -> dict:
    setup, step = _jitted_step(cfg)
    state = setup.init_state()
    batch = jax.device_put(_random_batch(cfg))
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        return m["loss"]

    dt = time_fn(run, warmup=2, iters=iters)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    fl = flops.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    return {
        "step_seconds": dt,
        "tokens_per_sec": tokens / dt,
        "flops_per_step": fl,
        "mfu": fl / dt / peak,
        "params": flops.param_counts(cfg.model)["total"],
    }


def compile_seconds(cfg: Config) -> float:
    setup, step = _jitted_step(cfg)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _random_batch(cfg))
    t0 = time.perf_counter()
    step.lower(setup.abstract_state, batch).compile()
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    peak = matmul_peak_flops(512 if quick else 2048)
    tiny = _config(128, 4, 4, 2, 128, 16, mlp_hidden=384)
    small = _config(512, 8, 8, 8, 256, 8) if not quick else _config(128, 2, 4, 4, 64, 2)
    iters = 2 if quick else 5
    res_tiny = measure_throughput(tiny if not quick else small, peak, iters)
    res_small = measure_throughput(small, peak, iters)
    depth = (2, 6) if quick else (4, 24)
    base = dataclasses.replace(small, model=dataclasses.replace(small.model, num_layers=depth[0]))
    deep = dataclasses.replace(small, model=dataclasses.replace(small.model, num_layers=depth[1]))
    c_base, c_deep = compile_seconds(base), compile_seconds(deep)
    return {
        "name": "train-step",
        "backend": jax.default_backend(),
        "matmul_peak_flops": peak,
        "tiny": res_tiny,
        "small_dense": res_small,
        "compile_seconds": {f"{depth[0]}_layers": c_base, f"{depth[1]}_layers": c_deep},
        "targets": [
            target("small dense MFU", res_small["mfu"], 0.40, at_least=True),
            target(f"compile time {depth[1]}/{depth[0]} layers", c_deep / c_base, 1.5),
        ],
    }


def main_print(r: dict) -> None:
    print(f"train-step benchmark on {r['backend']}; matmul peak {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    for k in ("tiny", "small_dense"):
        x = r[k]
        print(
            f"  {k:<12} {x['params'] / 1e6:7.2f}M params  {x['step_seconds'] * 1e3:8.1f} ms/step  "
            f"{x['tokens_per_sec']:9.0f} tok/s  MFU {100 * x['mfu']:.1f}%"
        )
    print("  compile: " + ", ".join(f"{k} {v:.2f}s" for k, v in r["compile_seconds"].items()))
    print_targets(r["targets"])
