"""The residual block and the scanned stack of blocks: the one model skeleton that the
plain stack, the recursive (MoR) stack and decoding all run.

Dimension legend: B batch, T time, S cache slots, D d_model, L layers in a stack,
n layers applied (a recursion step's pool layers), G kv heads, K head dim.

A block is attention then feed-forward, with pre-norm (default) or post-norm
placement; `Block.residual` writes that skeleton once and takes the attention as a
function, so the training forward (own keys, or an explicit mask and shared KV),
cached decoding and read-only cache decoding differ only in what they attend to.

Distinct layers are stacked along a leading axis (created with nnx.vmap) and
applied with jax.lax.scan (`ScannedStack.run` / `ScannedStack.decode`, through
`apply_layers`), so compile time does not grow with depth and the growth transforms
are one-liners on that axis (2510.08008: interpose = repeat, stack = concatenate).
A recursive stack applies a pool's layers by index (`ids`), reusing the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.schema import ModelConfig
from moe_lab.layers.attention import Attention, self_attention_mask
from moe_lab.layers.base import dtype_of
from moe_lab.layers.mlp import SwiGLU
from moe_lab.layers.moe import MoE
from moe_lab.layers.norms import RMSNorm
from moe_lab.parallel import sharding

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
CACHE_KEYS = ("k_BSGK", "v_BSGK", "valid_BS")  # one KV cache buffer set, in this order


def empty_cache(lead: tuple[int, ...], batch: int, max_len: int, cfg: ModelConfig, dtype) -> dict:
    """{"k_BSGK", "v_BSGK", "valid_BS"} zeros with leading axes `lead` (the layers)."""
    shape = (*lead, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
    return {
        "k_BSGK": jnp.zeros(shape, dtype),
        "v_BSGK": jnp.zeros(shape, dtype),
        "valid_BS": jnp.zeros(shape[:-2], bool),
    }


class Block(nnx.Module):
    """attention + feed-forward, with pre-norm (default) or post-norm placement."""

    def __init__(self, cfg: ModelConfig, ffn_kind: str, *, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=pd)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=pd)
        if ffn_kind == "moe":
            self.ffn = MoE(cfg, rngs=rngs)
        else:
            self.ffn = SwiGLU(
                cfg.d_model,
                cfg.resolved_mlp_hidden,
                init_std=cfg.init_std,
                param_dtype=cfg.param_dtype,
                compute_dtype=cfg.compute_dtype,
                rngs=rngs,
            )
        self.ffn_kind = ffn_kind
        self.post_norm = cfg.norm_placement == "post"

    def _ffn(self, h_BTD, train, rng, active_BT=None):
        """active_BT: the tokens the MoE's load, balance and z-loss statistics count
        (a recursive stack's dense path runs tokens that are not recursing)."""
        if self.ffn_kind == "moe":
            return self.ffn(h_BTD, train=train, rng=rng, active_BT=active_BT)
        return self.ffn(h_BTD), {}

    def residual(self, x_BTD, attend: Callable, *, train: bool = False, rng=None, active_BT=None):
        """The block skeleton -> (y_BTD, ffn aux, extra).

        attend(h_BTD) -> (a_BTD, extra): the attention of the normed (pre-norm) or raw
        (post-norm) input; extra is what it hands back (a cache, the KV it used).
        """
        if self.post_norm:  # x = Norm(x + F(x)) (Vaswani et al. 2017)
            a_BTD, extra = attend(x_BTD)
            x_BTD = self.attn_norm(x_BTD + a_BTD)
            y_BTD, aux = self._ffn(x_BTD, train, rng, active_BT)
            return self.ffn_norm(x_BTD + y_BTD), aux, extra
        a_BTD, extra = attend(self.attn_norm(x_BTD))
        x_BTD = x_BTD + a_BTD
        y_BTD, aux = self._ffn(self.ffn_norm(x_BTD), train, rng, active_BT)
        return x_BTD + y_BTD, aux, extra

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        y_BTD, aux, _ = self.residual(
            x_BTD, lambda h: (self.attn(h, positions_BT, segment_ids_BT), None), train=train, rng=rng
        )
        return y_BTD, aux

    def masked(
        self,
        x_BTD,
        positions_BT,
        mask_BTS,
        *,
        kv=None,
        train: bool,
        rng=None,
        active_BT=None,
        segment_ids_BT=None,
    ):
        """The block with an explicit attention mask and optional external KV
        (see Attention.attend) -> (y_BTD, aux, (k, v) attended to)."""
        return self.residual(
            x_BTD,
            lambda h: self.attn.attend(h, positions_BT, mask_BTS, kv, segment_ids_BT),
            train=train,
            rng=rng,
            active_BT=active_BT,
        )

    def decode(self, x_BTD, positions_BT, valid_BT, cache, index, layer=None):
        """Like __call__ with a KV cache (inference only; see Attention.decode)."""
        y_BTD, _, cache = self.residual(
            x_BTD, lambda h: self.attn.decode(h, positions_BT, valid_BT, cache, index, layer)
        )
        return y_BTD, cache

    def decode_read_only(self, x_BTD, positions_BT, cache_kv, index):
        """T new tokens attending only to a read-only cache (MoR KV sharing, steps >= 2:
        the cache already holds these tokens' step-1 KV at their slots)."""
        return self.residual(
            x_BTD, lambda h: (self.attn.attend_cache(h, positions_BT, cache_kv, index), None)
        )[0]


def scan_layers(body, carry, xs):
    """lax.scan over stacked layers, or a direct call when there is one layer: a
    1-step loop costs compile time and nothing else (one-layer stacks are common:
    MoR's unique first / last layers, middle_cycle pools with L = N_r + 2)."""
    if jax.tree.leaves(xs)[0].shape[0] != 1:
        return jax.lax.scan(body, carry, xs)
    carry, ys = body(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], ys)


def layer_keys(rng, n: int):
    """n per-layer keys; zeros (unused) without an rng, so the scan's inputs keep one shape."""
    return jax.random.split(rng, n) if rng is not None else jnp.zeros((n, 2), jnp.uint32)


def apply_layers(
    layers,
    body: Callable,
    carry,
    xs=None,
    *,
    ids: Sequence[int] | None = None,
    remat: str = "none",
    loop: Callable = scan_layers,
):
    """The stack-apply: body(block, carry, xs_l) -> (carry, ys) over stacked blocks.

    layers: nnx.vmap'ed Blocks (parameters stacked on axis 0).  ids=None: every layer
    in order (the scan slices the stacked state); else the layers `ids` in that order
    (a recursion step's pool layers; the state is indexed inside the body, so a
    layer applied at several steps is stored once).  xs: per-application inputs.
    """
    graphdef, state_L = nnx.split(layers)

    def step(carry, layer):
        which, xs_l = layer
        state = which if ids is None else jax.tree.map(lambda a: a[which], state_L)
        return body(nnx.merge(graphdef, state), carry, xs_l)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat])
    return loop(step, carry, (state_L if ids is None else jnp.asarray(ids, jnp.int32), xs))


class ScannedStack(nnx.Module):
    """`num_layers` Blocks with parameters stacked on axis 0, applied by lax.scan.

    scan_single=False: a one-layer stack is called directly (scan_layers), as MoR's
    unique first / last layers are; plain stacks scan every depth, one included.
    """

    def __init__(
        self, cfg: ModelConfig, num_layers: int, ffn_kind: str, *, rngs: nnx.Rngs, scan_single: bool = True
    ):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(cfg, ffn_kind, rngs=rngs)

        self.layers = make(rngs)
        self.num_layers = num_layers
        self.remat = cfg.remat
        self.scan_single = scan_single
        self.cfg = cfg

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        """-> (x_BTD, aux_L): every layer, attention causal within each packed document."""
        mask_BTS = self_attention_mask(segment_ids_BT, x_BTD.shape[:2])
        x_BTD, aux_L, _ = self.run(
            x_BTD, positions_BT, mask_BTS, train=train, rng=rng, segment_ids_BT=segment_ids_BT
        )
        return x_BTD, aux_L

    def run(
        self,
        x_BTD,
        positions_BT,
        mask_BTS,
        *,
        ids: Sequence[int] | None = None,
        kv_n=None,
        want_kv: bool = False,
        train: bool,
        rng=None,
        active_BT=None,
        segment_ids_BT=None,
    ):
        """The layers (all, or the pool layers `ids`) with an explicit mask -> (x, aux_n,
        kv_n or None).  kv_n: per-layer (k, v) to attend to (MoR KV sharing); want_kv:
        return the KV each layer used.  active_BT: the tokens the MoE statistics count.
        segment_ids_BT: where the mask is the packed rows' own (self-attention of every
        token), so a kernel that takes segment ids instead of a mask may run (splash)."""
        n = self.num_layers if ids is None else len(ids)

        def body(block, x_BTD, xs_l):
            key, kv = xs_l
            x_BTD, aux, kv_used = block.masked(
                x_BTD,
                positions_BT,
                mask_BTS,
                kv=kv,
                train=train,
                rng=key if rng is not None else None,
                active_BT=active_BT,
                segment_ids_BT=segment_ids_BT,
            )
            x_BTD = sharding.constrain(x_BTD, ("batch", None, "embed"))
            return x_BTD, (aux, kv_used if want_kv else None)

        loop = jax.lax.scan if ids is None and self.scan_single else scan_layers
        x_BTD, (aux_n, kv_out) = apply_layers(
            self.layers, body, x_BTD, (layer_keys(rng, n), kv_n), ids=ids, remat=self.remat, loop=loop
        )
        return x_BTD, aux_n, kv_out

    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        return empty_cache((self.num_layers,), batch, max_len, self.cfg, dtype)

    def decode(
        self,
        x_BTD,
        positions_BT,
        valid_BT,
        cache_n,
        index,
        *,
        ids: Sequence[int] | None = None,
        write: bool = True,
    ):
        """The stack (or the pool layers `ids`) on T new tokens -> (x_BTD, cache_n).

        cache_n ([n, B, S, ...] arrays, one row per layer applied) is carried through
        the layer scan and each layer's new KV written in place at slots
        [index, index+T) (Block.decode with a layer index: slicing a layer's cache
        in and out of the scan copied it twice per step).  write=False (MoR KV
        sharing, steps >= 2): the cache is only read, and returned as it came.
        """
        local_n = jnp.arange(self.num_layers if ids is None else len(ids), dtype=jnp.int32)
        if write:

            def body(block, carry, j):
                x_BTD, cache = carry
                return block.decode(x_BTD, positions_BT, valid_BT, cache, index, layer=j), None

            return apply_layers(self.layers, body, (x_BTD, cache_n), local_n, ids=ids)[0]

        def body_read_only(block, x_BTD, j):
            cache_kv = tuple(cache_n[k][j] for k in CACHE_KEYS)
            return block.decode_read_only(x_BTD, positions_BT, cache_kv, index), None

        return apply_layers(self.layers, body_read_only, x_BTD, local_n, ids=ids)[0], cache_n
