"""Attention kernels' memory and speed (layers/attention_kernels.py), from XLA's own
compiled memory analysis (nothing runs out of memory to find out).

- layer: fwd+bwd of one attention call (B 1, 8 heads, 4 kv heads, head dim 64) at
  T = 2048 and 8192 for each implementation that runs on this backend: the
  temporaries XLA plans.  Targets: chunked at T = 8192 needs <= 1/8 of xla's, and
  grows at most 5x from T = 2048 to 8192 (linear in T is 4x; xla's scores grow 16x).
- train step: a whole train step (d 256, 2 layers, batch 1) at T = 8192, compiled
  with xla and chunked attention: its planned temporaries, and the host memory it
  has against them (xla's plan exceeding it is "runs out of memory").
- time: fwd+bwd ms at T = 1024, chunked over xla (CPU pays for the chunking loop;
  reported, no target).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from moe_lab.accounting.timing import time_fn
from moe_lab.bench.common import print_targets, target
from moe_lab.bench.train_step import _config, _jitted_step, _random_batch
from moe_lab.layers.attention import self_attention_mask
from moe_lab.layers.attention_kernels import attend, attention_impl_error

H, G, K = 8, 4, 64
MIB = 2**20


def _runnable() -> list[str]:
    return [
        i for i in ("xla", "chunked", "tokamax", "cudnn") if attention_impl_error(i, "bfloat16", K) is None
    ]


def _layer_grad(impl: str, T: int, dtype):
    def loss(q, k, v, seg):
        out = attend(q, k, v, self_attention_mask(seg, seg.shape), impl)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    q = jax.ShapeDtypeStruct((1, T, H, K), dtype)
    kv = jax.ShapeDtypeStruct((1, T, G, K), dtype)
    seg = jax.ShapeDtypeStruct((1, T), jnp.int32)
    return f, f.lower(q, kv, kv, seg).compile()


def _layer_inputs(T: int, dtype):
    ks = jax.random.split(jax.random.key(0), 3)
    seg = jnp.ones((1, T), jnp.int32)
    return (
        jax.random.normal(ks[0], (1, T, H, K), dtype),
        jax.random.normal(ks[1], (1, T, G, K), dtype),
        jax.random.normal(ks[2], (1, T, G, K), dtype),
        seg,
    )


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def run(quick: bool = False) -> dict:
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    impls = _runnable()
    lengths = (256, 1024) if quick else (2048, 8192)
    layer = {
        i: {T: _layer_grad(i, T, dtype)[1].memory_analysis().temp_size_in_bytes / MIB for T in lengths}
        for i in impls
    }
    short, long = lengths
    # a whole train step at the long length, compiled only
    step = {}
    for impl in ("xla", "chunked"):
        cfg = _config(64 if quick else 256, 2, 4, 2, long, 1)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))
        setup, fn = _jitted_step(cfg)
        state = setup.init_state()
        compiled = fn.lower(state, _random_batch(cfg)).compile()
        step[impl] = compiled.memory_analysis().temp_size_in_bytes / MIB
    T_time = 256 if quick else 1024
    times = {}
    for impl in ("xla", "chunked"):
        f, _ = _layer_grad(impl, T_time, dtype)
        times[impl] = time_fn(f, *_layer_inputs(T_time, dtype), warmup=1, iters=3) * 1e3
    targets = [
        target(
            f"layer fwd+bwd temporaries at T={long}: chunked / xla",
            layer["chunked"][long] / layer["xla"][long],
            1 / 8,
        ),
        target(
            f"chunked temporaries T={long} / T={short} (linear: {long // short})",
            layer["chunked"][long] / layer["chunked"][short],
            1.25 * long / short,
        ),
    ]
    return {
        "name": "attention",
        "backend": jax.default_backend(),
        "dtype": jnp.dtype(dtype).name,
        "layer_temp_mib": {i: {str(T): round(v, 1) for T, v in d.items()} for i, d in layer.items()},
        "train_step_temp_mib": {i: round(v, 1) for i, v in step.items()},
        "train_step_seq_len": long,
        "host_memory_mib": round(_host_memory_bytes() / MIB),
        "fwd_bwd_ms": {i: round(v, 2) for i, v in times.items()},
        "time_seq_len": T_time,
        "targets": targets,
    }


def main_print(r: dict) -> None:
    print(
        f"attention benchmark on {r['backend']} ({r['dtype']}): fwd+bwd temporaries, "
        f"XLA's compiled memory analysis"
    )
    for impl, d in r["layer_temp_mib"].items():
        print(f"  {impl:<8} " + "  ".join(f"T={T}: {v:8.1f} MiB" for T, v in d.items()))
    host = r["host_memory_mib"]
    for impl, v in r["train_step_temp_mib"].items():
        fits = "fits" if not host or v < host else "exceeds"
        print(
            f"  train step T={r['train_step_seq_len']} {impl:<8} {v:9.1f} MiB ({fits} the host's {host} MiB)"
        )
    t = r["fwd_bwd_ms"]
    print(
        f"  fwd+bwd at T={r['time_seq_len']}: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in t.items())
        + f" (chunked / xla {t['chunked'] / t['xla']:.2f})"
    )
    print_targets(r["targets"])
