"""Sparse Mixture-of-Experts feed-forward layer (router + SwiGLU experts + dispatch).

Dimension legend: B batch, T time, D d_model, F expert hidden, E experts,
K top-k, C capacity, N = B*T tokens, A = N*K assignments.

y = sum_{e in topk(x)} gate_e(x) * SwiGLU_e(x)  [+ shared SwiGLU(x)]

Papers: Shazeer et al. 2017 (arXiv 1701.06538, sparsely-gated MoE); GShard
(arXiv 2006.16668, capacity); Switch Transformer (arXiv 2101.03961, load-balance
loss, jitter); ST-MoE (arXiv 2202.08906, z-loss); Mixtral (arXiv 2401.04088);
DeepSeekMoE (arXiv 2401.06066, shared experts); DeepSeek-V3 (arXiv 2412.19437,
sigmoid router with loss-free balancing bias); Expert Choice (arXiv 2202.09368);
MegaBlocks (arXiv 2211.15841, dropless).  Routers: moe_lab/layers/routing.py;
dispatch algorithms: moe_lab/layers/moe_kernels/dispatch.py.

The module is pure in __call__ (no variable mutation, static shapes), so it can
be created with nnx.vmap and applied under jax.lax.scan.  The sigmoid router's
`bias_E` (a `RouterBias`, not a Param) is updated after each train step with
`router_bias_after_step(bias_LE, aux, rate)` from the load the step's aux reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_lab.config.schema import DEFAULT_RULES, ModelConfig
from moe_lab.layers import expert_parallel as ep
from moe_lab.layers import routing
from moe_lab.layers.base import dtype_of, param, router_matmul
from moe_lab.layers.mlp import SwiGLU
from moe_lab.layers.moe_kernels.dispatch import expert_choice_moe, token_choice_moe
from moe_lab.layers.moe_kernels.reference import dense_gates, reference_moe
from moe_lab.parallel import sharding


class MoE(nnx.Module):
    """Token-choice or expert-choice MoE with SwiGLU experts.

    Parameters (growth code relies on these names):
      router_DE ("embed", None); gate_EDF, up_EDF ("expert", "embed", "mlp");
      down_EFD ("expert", "mlp", "embed"); bias_E (RouterBias, sigmoid router
      only); shared (SwiGLU, if num_shared_experts > 0); shared_gate_D (moe.shared_gate).

    `impl` (a static attribute, model.moe.kernel, default "auto": by backend)
    picks the dispatch kernels: see dispatch.token_choice_moe.  Tests set it to
    exercise the accelerator kernels on CPU.

    `rules`: the logical -> mesh axis table the layer's expert parallelism follows
    when it is traced by itself under `jax.set_mesh` (a notebook, a benchmark); inside
    a Transformer the model's table is already in force and wins
    (parallel/sharding.py: model_rules).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=DEFAULT_RULES):
        m = cfg.moe
        d, f, e = cfg.d_model, cfg.resolved_expert_hidden, m.num_experts
        pd = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.rules = tuple(rules)
        self.impl = cfg.moe.kernel
        self.router_DE = param(rngs, (d, e), ("embed", None), std=cfg.init_std, dtype=pd)
        self.gate_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.up_EDF = param(rngs, (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pd)
        self.down_EFD = param(rngs, (e, f, d), ("expert", "mlp", "embed"), std=cfg.init_std, dtype=pd)
        if m.router == "sigmoid":
            self.bias_E = routing.make_router_bias(e)
        if m.num_shared_experts > 0:
            self.shared = SwiGLU(
                d,
                m.shared_hidden or m.num_shared_experts * f,
                init_std=cfg.init_std,
                param_dtype=cfg.param_dtype,
                compute_dtype=cfg.compute_dtype,
                rngs=rngs,
            )
            if m.shared_gate:  # Qwen2-MoE: shared output * sigmoid(x . w)
                self.shared_gate_D = param(rngs, (d,), ("embed",), std=cfg.init_std, dtype=pd)

    def router_logits(self, x_ND: jax.Array, *, train: bool, rng: jax.Array | None) -> jax.Array:
        """float32 logits_NE (jitter on the router input while training)."""
        m = self.cfg.moe
        xr_ND = x_ND.astype(jnp.float32)
        if train and m.router_jitter > 0:
            if rng is None:
                raise ValueError("MoE: router_jitter > 0 in training needs an `rng`")
            xr_ND = routing.jitter(xr_ND, m.router_jitter, rng)
        return router_matmul(xr_ND, self.router_DE[...])

    def _all_to_all(self, num_tokens: int) -> bool:
        """Expert parallelism by all-to-all (layers/expert_parallel.py) for this call?
        Calls whose tokens the token shards do not divide (small decode batches)
        take the GSPMD path."""
        rules, mesh = sharding.active_rules_and_mesh()
        return not ep.why_not_all_to_all(self.cfg.moe, rules, mesh, num_tokens)

    def __call__(
        self,
        x_BTD: jax.Array,
        *,
        train: bool,
        rng: jax.Array | None = None,
        active_BT: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """active_BT: tokens counted in the load, balance, z-loss and drop statistics
        (all if None).  Every token is still computed; a recursive stack's dense path
        passes the tokens its recursion step really runs."""
        with sharding.model_rules(self.rules):
            return self._apply(x_BTD, train=train, rng=rng, active_BT=active_BT)

    def _apply(self, x_BTD, *, train: bool, rng, active_BT) -> tuple[jax.Array, dict[str, jax.Array]]:
        m = self.cfg.moe
        b, t, d = x_BTD.shape
        n, e, k = b * t, m.num_experts, m.top_k
        # weight 1 for each token the statistics count
        w_N = jnp.ones((n,), jnp.float32) if active_BT is None else active_BT.reshape(n).astype(jnp.float32)
        cd = dtype_of(self.cfg.compute_dtype)
        x_ND = x_BTD.reshape(n, d)
        logits_NE = self.router_logits(x_ND, train=train, rng=rng)
        weights = (self.gate_EDF[...].astype(cd), self.up_EDF[...].astype(cd), self.down_EFD[...].astype(cd))
        xc_ND = x_ND.astype(cd)
        dispatch = "dropless" if m.dispatch == "auto" else m.dispatch

        if m.router == "expert_choice":
            cap = routing.capacity(n, k, e, m.capacity_factor)
            ec = routing.ExpertChoiceRouter()(logits_NE, capacity=cap)
            if dispatch == "reference":
                gates_NE = (
                    jnp.zeros((n, e), jnp.float32).at[ec.token_EC, jnp.arange(e)[:, None]].add(ec.gate_EC)
                )
                y_ND = reference_moe(xc_ND, gates_NE.astype(cd), *weights)
            else:
                y_ND = expert_choice_moe(xc_ND, ec.token_EC, ec.gate_EC.astype(cd), weights, impl=self.impl)
            load_E = jnp.full((e,), cap, jnp.int32)
            # tokens no expert picked (expert choice drops tokens, not assignments)
            unpicked_N = jnp.ones((n,), jnp.float32).at[ec.token_EC.reshape(-1)].set(0.0)
            drop = jnp.mean(unpicked_N)
            aux = routing.router_aux(
                logits_NE,
                ec.probs_NE,
                load_E,
                balance=False,
                drop_fraction=drop,
                aux_loss_weight=m.aux_loss_weight,
                z_loss_weight=m.z_loss_weight,
                mask_N=w_N,
            )
        else:
            router = routing.TOKEN_CHOICE_ROUTERS[m.router]
            bias_E = self.bias_E[...] if m.router == "sigmoid" else None
            tc = router(logits_NE, bias_E, top_k=k, renormalize=m.renormalize)
            gate_NK = tc.gate_NK.astype(cd)
            if dispatch == "reference":
                y_ND = reference_moe(xc_ND, dense_gates(tc.expert_NK, gate_NK, e), *weights)
                drop = jnp.zeros((), jnp.float32)
            else:
                rules, mesh = sharding.active_rules_and_mesh()
                if self._all_to_all(n):
                    y_ND, keep_NK = ep.all_to_all_moe(
                        xc_ND, tc.expert_NK, gate_NK, weights, capacity_factor=m.capacity_factor
                    )
                elif not ep.why_not_local(m, rules, mesh, n):
                    y_ND, keep_NK = ep.sharded_moe(
                        xc_ND,
                        tc.expert_NK,
                        gate_NK,
                        weights,
                        impl=self.impl,
                        capacity_factor=m.capacity_factor if dispatch == "capacity" else None,
                    )
                else:
                    cap = routing.capacity(n, k, e, m.capacity_factor) if dispatch == "capacity" else None
                    y_ND, layout = token_choice_moe(
                        xc_ND, tc.expert_NK, gate_NK, weights, capacity=cap, impl=self.impl
                    )
                    keep_NK = layout.keep_NK
                dropped_NK = jnp.logical_not(keep_NK).astype(jnp.float32)
                drop = jnp.sum(dropped_NK * w_N[:, None]) / jnp.maximum(k * jnp.sum(w_N), 1.0)
            load_E = jnp.bincount(tc.expert_NK.reshape(-1), length=e, weights=jnp.repeat(w_N, k))
            aux = routing.router_aux(
                logits_NE,
                tc.probs_NE,
                load_E,
                balance=True,
                drop_fraction=drop,
                aux_loss_weight=m.aux_loss_weight,
                z_loss_weight=m.z_loss_weight,
                mask_N=w_N,
            )

        if m.routed_scale != 1.0:
            y_ND = y_ND * m.routed_scale
        if m.num_shared_experts > 0:
            shared_ND = self.shared(xc_ND)
            if m.shared_gate:
                gate_N = jax.nn.sigmoid(xc_ND @ self.shared_gate_D[...].astype(cd))
                shared_ND = shared_ND * gate_N[:, None]
            y_ND = y_ND + shared_ND
        return y_ND.reshape(b, t, d).astype(x_BTD.dtype), aux


def router_bias_after_step(
    bias_LE: jax.Array,
    aux: dict[str, jax.Array],
    rate: float,
    application_layer: tuple[int, ...] | None = None,
) -> jax.Array:
    """A stack's sigmoid-router biases after a train step: per layer,
    b_i += rate * sign(mean load - load_i) (DeepSeek-V3 loss-free balancing).

    bias_LE: the stack's [L, E] biases; aux: its stacked MoE aux, one row per layer
    application (tokens_per_expert_E [A, E], num_tokens [A]).  application_layer:
    the layer of each row where a layer runs several times (a recursive stack's
    shared pool, step-major); a layer's load is then its applications' assignments
    summed (fractions times the tokens each ran), so a step that ran few tokens
    weighs little.  None: row l is layer l.
    """
    load_LE = aux["tokens_per_expert_E"]
    if application_layer is not None:
        ids_A = jnp.asarray(application_layer, jnp.int32)
        counts_AE = load_LE * aux["num_tokens"][:, None]
        load_LE = jax.ops.segment_sum(counts_AE, ids_A, bias_LE.shape[0])
    return jax.vmap(lambda b_E, load_E: routing.loss_free_bias_update(b_E, load_E, rate))(bias_LE, load_LE)
