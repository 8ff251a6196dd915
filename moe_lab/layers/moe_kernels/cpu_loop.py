"""The CPU kernel: a loop over experts with windows sized by lax.switch, and its hand-written VJP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# ---------------------------------------------------- grouped expert compute


# Below this many multiply-adds per weight matrix in a full W-row window, an expert's
# rows run as that one window (g = W): padding costs microseconds there, while every
# extra window size is another switch branch of 3 forward and 6 backward dots to compile.
SINGLE_WINDOW_MACS = 2**21


def choose_tiles(
    rows_per_expert: float, max_rows: int | None = None, row_macs: int | None = None
) -> tuple[int, int]:
    """(W, g) of the CPU loop for an expert's expected row count: an expert's rows run
    as full tiles of W rows while more than W remain, then the last 1..W rows as one
    window of the next multiple of g rows (see `_expert_tiles`).

    max_rows: a bound on any expert's rows (the capacity).  Up to 512 expected rows,
    W = the smaller of max_rows and 1.5x the expected rows (at most 768), so that
    nearly every expert runs exactly one matmul per weight matrix with <= g - 1
    padding rows (more rows than W: full tiles first); more expected rows: full
    tiles of about half the expected rows, at most 512.  g: at most 16 window sizes
    when one window is the rule (its padding, < g rows, is then a share of every
    expert's compute; a finer g bought nothing measurable for more compile time,
    experiments/moe_kernels/README.md), at most 12 when full tiles are (the window
    is then the tail of a long expert).
    Why one window per expert: each tile is a separate matmul that packs its
    expert's D x F weights again (from DRAM when E*D*F is large), and a tile's weight
    gradients must be zero-filled and accumulated, which at ~128 rows per expert
    costs about as much as the tile; so at few rows per expert the number of tiles,
    not the padding, sets the cost (the A/Bs of the tilings tried are in
    experiments/moe_kernels/README.md).

    row_macs: multiply-adds per row and weight matrix (D * F).  When a whole window
    costs at most SINGLE_WINDOW_MACS, g = W: one window size, fewer branches to
    compile, which shortens small models' compiles (experiments/moe_kernels/README.md).
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
    row buffers inside each branch: inside the MoE layer XLA copied the whole carried
    buffers at every expert's conditional (experiments/moe_kernels/README.md)."""
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
        zeros = ((jnp.zeros((w, x_SD.shape[1]), dt), jnp.zeros((w, f), dt), jnp.zeros((w, f), dt)), ())
        outs, _ = _window(
            tiles, branch, _fwd_window, zeros, (lax.dynamic_slice_in_dim(x_SD, row, w),), (g_DF, u_DF, d_FD)
        )
        return tuple(lax.dynamic_update_slice_in_dim(a, o, row, 0) for a, o in zip(carry, outs)), None

    init = (jnp.zeros_like(x_SD), jnp.zeros((s, f), dt), jnp.zeros((s, f), dt))
    # scan over experts: weights arrive as scan slices, row ranges as scalars
    out, _ = lax.scan(expert_body, init, (starts_E, counts_E, gate_EDF, up_EDF, down_EFD))
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu_loop(x_SD, starts_E, counts_E, gate_EDF, up_EDF, down_EFD, tiles: tuple[int, int]):
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
        zeros = ((jnp.zeros((w, x_SD.shape[1]), x_SD.dtype),), tuple(jnp.zeros_like(a) for a in weights))
        (dx_WD,), grads = _window(
            tiles,
            branch,
            _bwd_window,
            zeros,
            (rows(x_SD, row), rows(g_SF, row), rows(u_SF, row), dy_WD),
            weights,
        )

        def full_tile(j, c):
            r0 = start + j * w
            dx_TD, tile_grads = _bwd_rows(
                rows(x_SD, r0), rows(g_SF, r0), rows(u_SF, r0), rows(dy_SD, r0), *weights
            )
            return (
                lax.dynamic_update_slice_in_dim(c[0], dx_TD, r0, 0),
                jax.tree.map(jnp.add, c[1], tile_grads),
            )

        dx_SD, grads = lax.fori_loop(0, n_full, full_tile, (dx_SD, grads))
        return lax.dynamic_update_slice_in_dim(dx_SD, dx_WD, row, 0), grads

    dx_SD, (dgate_EDF, dup_EDF, ddown_EFD) = lax.scan(
        expert_body, jnp.zeros_like(x_SD), (starts_E, counts_E, gate_EDF, up_EDF, down_EFD)
    )
    return dx_SD, None, None, dgate_EDF, dup_EDF, ddown_EFD


grouped_swiglu_loop.defvjp(_loop_fwd, _loop_bwd)
