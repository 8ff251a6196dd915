"""Checkpoint growth (arXiv 2510.08008): layer order, function preservation, noise on
copies only, only-E / only-k, optimizer-state growth, the `grow` command end to end
(grow -> save -> restore -> train) and its refusals."""

import argparse
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from moe_lab.cli.grow import add_grow_parser
from moe_lab.config.load import config_from_json
from moe_lab.config.schema import ConfigError, parse_mixture
from moe_lab.data import pipeline
from moe_lab.data.tasks.registry import make_task
from moe_lab.growth import transforms as growth
from moe_lab.growth.grow import grow_run
from moe_lab.growth.options import DepthGrowth, GrowOptions
from moe_lab.train.checkpoint import write_checkpoint
from moe_lab.train.loop import train
from moe_lab.train.run_dir import write_json_atomic
from moe_lab.train.state import build_model, setup_on_devices, split_model


def moe_cfg(**moe):
    layers = moe.pop("num_layers", 2)
    base = {"num_experts": 4, "top_k": 2, "dispatch": "dropless", "first_dense_layers": 0}
    return tiny_config(
        model={"ffn": "moe", "num_layers": layers, "moe": {**base, **moe}}, data={"seq_len": 16}
    )


def init(cfg, seed=0):
    """Random params (numpy, from the model's abstract tree: no slow jitted init)."""
    _, shapes, ms_shapes = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if jax.tree_util.keystr(path).endswith("['scale_D']"):
            return (1 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (cfg.model.init_std * rng.standard_normal(s.shape)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    # a trained-looking, non-zero selection bias (sigmoid router)
    model_state = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), ms_shapes)
    return params, model_state


def tokens(cfg, n=2):
    name = parse_mixture(cfg.data.mixture)[0][0]
    return pipeline.make_eval_batches(make_task(name, cfg.data), cfg.data, n, 1)[0]["inputs"]


def logits(cfg, params, model_state, tokens_BT):
    graphdef = split_model(nnx.eval_shape(lambda: build_model(cfg)))[0]
    fn = jax.jit(lambda p, m, t: nnx.merge(graphdef, p, m)(t)[0])
    return np.asarray(fn(params, model_state, tokens_BT))


def marked(cfg):
    """Params where every leaf of layer i (global index) equals i + 1."""
    params, _ = init(cfg)
    out, offset = dict(params), 0
    for name, n in growth.stack_sizes(cfg).items():
        mark = np.arange(offset, offset + n, dtype=np.float32) + 1
        out[name] = jax.tree.map(
            lambda x, m=mark: np.broadcast_to(m.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape), params[name]
        )
        offset += n
    return out


def layer_marks(params, stack="blocks"):
    return [int(v) for v in params[stack]["layers"]["attn"]["q_DHK"][:, 0, 0, 0]]


# ------------------------------------------------------------------------ depth


def test_depth_layer_order_interpose_stack_keep():
    cfg = moe_cfg(num_layers=3)
    p = marked(cfg)
    g, c = growth.grow_depth(p, cfg, method="interpose")
    assert layer_marks(g) == [1, 1, 2, 2, 3, 3] and c.model.num_layers == 6
    g, c = growth.grow_depth(p, cfg, method="stack")
    assert layer_marks(g) == [1, 2, 3, 1, 2, 3]
    g, c = growth.grow_depth(p, cfg, method="interpose", keep_first=1, keep_last=1, factor=3)
    assert layer_marks(g) == [1, 2, 2, 2, 3] and c.model.num_layers == 5
    g, _ = growth.grow_depth(p, cfg, method="stack", keep_first=1)
    assert layer_marks(g) == [1, 2, 3, 2, 3]
    # two stacks: dense layers first; each stack grows by the factor on its own
    cfg2 = moe_cfg(num_layers=3, first_dense_layers=1)
    g, c = growth.grow_depth(marked(cfg2), cfg2, method="stack")
    assert layer_marks(g, "dense_blocks") == [1, 1] and layer_marks(g) == [2, 3, 2, 3]
    assert (c.model.num_layers, c.model.moe.first_dense_layers) == (6, 2)
    with pytest.raises(ConfigError, match="at least one"):
        growth.grow_depth(p, cfg, keep_first=2, keep_last=1)


def test_depth_zero_copies_preserves_logits():
    cfg = moe_cfg(num_layers=2, first_dense_layers=1, router="sigmoid", num_shared_experts=1)
    params, ms = init(cfg)
    toks = tokens(cfg)
    base = logits(cfg, params, ms, toks)
    for method in ("interpose", "stack"):
        g, c = growth.grow_depth(params, cfg, method=method, zero_copies=True)
        gms, _ = growth.grow_depth(ms, cfg, method=method, zero_copies=True)
        assert gms["blocks"]["layers"]["ffn"]["bias_E"].shape == (2, 4)
        copy = 1  # the second layer of each (1-layer) stack is the copy
        assert not g["blocks"]["layers"]["attn"]["o_HKD"][copy].any()
        assert not g["blocks"]["layers"]["ffn"]["shared"]["down_FD"][copy].any()
        assert not g["dense_blocks"]["layers"]["ffn"]["down_FD"][copy].any()
        np.testing.assert_array_equal(
            g["blocks"]["layers"]["ffn"]["up_EDF"][1], params["blocks"]["layers"]["ffn"]["up_EDF"][0]
        )
        assert np.max(np.abs(logits(c, g, gms, toks) - base)) < 1e-5
    assert growth.depth_preserves_function(cfg, zero_copies=True)
    post = cfg.replace(model=dataclasses.replace(cfg.model, norm_placement="post"))
    assert not growth.depth_preserves_function(post, zero_copies=True)


# ------------------------------------------------------------------------ width


@pytest.mark.parametrize(
    "router,layout",
    [
        ("softmax_topk", "append"),
        ("topk_softmax", "interleave"),
        ("sigmoid", "append"),
        ("expert_choice", "interleave"),
    ],
)
def test_width_noise0_preserves_logits(router, layout):
    # expert_choice: C = cf*N*k/E is unchanged by growing k and E together, and each
    # copy picks the original's tokens with half its gate, so it holds too.
    cfg = moe_cfg(router=router, renormalize=True, num_shared_experts=int(router == "sigmoid"))
    params, ms = init(cfg)
    toks = tokens(cfg)
    g, gms, c = growth.grow_width(params, ms, cfg, noise=0.0, layout=layout)
    assert (c.model.moe.num_experts, c.model.moe.top_k) == (8, 4)
    assert growth.width_preserves_function(c, noise=0.0, grow_e=True, grow_k=True, init="copy")
    diff = np.max(np.abs(logits(c, g, gms, toks) - logits(cfg, params, ms, toks)))
    assert diff < 1e-5, diff


def test_width_from_top1_preserves_logits():
    """A k = 1 parent's gate is the raw p (Switch), so its k = 2 child must not
    renormalise: the two copies' gates p/2 sum back to p."""
    cfg = moe_cfg(router="softmax_topk", top_k=1, renormalize=True)
    params, ms = init(cfg)
    g, gms, c = growth.grow_width(params, ms, cfg, noise=0.0)
    assert (c.model.moe.top_k, c.model.moe.renormalize) == (2, False)
    assert growth.width_preserves_function(cfg, noise=0.0, grow_e=True, grow_k=True, init="copy")
    toks = tokens(cfg)
    assert np.max(np.abs(logits(c, g, gms, toks) - logits(cfg, params, ms, toks))) < 1e-5
    top1_sigmoid = moe_cfg(router="sigmoid", top_k=1, renormalize=True)
    assert not growth.width_preserves_function(top1_sigmoid, noise=0.0, grow_e=True, grow_k=True, init="copy")


def test_width_sigmoid_without_renormalisation_is_not_preserved():
    cfg = moe_cfg(router="sigmoid", renormalize=False)
    assert not growth.width_preserves_function(cfg, noise=0.0, grow_e=True, grow_k=True, init="copy")


def test_width_noise_on_copies_only_and_random_init():
    cfg = moe_cfg(router="sigmoid")
    params, ms = init(cfg)
    alpha = 0.1
    for layout, copies in (("append", slice(4, 8)), ("interleave", slice(1, 8, 2))):
        orig = slice(0, 4) if layout == "append" else slice(0, 8, 2)
        g, gms, _ = growth.grow_width(params, ms, cfg, noise=alpha, seed=3, layout=layout)
        for name, ax in growth.EXPERT_AXES.items():
            src = (ms if name == "bias_E" else params)["blocks"]["layers"]["ffn"][name]
            out = (gms if name == "bias_E" else g)["blocks"]["layers"]["ffn"][name]
            take = lambda x, s, ax=ax: np.moveaxis(np.moveaxis(x, ax, 0)[s], 0, ax)
            np.testing.assert_array_equal(take(out, orig), src)  # originals bit-identical
            eps = take(out, copies) - src
            if name == "bias_E":  # 4 samples per layer: pool the layers' z-scores
                z = eps / (alpha * src.std(axis=1, keepdims=True))
                assert abs(z.std() - 1) < 0.5 and np.all(eps != 0), z
                continue
            for layer in range(src.shape[0]):
                ratio = eps[layer].std() / (alpha * src[layer].std())
                assert abs(ratio - 1) < 0.1, (name, layer, ratio)
    # random_experts (the paper text's ablation): originals kept, new experts and
    # their router columns fresh N(0, init_std^2), their biases the layer's mean
    ffn, bias = params["blocks"]["layers"]["ffn"], ms["blocks"]["layers"]["ffn"]["bias_E"]
    g, gms, _ = growth.grow_width(params, ms, cfg, init="random_experts", seed=1)
    for name in ("up_EDF", "router_DE"):
        out, ax = g["blocks"]["layers"]["ffn"][name], growth.EXPERT_AXES[name]
        old, new = np.split(out, 2, axis=ax)
        np.testing.assert_array_equal(old, ffn[name])
        assert abs(new.std() / cfg.model.init_std - 1) < 0.1, name
        assert np.abs(np.corrcoef(new.ravel(), old.ravel())[0, 1]) < 0.3, name  # 256+ draws
    np.testing.assert_allclose(
        gms["blocks"]["layers"]["ffn"]["bias_E"][:, 4:],
        np.repeat(bias.mean(1, keepdims=True), 4, 1),
        rtol=1e-6,
    )
    # random_router (the released script's --growth-use-random-router): the whole
    # router redrawn, zero biases, the experts still copies (with their noise)
    g, gms, _ = growth.grow_width(params, ms, cfg, init="random_router", noise=0.0, seed=1)
    out = g["blocks"]["layers"]["ffn"]
    np.testing.assert_array_equal(out["up_EDF"], np.concatenate([ffn["up_EDF"]] * 2, axis=1))
    router = out["router_DE"]
    assert router.shape[-1] == 8 and abs(router.std() / cfg.model.init_std - 1) < 0.1
    assert np.abs(np.corrcoef(router[..., :4].ravel(), ffn["router_DE"].ravel())[0, 1]) < 0.3
    np.testing.assert_array_equal(gms["blocks"]["layers"]["ffn"]["bias_E"], 0.0)
    g, _, _ = growth.grow_width(params, ms, cfg, init="random_router", grow_e=False, seed=1)
    assert (
        np.abs(np.corrcoef(g["blocks"]["layers"]["ffn"]["router_DE"].ravel(), ffn["router_DE"].ravel())[0, 1])
        < 0.3
    )  # top-k only: redrawn too
    with pytest.raises(ConfigError, match="not one of copy, random_router, random_experts"):
        growth.grow_width(params, ms, cfg, init="random")


def test_only_e_and_only_k():
    cfg = moe_cfg()
    params, ms = init(cfg)
    g, _, c = growth.grow_width(params, ms, cfg, grow_k=False, noise=0.0)
    assert (c.model.moe.num_experts, c.model.moe.top_k) == (8, 2)
    assert g["blocks"]["layers"]["ffn"]["router_DE"].shape == (2, 32, 8)
    g, _, c = growth.grow_width(params, ms, cfg, grow_e=False)
    assert (c.model.moe.num_experts, c.model.moe.top_k) == (4, 4)
    jax.tree.map(np.testing.assert_array_equal, g, params)  # weights untouched
    assert not growth.width_preserves_function(c, noise=0.0, grow_e=False, grow_k=True, init="copy")
    with pytest.raises(ConfigError, match="exceeds"):
        growth.grow_width(params, ms, moe_cfg(top_k=3), grow_e=False)
    with pytest.raises(ConfigError, match="dense"):
        growth.grow_width(params, ms, tiny_config())


# -------------------------------------------------------------- optimizer state


def test_opt_state_grow_and_reset():
    cfg = moe_cfg(num_layers=2)
    setup = setup_on_devices(cfg)[1]
    params, ms = init(cfg)
    opt = jax.device_get(setup.tx.init(params))
    rng = np.random.default_rng(0)
    fill = lambda t: jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), t)
    adam = opt[1][0]._replace(count=np.int32(17), mu=fill(params), nu=fill(params))
    opt = (opt[0], (adam, opt[1][1], opt[1][2]._replace(count=np.int32(17))))
    state = {"params": params, "opt_state": opt, "model_state": ms, "step": np.int32(17)}
    steps = [
        ("depth", {"method": "interpose", "zero_copies": True}),
        ("width", {"noise": 0.01, "layout": "append"}),
    ]
    new, c = growth.grow_train_state(state, cfg, steps, opt_state="grow", seed=0)
    new_setup = setup_on_devices(c)[1]
    assert jax.tree.structure(new["opt_state"]) == jax.tree.structure(new_setup.abstract_state["opt_state"])
    g_adam = new["opt_state"][1][0]
    assert int(g_adam.count) == 17 and int(new["opt_state"][1][2].count) == 0
    assert int(new["step"]) == 0
    for m_old, m_new in ((adam.mu, g_adam.mu), (adam.nu, g_adam.nu)):
        up_old = m_old["blocks"]["layers"]["ffn"]["up_EDF"]
        up_new = m_new["blocks"]["layers"]["ffn"]["up_EDF"]
        assert up_new.shape == (4, 8, 32, 64)
        for l_new, l_old in ((0, 0), (1, 0), (2, 1), (3, 1)):  # interposed layers
            for e in range(8):  # appended experts: exact copies of the moments (no noise)
                np.testing.assert_array_equal(up_new[l_new, e], up_old[l_old, e % 4])
        o_new = m_new["blocks"]["layers"]["attn"]["o_HKD"]
        assert not o_new[1].any() and not o_new[3].any()  # zeroed copies: zero moments
        np.testing.assert_array_equal(o_new[2], m_old["blocks"]["layers"]["attn"]["o_HKD"][1])
    # the weights themselves did get noise on the new experts
    w = new["params"]["blocks"]["layers"]["ffn"]["up_EDF"]
    assert not np.array_equal(w[:, 4:], w[:, :4])
    new, _ = growth.grow_train_state(
        state, cfg, steps, opt_state="reset", init_fn_for=lambda _: new_setup.tx.init
    )
    assert int(new["opt_state"][1][0].count) == 0
    assert not any(np.any(x) for x in jax.tree.leaves(new["opt_state"][1][0].mu))


def test_weight_norm_profile_and_sunk_flops():
    cfg = moe_cfg(num_layers=2)
    params, _ = init(cfg)
    rows = growth.weight_norm_profile(params, cfg)
    assert [r["layer"] for r in rows] == [0, 1] and rows[0]["stack"] == "blocks"
    want = np.sqrt(np.mean(np.square(params["blocks"]["layers"]["ffn"]["up_EDF"][1, 2])))
    assert rows[1]["ffn/gate_EDF"] > 0
    g, c = growth.grow_depth(params, cfg, method="interpose")
    grown = growth.weight_norm_profile(g, c)
    assert [r["attn/q_DHK"] for r in grown][::2] == [r["attn/q_DHK"] for r in rows]
    assert grown[2]["attn/q_DHK"] == grown[3]["attn/q_DHK"]
    per_e = [np.sqrt(np.mean(np.square(params["blocks"]["layers"]["ffn"]["up_EDF"][1, e]))) for e in range(4)]
    assert abs(rows[1]["ffn/up_EDF"] - np.mean(per_e)) < 1e-6 and want in per_e
    assert growth.sunk_flops(cfg, {"flops_spent": 5.0, "step": 3}) == 5.0
    assert growth.sunk_flops(cfg, {"step": 2}) > 0


# ----------------------------------------------------------------- the command


def make_parent(workdir, cfg, step=7, flops_spent=1.5e9):
    """A parent run as `train` leaves it: config.json + checkpoints/<step> with meta."""
    os.makedirs(workdir)
    write_json_atomic(os.path.join(workdir, "config.json"), cfg.to_dict())
    params, model_state = init(cfg)
    opt_state = jax.device_get(setup_on_devices(cfg)[1].tx.init(params))
    state = {"params": params, "opt_state": opt_state, "model_state": model_state, "step": np.int32(step)}
    write_checkpoint(workdir, step, state, {"flops_spent": flops_spent, "tokens_seen": 99.0})
    return state


def read_json(path):
    with open(path) as f:
        return json.load(f)


def parse(argv):
    p = argparse.ArgumentParser()
    add_grow_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["grow", *argv])


def test_grow_command_then_train(tmp_path, capsys):
    cfg = moe_cfg(router="softmax_topk").replace(
        train=dataclasses.replace(
            tiny_config().train, steps=2, batch_size=8, eval_every=2, checkpoint_every=2, log_every=1
        )
    )
    parent, child = str(tmp_path / "parent"), str(tmp_path / "child")
    make_parent(parent, cfg)
    args = parse(
        [
            "--from",
            parent,
            "--to",
            child,
            "--depth",
            "stack",
            "--zero-copies",
            "--width-factor",
            "2",
            "--noise",
            "0",
            "--order",
            "width,depth",
            "--opt-state",
            "grow",
            "--seed",
            "5",
        ]
    )
    assert args.fn(args, {}) == 0
    out = capsys.readouterr().out
    assert "function-preserving; max |logits - parent logits|" in out
    lin = read_json(os.path.join(child, "lineage.json"))
    assert lin["parent_workdir"] == os.path.realpath(parent) and lin["parent_step"] == 7
    assert [t["kind"] for t in lin["transforms"]] == ["width", "depth"]
    assert lin["transforms"][1]["method"] == "stack" and lin["transforms"][1]["zero_copies"]
    assert lin["sunk_flops"] == 1.5e9 and lin["seed"] == 5 and lin["opt_state"] == "grow"
    assert lin["grown_params_total"] > 2 * lin["parent_params_total"] * 0.9
    assert lin["grown_params_active"] > lin["parent_params_active"]
    assert lin["max_abs_logit_diff"] < 1e-5 and lin["function_preserving"]
    grown_cfg = read_json(os.path.join(child, "config.json"))["model"]
    assert (grown_cfg["num_layers"], grown_cfg["moe"]["num_experts"], grown_cfg["moe"]["top_k"]) == (4, 8, 4)
    assert sorted(os.listdir(tmp_path)) == ["child", "parent"]  # no temp dir left behind
    # the grown run is continued with its own batch size (grow's checkpoint has no
    # data iterator state, so nothing ties the continuation to the parent's batches)
    child_cfg = config_from_json(os.path.join(child, "config.json"))
    child_cfg = child_cfg.replace(train=dataclasses.replace(child_cfg.train, batch_size=16))
    summary = train(child_cfg, child)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    assert summary["flops_spent"] > 0 and summary["tokens_seen"] == 2 * 16 * 16  # from 0


def test_grow_refusals(tmp_path):
    cfg = moe_cfg()
    parent = str(tmp_path / "parent")
    make_parent(parent, cfg)
    depth = ["--depth", "interpose"]

    def run(*argv):
        a = parse(list(argv))
        with pytest.raises(ConfigError) as e:
            a.fn(a, {})
        assert "\n" not in str(e.value)
        return str(e.value)

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in run("--from", parent, "--to", str(tmp_path / "full"), *depth)
    assert "never writing" in run("--from", parent, "--to", parent, *depth)
    assert "never writing" in run("--from", parent, "--to", f"{parent}/sub", *depth)
    assert "nothing to grow" in run("--from", parent, "--to", str(tmp_path / "n"))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    write_json_atomic(os.path.join(empty, "config.json"), cfg.to_dict())
    assert "no checkpoint" in run("--from", empty, "--to", str(tmp_path / "n"), *depth)
    assert "no checkpoint at step 3" in run(
        "--from", parent, "--step", "3", "--to", str(tmp_path / "n"), *depth
    )
    assert "no config.json" in run("--from", str(tmp_path / "nope"), "--to", str(tmp_path / "n"), *depth)
    dense = str(tmp_path / "dense")
    os.makedirs(dense)
    write_json_atomic(os.path.join(dense, "config.json"), tiny_config().to_dict())
    assert "dense" in run("--from", dense, "--to", str(tmp_path / "n"), "--width-factor", "2")
    # a config.json that does not match the checkpoint it sits next to
    raw = cfg.to_dict()
    raw["model"]["moe"]["num_experts"] = 8
    write_json_atomic(os.path.join(parent, "config.json"), raw)
    assert "does not match" in run("--from", parent, "--to", str(tmp_path / "n"), *depth)
    a = parse(["--from", parent, "--to", str(tmp_path / "n"), *depth])
    with pytest.raises(ConfigError, match="overrides"):
        a.fn(a, {"train.steps": "3"})
    assert sorted(os.listdir(tmp_path)) == ["dense", "empty", "full", "parent"]
    with pytest.raises(ConfigError, match="at least one"):
        grow_run(parent, str(tmp_path / "n"), GrowOptions(depth=DepthGrowth(method="stack", keep_first=2)))
