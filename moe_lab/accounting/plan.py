"""Memory plans: per-device bytes of params, optimizer state and activations under a mesh."""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from moe_lab.accounting.flops import layer_applications
from moe_lab.config.schema import MESH_AXES, Config
from moe_lab.layers.attention_kernels import resolve_attention_impl
from moe_lab.layers.base import dtype_of
from moe_lab.parallel.topology import GENERATIONS


def _shard_factor(spec, mesh) -> int:
    f = 1
    for axes in spec:
        for a in axes if isinstance(axes, tuple) else (axes,):
            if a is not None:
                f *= mesh.shape[a]
    return f


def sharded_bytes(shapes_tree, specs_tree, mesh) -> int:
    """Bytes one device holds for a tree of arrays under its PartitionSpecs."""
    leaves = jax.tree.leaves(shapes_tree)
    specs = jax.tree.leaves(specs_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return int(
        sum(
            math.prod(s.shape) * np.dtype(s.dtype).itemsize / _shard_factor(p, mesh)
            for s, p in zip(leaves, specs)
        )
    )


def activation_bytes(
    cfg: Config, batch_per_device: int, remat: str | None = None, platform: str | None = None
) -> int:
    """Activation memory per device of one train step: what the backward pass keeps,
    plus the transient set of the layer being recomputed and the logits.

    Calibrated against the compiler (libtpu, `moe-lab compile`; the table in
    experiments/pod_plans/README.md), per token, in the compute dtype's bytes b:

      one layer's full set  (10 D + FFN) b + 4 F_rows + attention
        FFN: dense 3 F; MoE r (2 D + 3 F) + shared 3 F_s, with r = k rows per token
        dropless, cf k with capacity buffers (capacity dispatch, all-to-all, expert
        choice); F_rows: the SwiGLU hidden again in f32 (r F + F_s, or F dense: silu's
        gradient); attention (xla, the einsum reference): the [H, T, S] scores kept for
        the backward pass, 12 + b bytes a pair (f32 scores, masked scores, softmax and
        the probabilities); a flash / chunked kernel keeps O(H K)
      saved per layer       none: the full set; full: the layer input D b; dots: the
                            outputs of the weight matmuls (q, k, v, o, the FFN's
                            gate / up / down or the router) plus the input
      recomputed layer      full / dots: one layer's set again, with the fused
                            softmax's 4 + b bytes a score pair
      logits                T V (b + 4): the LM head's output in the compute dtype
                            (then the gradient the backward matmuls read) and its f32
                            cast, which the cross-entropy reads and whose gradient
                            reuses the buffer: both [B, T, V] are live together

    Layers count by application: a recursive stack's shared layers once per
    recursion step, on the tokens the step keeps (flops.layer_applications).

    The terms add up, as the compiler's total (arguments + temp_size_in_bytes) does;
    its live peak (peak_memory_in_bytes) is lower on scanned stacks, where the logits
    and the recomputed layer are never live together (experiments/pod_plans/README.md).
    """
    m = cfg.model
    remat = remat or m.remat
    T = cfg.data.seq_len
    b = np.dtype(dtype_of(m.compute_dtype)).itemsize
    D, H, G, K = m.d_model, m.num_heads, m.num_kv_heads, m.resolved_head_dim
    attn = resolve_attention_impl(
        m.attention_impl, platform or "cpu", compute_dtype=m.compute_dtype, head_dim=K
    )
    # splash covers the plain stack at T a multiple of 128 (layers/splash.py)
    flash = attn != "xla" and not (attn == "splash" and (m.stack == "recursive" or T % 128))
    attn_saved = 4 * H * K * b if flash else H * T * (12 + b)
    attn_recomputed = 4 * H * K * b if flash else H * T * (4 + b)
    if m.ffn == "moe":
        e = m.moe
        dispatch = "dropless" if e.dispatch == "auto" else e.dispatch
        rows = e.top_k * (1 if dispatch == "dropless" and e.router != "expert_choice" else e.capacity_factor)
        shared_f = (
            e.shared_hidden or e.num_shared_experts * m.resolved_expert_hidden if e.num_shared_experts else 0
        )
        ffn = rows * (2 * D + 3 * m.resolved_expert_hidden) + 3 * shared_f
        hidden = rows * m.resolved_expert_hidden + shared_f
        ffn_dots = e.num_experts + (2 * shared_f + D if shared_f else 0) + D
    else:
        ffn = 3 * m.resolved_mlp_hidden
        hidden = m.resolved_mlp_hidden
        ffn_dots = 2 * m.resolved_mlp_hidden + D
    # + the SwiGLU hidden once more in f32 (silu's gradient; the compiler's largest live
    # buffer on the dropless paper configs: [n k, F] f32)
    layer_vals = (10 * D + ffn) * b + 4 * hidden
    saved = {
        "none": layer_vals + attn_saved,
        "full": D * b,
        "dots": (2 * D + H * K + 2 * G * K + ffn_dots) * b,
    }[remat]
    recomputed = 0 if remat == "none" else layer_vals + attn_recomputed
    tokens = batch_per_device * T
    # the logits are cast to f32 for the cross-entropy (models/transformer.py: logits), and
    # the compiler materialises that cast beside the compute-dtype logits: libtpu's buffer
    # assignment holds f32[B,T,V] and bf16[B,T,V] at once (mor_360m vanilla, 16 x 2048
    # tokens a device: 6 + 3 GiB), and the compiled total grows by 6.0 bytes a logit from
    # V 16384 to 49152 (32768 tokens a device, remat=full); 2 b, i.e. a fused f32
    # cross-entropy, left 2 bytes a logit out (3 GiB a device on the MoR configs)
    logits = tokens * m.vocab_size * (b + 4)
    return int(tokens * (layer_applications(m, T) * saved + recomputed) + logits)


# memory per chip (GiB) for the memory plan
# (TPUs from parallel/topology.py's generation table: HBM per device)
DEVICE_MEMORY_GIB = {
    "a100": 80,
    "h100": 80,
    "h200": 141,
    "b200": 180,
    **{g.hardware: g.hbm_gib_per_chip / g.devices_per_chip for g in GENERATIONS.values()},
}


def plan_platform(hardware: str) -> str | None:
    """The jax platform of a plan's hardware name (tpu-v5p -> tpu, h100 -> gpu)."""
    if not hardware:
        return None
    return "tpu" if hardware.startswith("tpu") else "cpu" if hardware == "cpu" else "gpu"


def device_memory_gib(hardware: str) -> float | None:
    if hardware in DEVICE_MEMORY_GIB:
        return float(DEVICE_MEMORY_GIB[hardware])
    if hardware == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return None


def memory_plan(cfg: Config, setup, mesh) -> dict:
    """Per-device bytes of params, optimizer state, grads and activations.  The kernels
    are those of the setup's platform, else of the config's pod (mesh.plan_hardware)."""
    data, fsdp, expert, _ = (mesh.shape[a] for a in MESH_AXES)
    # activations live one microbatch at a time (train.microbatches: gradient accumulation)
    batch_per_device = max(1, cfg.train.batch_size // (data * fsdp * expert * cfg.train.microbatches))
    p = sharded_bytes(setup.abstract_state["params"], setup.specs["params"], mesh)
    o = sharded_bytes(setup.abstract_state["opt_state"], setup.specs["opt_state"], mesh)
    platform = getattr(setup, "platform", None) or plan_platform(cfg.mesh.plan_hardware)
    return {
        "params": p,
        "opt_state": o,
        "grads": p,
        "activations": activation_bytes(cfg, batch_per_device, platform=platform),
        "activations_remat_full": activation_bytes(cfg, batch_per_device, remat="full", platform=platform),
        "batch_per_device": batch_per_device,
    }
