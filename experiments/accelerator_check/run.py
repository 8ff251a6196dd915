"""Accelerator check: the GPU/TPU dispatch kernels against the reference, and train-step MFU.

The CPU test suite runs the accelerator kernels (`ragged_dot`, blocks, [E, C, D]
buffers) on CPU only.  This script runs them on the machine's default backend:

1. correctness: every token-choice / expert-choice dispatch implementation vs
   `reference_moe` (outputs and gradients w.r.t. tokens, gates and expert
   weights), in f32 at HIGHEST matmul precision (expected rel. error ~1e-6)
   and with bf16 operands against the f32 reference (expected ~1e-2).  Errors
   are ||got - ref|| / ||ref|| computed in float64 on the host.  Capacity cases
   with drops compare against the reference with the dropped assignments'
   gates zeroed (the layout's keep mask).  Each case prints as it finishes
   (compiling one took 20-45 s on an H100).
2. (not on CPU) the expert SwiGLU kernels alone, fwd+bwd, at E = 8 and 256:
   ragged_dot, blocks, buffers; "inf" where XLA runs out of memory.
3. attention (layers/attention_kernels.py): every implementation that runs on the
   backend (xla, chunked, tokamax, cudnn) against xla on packed rows with GQA,
   outputs and gradients (f32 and bf16), then fwd+bwd time and XLA's planned
   temporaries at T = 4096 and 8192 ("inf" where one runs out of memory).
4. train-step throughput and MFU of a dense and an MoE decoder (bf16 compute),
   MFU = model FLOPs (moe_lab/accounting/flops.py: 6 x active params + attention) over
   the bf16 matmul rate this process measures on random 8192^3 operands and over
   the chip's datasheet bf16 peak.  full: the issue's two configs for one 80 GB
   GPU: dense d 2048, 16 layers, seq 4096 (the flash path: attention_impl auto);
   MoE d 1024, 64 experts of 512, top-8, 16 layers, dropless (kernel auto).

    python experiments/accelerator_check/run.py [--out check.json] [--skip-mfu]
        [--skip-kernels] [--skip-attention] [--cases blocks] [--mfu-size tiny]

Exit code 1 if any correctness case exceeds its tolerance.  What it printed on
an H100 is in README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_lab.accounting import flops
from moe_lab.accounting.hardware import peak_flops_per_device
from moe_lab.accounting.timing import time_fn
from moe_lab.bench.train_step import measure_throughput
from moe_lab.config.schema import Config, DataConfig, MeshConfig, ModelConfig, MoEConfig, TrainConfig
from moe_lab.config.validate import validate
from moe_lab.layers.attention import self_attention_mask
from moe_lab.layers.attention_kernels import attend, attention_impl_error
from moe_lab.layers.moe_kernels.accelerator import (
    buffer_swiglu,
    grouped_swiglu_blocks,
    grouped_swiglu_ragged,
    grouped_swiglu_tokamax,
)
from moe_lab.layers.moe_kernels.dispatch import expert_choice_moe, token_choice_moe
from moe_lab.layers.moe_kernels.layout import choose_block
from moe_lab.layers.moe_kernels.reference import dense_gates, reference_moe
from moe_lab.train.state import resolve_config

TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _problem(seed: int, n: int, d: int, f: int, e: int, k: int):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x_ND = jax.random.normal(keys[0], (n, d))
    probs_NE = jax.nn.softmax(2.0 * jax.random.normal(keys[1], (n, e)))
    gate_NK, expert_NK = jax.lax.top_k(probs_NE, k)
    weights = (
        jax.random.normal(keys[2], (e, d, f)) / math.sqrt(d),
        jax.random.normal(keys[3], (e, d, f)) / math.sqrt(d),
        jax.random.normal(keys[4], (e, f, d)) / math.sqrt(f),
    )
    ct_ND = jax.random.normal(keys[5], (n, d))  # cotangent: sum(y * ct) as the loss
    return x_ND, gate_NK, expert_NK.astype(jnp.int32), weights, ct_ND, probs_NE


def _value_and_grads(fn, x_ND, gate, weights, ct_ND, dtype):
    def loss(x_ND, gate, weights):
        cast = lambda a: a.astype(dtype)
        y_ND = fn(cast(x_ND), cast(gate), tuple(cast(w) for w in weights))
        return jnp.sum(y_ND.astype(jnp.float32) * ct_ND), y_ND.astype(jnp.float32)

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x_ND, gate, weights)
    return [y, grads[0], grads[1], *grads[2]]


def check_dispatch(seed: int = 0, only: str = ""):
    """Every dispatch impl vs the reference on the default backend."""
    n, d, f, e, k = 2048, 128, 256, 16, 2
    x_ND, gate_NK, expert_NK, weights, ct_ND, probs_NE = _problem(seed, n, d, f, e, k)
    tight = int(math.ceil(1.0 * n * k / e))  # capacity factor 1.0: some drops
    names = ("y", "dx", "dgate", "dw_gate", "dw_up", "dw_down")
    cases = []
    for impl, capacity in (
        ("tokamax", None),
        ("ragged", None),
        ("blocks", None),
        ("loop", None),
        ("buffer", n),
        ("buffer", tight),
        ("loop", tight),
    ):
        keep_NK = jax.jit(
            lambda x, g, w, impl=impl, capacity=capacity: (
                token_choice_moe(x, expert_NK, g, w, capacity=capacity, impl=impl)[1].keep_NK
            )
        )(x_ND, gate_NK, weights)

        def fast(x, g, w, impl=impl, capacity=capacity):
            return token_choice_moe(x, expert_NK, g, w, capacity=capacity, impl=impl)[0]

        def ref(x, g, w, keep_NK=keep_NK):
            return reference_moe(x, dense_gates(expert_NK, g * keep_NK.astype(g.dtype), e), *w)

        label = f"token choice {impl}, " + ("dropless" if capacity is None else f"C={capacity}")
        cases.append((label, fast, ref, gate_NK, float(jnp.mean(~keep_NK))))
    # expert choice: each expert's top-C tokens by probability
    cap = int(math.ceil(n * k / e))
    gate_EC, token_EC = jax.lax.top_k(probs_NE.T, cap)
    for impl in ("buffer", "loop"):

        def fast(x, g, w, impl=impl):
            return expert_choice_moe(x, token_EC, g, w, impl=impl)

        def ref(x, g, w):
            gates_NE = jnp.zeros((n, e), g.dtype).at[token_EC, jnp.arange(e)[:, None]].add(g)
            return reference_moe(x, gates_NE, *w)

        cases.append((f"expert choice {impl}", fast, ref, gate_EC, 0.0))

    with jax.default_matmul_precision("highest"):
        for label, fast, ref, gate, dropped in cases:
            if only not in label:
                continue
            want = _value_and_grads(ref, x_ND, gate, weights, ct_ND, jnp.float32)
            for dtype in ("float32", "bfloat16"):
                t0 = time.perf_counter()
                got = _value_and_grads(fast, x_ND, gate, weights, ct_ND, jnp.dtype(dtype))
                errs = {nm: _rel_err(g, w) for nm, g, w in zip(names, got, want)}
                worst = max(errs.values())
                yield {
                    "case": label,
                    "dtype": dtype,
                    "dropped": dropped,
                    **errs,
                    "max": worst,
                    "ok": worst <= TOL[dtype],
                    "seconds": time.perf_counter() - t0,
                }


def _time_or_oom(fn, *args) -> float:
    """Median ms, or inf where XLA runs out of memory (ragged_dot's dense rewrite)."""
    try:
        return 1e3 * time_fn(fn, *args, warmup=2, iters=10)
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return float("inf")


def kernel_times(rows: int = 32768, d: int = 256, f: int = 512):
    """fwd+bwd ms of the expert kernels alone, E in (8, 256), at the routing a
    balanced router gives (N*K/E rows per expert), plus the whole layer's
    dispatch for blocks (real sort, gather, combine)."""
    for dtype in (jnp.bfloat16, jnp.float32):
        for e in (8, 256):
            keys = jax.random.split(jax.random.PRNGKey(e), 4)
            x_SD = jax.random.normal(keys[0], (rows, d), dtype)
            w = tuple(
                0.05 * jax.random.normal(k, sh, dtype)
                for k, sh in zip(keys[1:], ((e, d, f), (e, d, f), (e, f, d)))
            )
            sizes_E = jnp.full((e,), rows // e, jnp.int32)
            block = choose_block(rows, e)
            block_expert_J = jnp.repeat(jnp.arange(e, dtype=jnp.int32), rows // e // block)

            def grad_of(kernel):
                return jax.jit(
                    jax.grad(lambda x, w: jnp.sum(kernel(x, w).astype(jnp.float32)), argnums=(0, 1))
                )

            kernels = {
                "tokamax": lambda x, w: grouped_swiglu_tokamax(x, sizes_E, *w),
                "ragged": lambda x, w: grouped_swiglu_ragged(x, sizes_E, *w),
                "blocks": lambda x, w: grouped_swiglu_blocks(x, block_expert_J, *w),
                "buffer": lambda x, w: buffer_swiglu(x.reshape(e, -1, d), *w),
            }
            row = {"dtype": jnp.dtype(dtype).name, "experts": e, "block": block}
            for name, kernel in kernels.items():
                row[f"{name}_ms"] = _time_or_oom(grad_of(kernel), x_SD, w)
            yield row


def _attention_problem(T: int, dtype, b: int = 1, h: int = 16, g: int = 8, k: int = 128):
    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(keys[0], (b, T, h, k), dtype)
    kv = [jax.random.normal(kk, (b, T, g, k), dtype) for kk in keys[1:3]]
    seg = jnp.where(jnp.arange(T) < 5 * T // 8, 1, 2)[None].repeat(b, 0).astype(jnp.int32)
    ct = jax.random.normal(keys[3], q.shape, jnp.float32)
    return q, *kv, seg, ct


def _attention_vag(impl: str):
    def loss(q, k, v, seg, ct):
        out = attend(q, k, v, self_attention_mask(seg, seg.shape), impl)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def attention_impls() -> list[str]:
    return [
        i for i in ("xla", "chunked", "tokamax", "cudnn") if attention_impl_error(i, "bfloat16", 128) is None
    ]


def check_attention(T: int = 1024):
    """Each implementation vs xla (f32 at HIGHEST; bf16 vs the f32 reference)."""
    with jax.default_matmul_precision("highest"):
        q, k, v, seg, ct = _attention_problem(T, jnp.float32)
        (_, want), want_g = _attention_vag("xla")(q, k, v, seg, ct)
        for impl in attention_impls():
            for dtype in ("float32", "bfloat16"):
                if impl == "cudnn" and dtype == "float32":
                    continue  # cuDNN flash attention is a half-precision kernel
                cast = [x.astype(dtype) for x in (q, k, v)]
                (_, got), got_g = _attention_vag(impl)(*cast, seg, ct)
                errs = {
                    "y": _rel_err(got, want),
                    **{f"d{n}": _rel_err(a, b) for n, a, b in zip("qkv", got_g, want_g)},
                }
                worst = max(errs.values())
                yield {
                    "case": f"attention {impl}",
                    "dtype": dtype,
                    "dropped": 0.0,
                    "dx": errs["dq"],
                    "dgate": errs["dk"],
                    "dw_gate": errs["dv"],
                    "dw_up": 0.0,
                    "dw_down": 0.0,
                    "y": errs["y"],
                    "max": worst,
                    "ok": worst <= TOL[dtype],
                    "seconds": 0.0,
                }


def attention_times(lengths=(4096, 8192)):
    """fwd+bwd ms and XLA's planned temporaries (MiB) per implementation, bf16."""
    for T in lengths:
        args = _attention_problem(T, jnp.bfloat16)
        row = {"seq_len": T}
        for impl in attention_impls():
            f = _attention_vag(impl)
            try:
                temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20
            except jax.errors.JaxRuntimeError:
                temp = float("inf")
            row[f"{impl}_temp_mib"] = temp
            row[f"{impl}_ms"] = _time_or_oom(f, *args)
        yield row


# MFU model sizes.  full: the two configs of issue 22 for one 80 GB GPU: dense d 2048,
# 16 layers, seq 4096 with the flash path (attention_impl auto: cuDNN on GPU); MoE
# d 1024, 64 experts of hidden 512 (top-8; 1.7B params, 27 GB with Adam), 16 layers,
# dropless (kernel auto: tokamax on accelerators).  small: the sizes of the first H100
# lease (d 1024, 16 layers, seq 1024; MoE 32 experts of 512, top-2).  tiny: the same
# code paths in seconds on CPU.
MFU_SIZES = {
    "full": {
        "dense": dict(d=2048, layers=16, heads=16, kv=8, seq=4096, batch=2),
        "moe": dict(d=1024, layers=16, heads=16, kv=8, seq=4096, batch=2, experts=64, hidden=512, top_k=8),
        "vocab": 32768,
        "peak_n": 8192,
        "iters": 5,
    },
    "small": {
        "dense": dict(d=1024, layers=16, heads=16, kv=8, seq=1024, batch=8),
        "moe": dict(d=1024, layers=16, heads=16, kv=8, seq=1024, batch=8, experts=32, hidden=512, top_k=2),
        "vocab": 32768,
        "peak_n": 8192,
        "iters": 10,
    },
    "tiny": {
        "dense": dict(d=64, layers=2, heads=4, kv=2, seq=64, batch=2),
        "moe": dict(d=64, layers=2, heads=4, kv=2, seq=64, batch=2, experts=4, hidden=32, top_k=2),
        "vocab": 512,
        "peak_n": 256,
        "iters": 2,
    },
}


def _mfu_config(ffn: str, size: dict) -> Config:
    z = size[ffn]
    moe = MoEConfig(
        num_experts=z.get("experts", 8),
        top_k=z.get("top_k", 2),
        expert_hidden=z.get("hidden", 0),
        dispatch="dropless",
        router="softmax_topk",
    )
    cfg = Config(
        model=ModelConfig(
            vocab_size=size["vocab"],
            d_model=z["d"],
            num_layers=z["layers"],
            num_heads=z["heads"],
            num_kv_heads=z["kv"],
            max_seq_len=z["seq"],
            compute_dtype="bfloat16",
            ffn=ffn,
            moe=moe,
        ),
        data=DataConfig(seq_len=z["seq"], mixture="arith:1"),
        train=TrainConfig(steps=1000, batch_size=z["batch"], warmup_steps=10),
        mesh=MeshConfig(data=1),
    )
    return resolve_config(validate(cfg))


def bf16_peak(n: int = 8192) -> float:
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.PRNGKey(0), 2))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(f, a, b, warmup=3, iters=10)


def check_mfu(size: str = "full") -> dict:
    z = MFU_SIZES[size]
    peak = bf16_peak(z["peak_n"])
    sheet, how = peak_flops_per_device("bfloat16")  # what `moe-lab train` reports MFU against
    out = {
        "bf16_matmul_peak_tflops": peak / 1e12,
        "size": size,
        "train_peak_tflops": sheet / 1e12,
        "train_peak_source": how,
    }
    for ffn in ("dense", "moe"):
        cfg = _mfu_config(ffn, z)
        print(
            f"  {ffn}: d {cfg.model.d_model}, {cfg.model.num_layers} layers, seq "
            f"{cfg.data.seq_len}, batch {cfg.train.batch_size}",
            flush=True,
        )
        r = measure_throughput(cfg, peak, iters=z["iters"])
        r["active_params"] = flops.param_counts(cfg.model)["active"]
        r["mfu_vs_train_peak"] = r["mfu"] * peak / sheet
        out[ffn] = r
        print(
            f"  {ffn:<6} {r['params'] / 1e6:7.1f}M params ({r['active_params'] / 1e6:.1f}M "
            f"active)  {1e3 * r['step_seconds']:8.1f} ms/step  {r['tokens_per_sec']:9.0f} "
            f"tok/s  MFU {100 * r['mfu']:.1f}% of measured, "
            f"{100 * r['mfu_vs_train_peak']:.1f}% of {how}",
            flush=True,
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="")
    p.add_argument("--skip-mfu", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--mfu-size", default="full", choices=sorted(MFU_SIZES))
    p.add_argument("--cases", default="", help="only dispatch cases whose label contains this")
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()}: {jax.devices()}")
    print("dispatch vs reference: rel. L2 errors of outputs and gradients (s: compile + run)")
    print(f"  {'case':<34}{'dtype':<10}{'dropped':>8}{'y':>10}{'dx':>10}{'dgate':>10}{'dW max':>10}{'s':>6}")
    rows = []
    for r in check_dispatch(only=args.cases):  # printed as they come: a slow kernel shows where it is
        rows.append(r)
        dw = max(r["dw_gate"], r["dw_up"], r["dw_down"])
        print(
            f"  {r['case']:<34}{r['dtype']:<10}{r['dropped']:>8.3f}{r['y']:>10.2e}"
            f"{r['dx']:>10.2e}{r['dgate']:>10.2e}{dw:>10.2e}{r['seconds']:>6.1f}  "
            f"{'OK' if r['ok'] else 'FAIL'}",
            flush=True,
        )
    if not args.skip_attention:
        for r in check_attention(256 if jax.default_backend() == "cpu" else 1024):
            rows.append(r)
            print(
                f"  {r['case']:<34}{r['dtype']:<10}{'':>8}{r['y']:>10.2e}{r['dx']:>10.2e}"
                f"{r['dgate']:>10.2e}{r['dw_gate']:>10.2e}{'':>6}  "
                f"{'OK' if r['ok'] else 'FAIL'}  (columns: out, dq, dk, dv)",
                flush=True,
            )
    result = {"backend": jax.default_backend(), "dispatch": rows, "kernels": [], "attention": []}
    on_cpu = jax.default_backend() == "cpu"  # ragged_dot on CPU is a dense loop: skip
    if not (on_cpu or args.skip_kernels):
        print("expert SwiGLU alone, fwd+bwd (ms), 32768 rows, d 256, F 512, balanced groups")
        for r in kernel_times():
            result["kernels"].append(r)
            print(
                f"  {r['dtype']:<9} E={r['experts']:<4} ragged_dot {r['ragged_ms']:8.2f}  "
                f"blocks(b={r['block']}) {r['blocks_ms']:8.2f}  [E, C, D] buffers "
                f"{r['buffer_ms']:8.2f}",
                flush=True,
            )
    if not (on_cpu or args.skip_attention):
        print(
            "attention fwd+bwd, bf16, B 1, 16 heads, 8 kv heads, head dim 128, 2 segments: "
            "ms and planned temporaries (MiB)"
        )
        for r in attention_times():
            result["attention"].append(r)
            print(
                f"  T={r['seq_len']:<6}"
                + "  ".join(
                    f"{i} {r[f'{i}_ms']:8.2f} ms {r[f'{i}_temp_mib']:9.0f} MiB" for i in attention_impls()
                ),
                flush=True,
            )
    if not args.skip_mfu:
        print(
            f"train step ({args.mfu_size}), bf16 compute; MFU against the bf16 matmul rate measured now",
            flush=True,
        )
        result["mfu"] = check_mfu(args.mfu_size)
        print(f"  bf16 matmul peak {result['mfu']['bf16_matmul_peak_tflops']:.1f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=float)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
