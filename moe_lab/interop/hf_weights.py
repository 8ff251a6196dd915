"""HF tensor names <-> moe_lab's parameter tree, for the classes of hf_config.py.

HF stores one [out, in] matrix per linear layer and per expert; moe_lab stacks layers
on axis 0 and experts on axis 1 and keeps heads apart ([L, D, H, K] queries, [L, E, D, F]
experts).  Each `Leaf` says where one moe_lab leaf of a block lives in HF (one tensor,
or one per expert) and how to turn one into the other; both directions use the same
table, so import and export cannot disagree on a name or a transpose.

Names (transformers 4.x, the format of the Hub's checkpoints):
    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.N.{input_layernorm, post_attention_layernorm}.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}, .{q,k}_norm.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight                 dense (Llama, Qwen's first)
    model.layers.N.block_sparse_moe.gate.weight, .experts.E.w{1,3,2}.weight   Mixtral
    model.layers.N.mlp.gate.weight, .experts.E.{gate,up,down}_proj.weight     Qwen / OLMoE
    model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight, .shared_expert_gate.weight
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from moe_lab.config.schema import ModelConfig
from moe_lab.interop.hf_config import MIXTRAL
from moe_lab.models import tree

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: Path  # inside a block (ScannedStack layers), or from the root for the top leaves
    names: tuple[str, ...]  # HF names (".{i}" filled with the layer); one per expert or one
    to_ml: Callable  # [hf arrays] -> the moe_lab array (one layer)
    to_hf: Callable  # the moe_lab array (one layer) -> [hf arrays]


def _linear_in(shape_of: Callable[[np.ndarray], tuple]):
    """HF [out, in] -> moe_lab [in, *out split] (W.T reshaped), and back."""
    return (lambda ws: ws[0].T.reshape(shape_of(ws[0])), lambda a: [a.reshape(a.shape[0], -1).T])


def _attn_leaves(m: ModelConfig, arch_qk_norm: str) -> list[Leaf]:
    D, H, G, K = m.d_model, m.num_heads, m.num_kv_heads, m.resolved_head_dim
    p = "model.layers.{i}.self_attn."
    out = [
        Leaf(
            ("attn_norm", "scale_D"),
            ("model.layers.{i}.input_layernorm.weight",),
            lambda ws: ws[0],
            lambda a: [a],
        ),
        Leaf(
            ("ffn_norm", "scale_D"),
            ("model.layers.{i}.post_attention_layernorm.weight",),
            lambda ws: ws[0],
            lambda a: [a],
        ),
    ]
    for name, n in (("q", H), ("k", G), ("v", G)):
        suffix = "HK" if name == "q" else "GK"
        to_ml, to_hf = _linear_in(lambda w, n=n: (D, n, K))
        out.append(Leaf(("attn", f"{name}_D{suffix}"), (f"{p}{name}_proj.weight",), to_ml, to_hf))
        if m.attn_bias != "none":
            out.append(
                Leaf(
                    ("attn", f"{name}_bias_{suffix}"),
                    (f"{p}{name}_proj.bias",),
                    lambda ws, n=n: ws[0].reshape(n, K),
                    lambda a: [a.reshape(-1)],
                )
            )
    out.append(
        Leaf(
            ("attn", "o_HKD"),
            (f"{p}o_proj.weight",),
            lambda ws: ws[0].T.reshape(H, K, D),
            lambda a: [a.reshape(H * K, D).T],
        )
    )
    if m.attn_bias == "qkvo":
        out.append(Leaf(("attn", "o_bias_D"), (f"{p}o_proj.bias",), lambda ws: ws[0], lambda a: [a]))
    if arch_qk_norm != "none":
        for name in ("q", "k"):
            out.append(
                Leaf(
                    ("attn", f"{name}_norm", "scale_D"),
                    (f"{p}{name}_norm.weight",),
                    lambda ws: ws[0],
                    lambda a: [a],
                )
            )
    return out


def _swiglu_leaves(path: Path, prefix: str, names=("gate_proj", "up_proj", "down_proj")):
    gate, up, down = names
    t = (lambda ws: ws[0].T, lambda a: [a.T])
    return [
        Leaf((*path, "gate_DF"), (f"{prefix}{gate}.weight",), *t),
        Leaf((*path, "up_DF"), (f"{prefix}{up}.weight",), *t),
        Leaf((*path, "down_FD"), (f"{prefix}{down}.weight",), *t),
    ]


def _moe_leaves(m: ModelConfig, arch: str) -> list[Leaf]:
    E = m.moe.num_experts
    mixtral = arch == MIXTRAL
    p = "model.layers.{i}." + ("block_sparse_moe." if mixtral else "mlp.")
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")

    def to_ml(ws):  # one expert (import fills the stacked leaf with it): a view, no copy
        return ws[0].T[None] if len(ws) == 1 else np.stack([w.T for w in ws])

    def experts(name):  # E HF [out, in] matrices <-> one [E, in, out]
        return (tuple(f"{p}experts.{e}.{name}.weight" for e in range(E)), to_ml, lambda a: [x.T for x in a])

    out = [
        Leaf((tree.FFN, "router_DE"), (f"{p}gate.weight",), lambda ws: ws[0].T, lambda a: [a.T]),
        Leaf((tree.FFN, "gate_EDF"), *experts(gate)),
        Leaf((tree.FFN, "up_EDF"), *experts(up)),
        Leaf((tree.FFN, "down_EFD"), *experts(down)),
    ]
    if m.moe.num_shared_experts:
        out += _swiglu_leaves((tree.FFN, "shared"), f"{p}shared_expert.")
        out.append(
            Leaf(
                (tree.FFN, "shared_gate_D"),
                (f"{p}shared_expert_gate.weight",),
                lambda ws: ws[0].reshape(-1),
                lambda a: [a.reshape(1, -1)],
            )
        )
    return out


def block_leaves(m: ModelConfig, arch: str, ffn_kind: str) -> list[Leaf]:
    """The leaves of one block of kind ffn_kind ("dense" or "moe")."""
    ffn = (
        _swiglu_leaves((tree.FFN,), "model.layers.{i}.mlp.") if ffn_kind == "dense" else _moe_leaves(m, arch)
    )
    return _attn_leaves(m, m.qk_norm) + ffn


def top_leaves(m: ModelConfig) -> list[Leaf]:
    out = [
        Leaf(("embed_VD",), ("model.embed_tokens.weight",), lambda ws: ws[0], lambda a: [a]),
        Leaf(("final_norm", "scale_D"), ("model.norm.weight",), lambda ws: ws[0], lambda a: [a]),
    ]
    if not m.tie_embeddings:
        out.append(Leaf(("unembed_DV",), ("lm_head.weight",), lambda ws: ws[0].T, lambda a: [a.T]))
    return out


def stacks_of(m: ModelConfig) -> list[tuple[str, range, str]]:
    """(stack name, the HF layer indices it holds, ffn kind) in model order."""
    n_dense = m.moe.first_dense_layers if m.ffn == "moe" else 0
    out = [(tree.DENSE_STACK, range(n_dense), "dense")] if n_dense else []
    return out + [(tree.MAIN_STACK, range(n_dense, m.num_layers), m.ffn)]


def layer_names(leaf: Leaf, layer: int | None) -> tuple[str, ...]:
    return tuple(n.format(i=layer) for n in leaf.names)


def hf_names(m: ModelConfig, arch: str) -> list[str]:
    """Every HF tensor name a checkpoint of `m` holds."""
    out = [n for leaf in top_leaves(m) for n in leaf.names]
    for _, layers, kind in stacks_of(m):
        for leaf in block_leaves(m, arch, kind):
            out += [n for i in layers for n in layer_names(leaf, i)]
    return out


class HFShapeError(ValueError):
    """An HF tensor whose shape does not fit the config (the message names it)."""


def _converted(leaf: Leaf, names: tuple[str, ...], ws: list, want: tuple) -> np.ndarray:
    try:
        a = leaf.to_ml(ws)
    except ValueError:
        a = None
    if a is None or tuple(a.shape) != tuple(want):
        shapes = sorted({tuple(w.shape) for w in ws})
        raise HFShapeError(
            f"tensor {names[0]} has shape {shapes[0] if len(shapes) == 1 else shapes}"
            f", which does not fit the config (moe_lab wants {tuple(want)} for "
            f"{'/'.join(leaf.path)})"
        )
    return a


def _stacked_parts(leaf: Leaf, layers: range, read: Callable[[str], np.ndarray], want: tuple):
    """(index into the stacked leaf, its array) for each layer (and expert) of `leaf`,
    read and converted one HF tensor at a time."""
    for j, i in enumerate(layers):
        names = layer_names(leaf, i)
        if len(names) == 1:
            yield (j,), _converted(leaf, names, [read(names[0])], want[1:])
            continue
        for e, name in enumerate(names):  # experts: one at a time
            yield (j, e), _converted(leaf, (name,), [read(name)], (1, *want[2:]))[0]


def leaf_plan(m: ModelConfig, arch: str, abstract_params: dict):
    """[(moe_lab path, Leaf, HF layers or None for a top leaf, shape)] in file order."""
    out = [(leaf.path, leaf, None, tree.get(abstract_params, leaf.path).shape) for leaf in top_leaves(m)]
    for stack, layers, kind in stacks_of(m):
        for leaf in block_leaves(m, arch, kind):
            path = (stack, tree.LAYERS, *leaf.path)
            out.append((path, leaf, layers, tree.get(abstract_params, path).shape))
    return out


def check_shapes(m: ModelConfig, arch: str, shape_of: Callable[[str], tuple], abstract_params: dict) -> None:
    """Runs every conversion on zero-stride views of the HF shapes (shape_of(name)), so
    a tensor that does not fit the config is named (HFShapeError) before any tensor
    is read or anything written; memory: one HF tensor at most (a reshape's copy)."""

    def view(name):
        return np.broadcast_to(np.zeros((), np.float32), shape_of(name))

    for _, leaf, layers, want in leaf_plan(m, arch, abstract_params):
        if layers is None:
            _converted(leaf, leaf.names, [view(n) for n in leaf.names], want)
        else:
            for _ in _stacked_parts(leaf, layers, view, want):
                pass


def param_makers(
    m: ModelConfig, arch: str, read: Callable[[str], np.ndarray], abstract_params: dict, dtype
) -> list[tuple[tuple, tuple, Callable]]:
    """[(moe_lab path, shape, make)]: make() reads the leaf's HF tensors one at a time
    and returns the moe_lab array (a stacked leaf is allocated once and filled layer by
    layer), so making one leaf holds that leaf plus one HF tensor."""

    def maker(leaf, layers, want):
        def make():
            if layers is None:
                ws = [read(n) for n in leaf.names]
                return np.asarray(_converted(leaf, leaf.names, ws, want), dtype)
            out = np.empty(want, dtype)
            for index, a in _stacked_parts(leaf, layers, read, want):
                out[index] = a
            return out

        return make

    return [
        (path, tuple(want), maker(leaf, layers, want))
        for path, leaf, layers, want in leaf_plan(m, arch, abstract_params)
    ]


def hf_tensors(
    m: ModelConfig, arch: str, leaf_of: Callable[[Path], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array view) for every tensor of the HF checkpoint, in file order, one
    at a time (views: the caller copies what it writes).  leaf_of(moe_lab path) is
    called once per leaf, and each leaf is dropped before the next is asked for: export
    reads the checkpoint leaf by leaf through it."""
    for leaf in top_leaves(m):
        yield from zip(leaf.names, leaf.to_hf(np.asarray(leaf_of(leaf.path))), strict=True)
    for stack, layers, kind in stacks_of(m):
        for leaf in block_leaves(m, arch, kind):
            stacked = leaf_of((stack, tree.LAYERS, *leaf.path))
            for j, i in enumerate(layers):
                yield from zip(layer_names(leaf, i), leaf.to_hf(np.asarray(stacked[j])), strict=True)
            del stacked  # before the next leaf is read


def hf_specs(m: ModelConfig, arch: str, shapes: dict) -> list[tuple[str, tuple, np.dtype]]:
    """[(HF name, shape, dtype)] of hf_tensors for a params tree of `shapes` (anything
    with .shape and .dtype), computed on zero-stride views (no tensor is copied)."""

    def shapes_only(a):
        return np.broadcast_to(np.zeros((), a.dtype), a.shape)

    views = _map(shapes_only, shapes)
    return [
        (name, tuple(a.shape), a.dtype) for name, a in hf_tensors(m, arch, lambda path: tree.get(views, path))
    ]


def _map(fn, node):
    return {k: _map(fn, v) for k, v in node.items()} if isinstance(node, dict) else fn(node)
