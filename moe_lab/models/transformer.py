"""Decoder-only transformer: embedding, stacks of blocks, final norm and unembedding.

Dimension legend: B batch, T time, D d_model, V vocab, L layers in a stack.

The stacks are ScannedStacks of residual blocks (moe_lab/models/blocks.py: layers
stacked on axis 0, applied by lax.scan), or one Mixture-of-Recursions stack
(`model.stack = "recursive"`, moe_lab/models/recursive.py).  With `model.ffn = "moe"`
and `moe.first_dense_layers = N` the model holds two stacks: `dense_blocks` (the
first N) then `blocks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.schema import DEFAULT_RULES, ModelConfig
from moe_lab.layers.base import dtype_of, param
from moe_lab.layers.norms import RMSNorm
from moe_lab.models import tree
from moe_lab.models.blocks import ScannedStack
from moe_lab.models.recursive import RecursiveStack
from moe_lab.parallel import sharding


class Transformer(nnx.Module):
    """The decoder.  `rules`: the logical -> mesh axis table (config.mesh.rules) its
    activation constraints and expert parallelism follow whenever it is traced under
    `jax.set_mesh` (parallel/sharding.py: model_rules)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=DEFAULT_RULES):
        V, D = cfg.vocab_size, cfg.d_model
        self.rules = tuple(rules)
        pd = dtype_of(cfg.param_dtype)
        self.embed_VD = param(rngs, (V, D), ("vocab", "embed"), std=cfg.init_std, dtype=pd)
        if cfg.stack == "recursive":  # MoR (moe_lab/models/recursive.py)
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

    def stacks(self) -> list[tuple[str, ScannedStack | RecursiveStack]]:
        """(name, stack) in model order; a recursive model has one ("recursive", RecursiveStack).
        The names are the state tree's (models/tree.py)."""
        names = (tree.RECURSIVE,) if hasattr(self, tree.RECURSIVE) else tree.PLAIN_STACKS
        return [(name, getattr(self, name)) for name in names if hasattr(self, name)]

    def embed(self, tokens_BT):
        x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
        return x_BTD.astype(dtype_of(self.cfg.compute_dtype))

    def logits(self, x_BTD):
        h_BTD = self.final_norm(x_BTD)
        cd = dtype_of(self.cfg.compute_dtype)
        w_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.unembed_DV[...]
        logits_BTV = jnp.einsum("btd,dv->btv", h_BTD.astype(cd), w_DV.astype(cd))
        return logits_BTV.astype(jnp.float32)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, train: bool = False, rng=None):
        """Returns (logits_BTV in f32, aux) where aux maps stack name -> per-layer aux."""
        with sharding.model_rules(self.rules):
            return self._forward(tokens_BT, positions_BT, segment_ids_BT, train=train, rng=rng)

    def _forward(self, tokens_BT, positions_BT, segment_ids_BT, *, train, rng):
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
            if name == tree.RECURSIVE:  # {"first", "shared", "last", "mor"}: one entry per stack
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
        with sharding.model_rules(self.rules):
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
