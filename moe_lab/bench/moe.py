"""Benchmark: one MoE layer, forward + backward, against the number of experts.

Fixed shape (full run): N = 16384 tokens (16 x 1024), d_model 256, expert hidden
512, top-2, capacity factor 1.25, softmax_topk router.  Times jit(value_and_grad)
of sum(y) with respect to all parameters and x, for E in 8, 32, 128, 256 and each
dispatch ("reference" only up to E=32: it runs every expert on every token),
plus a dense SwiGLU with the same active parameters (hidden k*512).

Targets (ratios measured in the same run): the cost of an MoE layer should
depend on k, not E (DESIGN.md, performance principles).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.bench.common import target, time_fn
from moe_lab.config import ModelConfig, MoEConfig
from moe_lab.layers.mlp import SwiGLU
from moe_lab.layers.moe import MoE

FULL = {"batch": 16, "seq": 1024, "d_model": 256, "hidden": 512, "experts": (8, 32, 128, 256)}
QUICK = {"batch": 2, "seq": 64, "d_model": 32, "hidden": 64, "experts": (4, 8)}
TOP_K, CAPACITY_FACTOR = 2, 1.25
REFERENCE_MAX_E = 32


def _grad_fn(module: nnx.Module, is_moe: bool):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x_BTD):
        m = nnx.merge(graphdef, params, rest)
        y = m(x_BTD, train=True)[0] if is_moe else m(x_BTD)
        return jnp.sum(y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _time_module(module, is_moe, x_BTD, iters):
    fn, params = _grad_fn(module, is_moe)
    return time_fn(fn, params, x_BTD, warmup=1, iters=iters)


def run(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    iters = 2 if quick else 5
    x_BTD = jax.random.normal(jax.random.PRNGKey(0), (s["batch"], s["seq"], s["d_model"]))
    base = ModelConfig(d_model=s["d_model"], ffn="moe", moe=MoEConfig(
        top_k=TOP_K, expert_hidden=s["hidden"], router="softmax_topk",
        capacity_factor=CAPACITY_FACTOR, router_jitter=0.0))
    rows = []
    # the dense baseline gets 2-D [N, D] input: on CPU, SwiGLU on [B, T, D] is slower
    # (weight-gradient dots over two batch dims), which would flatter the MoE ratios
    dense = SwiGLU(s["d_model"], TOP_K * s["hidden"], rngs=nnx.Rngs(0))
    t_dense = _time_module(dense, False, x_BTD.reshape(-1, s["d_model"]), iters)
    rows.append({"layer": "dense SwiGLU", "experts": 0, "dispatch": "-", "time_s": t_dense})
    times = {}
    for e in s["experts"]:
        for dispatch in ("capacity", "dropless", "reference"):
            if dispatch == "reference" and e > REFERENCE_MAX_E:
                continue  # every expert on every token: E/k times the work
            cfg = dataclasses.replace(base, moe=dataclasses.replace(
                base.moe, num_experts=e, dispatch=dispatch))
            n_iter = 1 if dispatch == "reference" else iters  # reference: seconds per call
            t = _time_module(MoE(cfg, rngs=nnx.Rngs(0)), True, x_BTD, n_iter)
            times[(dispatch, e)] = t
            rows.append({"layer": "MoE", "experts": e, "dispatch": dispatch, "time_s": t,
                         "vs_dense": t / t_dense})
    e_lo, e_hi = s["experts"][0], s["experts"][-1]
    targets = [
        target(f"capacity time(E={e_hi})/time(E={e_lo})",
               times[("capacity", e_hi)] / times[("capacity", e_lo)], 1.3),
        target(f"dropless time(E={e_hi})/time(E={e_lo})",
               times[("dropless", e_hi)] / times[("dropless", e_lo)], 1.6),
        target(f"capacity(E={e_lo})/dense", times[("capacity", e_lo)] / t_dense, 1.4),
    ]
    return {"name": "moe", "backend": jax.default_backend(),
            "shape": {"tokens": s["batch"] * s["seq"], "d_model": s["d_model"],
                      "expert_hidden": s["hidden"], "top_k": TOP_K,
                      "capacity_factor": CAPACITY_FACTOR},
            "results": rows, "targets": targets}


def main_print(result: dict) -> None:
    sh = result["shape"]
    print(f"MoE layer fwd+bwd on {result['backend']}: {sh['tokens']} tokens, d={sh['d_model']}, "
          f"F={sh['expert_hidden']}, k={sh['top_k']}, cf={sh['capacity_factor']}")
    print(f"  {'layer':<14}{'E':>5}  {'dispatch':<10}{'time (ms)':>11}{'x dense':>9}")
    for r in result["results"]:
        rel = f"{r['vs_dense']:.2f}" if "vs_dense" in r else "1.00"
        print(f"  {r['layer']:<14}{r['experts']:>5}  {r['dispatch']:<10}"
              f"{1e3 * r['time_s']:>11.1f}{rel:>9}")
    for t in result["targets"]:
        mark = "OK  " if t["ok"] else "MISS"
        print(f"  [{mark}] {t['name']}: {t['value']} (target {t['op']} {t['limit']})")


if __name__ == "__main__":
    main_print(run())
