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
      Not `jax.lax.ragged_dot` there: on CPU it is a dense loop over all
      experts, many times slower than a matmul (experiments/moe_kernels/README.md).
    - `bulk_and_loop_swiglu` (CPU, dropless, enough rows per expert): the first
      C0 = 0.9 x the expected rows of every expert at static offsets, run as one
      [E, C0, D] batched einsum, and only the rows past C0 through the loop above
      (`bulk_layout`): the loop's dynamic row offsets cost a fifth of the layer at
      few experts (the measurements: layout.py, BULK_FRACTION).
    - `grouped_swiglu_ragged` (TPU, dropless): `jax.lax.ragged_dot` grouped
      matmul (megablox-style GMM, Gale et al. 2022 arXiv 2211.15841).
    - `grouped_swiglu_blocks` (GPU, dropless): every expert's rows padded to
      whole blocks of b rows (`block_layout`), one batched einsum over blocks
      with each block's expert weights gathered (MegaBlocks' block-sparse idea,
      Gale et al. 2022, without a custom kernel).  Not ragged_dot on GPU: XLA
      rewrites it to a dense dot on CUDA, so it costs like a dense matmul over
      all experts (H100 timings: experiments/accelerator_check/README.md).
    - `grouped_swiglu_tokamax` (GPU and TPU, dropless: the accelerator default):
      `tokamax.ragged_dot`, tokamax's Pallas grouped matmul (mosaic on GPU / TPU,
      triton), the first of its kernels that accepts the shapes, else its XLA
      ragged_dot (what CPU runs: the tests check it there).  Same sorted rows as
      `ragged`.  Not yet timed on a GPU here (experiments/accelerator_check).
    - `buffer_swiglu` (accelerators, capacity): explicit [E, C, D] buffers and
      batched einsums (GShard, Lepikhin et al. 2020 arXiv 2006.16668).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_lab.layers.moe_kernels.accelerator import (
    buffer_swiglu,
    grouped_swiglu_blocks,
    grouped_swiglu_ragged,
    grouped_swiglu_tokamax,
)
from moe_lab.layers.moe_kernels.cpu_loop import choose_tiles, grouped_swiglu_loop
from moe_lab.layers.moe_kernels.layout import (
    block_layout,
    buffer_layout,
    bulk_layout,
    bulk_rows,
    choose_block,
    combine_rows,
    gather_rows,
    sorted_layout,
)

# ------------------------------------------------------------ entry points


def resolve_impl(impl: str, *, dropless: bool, expert_choice: bool = False) -> str:
    """The expert kernel a call runs: 'auto' is 'loop' on CPU and 'accelerator'
    elsewhere; 'accelerator' is 'buffer' for capacity and 'tokamax' for dropless
    (see module doc).  Expert choice (exactly C rows per expert) runs buffers for
    every accelerator kernel."""
    if impl == "auto":
        impl = "loop" if jax.default_backend() == "cpu" else "accelerator"
    if expert_choice:
        return "buffer" if impl in ("accelerator", "buffer", "ragged", "blocks", "tokamax") else impl
    if impl == "accelerator":
        if not dropless:
            return "buffer"
        return "tokamax"
    return impl


def sorted_swiglu(impl: str, x_SD, starts_E, counts_E, weights, tiles: tuple[int, int]):
    """The expert SwiGLU on expert-sorted rows (expert e's rows start at starts_E[e],
    contiguous from row 0; rows past the last expert's are not computed): the CPU loop,
    ragged_dot or tokamax's grouped matmul."""
    if impl == "loop":
        return grouped_swiglu_loop(x_SD, starts_E, counts_E, *weights, tiles)
    grouped = grouped_swiglu_ragged if impl == "ragged" else grouped_swiglu_tokamax
    return grouped(x_SD, counts_E, *weights)


def bulk_and_loop_swiglu(x_SD, bulk: int, over_starts_E, over_counts_E, weights, tiles: tuple[int, int]):
    """The expert SwiGLU on `bulk_layout` rows: the [E, C0] bulk as one batched einsum
    (static shapes), the overflow rows by the loop kernel."""
    num_experts, d = weights[0].shape[0], x_SD.shape[1]
    split = num_experts * bulk
    y_bulk = buffer_swiglu(x_SD[:split].reshape(num_experts, bulk, d), *weights).reshape(split, d)
    y_over = grouped_swiglu_loop(x_SD[split:], over_starts_E, over_counts_E, *weights, tiles)
    return jnp.concatenate([y_bulk, y_over])


def loop_dropless(expert_NK, num_experts: int, row_macs: int, tiles: tuple[int, int] | None = None):
    """(layout, experts) of the CPU dropless path: the layout of the assignments and
    experts(x_SD, layout, weights) -> y_SD (`bench moe` times the two apart).

    With `bulk_rows` > 0, the `bulk_layout`: most rows at static offsets (one batched
    einsum), the rest through the loop, in tiles sized for the expected overflow per
    expert; else the `sorted_layout` and the loop over all rows."""
    n, k = expert_NK.shape
    bulk = bulk_rows(n * k, num_experts)
    if not bulk:  # an expert gets each token at most once: n rows at most
        tiles = tiles or choose_tiles(min(n, n * k / num_experts), None, row_macs=row_macs)
        layout = sorted_layout(expert_NK, num_experts, n, pad=tiles[0])

        def experts(x_SD, layout, weights):
            return grouped_swiglu_loop(x_SD, layout.starts_E, layout.counts_E, *weights, tiles)

        return layout, experts
    tiles = tiles or choose_tiles(max(8.0, n * k / num_experts - bulk), None, row_macs=row_macs)
    layout = bulk_layout(expert_NK, num_experts, bulk, pad=tiles[0])

    def experts(x_SD, layout, weights):
        return bulk_and_loop_swiglu(x_SD, bulk, layout.starts_E, layout.counts_E, weights, tiles)

    return layout, experts


def token_choice_moe(
    x_ND,
    expert_NK,
    gate_NK,
    weights,
    *,
    capacity: int | None,
    impl: str = "auto",
    tiles: tuple[int, int] | None = None,
):
    """Expert-sorted token-choice MoE.  capacity=None: dropless.

    Returns (y_ND, layout); layout.keep_NK tells which assignments were dropped.
    impl: 'loop' (CPU grouped loop), 'ragged' (ragged_dot, dropless only),
    'tokamax' (tokamax.ragged_dot, dropless only),
    'blocks' (block-padded batched einsum, dropless only), 'buffer' ([E, C, D]
    einsum, capacity only), 'accelerator' (`resolve_impl`), 'auto' (by
    backend).  tiles: (W, g) rows of the CPU loop, default
    choose_tiles(expected rows per expert, capacity, D * F).
    """
    n, k = expert_NK.shape
    num_experts = weights[0].shape[0]
    impl = resolve_impl(impl, dropless=capacity is None)
    cap = n if capacity is None else capacity  # an expert gets each token at most once
    if impl in ("ragged", "blocks", "tokamax") and capacity is not None:
        raise ValueError(f"impl={impl!r} is dropless only (got capacity={capacity})")
    if impl == "blocks":
        layout, block_expert_J = block_layout(expert_NK, num_experts, choose_block(n * k, num_experts))
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = grouped_swiglu_blocks(x_SD, block_expert_J, *weights)
    elif impl == "buffer":
        layout = buffer_layout(expert_NK, num_experts, cap)
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = buffer_swiglu(x_SD.reshape(num_experts, cap, -1), *weights).reshape(x_SD.shape)
    elif impl == "loop" and capacity is None:
        layout, experts = loop_dropless(expert_NK, num_experts, x_ND.shape[1] * weights[0].shape[-1], tiles)
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = experts(x_SD, layout, weights)
    elif impl in ("ragged", "tokamax", "loop"):
        tiles = tiles or (
            (0, 0)
            if impl != "loop"
            else choose_tiles(
                min(cap, n * k / num_experts), capacity, row_macs=x_ND.shape[1] * weights[0].shape[-1]
            )
        )
        layout = sorted_layout(expert_NK, num_experts, cap, pad=tiles[0])
        x_SD = gather_rows(x_ND, layout.token_S, layout.row_NK, layout.keep_NK)
        y_SD = sorted_swiglu(impl, x_SD, layout.starts_E, layout.counts_E, weights, tiles)
    else:
        raise ValueError(f"unknown MoE impl {impl!r}")
    y_ND = combine_rows(
        y_SD, gate_NK, layout.row_NK, layout.keep_NK, layout.token_S, layout.assign_S, layout.valid_S
    )
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
