"""Benchmark: one MoE layer, forward + backward, against the number of experts.

Fixed shape (full run): N = 16384 tokens (16 x 1024), d_model 256, expert hidden
512, top-2, capacity factor 1.25, softmax_topk router.  Times jit(value_and_grad)
of sum(y) with respect to all parameters and x, for E in 8, 32, 128, 256 and each
dispatch ("reference" only up to E=32: it runs every expert on every token),
plus a dense SwiGLU with the same active parameters (hidden k*512).

Targets (ratios measured in the same run): the cost of an MoE layer should
depend on k, not E.  Also reported: the "matmul floor", the same expert SwiGLUs
on perfectly balanced [E, N*K/E, D] buffers with no router and no dispatch.  On
CPU its E=256/E=8 ratio is above 1 by itself: same FLOPs, but E=256 has 32x the
expert weights (402 MB vs 12.6 MB f32), read from DRAM for the forward, again
for the input gradient, and written as the weight gradient, each expert's
[256, 512] matrices used for only ~128 rows; the difference is the weight
stream, the machine's and not XLA's (the recorded ratios, batched-dot and
numpy-loop timings, with their commands: experiments/moe_kernels/README.md).
So the floor moves with the host's free memory bandwidth, which neighbours on a
shared VM take: the benchmark prints a copy bandwidth at its start and end.  And
the "ideal layer": the real router and token movement with the experts timed as
if perfectly balanced (no capacity padding, no tiles).  Its ratio is what a
perfect dispatch built on XLA dots could reach here; the router's f32
[N, D] x [D, E] matmul, which grows with E by design, is part of it; the
"router alone" rows time that router by itself.

The peer (bench/hf_peer.py, where transformers is installed): HF's
`MixtralSparseMoeBlock` on PyTorch CPU, same shape, same threads, timed in the same
rounds, and paired with moe_lab's dropless layer for the `vs_hf` targets.  And the
breakdown: the dropless layer's four stages, each jitted fwd+bwd by itself as the
layer runs it (router with its aux losses; sort and gather; the experts on the
sorted rows; the weighted combine), so a regression shows which stage moved.

Targets (issue "the CPU MoE layer at the dense floor"): dropless at E_lo at most
1.1x dense; moe_lab no slower than HF at any E, at most 0.8x HF where HF pays for
the expert count (E >= 128); the dropless E_hi/E_lo ratio within 1.1x of the
ideal layer's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.accounting.timing import time_fn
from moe_lab.bench import hf_peer
from moe_lab.bench.common import copy_bandwidth_gbs, host_cores, paired_ratios, print_targets, spread, target
from moe_lab.config.schema import ModelConfig, MoEConfig
from moe_lab.layers import routing
from moe_lab.layers.base import router_matmul
from moe_lab.layers.mlp import SwiGLU
from moe_lab.layers.moe import MoE
from moe_lab.layers.moe_kernels.accelerator import buffer_swiglu
from moe_lab.layers.moe_kernels.dispatch import loop_dropless
from moe_lab.layers.moe_kernels.layout import combine_rows, gather_rows, sorted_layout

FULL = {"batch": 16, "seq": 1024, "d_model": 256, "hidden": 512, "experts": (8, 32, 128, 256)}
QUICK = {"batch": 2, "seq": 64, "d_model": 32, "hidden": 64, "experts": (4, 8)}
TOP_K, CAPACITY_FACTOR = 2, 1.25
REFERENCE_MAX_E = 32
HF_FAST_E = 128  # from here on HF's python loop over experts costs: the 0.8x target
STAGES = ("router", "dispatch", "experts", "combine")


def _grad_fn(module: nnx.Module, is_moe: bool):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x_BTD):
        m = nnx.merge(graphdef, params, rest)
        y = m(x_BTD, train=True)[0] if is_moe else m(x_BTD)
        return jnp.sum(y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _matmul_floor_fn(s: dict, e: int):
    """fwd+bwd of E experts' SwiGLU on perfectly balanced [E, N*K/E, D] buffers.

    No router, no sort, no gather, no padding: what XLA's batched dots alone cost
    at this many rows per expert on this machine.  The E-scaling of this floor is
    a lower bound for any dispatch built on XLA dots (reported, not a target).
    """
    rows = s["batch"] * s["seq"] * TOP_K // e
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    x_ECD = jax.random.normal(keys[0], (e, rows, s["d_model"]))
    shapes = [(e, s["d_model"], s["hidden"])] * 2 + [(e, s["hidden"], s["d_model"])]
    weights = [0.02 * jax.random.normal(k, sh) for k, sh in zip(keys[1:], shapes)]
    fn = jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(buffer_swiglu(x, *w)), argnums=(0, 1)))
    return fn, (weights, x_ECD)


def _ideal_fn(s: dict, e: int):
    """The layer as it would cost with perfect balance and nothing wasted.

    The real router (f32 logits, softmax, top-k), the real sort, gather and
    combine, but the experts run on the sorted rows as if every expert held
    exactly N*K/E of them: one batched einsum on [E, N*K/E, D], no capacity
    padding, no tiles.  (Its outputs are not the layer's when the load is
    uneven: rows are timed, not checked.)  Its E_hi/E_lo ratio is what a
    perfect dispatch built on XLA dots could reach: floor plus routing.
    """
    n, d, f = s["batch"] * s["seq"], s["d_model"], s["hidden"]
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    x_ND = jax.random.normal(keys[0], (n, d))
    shapes = [(d, e), (e, d, f), (e, d, f), (e, f, d)]
    params = [0.02 * jax.random.normal(k, sh) for k, sh in zip(keys[1:], shapes)]

    def loss(params, x_ND):
        router_DE, *weights = params
        tc = routing.SoftmaxTopKRouter()(router_matmul(x_ND, router_DE), None, top_k=TOP_K, renormalize=True)
        layout = sorted_layout(tc.expert_NK, e, n, pad=0)
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = buffer_swiglu(x_SD.reshape(e, -1, d), *weights).reshape(x_SD.shape)
        return jnp.sum(
            combine_rows(
                y_SD,
                tc.gate_NK,
                layout.row_NK,
                layout.keep_NK,
                layout.token_S,
                layout.assign_S,
                layout.valid_S,
            )
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, x_ND)


def _router_fn(s: dict, e: int):
    """fwd+bwd of the router alone, as the MoE layer runs it: f32 logits matmul,
    softmax, top-k, the load count and the aux losses (balance, z, entropy).  Its
    cost grows with E by design (an [N, D] x [D, E] matmul and [N, E] elementwise
    work): reported so that a reader can see how much of an MoE ratio it is."""
    n, d = s["batch"] * s["seq"], s["d_model"]
    x_ND = jax.random.normal(jax.random.PRNGKey(0), (n, d))
    router_DE = 0.02 * jax.random.normal(jax.random.PRNGKey(1), (d, e))

    def loss(router_DE, x_ND):
        logits_NE = router_matmul(x_ND, router_DE)
        tc = routing.SoftmaxTopKRouter()(logits_NE, None, top_k=TOP_K, renormalize=True)
        load_E = jnp.bincount(tc.expert_NK.reshape(-1), length=e)
        aux = routing.router_aux(
            logits_NE,
            tc.probs_NE,
            load_E,
            balance=True,
            drop_fraction=0.0,
            aux_loss_weight=1e-2,
            z_loss_weight=1e-3,
        )
        return jnp.sum(tc.gate_NK) + aux["aux_loss"] + aux["router_entropy"]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (router_DE, x_ND)


def _stage_fns(s: dict, e: int) -> dict[str, tuple]:
    """The dropless CPU layer's stages, each fwd+bwd and jitted by itself, on the
    routing a real router gives the bench's input: {stage: (fn, args)} for STAGES[1:]
    (the router stage is the "router alone" row).  The layouts are arguments, not
    constants (XLA would fold constant row offsets into static slices, which the layer
    never gets).  Their times add up to about the layer's ("rest": the difference)."""
    d, f = s["d_model"], s["hidden"]
    _router, (router_DE, x_ND) = _router_fn(s, e)  # the router stage's inputs
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    weights = [0.02 * jax.random.normal(k, sh) for k, sh in zip(keys, shapes)]
    tc = routing.SoftmaxTopKRouter()(router_matmul(x_ND, router_DE), None, top_k=TOP_K, renormalize=True)
    # the layer's own path (dispatch.token_choice_moe, dropless, impl loop); the
    # experts function depends on the shapes only, not on the routing it is built from
    experts = loop_dropless(tc.expert_NK, e, d * f)[1]

    def make_layout(expert_NK):
        return loop_dropless(expert_NK, e, d * f)[0]

    def dispatch(x_ND, expert_NK):
        lay = make_layout(expert_NK)
        return jnp.sum(gather_rows(x_ND, lay.token_S, lay.row_NK, lay.keep_NK))

    layout = jax.jit(make_layout)(tc.expert_NK)
    x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)

    def combine(y_SD, gate_NK, lay):
        return jnp.sum(
            combine_rows(y_SD, gate_NK, lay.row_NK, lay.keep_NK, lay.token_S, lay.assign_S, lay.valid_S)
        )

    return {
        "dispatch": (jax.jit(jax.grad(dispatch)), (x_ND, tc.expert_NK)),
        "experts": (
            jax.jit(jax.grad(lambda x, w, lay: jnp.sum(experts(x, lay, w)), argnums=(0, 1))),
            (x_SD, weights, layout),
        ),
        "combine": (jax.jit(jax.grad(combine, argnums=(0, 1))), (x_SD, tc.gate_NK, layout)),
    }


def run(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    iters = 2 if quick else 7
    bandwidth_start = copy_bandwidth_gbs(16 if quick else 256)
    x_BTD = jax.random.normal(jax.random.PRNGKey(0), (s["batch"], s["seq"], s["d_model"]))
    base = ModelConfig(
        d_model=s["d_model"],
        ffn="moe",
        moe=MoEConfig(
            top_k=TOP_K,
            expert_hidden=s["hidden"],
            router="softmax_topk",
            capacity_factor=CAPACITY_FACTOR,
            router_jitter=0.0,
        ),
    )
    # (row label, jitted fn, args): built and compiled in the first round
    cases: dict[tuple, tuple] = {}
    # the dense baseline gets 2-D [N, D] input: on CPU, SwiGLU on [B, T, D] is slower
    # (weight-gradient dots over two batch dims), which would flatter the MoE ratios
    dense = SwiGLU(s["d_model"], TOP_K * s["hidden"], rngs=nnx.Rngs(0))
    fn, params = _grad_fn(dense, False)
    cases[("dense SwiGLU", 0, "-")] = (fn, (params, x_BTD.reshape(-1, s["d_model"])))
    for e in s["experts"]:
        for dispatch in ("capacity", "dropless", "reference"):
            if dispatch == "reference" and e > REFERENCE_MAX_E:
                continue  # every expert on every token: E/k times the work
            cfg = dataclasses.replace(
                base, moe=dataclasses.replace(base.moe, num_experts=e, dispatch=dispatch)
            )
            fn, params = _grad_fn(MoE(cfg, rngs=nnx.Rngs(0)), True)
            cases[("MoE", e, dispatch)] = (fn, (params, x_BTD))
    hf_missing = hf_peer.available()
    n, d = s["batch"] * s["seq"], s["d_model"]
    for e in s["experts"] if hf_missing is None else ():
        cases[("HF Mixtral block", e, "torch")] = hf_peer.mixtral_block_fn(n, d, s["hidden"], e, TOP_K)
    e_lo, e_hi = s["experts"][0], s["experts"][-1]
    for e in (e_lo, e_hi):
        cases[("matmul floor", e, "balanced")] = _matmul_floor_fn(s, e)
        cases[("ideal layer", e, "balanced")] = _ideal_fn(s, e)
        # the router alone is also the breakdown's router stage
        cases[("router alone", e, "f32")] = _router_fn(s, e)
        stages = _stage_fns(s, e)
        for stage in STAGES[1:]:
            cases[("dropless stage", e, stage)] = stages[stage]
    # The table: two rounds, the second in reverse order, each case's time = the
    # smaller of its two medians (a shared machine drifts over a minute).
    # Reference: one round, 1 call.  The targets below use paired ratios.
    times: dict[tuple, float] = {}
    for round_keys in (list(cases), [k for k in reversed(cases) if k[2] != "reference"]):
        for key in round_keys:
            fn, args = cases[key]
            ref = key[2] == "reference"
            # 2 warm-up calls: the first steps still grow the heap (page faults)
            t = time_fn(fn, *args, warmup=1 if ref else 2, iters=1 if ref else iters)
            times[key] = min(t, times.get(key, t))
    t_dense = times[("dense SwiGLU", 0, "-")]
    rows = [
        {"layer": k[0], "experts": k[1], "dispatch": k[2], "time_s": t, "vs_dense": t / t_dense}
        for k, t in times.items()
    ]
    times = {(k[2], k[1]): t for k, t in times.items()}
    # the targets: medians of back-to-back pairs (drift cancels within a pair)
    n_pairs = 3 if quick else 7

    def ratio(num, den):  # median and interquartile range of the pairs
        return spread(paired_ratios(cases[num], cases[den], pairs=n_pairs))

    dense_key = ("dense SwiGLU", 0, "-")
    targets = [
        target(
            f"capacity time(E={e_hi})/time(E={e_lo})",
            ratio(("MoE", e_hi, "capacity"), ("MoE", e_lo, "capacity")),
            1.3,
        ),
        target(
            f"dropless time(E={e_hi})/time(E={e_lo})",
            ratio(("MoE", e_hi, "dropless"), ("MoE", e_lo, "dropless")),
            1.6,
        ),
        target(f"capacity(E={e_lo})/dense", ratio(("MoE", e_lo, "capacity"), dense_key), 1.4),
    ]
    floor_ratio = ratio(("matmul floor", e_hi, "balanced"), ("matmul floor", e_lo, "balanced"))
    ideal_ratio = ratio(("ideal layer", e_hi, "balanced"), ("ideal layer", e_lo, "balanced"))
    dropless_ratio = next(t for t in targets if t["name"].startswith("dropless time"))
    targets += [
        target(f"dropless(E={e_lo})/dense", ratio(("MoE", e_lo, "dropless"), dense_key), 1.1),
        # what the dispatch adds to the E-scaling beyond the ideal layer's own
        target(
            f"dropless E={e_hi}/E={e_lo} over the ideal layer's",
            dropless_ratio["value"] / ideal_ratio["median"],
            1.1,
        ),
    ]
    if hf_missing is None:
        targets += [
            target(
                f"dropless(E={e})/HF(E={e})",
                ratio(("MoE", e, "dropless"), ("HF Mixtral block", e, "torch")),
                0.8 if e >= HF_FAST_E else 1.0,
            )
            for e in s["experts"]
        ]
    t_layer = {e: times[("dropless", e)] for e in (e_lo, e_hi)}
    breakdown = {
        e: {
            **{st: round(1e3 * times[("f32" if st == "router" else st, e)], 2) for st in STAGES},
            "layer": round(1e3 * t_layer[e], 2),
        }
        for e in (e_lo, e_hi)
    }
    for b in breakdown.values():
        b["rest"] = round(b["layer"] - sum(b[st] for st in STAGES), 2)
    for r in rows:
        if hf_missing is None and r["dispatch"] == "dropless" and r["layer"] == "MoE":
            r["vs_hf"] = r["time_s"] / times[("torch", r["experts"])]
    return {
        "name": "moe",
        "backend": jax.default_backend(),
        "shape": {
            "tokens": s["batch"] * s["seq"],
            "d_model": s["d_model"],
            "expert_hidden": s["hidden"],
            "top_k": TOP_K,
            "capacity_factor": CAPACITY_FACTOR,
        },
        "results": rows,
        "targets": targets,
        "peer": hf_missing or hf_peer.versions() | {"threads": host_cores()},
        "breakdown_ms": breakdown,
        "floor_ratio": round(floor_ratio["median"], 4),
        "ideal_ratio": round(ideal_ratio["median"], 4),
        "floor_ratio_iqr": [round(floor_ratio["q25"], 4), round(floor_ratio["q75"], 4)],
        "ideal_ratio_iqr": [round(ideal_ratio["q25"], 4), round(ideal_ratio["q75"], 4)],
        # what the E=hi/E=lo ratios would be from the table's times (each case's
        # best median), next to the paired medians the targets use
        "table_ratios": {d: round(times[(d, e_hi)] / times[(d, e_lo)], 4) for d in ("capacity", "dropless")},
        # the router's extra time at E=hi, as a share of the E=lo capacity layer: the
        # part of the capacity ratio that the router alone adds
        "router_share": round((times[("f32", e_hi)] - times[("f32", e_lo)]) / times[("capacity", e_lo)], 4),
        "copy_bandwidth_gbs": {
            "start": round(bandwidth_start, 2),
            "end": round(copy_bandwidth_gbs(16 if quick else 256), 2),
        },
    }


def main_print(result: dict) -> None:
    sh = result["shape"]
    print(
        f"MoE layer fwd+bwd on {result['backend']}: {sh['tokens']} tokens, d={sh['d_model']}, "
        f"F={sh['expert_hidden']}, k={sh['top_k']}, cf={sh['capacity_factor']}"
    )
    peer = result["peer"]
    if isinstance(peer, str):
        print(f"  {peer}")
    else:
        print(
            f"  peer: HF transformers {peer['transformers']} MixtralSparseMoeBlock, torch {peer['torch']}, "
            f"{peer['threads']} threads (the rows 'HF Mixtral block')"
        )
    print(f"  {'layer':<17}{'E':>5}  {'dispatch':<10}{'time (ms)':>11}{'x dense':>9}{'x HF':>7}")
    for r in result["results"]:
        hf = f"{r['vs_hf']:.2f}" if "vs_hf" in r else ""
        print(
            f"  {r['layer']:<17}{r['experts']:>5}  {r['dispatch']:<10}{1e3 * r['time_s']:>11.1f}"
            f"{r['vs_dense']:>9.2f}{hf:>7}"
        )
    print("  the dropless layer's stages, fwd+bwd each (ms; rest = layer - stages):")
    for e, b in result["breakdown_ms"].items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in b.items() if k != "layer")
        print(f"    E={e}: layer {b['layer']:.1f} = {parts}")
    fi, ii = result["floor_ratio_iqr"], result["ideal_ratio_iqr"]
    print(
        f"  matmul floor time(E=hi)/time(E=lo): {result['floor_ratio']} [{fi[0]}-{fi[1]}] "
        "(balanced expert SwiGLU alone, no routing or dispatch)"
    )
    print(
        f"  ideal layer time(E=hi)/time(E=lo): {result['ideal_ratio']} [{ii[0]}-{ii[1]}] "
        "(real router, sort, gather and combine; experts as if perfectly balanced, no "
        "padding: a lower bound for the ratios below)"
    )
    print(
        f"  router alone (f32 logits, softmax, top-k, aux losses), E=hi minus E=lo: "
        f"{result['router_share']:+.3f} of the E=lo capacity layer's time"
    )
    tr, bw = result["table_ratios"], result["copy_bandwidth_gbs"]
    print(
        f"  from the table's times: capacity {tr['capacity']}, dropless {tr['dropless']}; "
        f"memory copy bandwidth {bw['start']} GB/s at start, {bw['end']} at end (neighbours "
        "on a shared host take it; the largest E streams its expert weights 3x per step)"
    )
    print("  targets: medians of back-to-back pairs [middle half of the pairs]")
    print_targets(result["targets"])


if __name__ == "__main__":
    main_print(run())
