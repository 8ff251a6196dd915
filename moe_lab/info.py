"""`moe-lab info`: what a config costs before anyone runs it.

Parameters (total / active / sparsity), FLOPs per token, tokens per parameter,
per-device memory of params, optimizer state and activations under the mesh,
and the rule table with the resulting PartitionSpecs.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from moe_lab import flops, sharding
from moe_lab.config import Config, validate_for_devices
from moe_lab.layers import expert_parallel
from moe_lab.layers.base import dtype_of


def _shard_factor(spec, mesh) -> int:
    f = 1
    for axes in spec:
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None:
                f *= mesh.shape[a]
    return f


def sharded_bytes(shapes_tree, specs_tree, mesh) -> int:
    """Bytes one device holds for a tree of arrays under its PartitionSpecs."""
    leaves = jax.tree.leaves(shapes_tree)
    specs = jax.tree.leaves(specs_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize / _shard_factor(p, mesh)
                   for s, p in zip(leaves, specs)))


def activation_bytes(cfg: Config, batch_per_device: int, remat: str | None = None) -> int:
    """Rough activation memory per device for one train step (what backprop keeps).

    Per layer and token without remat: ~ (10 D + 3 F_active + 2 H T) values
    (norm/attention inputs and outputs, q/k/v, the SwiGLU hidden pre- and post-
    activation, the attention probabilities and scores); with full remat only the
    layer input D is kept per layer plus one layer's full set during its backward.
    """
    m = cfg.model
    remat = remat or m.remat
    T = cfg.data.seq_len
    f_active = (m.resolved_expert_hidden * (m.moe.top_k + m.moe.num_shared_experts)
                if m.ffn == "moe" else m.resolved_mlp_hidden)
    per_token_layer = 10 * m.d_model + 3 * f_active + 2 * m.num_heads * T
    itemsize = np.dtype(dtype_of(m.compute_dtype)).itemsize
    tokens = batch_per_device * T
    logits = tokens * m.vocab_size * 4 * 2
    if remat == "none":
        return int(tokens * per_token_layer * m.num_layers * itemsize + logits)
    return int(tokens * (m.d_model * m.num_layers + per_token_layer) * itemsize + logits)


# memory per chip (GiB) for the memory plan
DEVICE_MEMORY_GIB = {"tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32, "a100": 80,
                     "h100": 80, "h200": 141, "b200": 180}


def device_memory_gib(hardware: str) -> float | None:
    if hardware in DEVICE_MEMORY_GIB:
        return float(DEVICE_MEMORY_GIB[hardware])
    if hardware == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return None


def memory_plan(cfg: Config, setup, mesh) -> dict:
    """Per-device bytes of params, optimizer state, grads and activations."""
    data, fsdp, expert, _ = (mesh.shape[a] for a in sharding.MESH_AXES)
    batch_per_device = max(1, cfg.train.batch_size // (data * fsdp * expert))
    p = sharded_bytes(setup.abstract_state["params"], setup.specs["params"], mesh)
    o = sharded_bytes(setup.abstract_state["opt_state"], setup.specs["opt_state"], mesh)
    return {"params": p, "opt_state": o, "grads": p,
            "activations": activation_bytes(cfg, batch_per_device),
            "activations_remat_full": activation_bytes(cfg, batch_per_device, remat="full"),
            "batch_per_device": batch_per_device}


def print_info(cfg: Config, workdir: str | None = None, devices: int | None = None,
               hardware: str | None = None) -> None:
    from moe_lab.train.state import make_setup, resolve_config  # noqa: PLC0415

    cfg = resolve_config(cfg)
    n = devices or cfg.mesh.plan_devices or jax.device_count()
    hardware = hardware or cfg.mesh.plan_hardware or (
        "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind.lower())
    validate_for_devices(cfg, n)
    m = cfg.model
    s = flops.run_summary(cfg)
    print(f"config '{cfg.name}': d_model {m.d_model}, layers {m.num_layers}, heads {m.num_heads}"
          f"/{m.num_kv_heads} kv, ffn {m.ffn}, vocab {m.vocab_size}, seq {cfg.data.seq_len}")
    if m.ffn == "moe":
        e = m.moe
        print(f"moe: {e.num_experts} experts x hidden {m.resolved_expert_hidden}, top-{e.top_k}, "
              f"{e.num_shared_experts} shared, router {e.router}, dispatch {e.dispatch}, "
              f"sparsity 1-k/E = {s['sparsity']:.3f}")
    print(f"params: total {s['params_total']:,}  active {s['params_active']:,}  "
          f"(non-embedding {s['params_total_non_embedding']:,} / {s['params_active_non_embedding']:,})")
    print(f"FLOPs/token: forward {s['forward_flops_per_token']:.4g}, train {s['train_flops_per_token']:.4g}")
    print(f"run: {cfg.train.steps} steps x {cfg.train.batch_size} x {cfg.data.seq_len} = "
          f"{s['train_tokens']:,} tokens, {s['train_flops']:.4g} FLOPs, TPP {s['tpp']:.3g} "
          f"(1x Chinchilla for active size: {s['chinchilla_flops_active']:.3g} FLOPs)")
    mesh = (sharding.make_mesh(cfg.mesh) if n == jax.device_count()
            else sharding.make_abstract_mesh(cfg.mesh, n))
    print(sharding.format_rules(cfg.mesh.rules, mesh))
    if m.ffn == "moe":
        print(expert_parallel.plan_line(cfg, mesh))
    setup = make_setup(cfg, mesh)
    plan = memory_plan(cfg, setup, mesh)
    gib = 2**30
    steady = plan["params"] + plan["opt_state"] + plan["grads"]
    print(f"memory per device (mesh {dict(mesh.shape)}, {plan['batch_per_device']} sequences/device): "
          f"params {plan['params'] / gib:.3f} GiB, optimizer {plan['opt_state'] / gib:.3f} GiB, "
          f"grads {plan['grads'] / gib:.3f} GiB, activations ~{plan['activations'] / gib:.3f} GiB "
          f"with remat={m.remat} (remat=full: ~{plan['activations_remat_full'] / gib:.3f} GiB)")
    step_flops = s["train_flops_per_token"] * cfg.train.batch_size * cfg.data.seq_len
    print(f"step FLOPs: {step_flops:.4g} total, {step_flops / n:.4g} per device")
    cap = device_memory_gib(hardware)
    if cap:
        total = (steady + plan["activations"]) / gib
        verdict = "fits" if total <= cap else "does NOT fit"
        remat_total = (steady + plan["activations_remat_full"]) / gib
        print(f"plan on {n} x {hardware} ({cap:.0f} GiB each): ~{total:.2f} GiB per device -> "
              f"{verdict}" + ("" if total <= cap or m.remat == "full" else
                              f" (with remat=full ~{remat_total:.2f} GiB)"))
    print("parameter shardings:")
    print(sharding.describe_specs(setup.specs["params"]))
    if workdir and os.path.exists(os.path.join(workdir, "lineage.json")):
        with open(os.path.join(workdir, "lineage.json")) as f:
            print("lineage: " + json.dumps(json.load(f), indent=2))
