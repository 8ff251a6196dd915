"""Decoder-only transformer with a scanned stack of layers.

Dimension legend: B batch, T time, D d_model, V vocab, L layers in a stack.

Distinct layers are stacked along a leading axis (created with nnx.vmap) and
applied with jax.lax.scan, so compile time does not grow with depth and the
growth transforms are one-liners on that axis (2510.08008: interpose = repeat,
stack = concatenate).  With `model.ffn = "moe"` and `moe.first_dense_layers = N`
the model holds two stacks: `dense_blocks` (the first N) then `blocks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.schema import ModelConfig
from moe_lab.layers.attention import Attention
from moe_lab.layers.base import dtype_of, param
from moe_lab.layers.mlp import SwiGLU
from moe_lab.layers.moe import MoE
from moe_lab.layers.norms import RMSNorm
from moe_lab.parallel import sharding

_REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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
            self.ffn = SwiGLU(cfg.d_model, cfg.resolved_mlp_hidden, init_std=cfg.init_std,
                              param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                              rngs=rngs)
        self.ffn_kind = ffn_kind
        self.post_norm = cfg.norm_placement == "post"

    def _ffn(self, h_BTD, train, rng, active_BT=None):
        """active_BT: the tokens the MoE's load, balance and z-loss statistics count
        (a recursive stack's dense path runs tokens that are not recursing)."""
        if self.ffn_kind == "moe":
            return self.ffn(h_BTD, train=train, rng=rng, active_BT=active_BT)
        return self.ffn(h_BTD), {}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        if self.post_norm:  # x = Norm(x + F(x)) (Vaswani et al. 2017)
            x_BTD = self.attn_norm(x_BTD + self.attn(x_BTD, positions_BT, segment_ids_BT))
            y_BTD, aux = self._ffn(x_BTD, train, rng)
            return self.ffn_norm(x_BTD + y_BTD), aux
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
        y_BTD, aux = self._ffn(self.ffn_norm(x_BTD), train, rng)
        return x_BTD + y_BTD, aux


    def decode(self, x_BTD, positions_BT, valid_BT, cache, index, layer=None):
        """Like __call__ with a KV cache (inference only; see Attention.decode)."""
        def attn(h_BTD):
            return self.attn.decode(h_BTD, positions_BT, valid_BT, cache, index, layer)

        if self.post_norm:
            a_BTD, cache = attn(x_BTD)
            x_BTD = self.attn_norm(x_BTD + a_BTD)
            y_BTD, _ = self._ffn(x_BTD, False, None)
            return self.ffn_norm(x_BTD + y_BTD), cache
        a_BTD, cache = attn(self.attn_norm(x_BTD))
        x_BTD = x_BTD + a_BTD
        y_BTD, _ = self._ffn(self.ffn_norm(x_BTD), False, None)
        return x_BTD + y_BTD, cache


def scan_layers(body, carry, xs):
    """lax.scan over stacked layers, or a direct call when there is one layer: a
    1-step loop costs compile time and nothing else (one-layer stacks are common:
    MoR's unique first / last layers, middle_cycle pools with L = N_r + 2)."""
    if jax.tree.leaves(xs)[0].shape[0] != 1:
        return jax.lax.scan(body, carry, xs)
    carry, ys = body(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], ys)


class ScannedStack(nnx.Module):
    """`num_layers` Blocks with parameters stacked on axis 0, applied by lax.scan."""

    def __init__(self, cfg: ModelConfig, num_layers: int, ffn_kind: str, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(cfg, ffn_kind, rngs=rngs)

        self.layers = make(rngs)
        self.num_layers = num_layers
        self.remat = cfg.remat
        self.cfg = cfg

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, *, train: bool, rng=None):
        graphdef, state_L = nnx.split(self.layers)
        keys_L = (jax.random.split(rng, self.num_layers) if rng is not None
                  else jnp.zeros((self.num_layers, 2), jnp.uint32))

        def body(x_BTD, layer):
            state, key = layer
            block = nnx.merge(graphdef, state)
            x_BTD, aux = block(x_BTD, positions_BT, segment_ids_BT, train=train,
                               rng=key if rng is not None else None)
            return sharding.constrain(x_BTD, ("batch", None, "embed")), aux

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat])
        x_BTD, aux_L = jax.lax.scan(body, x_BTD, (state_L, keys_L))
        return x_BTD, aux_L


    def init_cache(self, batch: int, max_len: int, dtype) -> dict:
        cfg = self.cfg
        shape = (self.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        return {"k_BSGK": jnp.zeros(shape, dtype), "v_BSGK": jnp.zeros(shape, dtype),
                "valid_BS": jnp.zeros((self.num_layers, batch, max_len), bool)}

    def decode(self, x_BTD, positions_BT, valid_BT, cache_L, index):
        """The stack on T new tokens; cache_L ([L, B, S, ...] arrays) is carried through
        the layer scan and written in place (see Attention.decode)."""
        graphdef, state_L = nnx.split(self.layers)

        def body(carry, layer):
            x_BTD, cache_L = carry
            state, i = layer
            block = nnx.merge(graphdef, state)
            return block.decode(x_BTD, positions_BT, valid_BT, cache_L, index, layer=i), None

        layers = (state_L, jnp.arange(self.num_layers, dtype=jnp.int32))
        return scan_layers(body, (x_BTD, cache_L), layers)[0]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        V, D = cfg.vocab_size, cfg.d_model
        pd = dtype_of(cfg.param_dtype)
        self.embed_VD = param(rngs, (V, D), ("vocab", "embed"), std=cfg.init_std, dtype=pd)
        if cfg.stack == "recursive":  # MoR (moe_lab/models/recursive.py)
            from moe_lab.models.recursive import RecursiveStack  # noqa: PLC0415 (import cycle)

            self.recursive = RecursiveStack(cfg, rngs=rngs)
        else:
            n_dense = cfg.moe.first_dense_layers if cfg.ffn == "moe" else 0
            if n_dense:
                self.dense_blocks = ScannedStack(cfg, n_dense, "dense", rngs=rngs)
            self.blocks = ScannedStack(cfg, cfg.num_layers - n_dense, cfg.ffn, rngs=rngs)
        self.final_norm = RMSNorm(D, eps=cfg.norm_eps, dtype=pd)
        if not cfg.tie_embeddings:
            self.unembed_DV = param(rngs, (D, V), ("embed", "vocab"), std=cfg.init_std, dtype=pd)
        self.cfg = cfg

    def stacks(self) -> list[tuple[str, ScannedStack]]:
        """(name, stack) in model order; a recursive model has one ("recursive", RecursiveStack)."""
        if hasattr(self, "recursive"):
            return [("recursive", self.recursive)]
        out = [("dense_blocks", self.dense_blocks)] if hasattr(self, "dense_blocks") else []
        return out + [("blocks", self.blocks)]

    def embed(self, tokens_BT):
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        return x_BTD.astype(dtype_of(self.cfg.compute_dtype))

    def logits(self, x_BTD):
        h_BTD = self.final_norm(x_BTD)
        cd = dtype_of(self.cfg.compute_dtype)
        w_DV = (self.embed_VD[...].T if self.cfg.tie_embeddings else self.unembed_DV[...])
        logits_BTV = jnp.einsum("btd,dv->btv", h_BTD.astype(cd), w_DV.astype(cd))
        return logits_BTV.astype(jnp.float32)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *,
                 train: bool = False, rng=None):
        """Returns (logits_BTV in f32, aux) where aux maps stack name -> per-layer aux."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("batch", None, "embed"))
        aux = {}
        for i, (name, stack) in enumerate(self.stacks()):
            key = jax.random.fold_in(rng, i) if rng is not None else None
            x_BTD, a = stack(x_BTD, positions_BT, segment_ids_BT, train=train, rng=key)
            if name == "recursive":  # {"first", "shared", "last", "mor"}: one entry per stack
                aux.update(a)
            else:
                aux[name] = a
        return self.logits(x_BTD), aux


    # ------------------------------------------------------------ decoding (KV cache)

    def init_cache(self, batch: int, max_len: int) -> dict:
        dtype = dtype_of(self.cfg.compute_dtype)
        return {name: stack.init_cache(batch, max_len, dtype) for name, stack in self.stacks()}

    def decode(self, tokens_BT, positions_BT, valid_BT, cache: dict, index):
        """T new tokens at cache slots [index, index+T) -> (logits_BTV, new cache)."""
        x_BTD = self.embed(tokens_BT)
        new_cache = {}
        for name, stack in self.stacks():
            x_BTD, new_cache[name] = stack.decode(x_BTD, positions_BT, valid_BT, cache[name], index)
        return self.logits(x_BTD), new_cache


def total_aux_loss(aux: dict) -> jax.Array:
    """Sum of the MoE layers' weighted auxiliary losses over all stacks and layers."""
    total = jnp.zeros((), jnp.float32)
    for stack_aux in aux.values():
        if "aux_loss" in stack_aux:
            total += jnp.sum(stack_aux["aux_loss"])
    return total
