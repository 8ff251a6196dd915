"""Flash attention for packed rows on TPU: the Pallas splash-attention kernel with a causal
mask and segment ids (jax.experimental.pallas.ops.tpu.splash_attention; what MaxText
runs), GQA as R query heads per kv head (the kernel's MQA form, vmapped over kv heads).

Packed rows: moe_lab's mask (layers/attention.py) is causal by position within a
segment; with packing, positions rise by one inside each segment and segments are
contiguous, so "causal by index and same segment id" is the same set of pairs.  Padding
(segment 0) attends among itself, as nowhere in the loss.  Mosaic kernels cannot be
partitioned by XLA: on a mesh the call runs inside shard_map over the batch axes.
On CPU the kernel runs in Pallas' interpreter (the tests' reference check).

Dimension legend: B batch, T time, H query heads, G kv heads, R = H / G, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from moe_lab.parallel import sharding


def takes(seq_len: int) -> bool:
    """The kernel tiles time in blocks of 128, 256 or 512 rows: T must be a multiple of 128
    (others run xla attention: Attention.attend, and the start-up line says so)."""
    return seq_len % 128 == 0


def _kernel(seq_len: int, group: int, interpret: bool):
    """Built per trace (not cached: the kernel object holds the mask's block tables as
    arrays, which a cache would carry from one trace into the next)."""
    block = next(b for b in (512, 256, 128) if seq_len % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * group)
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q_BTHK, k_BTGK, v_BTGK, seg_BT, interpret: bool):
    B, T, H, K = q_BTHK.shape
    G = k_BTGK.shape[2]
    kernel = _kernel(T, H // G, interpret)
    q_BGRTK = (q_BTHK * K**-0.5).reshape(B, T, G, H // G, K).transpose(0, 2, 3, 1, 4)
    k_BGTK, v_BGTK = (a.transpose(0, 2, 1, 3) for a in (k_BTGK, v_BTGK))

    def one_row(q_GRTK, k_GTK, v_GTK, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GRTK, k_GTK, v_GTK)

    out_BGRTK = jax.vmap(one_row)(q_BGRTK, k_BGTK, v_BGTK, seg_BT.astype(jnp.int32))
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K).astype(v_BTGK.dtype)


def splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT):
    """Causal, segment-masked GQA attention -> [B, T, H, K] (see module doc)."""
    rules, mesh = sharding.active_rules_and_mesh()
    interpret = (
        mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else jax.default_backend()
    ) == "cpu"
    fn = functools.partial(_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return fn(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
    batch = sharding.logical_to_spec(("batch",), rules, mesh)[0]
    P = jax.sharding.PartitionSpec
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(batch),) * 4, out_specs=P(batch), check_vma=False)(
        q_BTHK, k_BTGK, v_BTGK, segment_ids_BT
    )
