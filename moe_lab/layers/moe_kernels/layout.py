"""Expert-sorted layouts of the token->expert assignments, and the gather-only permutations."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# ------------------------------------------------------------------- layouts


class Layout(NamedTuple):
    """Where each assignment lives in an expert-sorted row array of S rows.

    token_S/assign_S: source token and flat assignment id (n*K + k) of row s;
    valid_S: row s holds a kept assignment; row_NK: row of assignment (n, k);
    keep_NK: (n, k) was not dropped; starts_E/counts_E: expert e's kept rows are
    [starts_E[e], starts_E[e] + counts_E[e]); load_E: assignments per expert
    before drops.
    """

    token_S: jax.Array
    assign_S: jax.Array
    valid_S: jax.Array
    row_NK: jax.Array
    keep_NK: jax.Array
    starts_E: jax.Array
    counts_E: jax.Array
    load_E: jax.Array


def _sort_by_expert(expert_NK, num_experts):
    """Assignments sorted by expert, and within an expert by choice rank, then token:
    every token's first choice is served before any token's second choice (GShard
    Algorithm 1; flaxformer's Switch router), so capacity drops hit the lower-ranked
    choices first and do not depend on where a token sits in the batch."""
    n, k = expert_NK.shape
    e_A = expert_NK.reshape(-1)
    rank_A = jnp.tile(jnp.arange(k, dtype=jnp.int32), n)
    # stable, so equal (expert, rank) keys keep token order
    order_A = jnp.argsort(e_A * k + rank_A, stable=True).astype(jnp.int32)  # row -> assignment
    load_E = jnp.bincount(e_A, length=num_experts).astype(jnp.int32)
    starts_E = (jnp.cumsum(load_E) - load_E).astype(jnp.int32)
    arange_A = jnp.arange(n * k, dtype=jnp.int32)
    row_A = jnp.zeros((n * k,), jnp.int32).at[order_A].set(arange_A)  # inverse permutation
    pos_A = row_A - starts_E[e_A]  # position within the expert (token order)
    return e_A, order_A, load_E, starts_E, row_A, pos_A


def sorted_layout(expert_NK, num_experts: int, capacity: int, pad: int) -> Layout:
    """Rows = the A assignments sorted by expert, plus `pad` zero-weight rows.

    Expert e's rows are [starts_E[e], starts_E[e] + load_E[e]); only the first
    `capacity` of them are kept (computed and combined).  Dropped rows stay in
    place but are never computed or read.
    """
    n, k = expert_NK.shape
    _e_A, order_A, load_E, starts_E, row_A, pos_A = _sort_by_expert(expert_NK, num_experts)
    keep_A = pos_A < capacity
    pad_i = jnp.zeros((pad,), jnp.int32)
    return Layout(
        token_S=jnp.concatenate([order_A // k, pad_i]),
        assign_S=jnp.concatenate([order_A, pad_i]),
        valid_S=jnp.concatenate([keep_A[order_A], jnp.zeros((pad,), bool)]),
        row_NK=row_A.reshape(n, k),
        keep_NK=keep_A.reshape(n, k),
        starts_E=starts_E,
        counts_E=jnp.minimum(load_E, capacity),
        load_E=load_E,
    )


# CPU dropless: the first BULK_FRACTION of an expert's expected rows sit at static
# offsets (an [E, C0, D] buffer, one batched einsum) and only the rest go through the
# loop kernel, whose dynamic row offsets cost: on the bench moe shape at E = 8 the loop
# kernel with runtime starts was 1.36-1.43x the dense layer against 1.14-1.19x with the
# same starts as compile-time constants (XLA slices them for free), and the bulk split
# took the experts + dispatch from 1.42x to 1.17x dense at 0.9 (1.26x at 1.0, where
# the bulk holds padding for every expert below the mean).
# In the layer (bench moe, one run): E = 8 1.46 -> 1.22x dense, E = 32 1.65 -> 1.36x,
# E = 128 2.02 -> 1.97x, but E = 256 2.65 -> 3.46x (the loop over 256 experts stays,
# for a few overflow rows each, and both paths write [E, D, F] weight gradients): so
# the split runs from BULK_MIN_EXPECTED_ROWS expected rows per expert on
# (experiments/moe_kernels/README.md).
BULK_FRACTION = 0.9
BULK_MIN_EXPECTED_ROWS = 512


def bulk_rows(assignments: int, num_experts: int) -> int:
    """C0, the rows per expert at static offsets in `bulk_layout` (a multiple of 8), or 0
    where the expected rows per expert are too few for the split to pay."""
    if assignments / num_experts < BULK_MIN_EXPECTED_ROWS:
        return 0
    return int(BULK_FRACTION * assignments / num_experts) // 8 * 8


def bulk_layout(expert_NK, num_experts: int, bulk: int, pad: int) -> Layout:
    """Dropless rows in two regions: the bulk, E buffers of `bulk` = C0 slots at static
    offsets (expert e's first C0 rows at e*C0 + position; empty slots invalid), then the
    overflow, every expert's rows past C0, expert-sorted from row E*C0 on, plus `pad`.

    starts_E / counts_E describe the overflow rows only, relative to row E*C0 (what the
    loop kernel runs on); the bulk is [E, C0] by construction.  The overflow region is
    sized for the worst case (A rows), so nothing is ever dropped.
    """
    n, k = expert_NK.shape
    a = n * k
    e_A, _order_A, load_E, _starts, _row, pos_A = _sort_by_expert(expert_NK, num_experts)
    over_E = jnp.maximum(load_E - bulk, 0).astype(jnp.int32)
    over_start_E = (jnp.cumsum(over_E) - over_E).astype(jnp.int32)
    row_A = jnp.where(
        pos_A < bulk, e_A * bulk + pos_A, num_experts * bulk + over_start_E[e_A] + pos_A - bulk
    ).astype(jnp.int32)
    return _dropless_layout(row_A, num_experts * bulk + a + pad, (n, k), over_start_E, over_E, load_E)


def _dropless_layout(row_A, rows: int, nk: tuple[int, int], starts_E, counts_E, load_E) -> Layout:
    """The Layout of dropless rows from the row of every assignment (row_A, distinct
    rows in [0, rows)): rows no assignment holds are invalid (never combined)."""
    n, k = nk
    assign_S = jnp.zeros((rows,), jnp.int32).at[row_A].set(jnp.arange(n * k, dtype=jnp.int32))
    return Layout(
        token_S=assign_S // k,
        assign_S=assign_S,
        valid_S=jnp.zeros((rows,), bool).at[row_A].set(True),
        row_NK=row_A.reshape(n, k),
        keep_NK=jnp.ones((n, k), bool),
        starts_E=starts_E,
        counts_E=counts_E,
        load_E=load_E,
    )


def buffer_layout(expert_NK, num_experts: int, capacity: int) -> Layout:
    """Rows = E buffers of C slots (row e*C + c); empty slots are invalid."""
    n, k = expert_NK.shape
    e_A, order_A, load_E, starts_E, _row_A, pos_A = _sort_by_expert(expert_NK, num_experts)
    keep_A = pos_A < capacity
    c_C = jnp.arange(capacity, dtype=jnp.int32)
    counts_E = jnp.minimum(load_E, capacity)
    valid_EC = c_C[None, :] < counts_E[:, None]
    src_EC = jnp.where(valid_EC, starts_E[:, None] + c_C[None, :], 0)
    assign_S = order_A[src_EC].reshape(-1)
    return Layout(
        token_S=assign_S // k,
        assign_S=assign_S,
        valid_S=valid_EC.reshape(-1),
        row_NK=jnp.where(keep_A, e_A * capacity + pos_A, 0).reshape(n, k),
        keep_NK=keep_A.reshape(n, k),
        starts_E=jnp.arange(num_experts, dtype=jnp.int32) * capacity,
        counts_E=counts_E,
        load_E=load_E,
    )


def block_layout(expert_NK, num_experts: int, block: int) -> tuple[Layout, jax.Array]:
    """Dropless rows grouped by expert, each expert's group padded to whole blocks.

    Returns (layout, block_expert_J): row s belongs to block s // block, and
    every block holds rows of one expert, block_expert_J[j].  J is a static
    bound on sum_e ceil(load_e / block), the smaller of
    ceil((A + E (block - 1)) / block) and min(E, A) + A // block (each
    non-empty expert's last block plus its full ones; the tighter one when
    E > A / block, e.g. decoding a few tokens).  Padding rows and unused
    trailing blocks are invalid (never combined; zero gradients).
    """
    n, k = expert_NK.shape
    a = n * k
    e_A, order_A, load_E, _starts, _row, pos_A = _sort_by_expert(expert_NK, num_experts)
    num_blocks = min(-(-(a + num_experts * (block - 1)) // block), min(num_experts, a) + a // block)
    blocks_E = (load_E + block - 1) // block
    end_E = jnp.cumsum(blocks_E).astype(jnp.int32)  # exclusive end block of each expert
    starts_E = (end_E - blocks_E) * block
    row_A = starts_E[e_A] + pos_A  # assignment (n, k) -> its row
    block_expert_J = jnp.minimum(
        jnp.searchsorted(end_E, jnp.arange(num_blocks, dtype=jnp.int32), side="right"), num_experts - 1
    ).astype(jnp.int32)
    return _dropless_layout(row_A, num_blocks * block, (n, k), starts_E, load_E, load_E), block_expert_J


def choose_block(assignments: int, num_experts: int) -> int:
    """Rows per block of `block_layout`: a power of two in [16, 128], and small
    enough that the padding bound E * block stays under half the assignments
    (static shapes compute the bound, not the actual padding)."""
    block = 128
    while block > 16 and num_experts * block > assignments // 2:
        block //= 2
    return block


# ------------------------------------------------- gather-only permutations


@jax.custom_vjp
def gather_rows(x_ND, token_S, row_NK, keep_NK):
    """x_SD = x_ND[token_S].  Backward: dx_n = sum_k keep * dx_S[row_NK] (a gather)."""
    return x_ND[token_S]


def _gather_rows_fwd(x_ND, token_S, row_NK, keep_NK):
    return x_ND[token_S], (row_NK, keep_NK, token_S)


def _gather_rows_bwd(res, dx_SD):
    row_NK, keep_NK, _token_S = res
    dx_NKD = jnp.where(keep_NK[..., None], dx_SD[row_NK], 0)
    return jnp.sum(dx_NKD, axis=1), None, None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine_rows(y_SD, gate_NK, row_NK, keep_NK, token_S, assign_S, valid_S):
    """y_ND = sum_k keep * gate_NK * y_SD[row_NK].

    Backward (gathers only): dy_S = valid * gate[assign_S] * dy_ND[token_S];
    dgate_NK = keep * <y_SD[row_NK], dy_ND>.
    """
    y_NKD = y_SD[row_NK]
    w_NK = jnp.where(keep_NK, gate_NK, 0).astype(y_SD.dtype)
    return jnp.einsum("nk,nkd->nd", w_NK, jnp.where(keep_NK[..., None], y_NKD, 0))


def _combine_fwd(y_SD, gate_NK, row_NK, keep_NK, token_S, assign_S, valid_S):
    out = combine_rows(y_SD, gate_NK, row_NK, keep_NK, token_S, assign_S, valid_S)
    return out, (y_SD, gate_NK, row_NK, keep_NK, token_S, assign_S, valid_S)


def _combine_bwd(res, dy_ND):
    y_SD, gate_NK, row_NK, keep_NK, token_S, assign_S, valid_S = res
    w_S = jnp.where(valid_S, gate_NK.reshape(-1)[assign_S], 0).astype(dy_ND.dtype)
    dy_SD = w_S[:, None] * dy_ND[token_S]
    y_NKD = jnp.where(keep_NK[..., None], y_SD[row_NK], 0)
    dgate_NK = jnp.einsum("nkd,nd->nk", y_NKD, dy_ND).astype(gate_NK.dtype)
    return dy_SD, dgate_NK, None, None, None, None, None


combine_rows.defvjp(_combine_fwd, _combine_bwd)
