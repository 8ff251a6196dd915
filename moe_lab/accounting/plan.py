"""Memory plans: per-device bytes of params, optimizer state and activations under a mesh.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

from moe_lab.config.schema import MESH_AXES, Config
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
    data, fsdp, expert, _ = (mesh.shape[a] for a in MESH_AXES)
    batch_per_device = max(1, cfg.train.batch_size // (data * fsdp * expert))
    p = sharded_bytes(setup.abstract_state["params"], setup.specs["params"], mesh)
    o = sharded_bytes(setup.abstract_state["opt_state"], setup.specs["opt_state"], mesh)
    return {"params": p, "opt_state": o, "grads": p,
            "activations": activation_bytes(cfg, batch_per_device),
            "activations_remat_full": activation_bytes(cfg, batch_per_device, remat="full"),
            "batch_per_device": batch_per_device}


