"""MoE dispatch: moving tokens to their experts, running the SwiGLU experts, combining.

Dimension legend: N tokens (= B*T), D d_model, F expert hidden, E experts,
K top-k, C capacity (rows per expert buffer), A = N*K assignments, S rows of
an expert-sorted layout (A, E*C or either plus tile padding), R = S.

Implementations (all give the reference's outputs and gradients where nothing
is dropped; tests/test_moe.py checks every pair):

* `reference_moe`: every expert on every token, weighted by the dense gate
  matrix `gates_NE` (zeros where unselected).  Slow, obviously correct.
* token choice, expert-sorted:  `sorted_layout` sorts the A assignments by
  expert, then choice rank, then token (GShard capacity semantics: all first
  choices are served before any second choice, first come first served within
  a rank; so a token's second choice can lose its slot to a later token's
  first choice: capacity dispatch is not causal, as in GShard, and a prefix
  and the full sequence may drop differently); an expert's rows beyond
  capacity C are dropped.  Tokens are moved
  with `gather_rows`, results brought back with `combine_rows`; both have
  custom VJPs whose backward passes are gathers too (no scatter-add in either
  direction; cf. MaxText's sort-based permute with custom VJP).
* expert compute on the sorted rows, by backend:
    - `grouped_swiglu_loop` (CPU): a loop over experts with a hand-written VJP;
      an expert's rows run as full tiles of W rows (a loop with a dynamic trip
      count, usually zero) and then one window whose size, a multiple of g, is
      picked by `lax.switch` (`choose_tiles`, `_expert_tiles`): usually one
      matmul per weight matrix and expert, < g padding rows, weight gradients
      straight from the dots.  Only rows the expert holds (rounded up to g) are
      computed, so cost ~ A*D*F and independent of E, without [E, C, D] buffers.
      `jax.lax.ragged_dot` is a dense loop over all experts on CPU (15-200x
      slower than a matmul), which is why it is not used there.
    - `grouped_swiglu_ragged` (TPU, dropless): `jax.lax.ragged_dot` grouped
      matmul (megablox-style GMM, Gale et al. 2022 arXiv 2211.15841).
    - `grouped_swiglu_blocks` (GPU, dropless): every expert's rows padded to
      whole blocks of b rows (`block_layout`), one batched einsum over blocks
      with each block's expert weights gathered (MegaBlocks' block-sparse idea,
      Gale et al. 2022, without a custom kernel).  Why not ragged_dot on GPU:
      measured on an H100 (jax 0.11.2, experiments/accelerator_check), it costs
      like a dense matmul over all experts: a [16384, 256] x [E, 256, 512] bf16
      ragged_dot took 0.24 ms at E=8 and 2.24 ms at E=256 (dense [16384, 256] x
      [256, 512]: 0.10 ms), its weight gradient 0.34 -> 6.3 ms, and the SwiGLU's
      fwd+bwd at 32768 f32 rows and E=256 asked XLA for 64 GiB.  (XLA rewrites
      ragged_dot to a dense dot on CUDA unless its cuDNN fusion applies;
      openxla/xla#40189 keeps the weight gradient dense.)
    - `buffer_swiglu` (accelerators, capacity): explicit [E, C, D] buffers and
      batched einsums (GShard, Lepikhin et al. 2020 arXiv 2006.16668).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# ----------------------------------------------------------------- reference


def reference_moe(x_ND, gates_NE, gate_EDF, up_EDF, down_EFD):
    """y_n = sum_e gates_NE[n, e] * SwiGLU_e(x_n) over ALL experts (scan over E)."""

    def step(y_ND, inputs):
        g_DF, u_DF, d_FD, w_N = inputs
        h_NF = jax.nn.silu(x_ND @ g_DF) * (x_ND @ u_DF)
        return y_ND + w_N[:, None] * (h_NF @ d_FD), None

    y_ND, _ = lax.scan(step, jnp.zeros_like(x_ND), (gate_EDF, up_EDF, down_EFD, gates_NE.T))
    return y_ND


def dense_gates(expert_NK, gate_NK, num_experts):
    """The [N, E] gate matrix of a token-choice routing (zeros where unselected)."""
    return jnp.sum(jax.nn.one_hot(expert_NK, num_experts, dtype=gate_NK.dtype) * gate_NK[..., None], 1)


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
    num_blocks = min(-(-(a + num_experts * (block - 1)) // block),
                     min(num_experts, a) + a // block)
    blocks_E = (load_E + block - 1) // block
    end_E = jnp.cumsum(blocks_E).astype(jnp.int32)  # exclusive end block of each expert
    starts_E = (end_E - blocks_E) * block
    row_A = starts_E[e_A] + pos_A  # assignment (n, k) -> its row
    rows = num_blocks * block
    arange_A = jnp.arange(a, dtype=jnp.int32)
    assign_S = jnp.zeros((rows,), jnp.int32).at[row_A].set(arange_A)
    block_expert_J = jnp.minimum(
        jnp.searchsorted(end_E, jnp.arange(num_blocks, dtype=jnp.int32), side="right"),
        num_experts - 1).astype(jnp.int32)
    layout = Layout(token_S=assign_S // k, assign_S=assign_S,
                    valid_S=jnp.zeros((rows,), bool).at[row_A].set(True),
                    row_NK=row_A.reshape(n, k), keep_NK=jnp.ones((n, k), bool),
                    starts_E=starts_E, counts_E=load_E, load_E=load_E)
    return layout, block_expert_J


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


# ---------------------------------------------------- grouped expert compute


# Below this many multiply-adds per weight matrix in a full W-row window, an expert's
# rows run as that one window (g = W): padding costs microseconds there, while every
# extra window size is another switch branch of 3 forward and 6 backward dots to compile.
SINGLE_WINDOW_MACS = 2**21


def choose_tiles(rows_per_expert: float, max_rows: int | None = None,
                 row_macs: int | None = None) -> tuple[int, int]:
    """(W, g) of the CPU loop for an expert's expected row count: an expert's rows run
    as full tiles of W rows while more than W remain, then the last 1..W rows as one
    window of the next multiple of g rows (see `_expert_tiles`).

    max_rows: a bound on any expert's rows (the capacity).  Up to 512 expected rows,
    W = the smaller of max_rows and 1.5x the expected rows (at most 768), so that
    nearly every expert runs exactly one matmul per weight matrix with <= g - 1
    padding rows (more rows than W: full tiles first); more expected rows: full
    tiles of about half the expected rows, at most 512.  g: at most 16 window sizes
    when one window is the rule (its padding, < g rows, is then a share of every
    expert's compute: at 160 expected rows and W=200, g = 24 -> 16 gave a paired
    A/B median of 0.968 over 15 pairs; at the bench shape's E=256, W=160, g = 16 -> 8
    gave 0.982 over 31 pairs, inside the noise, for 1.6 s more compile), at most 12
    when full tiles are (the window is then the tail of a long expert).
    Why one window per expert: each tile is a separate matmul that packs its
    expert's D x F weights again (from DRAM when E*D*F is large), and a tile's weight
    gradients must be zero-filled and accumulated, which at ~128 rows per expert
    costs about as much as the tile; so at few rows per expert the number of tiles,
    not the padding, sets the cost.  Measured (bench moe shape, E=256, fwd+bwd):
    main tiles of the expected rows plus quarter-size tails 694-726 ms (earlier
    kernel); one window of the capacity (25% padding) 747-931 ms; main tiles of half
    the rows with quarter tails 993-1103 ms.  This scheme against main + quarter
    tails, one A/B in one process: 717 vs 861 ms at E=256, 545 vs 547 ms at E=8.

    row_macs: multiply-adds per row and weight matrix (D * F).  When a whole window
    costs at most SINGLE_WINDOW_MACS, g = W: one window size, fewer branches to
    compile (a 1-layer d=32 MoE run of the test suite: train step compile 4.3 -> 3.1 s,
    eval step 1.5 -> 0.8 s, cached generate 1.8 -> 1.1 s).
    """
    if rows_per_expert <= 512:
        cover = max_rows if max_rows is not None else 1.5 * rows_per_expert
        w = max(8, 8 * math.ceil(min(cover, 1.5 * rows_per_expert, 768) / 8))
    else:
        w = 16
        while w < 512 and 2 * w <= rows_per_expert / 2:
            w *= 2
    if row_macs is not None and w * row_macs <= SINGLE_WINDOW_MACS:
        return w, w
    return w, max(8, 8 * math.ceil(w / (128 if rows_per_expert <= 512 else 96)))


def _silu_parts(g):
    s = jax.nn.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))  # silu(g), silu'(g)


def _expert_tiles(start, count, tiles):
    """(number of full W-row tiles, first row of the window, window branch) of one expert.

    Full tiles cover rows [start, start + n_full W) while more rows follow them; the
    remaining r = count - n_full W rows (1..W, or 0 for an empty expert) run as one
    window of ceil(r / g) * g rows (capped at W): branch ceil(r / g) of `_window_sizes`
    (branch 0: nothing).  Window rows past the expert's range are computed and then
    overwritten by the next expert (experts run in increasing order) or never read.
    """
    w, g = tiles
    n_full = jnp.maximum(count - 1, 0) // w
    rest = count - n_full * w
    return n_full, start + n_full * w, (rest + g - 1) // g


def _window_sizes(tiles) -> list[int]:
    w, g = tiles
    return [min(i * g, w) for i in range(1, -(-w // g) + 1)]


def _fwd_rows(x_TD, g_DF, u_DF, d_FD):
    g_TF, u_TF = x_TD @ g_DF, x_TD @ u_DF
    return (jax.nn.silu(g_TF) * u_TF) @ d_FD, g_TF, u_TF


def _bwd_rows(x_TD, g_TF, u_TF, dy_TD, g_DF, u_DF, d_FD):
    """(dx_TD, (dgate_DF, dup_DF, ddown_FD)) of SwiGLU rows given the saved g, u."""
    silu_TF, dsilu_TF = _silu_parts(g_TF)
    dd_FD = (silu_TF * u_TF).T @ dy_TD
    dh_TF = dy_TD @ d_FD.T
    dgate_TF = dh_TF * u_TF * dsilu_TF
    dup_TF = dh_TF * silu_TF
    dx_TD = dgate_TF @ g_DF.T + dup_TF @ u_DF.T
    return dx_TD, (x_TD.T @ dgate_TF, x_TD.T @ dup_TF, dd_FD)


def _fwd_window(x_TD, *weights):
    """`_fwd_rows` as a `_window` fn: (row outputs (y, g, u), no other outputs)."""
    return _fwd_rows(x_TD, *weights), ()


def _bwd_window(*args):
    """`_bwd_rows` as a `_window` fn: (row outputs (dx,), weight gradients)."""
    dx_TD, grads = _bwd_rows(*args)
    return (dx_TD,), grads


def _pad_rows(a_TX, rows: int):
    return jnp.pad(a_TX, ((0, rows - a_TX.shape[0]), (0, 0)))


def _window(tiles, branch, fn, zeros, row_args, other_args):
    """lax.switch over the window sizes: branch i runs `fn` on the first
    _window_sizes[i-1] of the W rows in `row_args` and pads its row outputs back to W
    rows; branch 0 returns `zeros`.  One matmul per weight matrix, whatever the size.

    Why the padded copy out of the switch, not a dynamic_update_slice of the big
    row buffers inside each branch: the latter was 1.05x the batched-einsum floor in
    the kernel alone, but inside the MoE layer XLA copied the whole carried buffers
    at every expert's conditional (bench moe E=256: 0.7 s -> 7 s)."""
    w = tiles[0]

    def sized(rows):
        def run(row_args, other_args):
            rows_out, rest = fn(*[a[:rows] for a in row_args], *other_args)
            return tuple(_pad_rows(a, w) for a in rows_out), rest
        return run

    branches = [lambda row_args, other_args: zeros] + [sized(r) for r in _window_sizes(tiles)]
    return lax.switch(branch, branches, row_args, other_args)


def _loop_forward(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, tiles):
    """Expert e's kept rows [starts_E[e], starts_E[e] + counts_E[e]): full tiles, then
    one window (`_expert_tiles`); returns y_SD and the saved g_SF, u_SF."""
    dt = x_SD.dtype
    s, f = x_SD.shape[0], gate_EDF.shape[-1]
    w = tiles[0]

    def expert_body(carry, inputs):
        start, count, g_DF, u_DF, d_FD = inputs
        n_full, row, branch = _expert_tiles(start, count, tiles)

        def full_tile(j, c):
            r0 = start + j * w
            outs = _fwd_rows(lax.dynamic_slice_in_dim(x_SD, r0, w), g_DF, u_DF, d_FD)
            return tuple(lax.dynamic_update_slice_in_dim(a, o, r0, 0) for a, o in zip(c, outs))

        carry = lax.fori_loop(0, n_full, full_tile, carry)
        zeros = ((jnp.zeros((w, x_SD.shape[1]), dt), jnp.zeros((w, f), dt), jnp.zeros((w, f), dt)),
                 ())
        outs, _ = _window(tiles, branch, _fwd_window, zeros,
                          (lax.dynamic_slice_in_dim(x_SD, row, w),), (g_DF, u_DF, d_FD))
        return tuple(lax.dynamic_update_slice_in_dim(a, o, row, 0)
                     for a, o in zip(carry, outs)), None

    init = (jnp.zeros_like(x_SD), jnp.zeros((s, f), dt), jnp.zeros((s, f), dt))
    # scan over experts: weights arrive as scan slices, row ranges as scalars
    out, _ = lax.scan(expert_body, init, (starts_E, counts_E, gate_EDF, up_EDF, down_EFD))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu_loop(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD,
                        tiles: tuple[int, int]):
    """y rows of expert e = SwiGLU_e(x rows of e) for the kept rows; other rows undefined.

    tiles = (W, g) (see choose_tiles; expert choice: (C, C), one window of C rows);
    x_SD needs >= W rows of padding after the last expert's rows.
    """
    return _loop_forward(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, tiles)[0]


def _loop_fwd(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, tiles):
    y_SD, g_SF, u_SF = _loop_forward(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, tiles)
    return y_SD, (x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, g_SF, u_SF)


def _loop_bwd(tiles, res, dy_SD):
    x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, g_SF, u_SF = res
    w = tiles[0]

    def rows(a_SX, r0):
        return lax.dynamic_slice_in_dim(a_SX, r0, w)

    def expert_body(dx_SD, inputs):
        start, count, g_DF, u_DF, d_FD = inputs
        weights = (g_DF, u_DF, d_FD)
        n_full, row, branch = _expert_tiles(start, count, tiles)
        # the window first: its weight gradients start the sum (no zero-fill, and
        # nothing to add when the expert has no full tile, the usual case)
        mine_W1 = (jnp.arange(w) < start + count - row)[:, None]
        dy_WD = jnp.where(mine_W1, rows(dy_SD, row), 0)
        zeros = ((jnp.zeros((w, x_SD.shape[1]), x_SD.dtype),),
                 tuple(jnp.zeros_like(a) for a in weights))
        (dx_WD,), grads = _window(tiles, branch, _bwd_window, zeros,
                                  (rows(x_SD, row), rows(g_SF, row), rows(u_SF, row), dy_WD),
                                  weights)

        def full_tile(j, c):
            r0 = start + j * w
            dx_TD, tile_grads = _bwd_rows(rows(x_SD, r0), rows(g_SF, r0), rows(u_SF, r0),
                                          rows(dy_SD, r0), *weights)
            return (lax.dynamic_update_slice_in_dim(c[0], dx_TD, r0, 0),
                    jax.tree.map(jnp.add, c[1], tile_grads))

        dx_SD, grads = lax.fori_loop(0, n_full, full_tile, (dx_SD, grads))
        return lax.dynamic_update_slice_in_dim(dx_SD, dx_WD, row, 0), grads

    dx_SD, (dgate_EDF, dup_EDF, ddown_EFD) = lax.scan(
        expert_body, jnp.zeros_like(x_SD), (starts_E, counts_E, gate_EDF, up_EDF, down_EFD))
    return dx_SD, None, None, dgate_EDF, dup_EDF, ddown_EFD


grouped_swiglu_loop.defvjp(_loop_fwd, _loop_bwd)


def grouped_swiglu_ragged(x_SD, group_sizes_E, gate_EDF, up_EDF, down_EFD):
    """Grouped matmul with `jax.lax.ragged_dot`: groups are contiguous from row 0."""
    g_SF = lax.ragged_dot(x_SD, gate_EDF, group_sizes_E)
    u_SF = lax.ragged_dot(x_SD, up_EDF, group_sizes_E)
    return lax.ragged_dot(jax.nn.silu(g_SF) * u_SF, down_EFD, group_sizes_E)


def grouped_swiglu_blocks(x_SD, block_expert_J, gate_EDF, up_EDF, down_EFD):
    """SwiGLU on [J, b, D] blocks, block j with expert block_expert_J[j]'s weights.

    Weights are gathered per block ([J, D, F]; autodiff turns the gather into a
    segment sum for the weight gradients): FLOPs ~ rows * D * F and weight
    traffic ~ J * D * F, neither a multiple of E.
    """
    j = block_expert_J.shape[0]
    x_JbD = x_SD.reshape(j, -1, x_SD.shape[-1])
    g_JbF = jnp.einsum("jbd,jdf->jbf", x_JbD, gate_EDF[block_expert_J])
    u_JbF = jnp.einsum("jbd,jdf->jbf", x_JbD, up_EDF[block_expert_J])
    y_JbD = jnp.einsum("jbf,jfd->jbd", jax.nn.silu(g_JbF) * u_JbF, down_EFD[block_expert_J])
    return y_JbD.reshape(x_SD.shape)


def buffer_swiglu(x_ECD, gate_EDF, up_EDF, down_EFD):
    """Batched expert SwiGLU on explicit per-expert buffers."""
    h_ECF = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, gate_EDF)) * jnp.einsum(
        "ecd,edf->ecf", x_ECD, up_EDF)
    return jnp.einsum("ecf,efd->ecd", h_ECF, down_EFD)


# ------------------------------------------------------------ entry points


def resolve_impl(impl: str, *, dropless: bool, expert_choice: bool = False) -> str:
    """The expert kernel a call runs: 'auto' is 'loop' on CPU and 'accelerator'
    elsewhere; 'accelerator' is 'buffer' for capacity, and for dropless 'ragged'
    on TPU, 'blocks' on GPU (see module doc).  Expert choice (exactly C rows per
    expert) runs buffers for every accelerator kernel."""
    if impl == "auto":
        impl = "loop" if jax.default_backend() == "cpu" else "accelerator"
    if expert_choice:
        return "buffer" if impl in ("accelerator", "buffer", "ragged", "blocks") else impl
    if impl == "accelerator":
        if not dropless:
            return "buffer"
        return "ragged" if jax.default_backend() == "tpu" else "blocks"
    return impl


def token_choice_moe(x_ND, expert_NK, gate_NK, weights, *, capacity: int | None,
                     impl: str = "auto", tiles: tuple[int, int] | None = None):
    """Expert-sorted token-choice MoE.  capacity=None: dropless.

    Returns (y_ND, layout); layout.keep_NK tells which assignments were dropped.
    impl: 'loop' (CPU grouped loop), 'ragged' (ragged_dot, dropless only),
    'blocks' (block-padded batched einsum, dropless only), 'buffer' ([E, C, D]
    einsum, capacity only), 'accelerator' (`resolve_impl`), 'auto' (by
    backend).  tiles: (W, g) rows of the CPU loop, default
    choose_tiles(expected rows per expert, capacity, D * F).
    """
    n, k = expert_NK.shape
    num_experts = weights[0].shape[0]
    impl = resolve_impl(impl, dropless=capacity is None)
    cap = n if capacity is None else capacity  # an expert gets each token at most once
    if impl in ("ragged", "blocks") and capacity is not None:
        raise ValueError(f"impl={impl!r} is dropless only (got capacity={capacity})")
    if impl == "blocks":
        layout, block_expert_J = block_layout(expert_NK, num_experts,
                                              choose_block(n * k, num_experts))
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = grouped_swiglu_blocks(x_SD, block_expert_J, *weights)
    elif impl == "buffer":
        layout = buffer_layout(expert_NK, num_experts, cap)
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = buffer_swiglu(x_SD.reshape(num_experts, cap, -1), *weights).reshape(x_SD.shape)
    elif impl == "ragged":
        layout = sorted_layout(expert_NK, num_experts, cap, pad=0)
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = grouped_swiglu_ragged(x_SD, layout.counts_E, *weights)
    elif impl == "loop":
        tiles = tiles or choose_tiles(min(cap, n * k / num_experts), capacity,
                                      row_macs=x_ND.shape[1] * weights[0].shape[-1])
        layout = sorted_layout(expert_NK, num_experts, cap, pad=tiles[0])
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = grouped_swiglu_loop(x_SD, layout.starts_E, layout.counts_E, *weights, tiles)
    else:
        raise ValueError(f"unknown MoE impl {impl!r}")
    y_ND = combine_rows(y_SD, gate_NK, layout.row_NK, layout.keep_NK, layout.token_S,
                        layout.assign_S, layout.valid_S)
    return y_ND, layout


def expert_choice_moe(x_ND, token_EC, gate_EC, weights, *, impl: str = "auto"):
    """Expert-choice MoE: expert e runs on tokens token_EC[e] (exactly C each).

    The combine is a segment sum (a token has 0..E experts); its backward is a gather.
    """
    num_experts, cap = token_EC.shape
    impl = resolve_impl(impl, dropless=False, expert_choice=True)
    token_S = token_EC.reshape(-1)
    x_SD = x_ND[token_S]
    if impl == "buffer":
        y_SD = buffer_swiglu(x_SD.reshape(num_experts, cap, -1), *weights).reshape(x_SD.shape)
    elif impl == "loop":
        # every expert holds exactly C rows: one window each, no padding rows
        starts_E = jnp.arange(num_experts, dtype=jnp.int32) * cap
        counts_E = jnp.full((num_experts,), cap, jnp.int32)
        y_SD = grouped_swiglu_loop(x_SD, starts_E, counts_E, *weights, (cap, cap))
    else:
        raise ValueError(f"unknown MoE impl {impl!r}")
    w_S = gate_EC.reshape(-1).astype(y_SD.dtype)
    return jnp.zeros_like(x_ND).at[token_S].add(w_S[:, None] * y_SD)
