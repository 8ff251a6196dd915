"""`moe-lab bench decode`: MoR decode throughput and KV-cache memory vs a vanilla model.

Models (same width, same batch, same prompts, greedy, KV cache, CPU f32):
- MoR: middle_cycle, N_r = 3, expert choice (capacities 1, 2/3, 1/3), 1 + 3x2 + 1 = 8
  layer applications at full depth; once with recursion-wise caching, once with
  recursive KV sharing.
- vanilla: 8 distinct layers (the same number of layer applications), run through
  the same decode machinery (a recursive stack with N_r = 1 and no routing, which is
  the plain transformer exactly: tests/test_mor.py), and, for reference, the plain
  Transformer's own decode path.

The models are untrained; their expert-choice routers are first fitted (router
parameters only, the auxiliary BCE objective vs top-k membership) so that threshold
routing at decode keeps about the trained capacities. What decode actually kept is
measured and reported (per-step kept fraction, sampling accuracy).

Depth-wise batching: at each recursion step only the rows whose token continues are
computed, gathered into the smallest of 8 static row buckets (lax.switch).  The
continuous variant (2507.10524 sec. 3.3, eval/depthwise.py: a FIFO of tokens at any
depth fills every shared-block call) is timed end to end beside it.

Timing: throughput is of the decode loop alone (the N - 1 single-token steps after
the prompt's prefill, which runs every row at T > 1 and is reported separately as
end-to-end tokens/s).  The speed-ups are medians of back-to-back (vanilla, MoR)
pairs: on this shared 2-core machine medians taken minutes apart drift by up to
+-25% (the same function measured 1.39 s and 1.79 s within one run).

Compute bound: vanilla runs 8 layer applications per token, MoR 2 + 2 x (sum of the
kept fractions per step): 6 with capacities (1, 2/3, 1/3) exactly, so at the same
batch the speed-up cannot exceed 8/6 = 1.33x there; the fitted routers keep a little
less at decode (measured [1, 0.55, 0.24]: 1.43x). The benchmark prints this bound
(ideal_speedup) from what decode actually kept, next to the measured speed-up. On CPU
at batch 64 a layer's matmuls are partly bound by reading the weights, which MoR does
at every step that keeps any row ([64, 512] x [512, 1536] takes 654 us, [40, ...] 545
us, [16, ...] 329 us), so skipped rows save less than their share and the measured
speed-up stays below that bound. The paper's larger gains (up to 2.06x) use the
largest batch that fits in memory; the KV-sharing model allocates half of vanilla's
cache here, so it is also timed at twice the batch (equal KV memory).

KV memory: entries actually stored (valid) relative to vanilla, for the recursive
part and the whole model; the expected shared-part ratios are (N_r+1)/(2N_r) and
1/N_r. The static buffers of recursion-wise caching are allocated at full length
per step (no paging), which is reported as allocated bytes.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_lab.accounting.timing import time_fn
from moe_lab.bench.common import paired_ratio, paired_ratios, print_targets, spread, target
from moe_lab.config.schema import Config, DataConfig, ModelConfig, MoRConfig
from moe_lab.config.validate import validate
from moe_lab.eval.depthwise import generate_depthwise
from moe_lab.eval.generate import decode_steps, prefill
from moe_lab.train.state import build_model, resolve_config, split_model


def _cfg(stack: str, num_layers: int, mor: MoRConfig, d: int, seq: int) -> Config:
    m = ModelConfig(
        d_model=d,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=3 * d,
        max_seq_len=seq,
        stack=stack,
        mor=mor,
    )
    return resolve_config(validate(Config(model=m, data=DataConfig(seq_len=seq, mixture="arith:1"))))


def _fit_routers(cfg: Config, params, rest, graphdef, seq: int, steps: int, seed: int = 0):
    """Adam on the router parameters only, loss = aux BCE (threshold vs top-k)."""
    rng = np.random.default_rng(seed)
    V = cfg.model.vocab_size
    tokens = jnp.asarray(rng.integers(3, V, (16, seq)), jnp.int32)
    router = params["recursive"]["router"]
    others = {**params, "recursive": {k: v for k, v in params["recursive"].items() if k != "router"}}
    tx = optax.adam(3e-2)
    opt = tx.init(router)

    def loss(router):
        p = {**others, "recursive": {**others["recursive"], "router": router}}
        model = nnx.merge(graphdef, p, rest)
        _, aux = model(tokens, train=True)
        return aux["mor"]["bce_loss"]

    @jax.jit
    def step(router, opt):
        g = jax.grad(loss)(router)
        upd, opt = tx.update(g, opt, router)
        return optax.apply_updates(router, upd), opt

    for _ in range(steps):
        router, opt = step(router, opt)
    return {**others, "recursive": {**others["recursive"], "router": router}}


def _routing_stats(graphdef, params, rest, tokens_BS):
    """Threshold routing (== decode) over prompt + generated tokens: kept fractions."""
    model = nnx.merge(graphdef, params, rest)
    _, aux = jax.jit(lambda t: model(t, train=False))(tokens_BS)
    kept = np.asarray(aux["mor"]["kept_RBT"], np.float64)
    return kept.mean(axis=(1, 2)), float(aux["mor"]["sampling_accuracy"])


def _decode_fn(gd, params, rest, prompts_BP, valid_BP, new_tokens: int):
    """(jitted fn, args) running only the N - 1 single-token decode steps after the
    prefill, and the jitted prefill (params -> decode state).

    Decode throughput is what MoR's depth routing speeds up; the prompt's prefill
    (T > 1, every row computed) is timed separately and not in the target.
    """
    greedy = {"temperature": 0.0, "top_p": 1.0}
    prefill_fn = jax.jit(
        lambda p: prefill(
            nnx.merge(gd, p, rest),
            prompts_BP,
            valid_BP,
            jax.random.key(0),
            max_new_tokens=new_tokens,
            **greedy,
        )
    )
    fn = jax.jit(lambda p, st: decode_steps(nnx.merge(gd, p, rest), st, prompts_BP.shape[1], **greedy))
    return (fn, (params, prefill_fn(params))), prefill_fn


def _bytes(tree) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def run(
    quick: bool = False,
    d_model: int | None = None,
    batch: int | None = None,
    new_tokens: int | None = None,
    pool: int = 2,
    fit_steps: int | None = None,
) -> dict:
    """pool: shared layers per recursion step (2: 1 + 3x2 + 1 = 8 layer applications;
    10 is the layout of the paper's 360M models, 1 + 3x10 + 1 = 32).  fit_steps: train
    steps fitting the MoR routers before decoding (default 30 quick, 150 full)."""
    # d_model 512, batch 64: decode is compute-bound on CPU there; at d_model 256 / batch 32
    # per-op overheads dominate and skipping rows saves nothing (measured ~1.0x).
    d, B = (128, 8) if quick else (512, 64)
    d, B = d_model or d, batch or B
    P, N = 16, new_tokens or (16 if quick else 32)
    S = P + N
    n_r = 3
    layers = 2 + n_r * pool
    base = MoRConfig(num_recursions=n_r, sharing="middle_cycle", routing="expert_choice")
    cfgs = {
        "vanilla": _cfg(
            "recursive", layers, MoRConfig(num_recursions=1, sharing="cycle", routing="none"), d, S
        ),
        "vanilla_plain_path": _cfg("plain", layers, MoRConfig(), d, S),
        "mor_recursion_wise": _cfg("recursive", layers, base, d, S),
        "mor_kv_shared": _cfg("recursive", layers, dataclasses.replace(base, kv_cache="shared"), d, S),
    }
    rng = np.random.default_rng(1)
    V = cfgs["vanilla"].model.vocab_size
    # 2B prompts: the equal-KV-memory run of KV sharing uses all of them
    prompts_all = jnp.asarray(rng.integers(3, V, (2 * B, P)), jnp.int32)
    prompts, valid = prompts_all[:B], jnp.ones((B, P), bool)
    out = {
        "name": "decode",
        "backend": jax.default_backend(),
        "batch": B,
        "prompt_len": P,
        "new_tokens": N,
        "d_model": d,
        "layer_applications": layers,
        "num_recursions": n_r,
    }
    results, decoders, models = {}, {}, {}
    for name, cfg in cfgs.items():
        gd, params, rest = split_model(build_model(cfg))
        t_fit = 0.0
        if cfg.model.mor.routing == "expert_choice" and cfg.model.stack == "recursive":
            t0 = time.perf_counter()
            fit = fit_steps if fit_steps is not None else (30 if quick else 150)
            params = _fit_routers(cfg, params, rest, gd, S, fit)
            t_fit = time.perf_counter() - t0

        decoders[name], prefill_fn = _decode_fn(gd, params, rest, prompts, valid, N)
        fn, args = decoders[name]

        def gen(params=params, prefill_fn=prefill_fn, fn=fn):  # prefill + decode: all N tokens
            return fn(params, prefill_fn(params))

        dt_all = time_fn(gen, warmup=1, iters=2 if quick else 3)
        dt = time_fn(fn, *args, warmup=1, iters=2 if quick else 5)
        if name == "mor_kv_shared":
            # the paper's throughput protocol (2507.10524 sec. 4.4): the largest batch
            # that fits the memory of vanilla's KV cache; sharing allocates 1/N_r of it
            # for the recursive part, so twice the batch here (2 + 2 vs 8 layer buffers)
            decoders["mor_kv_shared_2x_batch"], _ = _decode_fn(
                gd, params, rest, prompts_all, jnp.ones((2 * B, P), bool), N
            )
            time_fn(
                decoders["mor_kv_shared_2x_batch"][0],
                *decoders["mor_kv_shared_2x_batch"][1],
                warmup=1,
                iters=1,
            )
        model = nnx.merge(gd, params, rest)
        cache = jax.eval_shape(lambda model=model: model.init_cache(B, S))
        r = {
            "decode_seconds": dt,
            "tokens_per_sec": B * (N - 1) / dt,
            "end_to_end_tokens_per_sec": B * N / dt_all,
            "kv_cache_bytes_allocated": _bytes(cache),
            "router_fit_seconds": t_fit,
        }
        if cfg.model.stack == "recursive" and cfg.model.mor.routing != "none":
            full = jnp.concatenate([prompts, gen()], axis=1)
            frac, acc = _routing_stats(gd, params, rest, full)
            r["kept_fraction_per_step"] = [round(float(f), 4) for f in frac]
            r["sampling_accuracy"] = acc
            r["mean_depth"] = float(frac.sum())
            if cfg.model.mor.kv_cache == "recursion_wise":
                shared_ratio = float(frac.mean())  # step r stores the tokens it kept
            else:
                shared_ratio = 1.0 / n_r  # one step's KV for all tokens
            r["kv_stored_ratio_recursive_part"] = shared_ratio
            r["kv_stored_ratio_model"] = (2 + pool * n_r * shared_ratio) / layers
            # compute bound: layer applications per token, vanilla over MoR's measured ones
            r["ideal_speedup"] = layers / (2 + pool * float(frac.sum()))
        results[name] = r
        models[name] = (gd, params, rest)
    out["models"] = results
    # continuous depth-wise batching (eval/depthwise.py) of the recursion-wise model, at
    # the same batch (its static KV buffers are vanilla's size: also equal KV memory),
    # end to end (prefill included) against the lockstep decode and vanilla
    gd, params, rest = models["mor_recursion_wise"]
    prompt_rows = np.asarray(prompts).tolist()
    dw_stats = {}
    dw = time_fn(
        lambda: generate_depthwise(gd, params, rest, prompt_rows, N, slots=B, stats=dw_stats),
        warmup=1,
        iters=1 if quick else 2,
    )
    out["depthwise"] = {
        "end_to_end_tokens_per_sec": B * N / dw,
        "shared_block_calls": dw_stats["calls"],
        "slot_fill": dw_stats["filled_slots"] / (dw_stats["calls"] * dw_stats["slots"]),
    }
    out["speedup_depthwise_end_to_end"] = (
        out["depthwise"]["end_to_end_tokens_per_sec"] / results["vanilla"]["end_to_end_tokens_per_sec"]
    )
    # speed-ups: medians of back-to-back (vanilla, MoR) pairs of the decode loop, so
    # that the machine's drift over minutes cancels (time(vanilla) / time(MoR))
    pairs = 3 if quick else 7
    van = decoders["vanilla"]
    rw, sh = results["mor_recursion_wise"], results["mor_kv_shared"]
    stats = {
        k: spread(paired_ratios(van, decoders[f"mor_{k}"], pairs)) for k in ("recursion_wise", "kv_shared")
    }
    for k, st in stats.items():
        out[f"speedup_{k}"] = st["median"]
        out[f"speedup_{k}_iqr"] = [st["q25"], st["q75"]]
    out["ideal_speedup"] = {k: results[k]["ideal_speedup"] for k in ("mor_recursion_wise", "mor_kv_shared")}
    vanilla_alloc = results["vanilla"]["kv_cache_bytes_allocated"]
    out["kv_alloc_ratio_shared"] = sh["kv_cache_bytes_allocated"] / vanilla_alloc
    # twice the batch: tokens/s ratio = 2 * time(vanilla) / time(MoR at 2B)
    out["speedup_kv_shared_equal_kv_memory"] = 2 * paired_ratio(
        van, decoders["mor_kv_shared_2x_batch"], pairs
    )
    out["speedup_vs_plain_path"] = max(
        paired_ratio(decoders["vanilla_plain_path"], decoders[k], pairs)
        for k in ("mor_recursion_wise", "mor_kv_shared")
    )
    out["expected_kv_ratio"] = {"recursion_wise": (n_r + 1) / (2 * n_r), "shared": 1 / n_r}
    # the same bound had decode kept exactly the trained capacities (1, 2/3, 1/3):
    # 8 / 6 = 1.33x at pool 2, 32 / 22 = 1.45x at the paper's pool 10; the same-batch
    # target of 1.5x is above it for middle_cycle at N_r = 3 whatever the depth
    out["bound_at_trained_capacities"] = layers / (2 + pool * sum((n_r - r) / n_r for r in range(n_r)))
    out["targets"] = [
        target("MoR recursion-wise decode tokens/s vs vanilla", stats["recursion_wise"], 1.5, at_least=True),
        target("MoR KV-sharing decode tokens/s vs vanilla", stats["kv_shared"], 1.5, at_least=True),
        target(
            "recursion-wise stored KV (recursive part) vs vanilla",
            rw["kv_stored_ratio_recursive_part"],
            round((n_r + 1) / (2 * n_r) + 0.1, 4),
        ),
        target(
            "KV-sharing stored KV (recursive part) vs vanilla",
            sh["kv_stored_ratio_recursive_part"],
            round(1 / n_r + 1e-3, 4),
        ),
    ]
    return out


def main_print(r: dict) -> None:
    print(
        f"decode benchmark on {r['backend']}: batch {r['batch']}, prompt {r['prompt_len']}, "
        f"{r['new_tokens']} new tokens, d_model {r['d_model']}, "
        f"{r['layer_applications']} layer applications at full depth"
    )
    print(
        "  (per-model tok/s: medians taken minutes apart, which drift on a shared machine; "
        "the speed-ups are medians of back-to-back pairs)"
    )
    for name, x in r["models"].items():
        line = (
            f"  {name:<20} {x['tokens_per_sec']:7.0f} tok/s decode "
            f"({x['end_to_end_tokens_per_sec']:5.0f} with prefill)  KV alloc "
            f"{x['kv_cache_bytes_allocated'] / 2**20:6.2f} MiB"
        )
        if "kept_fraction_per_step" in x:
            line += (
                f"  kept/step {x['kept_fraction_per_step']}  sampling acc "
                f"{x['sampling_accuracy']:.3f}  KV stored (recursive part) "
                f"{x['kv_stored_ratio_recursive_part']:.3f}, model {x['kv_stored_ratio_model']:.3f}"
            )
        print(line)
    print(
        f"  decode speed-up vs vanilla (paired): recursion-wise {r['speedup_recursion_wise']:.2f}x, "
        f"KV sharing {r['speedup_kv_shared']:.2f}x (best vs plain decode path "
        f"{r['speedup_vs_plain_path']:.2f}x)"
    )
    ib = r["ideal_speedup"]
    print(
        f"  compute bound (layer applications, vanilla / MoR as routed): recursion-wise "
        f"{ib['mor_recursion_wise']:.2f}x, KV sharing {ib['mor_kv_shared']:.2f}x; at exactly "
        f"the trained capacities {r['bound_at_trained_capacities']:.2f}x"
    )
    print(
        f"  KV sharing at vanilla's KV-cache memory (allocated {r['kv_alloc_ratio_shared']:.2f}x "
        f"of vanilla, so batch {2 * r['batch']}): {r['speedup_kv_shared_equal_kv_memory']:.2f}x "
        "vanilla tokens/s (the paper's max-batch protocol; not the same-batch target)"
    )
    dw = r["depthwise"]
    print(
        f"  continuous depth-wise batching (recursion-wise, batch {r['batch']}, same KV memory): "
        f"{dw['end_to_end_tokens_per_sec']:.0f} tok/s with prefill, "
        f"{r['speedup_depthwise_end_to_end']:.2f}x vanilla's; {dw['shared_block_calls']} "
        f"shared-block calls, {100 * dw['slot_fill']:.0f}% of their slots filled "
        "(host-side queue: one device round trip per call)"
    )
    print_targets(r["targets"])
