"""The dense decoder: causality, packing, shapes, parameter accounting, remat, norms."""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from moe_lab.accounting import flops
from moe_lab.layers.attention import rope
from moe_lab.train.state import build_model, split_model


def _model(**model_kw):
    cfg = tiny_config(model=model_kw)
    return cfg, build_model(cfg)


def _tokens(cfg, B=2, T=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 3, cfg.model.vocab_size)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_shapes_finite_and_causal(placement):
    cfg, model = _model(norm_placement=placement)
    tok = _tokens(cfg)
    logits, _ = model(tok)
    assert logits.shape == (2, 16, cfg.model.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # changing a future token must not change earlier logits
    tok2 = tok.at[:, 10].set((tok[:, 10] + 7) % cfg.model.vocab_size)
    logits2, _ = model(tok2)
    np.testing.assert_allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not np.allclose(logits[:, 10:], logits2[:, 10:])


def test_packed_segments_match_separate_documents():
    """Two documents packed in one row (segment ids, restarted positions) give the
    same logits as each document alone: attention never crosses documents."""
    cfg, model = _model()
    a, b = _tokens(cfg, 1, 9, seed=1), _tokens(cfg, 1, 7, seed=2)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 9 + [2] * 7])
    pos = jnp.array([list(range(9)) + list(range(7))])
    logits, _ = model(packed, pos, seg)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(logits[:, :9], la, atol=1e-5)
    np.testing.assert_allclose(logits[:, 9:], lb, atol=1e-5)


def _naive_attention_block(x, q, k, v, o, theta):
    """Loop-over-heads reference of GQA causal attention with RoPE (numpy-like)."""
    T = x.shape[1]
    H, G = q.shape[1], k.shape[1]
    pos = jnp.arange(T)[None]
    out = 0
    for h in range(H):
        g = h // (H // G)
        qh = rope((x @ q[:, h])[:, :, None], pos, theta)[:, :, 0]
        kh = rope((x @ k[:, g])[:, :, None], pos, theta)[:, :, 0]
        vh = x @ v[:, g]
        s = qh @ kh.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        out = out + jax.nn.softmax(s, -1) @ vh @ o[h]
    return out


def test_attention_matches_per_head_reference():
    cfg, model = _model()
    attn = nnx.merge(*nnx.split(model.blocks.layers))  # stacked; take layer 0 by hand
    p = nnx.state(attn).to_pure_dict()["attn"]
    x = jax.random.normal(jax.random.key(3), (2, 12, cfg.model.d_model))
    from moe_lab.layers.attention import Attention

    layer = Attention(cfg.model, rngs=nnx.Rngs(0))
    for name in ("q_DHK", "k_DGK", "v_DGK", "o_HKD"):
        getattr(layer, name)[...] = p[name][0]
    got = layer(x, jnp.broadcast_to(jnp.arange(12), (2, 12)))
    want = _naive_attention_block(
        x, p["q_DHK"][0], p["k_DGK"][0], p["v_DGK"][0], p["o_HKD"][0], cfg.model.rope_theta
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(num_kv_heads=4)])
def test_param_count_matches_flops_accounting(kw):
    cfg, model = _model(**kw)
    _, params, _ = split_model(model)
    n = sum(x.size for x in jax.tree.leaves(params))
    counts = flops.param_counts(cfg.model)
    assert n == counts["total"] == counts["active"]


def test_moe_param_count_total_vs_active():
    cfg = tiny_config(
        model=dict(
            ffn="moe",
            moe=dict(num_experts=4, top_k=1, expert_hidden=16, num_shared_experts=1, first_dense_layers=1),
        )
    )
    _, params, _ = split_model(build_model(cfg))
    n = sum(x.size for x in jax.tree.leaves(params))
    counts = flops.param_counts(cfg.model)
    assert n == counts["total"]
    D, F = cfg.model.d_model, 16
    # one MoE layer: 3 of the 4 routed experts are inactive per token
    assert counts["total"] - counts["active"] == 3 * 3 * D * F
    assert flops.sparsity(cfg.model) == pytest.approx(0.75)


def test_expert_choice_active_params_count_capacity_factor_times_k_experts():
    """Expert choice: every expert takes C = cf*N*k/E tokens, so a token passes
    through cf*k experts on average (FLOPs and active parameters count that)."""

    def counts(router, cf):
        cfg = tiny_config(
            model=dict(
                ffn="moe",
                moe=dict(num_experts=8, top_k=2, expert_hidden=16, router=router, capacity_factor=cf),
            )
        )
        return cfg.model, flops.param_counts(cfg.model)

    m, tc = counts("softmax_topk", 1.25)
    _, ec = counts("expert_choice", 1.25)
    ffn_layers = m.num_layers - m.moe.first_dense_layers
    assert ec["active"] - tc["active"] == ffn_layers * 3 * m.d_model * 16 * (1.25 * 2 - 2)
    assert ec["total"] == tc["total"]


def test_router_learns_from_the_loss_at_top1():
    """k = 1 with renormalize: the gate stays p (Switch), not p / p = 1, so the
    router's gradient from the LM loss alone (aux weights 0) is not zero."""
    from moe_lab.config.schema import ModelConfig, MoEConfig
    from moe_lab.layers.moe import MoE

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16))

    def router_grad(router, renormalize):
        cfg = ModelConfig(
            d_model=16,
            init_std=0.5,
            ffn="moe",
            moe=MoEConfig(
                num_experts=4,
                top_k=1,
                expert_hidden=8,
                router=router,
                renormalize=renormalize,
                aux_loss_weight=0.0,
                z_loss_weight=0.0,
            ),
        )
        graphdef, params, rest = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        g = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, train=True)[0] * w))(params)
        return np.asarray(g["router_DE"][...])

    for router in ("softmax_topk", "sigmoid"):
        g = router_grad(router, True)
        assert np.linalg.norm(g) > 1e-2, router  # p / p = 1 gave ~1e-7 here
        np.testing.assert_allclose(g, router_grad(router, False), rtol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_loss_and_grads(remat):
    cfg, model = _model()
    cfg_r = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
    graphdef, params, rest = split_model(model)
    graphdef_r, _, _ = split_model(build_model(cfg_r))
    tok = _tokens(cfg)

    def loss(gd, p):
        logits, _ = nnx.merge(gd, p, rest)(tok)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    l0, g0 = jax.value_and_grad(lambda p: loss(graphdef, p))(params)
    l1, g1 = jax.value_and_grad(lambda p: loss(graphdef_r, p))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_flops_per_token_counts_causal_attention():
    cfg = tiny_config()
    m = cfg.model
    f128 = flops.forward_flops_per_token(m, 128)
    f64 = flops.forward_flops_per_token(m, 64)
    # the difference is attention only: 2*2*H*K*(T+1)/2 per layer
    assert f128 - f64 == pytest.approx(m.num_layers * 2 * 2 * m.num_heads * m.resolved_head_dim * 32)


def test_param_counts_reproduce_the_sparsity_paper_example():
    """2508.18672: d=1024, E=64, k=16, 16 layers, experts of hidden 2d -> 6.7B total,
    1.9B active with total = L(4d^2 + 3*E*d*2d + dE) + 2Vd (norms aside)."""
    from moe_lab.config.load import load_config
    from moe_lab.config.validate import validate

    cfg = load_config("configs/sparsity_sweep.py:paper", {"model.vocab_size": "100000"})
    m = validate(cfg).model
    c = flops.param_counts(m)
    d, E, k, L, V = 1024, 64, 16, 16, 100000
    norms = L * 2 * d + d
    assert c["total"] == L * (4 * d * d + 3 * E * d * 2 * d + d * E) + 2 * V * d + norms
    assert c["active"] == L * (4 * d * d + 3 * k * d * 2 * d + d * E) + 2 * V * d + norms
    assert round(c["total"] / 1e9, 1) == 6.7 and round(c["active"] / 1e9, 1) == 1.9


def test_tree_paths_name_the_models_attributes():
    """models/tree.py spells the module attribute names that growth, the train step and
    the recursion-depth transform walk: every path it builds exists in a real model's
    params / model_state (abstract models: no compute)."""
    from moe_lab.models import tree

    def trees(**model):
        _, params, rest = split_model(nnx.eval_shape(lambda: build_model(tiny_config(model=model))))
        return params, rest

    moe = dict(
        num_layers=3,
        ffn="moe",
        moe=dict(num_experts=4, top_k=2, router="sigmoid", num_shared_experts=1, first_dense_layers=1),
    )
    params, rest = trees(**moe)
    assert tree.stack_paths(params) == [(tree.DENSE_STACK,), (tree.MAIN_STACK,)]
    assert tree.get(rest, tree.router_bias_path((tree.MAIN_STACK,))).shape == (2, 4)
    leaves = [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert {tree.ffn_leaf(p) for p in leaves} >= {"router_DE", "gate_EDF", "up_EDF", "down_EFD"}
    assert {tree.plain_stack_of(p) for p in leaves} - {None} == {tree.DENSE_STACK, tree.MAIN_STACK}

    mor = dict(
        num_layers=4,
        stack="recursive",
        mor=dict(num_recursions=2, sharing="middle_cycle", routing="expert_choice", causal_aux="aux_router"),
    )
    params, _ = trees(**mor)
    assert tree.stack_paths(params) == [(tree.RECURSIVE, n) for n in tree.RECURSIVE_STACKS]
    for path in tree.STEP_ROUTERS:
        assert tree.get(params, path) is not None, path
    _, rest = trees(
        **{**mor, "mor": dict(num_recursions=2, routing="token_choice", balance="loss_free", warmup_steps=2)}
    )
    for name in (tree.DEPTH_BIAS, tree.STEPS_SEEN):
        assert tree.get(rest, tree.mor_path(name)) is not None, name


@pytest.mark.parametrize(
    "impl,extra", [("chunked", {}), ("chunked", dict(stack="recursive", num_layers=5)), ("tokamax", {})]
)
def test_attention_implementations_match_xla(impl, extra):
    """Every attention kernel that runs on CPU (tokamax's xla_chunked and its own
    choice, which is its XLA attention here) against moe_lab's einsum attention:
    logits and gradients on packed rows with padding (GQA: 4 heads, 2 kv heads), a
    recursive stack's gathered tokens, and greedy KV-cache decoding."""
    from moe_lab.eval.generate import generate

    cfg, model = _model(**extra)
    gd, params, rest = split_model(model)
    gd_impl, _, _ = split_model(build_model(_replace_model(cfg, attention_impl=impl)))
    tok = _tokens(cfg)
    seg = jnp.asarray(np.r_[[1] * 9 + [2] * 7, [1] * 13 + [0] * 3].reshape(2, 16))
    pos = jnp.asarray(np.r_[np.arange(9), np.arange(7), np.arange(16)].reshape(2, 16))
    w = jax.random.normal(jax.random.key(1), (2, 16, cfg.model.vocab_size))

    def loss(p, graphdef):
        logits, _ = nnx.merge(graphdef, p, rest)(tok, pos, seg, train=False)
        return jnp.sum(logits * w), logits

    vag = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want), g_want = vag(params, gd)
    (_, got), g_got = vag(params, gd_impl)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-3)
    if impl == "chunked" and not extra:
        prompts = [[5, 17, 33, 80], [7, 8]]
        assert generate(gd_impl, params, rest, prompts, max_new_tokens=4) == generate(
            gd, params, rest, prompts, max_new_tokens=4
        )


def test_cudnn_attention_is_refused_off_gpu_and_auto_picks_what_runs():
    from moe_lab.layers.attention_kernels import resolve_attention_impl

    with pytest.raises(Exception, match="attention_impl='cudnn' needs an NVIDIA GPU") as e:
        _model(attention_impl="cudnn")
    assert "\n" not in str(e.value)
    auto = functools.partial(resolve_attention_impl, "auto")
    assert auto("gpu", compute_dtype="bfloat16", head_dim=64) == "cudnn"
    assert auto("gpu", compute_dtype="float32", head_dim=64) == "xla"  # cuDNN: half only
    assert auto("gpu", compute_dtype="bfloat16", head_dim=256) == "xla"
    # not tokamax on TPU: its flash kernel refuses the dense mask and would fall back
    # silently; tokamax asked for on TPU is its Mosaic kernel alone (no fallback)
    assert auto("tpu") == "splash" and auto("cpu") == "xla"
    assert resolve_attention_impl("tokamax", "tpu") == "tokamax:mosaic"
    assert resolve_attention_impl("tokamax", "cpu") == "tokamax"


def _replace_model(cfg, **model):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, str, str]]:
    """(lhs dtype, rhs dtype, out dtype) of every dot_general, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in (*eqn.invars[:2], eqn.outvars[0])))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_operand_dtypes(inner)
    return out


def test_mixed_precision_bf16_compute_f32_params_router_and_loss():
    """compute_dtype bf16, param_dtype f32: every matmul of the forward and backward
    runs on bf16 operands except the router's (f32: its logits decide the routing);
    logits (cast after the bf16 LM head, as MaxText), loss and gradients are f32."""
    cfg, model = _model(
        compute_dtype="bfloat16",
        ffn="moe",
        moe=dict(num_experts=4, top_k=2, expert_hidden=32, dispatch="dropless"),
    )
    gd, params, rest = split_model(model)
    tok = _tokens(cfg)

    def loss(p):
        logits, _ = nnx.merge(gd, p, rest)(tok)
        assert logits.dtype == jnp.float32
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tok[..., None], -1)[..., 0]
        )

    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    f32 = [d for d in dots if "float32" in d[:2]]
    bf16 = [d for d in dots if d[:2] == ("bfloat16", "bfloat16")]
    assert len(bf16) > 3 * len(f32) > 0, (len(bf16), f32)
    # the f32 ones: the router's logits and their two gradients (the layers are one scan)
    assert f32 == [("float32",) * 3] * 3, f32
    value, grads = jax.value_and_grad(loss)(params)
    assert value.dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype("float32")}


def test_splash_attention_matches_xla_on_packed_rows():
    """The TPU splash kernel (layers/splash.py; Pallas' interpreter on CPU) against the
    einsum reference on packed rows with padding: outputs (real tokens) and gradients,
    on one device and under shard_map over 2."""
    from moe_lab.config.schema import DEFAULT_RULES, MeshConfig, ModelConfig
    from moe_lab.layers.attention import Attention
    from moe_lab.parallel import sharding

    m = ModelConfig(d_model=16, num_heads=4, num_kv_heads=2, max_seq_len=128, attention_impl="splash")
    splash = Attention(m, rngs=nnx.Rngs(0))
    ref = Attention(dataclasses.replace(m, attention_impl="xla"), rngs=nnx.Rngs(0))
    x_BTD = jax.random.normal(jax.random.PRNGKey(1), (2, 128, 16))
    seg_BT = np.ones((2, 128), np.int32)
    seg_BT[:, 50:], seg_BT[:, 100:], seg_BT[1, 120:] = 2, 3, 0  # 3 documents, padding
    pos_BT = np.concatenate([np.arange(50), np.arange(50), np.arange(28)])[None].repeat(2, 0)
    real_BT1 = (seg_BT > 0)[..., None]

    def loss(mod, x_BTD):
        y_BTD = mod(x_BTD, jnp.asarray(pos_BT), jnp.asarray(seg_BT))
        return jnp.sum(jnp.sin(y_BTD) * real_BT1), y_BTD

    grad = nnx.grad(loss, has_aux=True, argnums=(0, 1))
    g_want, y_want = grad(ref, x_BTD)
    mesh = sharding.make_mesh(MeshConfig(data=2), jax.devices()[:2])
    for ctx in (contextlib.nullcontext(), sharding.use_rules(DEFAULT_RULES, mesh)):
        with jax.set_mesh(mesh), ctx:
            g_got, y_got = nnx.jit(grad)(splash, x_BTD)
        np.testing.assert_allclose(
            np.where(real_BT1, y_got, 0), np.where(real_BT1, y_want, 0), atol=2e-5, rtol=1e-4
        )
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
