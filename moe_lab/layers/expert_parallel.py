"""Expert parallelism by all-to-all: tokens travel to the devices that hold their experts.

GShard (Lepikhin et al. 2020, arXiv 2006.16668, sec. 3.2) / Switch (Fedus et al.
2021): with tokens sharded over the batch mesh axes and the E experts over the
`expert` axis (X devices, E_loc = E / X experts each), every device

 1. lays out its own n tokens' assignments in capacity buffers [E, C, D],
    C = ceil(capacity_factor * n * k / E) (first choices before second ones,
    then token order, among its tokens: capacity is per device, as in GShard's
    groups),
 2. all-to-all over `expert`: the buffers of experts [i E_loc, (i+1) E_loc) go
    to device i, which receives [X, E_loc, C, D] (one slab per sender),
 3. runs its E_loc experts on X * C rows each (batched einsums),
 4. all-to-all back, and combines its tokens' outputs (gates, drops) locally.

Per device the expert compute is k * n * capacity_factor rows, whatever E is,
and the traffic is two all-to-alls of [E, C, D], no all-gather of tokens or
weights over the `expert` axis.  Without this (model.moe.expert_parallel =
"gspmd"), the global sort of dispatch.py is partitioned by XLA.

Legend: n local tokens, D d_model, F expert hidden, E experts, X expert-axis
devices, e = E_loc local experts, C local capacity, K top-k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_lab.layers import routing
from moe_lab.layers.kernel_choice import moe_kernel_for
from moe_lab.layers.moe_kernels.accelerator import buffer_swiglu
from moe_lab.layers.moe_kernels.cpu_loop import choose_tiles
from moe_lab.layers.moe_kernels.dispatch import resolve_impl, sorted_swiglu, token_choice_moe
from moe_lab.layers.moe_kernels.layout import (
    buffer_layout,
    combine_rows,
    gather_rows,
    sorted_layout,
)
from moe_lab.parallel import sharding

EXPERT_AXIS = "expert"


def _token_spec(rules, mesh) -> P:
    return sharding.logical_to_spec(("batch", None), rules, mesh)


def _token_axes(rules, mesh) -> tuple[str, ...]:
    axes = _token_spec(rules, mesh)[0]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def why_not_all_to_all(moe, rules, mesh, num_tokens: int) -> str:
    """'' where the all-to-all applies to a call of `num_tokens` tokens, else why not.

    It applies to token-choice capacity dispatch on an `expert` mesh axis > 1
    that splits the tokens evenly, unless model.moe.expert_parallel = "gspmd".
    (The one decision; MoE.__call__ and `plan_line` both use it.)
    """
    x_devices = 1 if mesh is None else int(dict(mesh.shape).get(EXPERT_AXIS, 1))
    if x_devices == 1:
        return "expert axis 1: no expert parallelism"
    gspmd = f"experts over expert={x_devices} by GSPMD"
    dispatch = "dropless" if moe.dispatch == "auto" else moe.dispatch
    if moe.expert_parallel == "gspmd" or dispatch != "capacity" or moe.router == "expert_choice":
        return f"{gspmd} (global sort)"
    axes = _token_axes(rules, mesh)
    if EXPERT_AXIS not in axes:
        return f"{gspmd} (tokens not split over expert)"
    if num_tokens % math.prod(mesh.shape[a] for a in axes):
        return f"{gspmd} (tokens do not divide over the token shards)"
    return ""


def all_to_all_moe(x_ND, expert_NK, gate_NK, weights, *, capacity_factor: float):
    """Token-choice MoE with capacity, experts sharded over the `expert` mesh axis.

    x_ND, expert_NK, gate_NK: global arrays whose token dimension is sharded by
    the logical "batch" rule; weights (gate_EDF, up_EDF, down_EFD) sharded on E
    over `expert`.  Returns (y_ND, keep_NK).  Must be traced under
    `sharding.use_rules` with a mesh that has an `expert` axis.
    """
    rules, mesh = sharding.active_rules_and_mesh()
    num_experts = weights[0].shape[0]
    x_axes = mesh.shape[EXPERT_AXIS]
    local_experts = num_experts // x_axes
    token_spec = _token_spec(rules, mesh)
    expert_spec = P(EXPERT_AXIS, None, None)

    def local(x_nD, expert_nK, gate_nK, g_eDF, u_eDF, d_eFD):
        n, k = expert_nK.shape
        d = x_nD.shape[-1]
        cap = routing.capacity(n, k, num_experts, capacity_factor)
        layout = buffer_layout(expert_nK, num_experts, cap)
        x_SD = gather_rows(x_nD, layout.token_S, layout.row_NK, layout.keep_NK)
        # [X, e, C, D]: slab i holds this device's rows for device i's experts
        send_XeCD = x_SD.reshape(x_axes, local_experts, cap, d)
        recv_XeCD = jax.lax.all_to_all(send_XeCD, EXPERT_AXIS, 0, 0, tiled=True)
        rows_eRD = recv_XeCD.transpose(1, 0, 2, 3).reshape(local_experts, x_axes * cap, d)
        y_eRD = buffer_swiglu(rows_eRD, g_eDF, u_eDF, d_eFD)
        back_XeCD = y_eRD.reshape(local_experts, x_axes, cap, d).transpose(1, 0, 2, 3)
        y_SD = jax.lax.all_to_all(back_XeCD, EXPERT_AXIS, 0, 0, tiled=True).reshape(-1, d)
        y_nD = combine_rows(
            y_SD, gate_nK, layout.row_NK, layout.keep_NK, layout.token_S, layout.assign_S, layout.valid_S
        )
        return y_nD, layout.keep_NK

    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec) + (expert_spec,) * 3,
        out_specs=(token_spec, token_spec),
    )
    return fn(x_ND, expert_NK, gate_NK, *weights)


def plan_line(cfg, mesh) -> str:
    """One start-up line: which MoE kernels and which expert parallelism a run uses."""
    m = cfg.model.moe
    dispatch = "dropless" if m.dispatch == "auto" else m.dispatch
    tokens = cfg.train.batch_size * cfg.data.seq_len
    why_not = why_not_all_to_all(m, cfg.mesh.rules, mesh, tokens)
    platform = sharding.mesh_platform(mesh) or jax.default_backend()
    kernel = (
        "buffer"
        if not why_not
        else resolve_impl(
            moe_kernel_for(m, platform),
            dropless=dispatch != "capacity",
            expert_choice=m.router == "expert_choice",
        )
    )
    line = (
        f"MoE: {m.num_experts} experts, top-{m.top_k}, {m.router}, dispatch {dispatch}, "
        f"kernel {kernel}" + (f" (auto, on {platform})" if m.kernel == "auto" and why_not else "")
    )
    if why_not:
        why_local = why_not_local(m, cfg.mesh.rules, mesh, tokens)
        if why_local:
            return f"{line} | {why_not}" + ("" if mesh.size == 1 else f"; {why_local}")
        local = tokens // math.prod(mesh.shape[a] for a in _token_axes(cfg.mesh.rules, mesh))
        x = int(dict(mesh.shape).get(EXPERT_AXIS, 1))
        experts = (
            f"experts over expert={x} by a ring of {x} steps" if x > 1 else "every expert on every device"
        )
        return f"{line} | shard_map: each device sorts its own {local} tokens, {experts}"
    local = tokens // math.prod(mesh.shape[a] for a in _token_axes(cfg.mesh.rules, mesh))
    cap = routing.capacity(local, m.top_k, m.num_experts, m.capacity_factor)
    return (
        f"{line} | all-to-all over expert={mesh.shape[EXPERT_AXIS]}: {local} tokens per "
        f"device, capacity {cap} per expert per device"
    )


# ------------------------------------- dropless (and per-shard capacity) under shard_map


def why_not_local(moe, rules, mesh, num_tokens: int) -> str:
    """'' where a token-choice call of `num_tokens` tokens runs `sharded_moe` (every
    device sorts its own tokens; experts over `expert` by a ring), else why not.

    It applies to dropless dispatch on any mesh of more than one device whose token
    shards split the call evenly, and to capacity dispatch where the all-to-all does
    not (no expert axis): then the global sort of dispatch.py would be replicated on
    every device by GSPMD (the compile issue measured 1.04 TB of temporaries per chip).
    """
    if mesh is None or mesh.size == 1:
        return "one device"
    if moe.router == "expert_choice" or moe.expert_parallel == "gspmd":
        return "expert choice or expert_parallel='gspmd': the global GSPMD path"
    axes = _token_axes(rules, mesh)
    if not axes:
        return "tokens not sharded"
    x_devices = int(dict(mesh.shape).get(EXPERT_AXIS, 1))
    if x_devices > 1 and EXPERT_AXIS not in axes:
        return "tokens not split over expert"
    if num_tokens % math.prod(mesh.shape[a] for a in axes):
        return "tokens do not divide over the token shards"
    dispatch = "dropless" if moe.dispatch == "auto" else moe.dispatch
    if dispatch == "capacity" and x_devices > 1:
        return "capacity with an expert axis: the all-to-all"
    return ""


def sharded_moe(x_ND, expert_NK, gate_NK, weights, *, capacity_factor: float | None, impl: str):
    """Token-choice MoE under shard_map: no global sort, nothing replicated.

    Every device lays out its own n tokens' assignments (dispatch.py's sorted layouts
    and kernels, the TPU Mosaic grouped matmul included: inside shard_map it needs no
    automatic partitioning).  Experts are sharded over the `expert` mesh axis (X
    devices, e = E / X each); with X > 1 the token blocks of the expert axis travel
    a ring (MaxText's ring of experts): at each of X steps a device runs its local
    experts on the visiting block's assignments to them and adds their weighted
    outputs into the block's output, which travels with it, until every block is home
    with all k contributions.  Per device and step: the block's n k rows at most, the
    grouped matmul on local experts' rows only, two n x D transfers.  Dropless with
    capacity_factor None; otherwise capacity per device (X = 1 only: an expert axis
    takes the all-to-all).  Returns (y_ND, keep_NK).
    """
    rules, mesh = sharding.active_rules_and_mesh()
    num_experts = weights[0].shape[0]
    x_axes = int(dict(mesh.shape).get(EXPERT_AXIS, 1))
    token_spec = _token_spec(rules, mesh)
    expert_spec = P(EXPERT_AXIS if x_axes > 1 else None, None, None)
    impl = resolve_impl(impl, dropless=capacity_factor is None)

    def local(x_nD, expert_nK, gate_nK, g_eDF, u_eDF, d_eFD):
        n, k = expert_nK.shape
        w = (g_eDF, u_eDF, d_eFD)
        if x_axes == 1:
            cap = None if capacity_factor is None else routing.capacity(n, k, num_experts, capacity_factor)
            y_nD, layout = token_choice_moe(x_nD, expert_nK, gate_nK, w, capacity=cap, impl=impl)
            return y_nD, layout.keep_NK
        return _ring_of_experts(x_nD, expert_nK, gate_nK, w, x_axes, impl), jnp.ones((n, k), bool)

    # check_vma off: the CPU loop kernel's hand-written VJP carries weight-gradient
    # accumulators that shard_map's varying-axis types would have to be told about
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec) + (expert_spec,) * 3,
        out_specs=(token_spec, token_spec),
        check_vma=False,
    )
    return fn(x_ND, expert_NK, gate_NK, *weights)


def _ring_of_experts(x_nD, expert_nK, gate_nK, weights, x_axes: int, impl: str):
    """y_nD of this device's tokens: X ring steps over the `expert` axis (sharded_moe)."""
    local_experts = weights[0].shape[0]
    first = jax.lax.axis_index(EXPERT_AXIS) * local_experts  # global id of local expert 0
    ring = [(i, (i + 1) % x_axes) for i in range(x_axes)]

    # each step recomputed in the backward pass: autodiff would otherwise keep every
    # step's n k rows and expert hiddens alive at once (X times one step's; the compiler
    # asked for 127 GB of temporaries per chip on the sparsity config without this)
    @jax.checkpoint
    def visit(carry, _):
        x, expert, gate, y = carry
        y = y + local_expert_rows(x, expert - first, gate, weights, impl)
        return tuple(jax.lax.ppermute(a, EXPERT_AXIS, ring) for a in (x, expert, gate, y)), None

    carry = (x_nD, expert_nK, gate_nK, jnp.zeros_like(x_nD))
    (_, _, _, y_nD), _ = jax.lax.scan(visit, carry, None, length=x_axes)
    return y_nD  # X hops: every block is back on its own device


def local_expert_rows(x_nD, local_nK, gate_nK, weights, impl: str):
    """sum_k gate * SwiGLU_e(x) over the assignments to this device's experts
    (local ids 0..e-1; others contribute nothing): the local assignments sorted first,
    the rest after them as one group that is never computed or combined."""
    e = weights[0].shape[0]
    n, k = local_nK.shape
    mine_nK = (local_nK >= 0) & (local_nK < e)
    ids_nK = jnp.where(mine_nK, local_nK, e)
    kernel = "loop" if impl == "loop" else ("tokamax" if impl == "tokamax" else "ragged")
    tiles = (
        choose_tiles(n * k / (e + 1), None, row_macs=x_nD.shape[1] * weights[0].shape[-1])
        if kernel == "loop"
        else (0, 0)
    )
    layout = sorted_layout(ids_nK, e + 1, n, pad=tiles[0])
    rows_S = jnp.arange(layout.token_S.shape[0], dtype=jnp.int32)
    valid_S = rows_S < layout.starts_E[e]  # the local rows come first
    x_SD = gather_rows(x_nD, layout.token_S, layout.row_NK, mine_nK)
    y_SD = sorted_swiglu(kernel, x_SD, layout.starts_E[:e], layout.counts_E[:e], weights, tiles)
    return combine_rows(y_SD, gate_nK, layout.row_NK, mine_nK, layout.token_S, layout.assign_S, valid_S)
