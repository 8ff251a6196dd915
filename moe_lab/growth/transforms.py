"""Growing trained MoE checkpoints in depth and width (arXiv 2510.08008).

Pure functions on the train-state pytrees (nested dicts of numpy or jax arrays,
layers stacked on axis 0; see moe_lab/models/blocks.py, the names in
moe_lab/models/tree.py); no I/O.  Run directories: moe_lab/growth/grow.py (CLI:
moe_lab/cli/grow.py).

Depth (2510.08008 sec. "depth growth"): every layer of a stack is copied
verbatim, no noise.
  interpose  [l1, l1, l2, l2, ..., ln, ln]   (the paper's method; repeat on axis 0)
  stack      [l1, ..., ln, l1, ..., ln]      (tile on axis 0)
Options of the released code: `keep_first` / `keep_last` layers stay single;
`zero_copies` zeroes the output projections (attention o_HKD, FFN down
projections of experts, shared experts and dense FFNs) of the inserted copies,
so with pre-norm residual blocks each copy is an identity map and the grown
model computes exactly the original function.  A model with
`moe.first_dense_layers > 0` holds two stacks (dense_blocks, then blocks); each
grows by the factor on its own ("stack" repeats within a stack, since dense
layers must come first); `keep_first` / `keep_last` count global layers.

Width (2510.08008 sec. "width growth"): E -> f*E experts and top_k -> f*k.  New
experts (gate/up/down), their router columns and routing biases are copies of
the originals plus eps ~ N(0, (noise * std(tensor))^2), std per layer of the
original tensor; the noise goes to the copies only.  With noise 0 the function
is preserved exactly for softmax_topk (renormalised or not; a k = 1 parent,
whose gate is the raw p, grows into renormalize=False), topk_softmax, sigmoid
with renormalize=True at k > 1 and expert_choice (C = cf*N*k/E is unchanged, each
copy picks the original's tokens with half the gate): each group of copies has
equal logits, all copies are selected, gates sum to the original's.  Not
preserved: sigmoid without renormalisation or from k = 1 (gates sum to f times
the original's score, or to 1), growing only E or only k (the paper's inferior
ablations), the random baselines below.

Width baselines, named for what they redraw (2510.08008's ablation "random init"):
  random_router   the released growth script's baseline (`--growth-use-random-router`
                  in Offline_checkpoint_growth.py): the WHOLE router, the originals'
                  columns included, redrawn from N(0, init_std^2) (released: 0.02) with
                  zero routing biases; the experts are still copies (noised as usual).
  random_experts  what the paper's text describes ("random init new experts"): the
                  originals kept, the new experts and their router columns drawn
                  fresh from N(0, init_std^2), their biases the layer's mean.  The
                  released code has no such option, so how the paper initialised
                  them is not known; this is our reading.

Optimizer state: "reset" (the paper) re-initialises Adam; "grow" transforms the
moments like their weights (copies, no noise; zeros for zeroed copies and for
redrawn weights), keeps Adam's bias-correction count and restarts the
schedule count at 0 with the new run's step.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_lab.accounting import flops
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate
from moe_lab.layers.recursion_routing import step_routers_for
from moe_lab.models import tree as model_tree
from moe_lab.models.recursive import recursion_schedule

# Output projections of a block: zeroing them makes a pre-norm block the identity.
OUTPUT_PROJECTIONS = ("o_HKD", "o_bias_D", "down_EFD", "down_FD")
# Width growth's initialisations of the new experts (module docstring).
WIDTH_INITS = ("copy", "random_router", "random_experts")
# MoE leaves with an expert axis -> that axis in the stacked [L, ...] array.
EXPERT_AXES = {"gate_EDF": 1, "up_EDF": 1, "down_EFD": 1, "router_DE": 2, model_tree.ROUTER_BIAS: 1}


# ------------------------------------------------------------------- helpers


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _paths(tree) -> list[tuple[str, ...]]:
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            for k in sorted(node):
                walk(node[k], path + (k,))
        else:
            out.append(path)

    walk(tree, ())
    return out


def _map_dict(tree, fn: Callable[[tuple[str, ...], Any], Any], path=()):
    """Maps fn(path, leaf) over a nested dict (params, moments or model_state)."""
    if isinstance(tree, dict):
        return {k: _map_dict(v, fn, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


def _leaf_rng(seed: int, path: tuple[str, ...]) -> np.random.Generator:
    """Independent stream per tensor, so results do not depend on traversal order."""
    return np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])


def _replace_model(cfg: Config, **model) -> Config:
    moe = model.pop("moe", None)
    m = dataclasses.replace(cfg.model, **model)
    if moe:
        m = dataclasses.replace(m, moe=dataclasses.replace(m.moe, **moe))
    return validate(cfg.replace(model=m))


def stack_sizes(cfg: Config) -> dict[str, int]:
    m = cfg.model
    n_dense = m.moe.first_dense_layers if m.ffn == "moe" else 0
    sizes = dict(zip(model_tree.PLAIN_STACKS, (n_dense, m.num_layers - n_dense)))
    return {k: v for k, v in sizes.items() if v}


# --------------------------------------------------------------------- depth


@dataclasses.dataclass(frozen=True)
class DepthPlan:
    """Per stack: the source layer of each new layer, and which new layers are copies."""

    index: dict[str, np.ndarray]
    is_copy: dict[str, np.ndarray]
    cfg: Config  # the grown config


def depth_plan(
    cfg: Config, *, method: str = "interpose", factor: int = 2, keep_first: int = 0, keep_last: int = 0
) -> DepthPlan:
    if method not in ("interpose", "stack"):
        raise ConfigError(f"grow: depth method {method!r} is not one of interpose, stack")
    if factor < 2:
        raise ConfigError(f"grow: depth factor must be >= 2, got {factor}")
    L = cfg.model.num_layers
    if keep_first < 0 or keep_last < 0 or keep_first + keep_last >= L:
        raise ConfigError(
            f"grow: keep_first={keep_first} + keep_last={keep_last} must leave "
            f"at least one of the {L} layers to grow"
        )
    index, is_copy, offset = {}, {}, 0
    for name, n in stack_sizes(cfg).items():
        g = offset + np.arange(n)
        single = (g < keep_first) | (g >= L - keep_last)
        head = [i for i in range(n) if single[i] and g[i] < keep_first]
        tail = [i for i in range(n) if single[i] and g[i] >= L - keep_last]
        mid = [i for i in range(n) if not single[i]]
        if method == "interpose":
            grown = [(i, r > 0) for i in mid for r in range(factor)]
        else:
            grown = [(i, r > 0) for r in range(factor) for i in mid]
        order = [(i, False) for i in head] + grown + [(i, False) for i in tail]
        index[name] = np.array([i for i, _ in order], np.int32)
        is_copy[name] = np.array([c for _, c in order], bool)
        offset += n
    sizes = {k: len(v) for k, v in index.items()}
    new_cfg = _replace_model(
        cfg, num_layers=sum(sizes.values()), moe={"first_dense_layers": sizes.get(model_tree.DENSE_STACK, 0)}
    )
    return DepthPlan(index=index, is_copy=is_copy, cfg=new_cfg)


def apply_depth(tree: dict, plan: DepthPlan, *, zero_copies: bool = False) -> dict:
    """Applies a depth plan to any tree shaped like params (also Adam moments and
    model_state): leaves under <stack>/layers are gathered on the layer axis."""

    def fn(path, x):
        stack = model_tree.plain_stack_of(path)
        if stack not in plan.index:
            return x
        y = x[plan.index[stack]]
        if zero_copies and path[-1] in OUTPUT_PROJECTIONS:
            keep = (~plan.is_copy[stack]).reshape((-1,) + (1,) * (x.ndim - 1))
            y = y * _xp(y).asarray(keep, y.dtype)
        return y

    return _map_dict(tree, fn)


def grow_depth(
    params: dict,
    cfg: Config,
    *,
    method: str = "interpose",
    factor: int = 2,
    keep_first: int = 0,
    keep_last: int = 0,
    zero_copies: bool = False,
) -> tuple[dict, Config]:
    """(params, cfg) of the depth-grown model (2510.08008: interposition / stacking).

    `params` may be any tree with the params layout under the stacks, e.g.
    model_state (router biases) or Adam moments: `grow_depth(model_state, cfg, ...)`.
    """
    plan = depth_plan(cfg, method=method, factor=factor, keep_first=keep_first, keep_last=keep_last)
    return apply_depth(params, plan, zero_copies=zero_copies), plan.cfg


# --------------------------------------------------------------------- width


@dataclasses.dataclass(frozen=True)
class WidthPlan:
    """New expert e' comes from old expert index[e']; is_copy marks the new ones."""

    index: np.ndarray
    is_copy: np.ndarray
    cfg: Config
    init: str  # copy | random_router | random_experts (see the module docstring)


def width_plan(
    cfg: Config,
    *,
    factor: int = 2,
    layout: str = "append",
    grow_k: bool = True,
    grow_e: bool = True,
    init: str = "copy",
) -> WidthPlan:
    m = cfg.model
    if m.ffn != "moe":
        raise ConfigError("grow: width growth needs an MoE model (model.ffn='moe'); this one is dense")
    if factor < 2:
        raise ConfigError(f"grow: width factor must be >= 2, got {factor}")
    if layout not in ("append", "interleave"):
        raise ConfigError(f"grow: width layout {layout!r} is not one of append, interleave")
    if init not in WIDTH_INITS:
        raise ConfigError(f"grow: width init {init!r} is not one of {', '.join(WIDTH_INITS)}")
    if not (grow_e or grow_k):
        raise ConfigError("grow: width growth with neither experts nor top-k to grow")
    E, k = m.moe.num_experts, m.moe.top_k
    new_e, new_k = (E * factor if grow_e else E), (k * factor if grow_k else k)
    if new_k > new_e:
        raise ConfigError(f"grow: top_k {k} -> {new_k} exceeds the {new_e} experts")
    if not grow_e:
        index = np.arange(E)
    elif layout == "append":  # [e1..eE, e1'..eE']
        index = np.tile(np.arange(E), factor)
    else:  # [e1, e1', e2, e2', ...]
        index = np.repeat(np.arange(E), factor)
    is_copy = np.zeros(len(index), bool)
    is_copy[np.unique(index, return_index=True)[1]] = True
    is_copy = ~is_copy  # the first occurrence of each expert is the original
    moe = {"num_experts": new_e, "top_k": new_k}
    if k == 1 and new_k > 1 and m.moe.router == "softmax_topk" and m.moe.renormalize:
        # at k = 1 the parent's gate is the raw p (routing.SoftmaxTopKRouter); the f
        # copies' gates p/f sum to it only without renormalisation (which would make
        # them sum to 1)
        moe["renormalize"] = False
    new_cfg = _replace_model(cfg, moe=moe)
    return WidthPlan(index=index.astype(np.int32), is_copy=is_copy, cfg=new_cfg, init=init)


def apply_width(
    tree: dict,
    plan: WidthPlan,
    *,
    kind: str = "params",
    noise: float = 0.0,
    seed: int = 0,
    init_std: float = 0.02,
) -> dict:
    """Applies a width plan to a params-shaped tree.

    kind="params": copies get noise*std-scaled Gaussian noise; kind="model_state":
    routing biases (copies get the same relative noise); kind="moments": Adam
    moments, copied without noise.  The random baselines (module docstring) redraw
    weights from N(0, init_std^2), set biases as described there and give redrawn
    weights zero moments.
    """

    def fn(path, x):
        if model_tree.plain_stack_of(path) is None or model_tree.ffn_leaf(path) not in EXPERT_AXES:
            return x  # not an MoE leaf (shared experts live under ffn/shared)
        ax = EXPERT_AXES[path[-1]]
        xp = _xp(x)
        y = xp.take(x, xp.asarray(plan.index), axis=ax)
        if plan.init == "random_router" and path[-1] in ROUTER_LEAVES:
            # the released baseline: every column redrawn, the originals' too
            return xp.asarray(_redrawn(kind, path, y.shape, seed, init_std, bias=None), y.dtype)
        if not plan.is_copy.any():
            return y
        mask_shape = [1] * x.ndim
        mask_shape[ax] = len(plan.index)
        copy = np.broadcast_to(plan.is_copy.reshape(mask_shape), y.shape)
        if plan.init == "random_experts":
            mean = np.mean(np.asarray(x, np.float32), axis=ax, keepdims=True)
            new = _redrawn(kind, path, y.shape, seed, init_std, bias=mean)
            return xp.where(copy, xp.asarray(new, y.dtype), y)
        if kind == "moments" or noise == 0:
            return y
        # eps ~ N(0, (noise * std of the original tensor of that layer)^2), copies only
        x32 = np.asarray(x, np.float32)
        std_L = x32.reshape(x.shape[0], -1).std(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
        eps = noise * std_L * _leaf_rng(seed, path).standard_normal(y.shape)
        eps = np.where(copy, eps, 0.0)
        return xp.where(copy, y + xp.asarray(eps, y.dtype), y)

    return _map_dict(tree, fn)


ROUTER_LEAVES = ("router_DE", model_tree.ROUTER_BIAS)


def _redrawn(kind: str, path, shape, seed: int, init_std: float, *, bias) -> np.ndarray:
    """A redrawn leaf: N(0, init_std^2) weights, zero moments, and routing biases
    `bias` (broadcast; None: zeros, the released random-router baseline)."""
    if kind == "moments":
        return np.zeros(shape, np.float32)
    if kind == "model_state":
        return np.broadcast_to(0.0 if bias is None else bias, shape)
    return init_std * _leaf_rng(seed, path).standard_normal(shape)


def grow_width(
    params: dict,
    model_state: dict,
    cfg: Config,
    *,
    factor: int = 2,
    noise: float = 0.01,
    seed: int = 0,
    layout: str = "append",
    grow_k: bool = True,
    grow_e: bool = True,
    init: str = "copy",
) -> tuple[dict, dict, Config]:
    """(params, model_state, cfg) with E -> factor*E experts and k -> factor*k (2510.08008).

    noise: relative std of the noise on the copies (paper: 0.01); 0 preserves the
    function for the routers listed in the module docstring.  grow_e / grow_k:
    grow only the experts or only top-k (the paper's ablations).  init: copy, or one of
    the random baselines of the module docstring (random_router: the released
    code's; random_experts: the paper text's), drawn with cfg.model.init_std.
    """
    plan = width_plan(cfg, factor=factor, layout=layout, grow_k=grow_k, grow_e=grow_e, init=init)
    kw = {"noise": noise, "seed": seed, "init_std": cfg.model.init_std}
    return (
        apply_width(params, plan, kind="params", **kw),
        apply_width(model_state, plan, kind="model_state", **kw),
        plan.cfg,
    )


def width_preserves_function(cfg: Config, *, noise: float, grow_e: bool, grow_k: bool, init: str) -> bool:
    """Whether width growth with these options keeps the logits (see module docstring)."""
    moe = cfg.model.moe
    # sigmoid copies keep the full score s each: only renormalised gates over k > 1
    # choices sum back to the parent's (at k = 1 the parent's gate is s itself)
    router_ok = moe.router != "sigmoid" or (moe.renormalize and moe.top_k > 1)
    return noise == 0 and grow_e and grow_k and init == "copy" and router_ok


def depth_preserves_function(cfg: Config, *, zero_copies: bool) -> bool:
    """Zeroed copies are identities only in pre-norm blocks (post-norm re-normalises)."""
    return zero_copies and cfg.model.norm_placement == "pre"


# ------------------------------------------------------------ optimizer state


def _is_params_like(node, params_struct) -> bool:
    return isinstance(node, dict) and jax.tree.structure(node) == params_struct


def grow_opt_state(
    opt_state,
    old_params: dict,
    transform: Callable[[dict], dict],
    *,
    mode: str = "reset",
    init_fn: Callable | None = None,
    new_params: dict | None = None,
):
    """The optimizer state after growth.

    mode="reset" (2510.08008 re-initialises Adam): `init_fn(new_params)`, e.g.
    the new run's `tx.init`.  mode="grow": every params-shaped subtree of
    `opt_state` (Adam's mu and nu) goes through `transform` (the weights'
    transforms without noise, kind="moments"); Adam's count is kept (its bias
    correction matches the moments); schedule counts restart at 0 with the new
    run's step; everything else is kept.  The optax structure (namedtuples) is
    rebuilt from the original's.
    """
    if mode == "reset":
        if init_fn is None or new_params is None:
            raise ValueError("grow_opt_state(mode='reset') needs init_fn and new_params")
        return init_fn(new_params)
    if mode != "grow":
        raise ConfigError(f"grow: opt-state mode {mode!r} is not one of reset, grow")
    struct = jax.tree.structure(old_params)

    def walk(node):
        if _is_params_like(node, struct):
            return transform(node)
        if type(node).__name__ == "ScaleByScheduleState":
            return type(node)(count=_xp(node.count).zeros_like(node.count))
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(c) for c in node])
        if isinstance(node, (tuple, list)):
            return type(node)(walk(c) for c in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(opt_state)


# ------------------------------------------------------------- whole states


def grow_train_state(
    state: dict,
    cfg: Config,
    steps: list[tuple[str, dict]],
    *,
    opt_state: str = "reset",
    seed: int = 0,
    init_fn_for: Callable[[Config], Callable] | None = None,
) -> tuple[dict, Config]:
    """Applies [("depth", kwargs) | ("width", kwargs), ...] in order to a whole
    train state {"params", "opt_state", "model_state", "step"}; step becomes 0.

    depth kwargs: method, factor, keep_first, keep_last, zero_copies; width
    kwargs: factor, noise, layout, grow_k, grow_e, init.  Width step i uses seed
    `seed + i`.  `init_fn_for(new_cfg)` returns the new optimizer's init (reset).
    """
    params, model_state = state["params"], state["model_state"]
    mus = []  # transforms of the moments, composed in order
    for i, (what, kw) in enumerate(steps):
        if what == "depth":
            kw = dict(kw)
            zero = kw.pop("zero_copies", False)
            plan = depth_plan(cfg, **kw)
            params = apply_depth(params, plan, zero_copies=zero)
            model_state = apply_depth(model_state, plan, zero_copies=zero)
            mus.append(lambda t, p=plan, z=zero: apply_depth(t, p, zero_copies=z))
        elif what == "width":
            kw = dict(kw)
            noise = kw.pop("noise", 0.01)
            plan = width_plan(cfg, **kw)
            opts = {"noise": noise, "seed": seed + i, "init_std": cfg.model.init_std}
            params = apply_width(params, plan, kind="params", **opts)
            model_state = apply_width(model_state, plan, kind="model_state", **opts)
            mus.append(lambda t, p=plan: apply_width(t, p, kind="moments"))
        else:
            raise ConfigError(f"grow: unknown transform {what!r} (depth, width)")
        cfg = plan.cfg

    def transform(tree):
        for f in mus:
            tree = f(tree)
        return tree

    init_fn = init_fn_for(cfg) if (opt_state == "reset" and init_fn_for) else None
    new_opt = grow_opt_state(
        state["opt_state"], state["params"], transform, mode=opt_state, init_fn=init_fn, new_params=params
    )
    step = state["step"]
    new = {
        "params": params,
        "opt_state": new_opt,
        "model_state": model_state,
        "step": _xp(step).zeros_like(step),
    }
    return new, cfg


# ------------------------------------------------------------------- analysis


def weight_norm_profile(params: dict, cfg: Config) -> list[dict]:
    """Per layer (model order), ||W||_F / sqrt(numel) of every weight kind.

    Expert tensors (gate_EDF, up_EDF, down_EFD) give the mean over experts of the
    per-expert value (2510.08008's rising per-layer profile; stacking leaves a
    cliff at the seam, interposition keeps it smooth).  Rows are flat dicts
    {"layer", "stack", "attn/q_DHK", "ffn/gate_EDF", ...}: pd.DataFrame(rows).
    """
    rows, g = [], 0
    for name, n in stack_sizes(cfg).items():
        layers = model_tree.get(params, (name, model_tree.LAYERS))
        for i in range(n):
            row = {"layer": g, "stack": name}
            for path in _paths(layers):
                w = np.asarray(model_tree.get(layers, path)[i], np.float32)
                if path[-1] in ("gate_EDF", "up_EDF", "down_EFD"):
                    per_e = np.sqrt(np.mean(np.square(w.reshape(w.shape[0], -1)), axis=1))
                    row["/".join(path)] = float(per_e.mean())
                else:
                    row["/".join(path)] = float(np.sqrt(np.mean(np.square(w))))
            rows.append(row)
            g += 1
    return rows


def sunk_flops(parent_cfg: Config, parent_meta: dict) -> float:
    """Training FLOPs already spent on the parent (checkpoint meta "flops_spent";
    estimated from its step, batch and sequence length if missing)."""
    if parent_meta.get("flops_spent") is not None:
        return float(parent_meta["flops_spent"])
    t, d = parent_cfg.train, parent_cfg.data
    per_token = flops.train_flops_per_token(parent_cfg.model, d.seq_len)
    return float(per_token * int(parent_meta.get("step", 0)) * t.batch_size * d.seq_len)


def chinchilla_ratio(cfg: Config, spent: float) -> float:
    """spent / (6 * N_a * 20 * N_a): 2510.08008 finds interposition beats stacking
    once the base has seen more than about 1x Chinchilla FLOPs of its active size."""
    n_a = flops.param_counts(cfg.model)["active"]
    return spent / (6.0 * n_a * 20 * n_a) if n_a else math.nan


# ------------------------------------------------ recursion depth (MoR, test time)


def with_recursions(cfg, state: dict, depth: int):
    """(cfg', params', model_state') of a recursive model run with `depth` recursion
    steps of the SAME shared pool (depth > trained: extrapolation).

    The pool of P shared layers is unchanged (num_layers' = P*depth (+2 for
    middle_* sharing)); expert-choice step routers beyond the trained ones reuse the
    last trained router (fewer steps: the first `depth` routers).  Token-choice
    routing picks a depth among the trained N_r up front, so it cannot be capped or
    extended without changing its router: refused.
    """
    m = cfg.model
    if m.stack != "recursive":
        raise ConfigError("recursion depth sweep needs model.stack='recursive'")
    mor = m.mor
    if mor.routing == "token_choice":
        raise ConfigError(
            "recursion depth sweep: token-choice routing fixes depths 1..N_r "
            "in its router; only routing='none' or 'expert_choice' can vary depth"
        )
    if depth < 1:
        raise ConfigError(f"recursion depth must be >= 1, got {depth}")
    R = mor.num_recursions
    pool = recursion_schedule(m.num_layers, R, mor.sharing).pool
    middle = mor.sharing.startswith("middle")
    if mor.sharing.endswith("sequence") and pool > 1:
        raise ConfigError(
            "recursion depth sweep: 'sequence' sharing with a pool > 1 applies "
            "each layer N_r times in a row; its depth cannot be changed"
        )
    caps = ""
    if mor.capacities.strip():
        old = [c.strip() for c in mor.capacities.split(",")]
        caps = ",".join((old + [old[-1]] * depth)[:depth])
    mor2 = dataclasses.replace(mor, num_recursions=depth, capacities=caps)
    m2 = dataclasses.replace(m, num_layers=pool * depth + (2 if middle else 0), mor=mor2)
    params = dict(state["params"])
    if mor.routing == "expert_choice":
        steps = [min(r, R - 1) for r in range(depth)]  # trained router of each new step
        for path in model_tree.STEP_ROUTERS:
            routers = model_tree.get(params, path)
            if routers is not None:
                params = model_tree.replace(params, path, step_routers_for(routers, steps))
    return cfg.replace(model=m2), params, state["model_state"]
