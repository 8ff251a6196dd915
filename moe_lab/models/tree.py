"""The names in the parameter / state tree of a Transformer, spelled once.

params and model_state are nested dicts (nnx.State.to_pure_dict()) whose keys are
the modules' attribute names: Transformer (transformer.py), RecursiveStack
(recursive.py), ScannedStack and Block (blocks.py), MoE (layers/moe.py), the MoR
routers (layers/recursion_routing.py).  What walks those trees from outside the
modules (growth, the train step's state updates, the recursion-depth transform)
takes the paths from here.  Checkpoints are saved by these names: renaming an
attribute (and the constant here) breaks every checkpoint written before.

Layout (stacked leaves carry the layer axis L first):
  <DENSE_STACK | MAIN_STACK> / layers / {attn_norm, attn, ffn_norm, ffn} / ...
  recursive / <first | shared | last> / layers / ...   (a MoR model)
  recursive / {router, aux_router, bias_R, steps_seen}
  .../ffn / {router_DE, gate_EDF, up_EDF, down_EFD, bias_E, shared}   (an MoE)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Path = tuple[str, ...]

DENSE_STACK = "dense_blocks"  # the first moe.first_dense_layers layers of an MoE model
MAIN_STACK = "blocks"
PLAIN_STACKS = (DENSE_STACK, MAIN_STACK)  # Transformer's ScannedStacks, in model order
RECURSIVE = "recursive"  # Transformer's one RecursiveStack (model.stack = "recursive")
RECURSIVE_STACKS = ("first", "shared", "last")  # its ScannedStacks, in model order
SHARED_POOL = "shared"  # the recursive stack's shared pool (applied once per step)
LAYERS = "layers"  # a ScannedStack's Blocks, stacked on axis 0
FFN = "ffn"  # a Block's feed-forward (MoE or SwiGLU)
ROUTER_BIAS = "bias_E"  # an MoE sigmoid router's loss-free selection bias
ROUTER = "router"  # MoR: the step routers (expert choice) or the depth router
AUX_ROUTER = "aux_router"  # MoR expert choice: the stop-gradient causal router
DEPTH_BIAS = "bias_R"  # MoR token choice: the loss-free depth bias
STEPS_SEEN = "steps_seen"  # MoR token choice: train steps seen (warm-up)

# MoR expert choice: the routers with one row per recursion step (axis 0)
STEP_ROUTERS: tuple[Path, ...] = ((RECURSIVE, ROUTER), (RECURSIVE, AUX_ROUTER))


def get(tree: dict, path: Sequence[str], default: Any = None) -> Any:
    """tree[path[0]][path[1]]...; `default` where a key is missing."""
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def replace(tree: dict, path: Sequence[str], value: Any) -> dict:
    """A tree with `value` at `path`: the dicts along the path are copied, everything
    else shared with `tree` (which is left as it was)."""
    if not path:
        return value
    head, *rest = path
    return {**tree, head: replace(tree.get(head, {}), rest, value)}


def stack_paths(tree: dict) -> list[Path]:
    """The ScannedStacks present in a params-shaped tree, in model order:
    ("dense_blocks",), ("blocks",), or ("recursive", "first"), ("recursive", "shared"), ..."""
    if RECURSIVE in tree:
        return [(RECURSIVE, name) for name in RECURSIVE_STACKS if name in tree[RECURSIVE]]
    return [(name,) for name in PLAIN_STACKS if name in tree]


def router_bias_path(stack: Path) -> Path:
    """The [L, E] sigmoid-router biases of a stack's MoE layers."""
    return (*stack, LAYERS, FFN, ROUTER_BIAS)


def mor_path(name: str) -> Path:
    """A RecursiveStack's own variable (router, aux_router, bias_R, steps_seen)."""
    return (RECURSIVE, name)


def plain_stack_of(path: Path) -> str | None:
    """The plain stack whose stacked layers hold the leaf at `path`, or None."""
    if len(path) >= 2 and path[0] in PLAIN_STACKS and path[1] == LAYERS:
        return path[0]
    return None


def ffn_leaf(path: Path) -> str | None:
    """The leaf's name if it sits directly in a block's feed-forward (an MoE's own
    tensors; shared experts are one level deeper, under ffn/shared), else None."""
    return path[-1] if len(path) >= 2 and path[-2] == FFN else None
