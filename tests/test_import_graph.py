"""The package's import graph stays one-way (read with ast; nothing is imported).

Rooms, lowest first; a module may import its own room and rooms of a lower rank only
(two rooms of the same rank are independent of each other):

    config < parallel < layers < models < accounting < data < train < (growth, interop) < eval
           < (rl, aot) < sweep < bench < cli

data ranks just below train: the model (layers, models) never sees where tokens come
from, so a new data source cannot change what a layer computes.

aot (ahead-of-time compilation for a pod) compiles train's steps and eval's decode step,
and `sweep --compile` compiles every point of a sweep with it.

Why this order, where it differs from "cli -> sweep -> (rl, growth, eval) -> train":
eval's test-time depth sweep uses growth's recursion-depth transform (a parameter
rewrite), and GRPO (rl) generates with eval's one generation API, so the three form a
chain.  Function-local imports hide the graph: they are allowed only for optional or
heavy libraries that some commands never need (plotting, pandas, torch, ...).
"""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "moe_lab"
RANKS = {
    "config": 0,
    "parallel": 1,
    "layers": 2,
    "models": 3,
    "accounting": 4,
    "data": 5,
    "train": 6,
    "growth": 7,
    "interop": 7,
    "eval": 8,
    "rl": 9,
    "aot": 9,
    "sweep": 10,
    "bench": 11,
    "cli": 12,
    "__main__": 13,
    "__init__": 13,
}
# the stack every room may import at module top; a local import of these is a hidden edge
CORE_LIBRARIES = {"moe_lab", "jax", "jaxlib", "flax", "optax", "orbax", "grain", "numpy", "ml_collections"}
# modules whose function-local imports are the point
LOCAL_IMPORTS_BY_DESIGN = {
    # its child processes measure peak memory (RSS) of a growth against a baseline
    # that only imports the checkpoint code: what is imported, and when, is measured
    "moe_lab.bench.growth",
    # `eval --lm-eval` loads the lm-eval model module (which needs the optional [eval]
    # extra, lm_eval) only when asked: every other command starts without it
    "moe_lab.cli.eval",
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imported_names(node, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        keep = len(module.split(".")) - node.level + (1 if is_package else 0)
        base = ".".join(module.split(".")[:keep] + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph():
    """(edges {module: {imported module}}, local imports [(module, line, name)])."""
    mods = _modules()

    def resolve(name):
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    edges, local = {m: set() for m in mods}, []
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if getattr(node, "module", "") == "__future__":
                continue
            names = _imported_names(node, m, path.name == "__init__.py")
            if (
                id(node) not in top
                and names[0].split(".")[0] in CORE_LIBRARIES
                and m not in LOCAL_IMPORTS_BY_DESIGN
            ):
                local.append((m, node.lineno, names[0]))
            for n in names:
                target = resolve(n) if n.startswith("moe_lab") else None
                if target and target != m:
                    edges[m].add(target)
    return edges, local


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def against_the_order(edges) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            a, b = room(src), room(dst)
            if a != b and RANKS[b] >= RANKS[a]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_every_module_belongs_to_a_room():
    assert {room(m) for m in _modules()} <= set(RANKS), set(map(room, _modules())) - set(RANKS)


def test_no_import_cycles():
    edges, _ = import_graph()
    assert find_cycles(edges) == []


def test_imports_follow_the_room_order():
    edges, _ = import_graph()
    assert against_the_order(edges) == []


def test_no_function_local_imports_of_the_stack():
    _, local = import_graph()
    assert local == []


def test_the_checks_can_fail():
    """The detectors themselves, on a made-up graph: a cycle and an upward import."""
    edges = {"moe_lab.train.loop": {"moe_lab.eval.evaluate"}, "moe_lab.eval.evaluate": {"moe_lab.train.loop"}}
    assert find_cycles(edges) == [["moe_lab.eval.evaluate", "moe_lab.train.loop"]]
    assert against_the_order(edges) == ["moe_lab.train.loop -> moe_lab.eval.evaluate"]


def test_every_file_the_tree_names_exists():
    """A docstring, comment or README that names moe_lab/<path>.py names a file that is there
    (files move; their mentions must move with them)."""
    root = PACKAGE.parent
    texts = [
        *root.glob("moe_lab/**/*.py"),
        *root.glob("configs/*.py"),
        *root.glob("tests/*.py"),
        *root.glob("experiments/**/*.py"),
        *root.glob("experiments/**/*.md"),
        root / "README.md",
    ]
    missing = sorted(
        {
            (str(t.relative_to(root)), name)
            for t in texts
            for name in re.findall(r"moe_lab/[\w/]+\.py", t.read_text())
            if not (root / name).is_file()
        }
    )
    assert missing == []
