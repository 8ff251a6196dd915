"""Kernel choice by the devices a model is compiled for, not by the host's backend.

`model.attention_impl` and `model.moe.kernel` default to "auto".  What "auto" means
depends on the platform of the mesh's devices: a run compiled on a CPU host for a
TPU pod (moe-lab compile) must pick the kernels the pod would pick.  `for_platform`
returns the model config with both made concrete for a platform and the start-up
lines that say what was chosen and why; the run's config.json keeps "auto".
"""

from __future__ import annotations

import dataclasses

from moe_lab.config.schema import ModelConfig
from moe_lab.layers.attention_kernels import (
    auto_attention_note,
    resolve_attention_impl,
    splash_note,
)


def moe_kernel_for(moe, platform: str) -> str:
    """model.moe.kernel on `platform`: auto is the CPU loop on CPU, else [E, C, D]
    buffers for capacity and expert choice and tokamax's grouped matmul for dropless
    (moe_kernels/dispatch.py: resolve_impl)."""
    if moe.kernel != "auto":
        return moe.kernel
    if platform == "cpu":
        return "loop"
    dispatch = "dropless" if moe.dispatch == "auto" else moe.dispatch
    if moe.router == "expert_choice" or dispatch == "capacity":
        return "buffer"
    return "tokamax"


def for_platform(m: ModelConfig, platform: str, seq_len: int | None = None) -> tuple[ModelConfig, list[str]]:
    """(the model config with concrete kernels for `platform`, start-up lines; seq_len:
    the run's, for what the splash kernel takes)."""
    head_dim = m.resolved_head_dim
    attn = resolve_attention_impl(
        m.attention_impl, platform, compute_dtype=m.compute_dtype, head_dim=head_dim
    )
    notes = []
    if m.attention_impl == "auto":
        notes.append(auto_attention_note(platform, m.compute_dtype, head_dim, seq_len))
    elif attn == "splash":
        notes.append(
            f"attention: splash: {splash_note(seq_len)}"
            + (" (on cpu in Pallas' interpreter: for tests, slow)" if platform == "cpu" else "")
        )
    elif attn != m.attention_impl:
        notes.append(
            f"attention: {m.attention_impl} -> {attn} on {platform} (the kernel "
            "alone: a call it refuses fails to compile instead of falling back)"
        )
    out = dataclasses.replace(m, attention_impl=attn)
    if m.ffn == "moe":
        kernel = moe_kernel_for(m.moe, platform)
        if m.moe.kernel == "auto":
            notes.append(f"moe kernel: auto -> {kernel} on {platform}")
        out = dataclasses.replace(out, moe=dataclasses.replace(m.moe, kernel=kernel))
    return out, notes
