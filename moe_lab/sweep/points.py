"""Sweep grid expansion: a config's get_sweep() -> ordered, named Points; shards.

The runner (sweep/runner.py) runs them; sweep/results.py stores what they give.
"""

from __future__ import annotations

import dataclasses
import re

from moe_lab.config.load import apply_overrides, load_raw
from moe_lab.config.schema import ConfigError

SPECIAL = ("name", "from", "budget_flops", "budget_flops_total", "trainer", "post", "tags")
_ABBREV = {
    "num_experts": "e",
    "top_k": "k",
    "d_model": "d",
    "num_layers": "l",
    "expert_hidden": "f",
    "num_heads": "h",
    "num_kv_heads": "kv",
    "steps": "s",
    "batch_size": "b",
    "seed": "seed",
    "lr": "lr",
    "mixture": "mix",
    "budget_flops": "B",
    "budget_flops_total": "BT",
}


# ------------------------------------------------------------------ expansion


@dataclasses.dataclass(frozen=True)
class Point:
    index: int  # position in get_sweep()
    name: str
    overrides: dict  # dotted config keys -> values
    source: dict | None = None  # the "from" spec
    budget_flops: float | None = None
    budget_flops_total: float | None = None
    trainer: str | None = None
    post: tuple = ()
    tags: dict = dataclasses.field(default_factory=dict)

    @property
    def parent(self) -> str | None:
        return self.source["run"] if self.source else None

    @property
    def swept(self) -> dict:
        out = dict(self.overrides)
        for k in ("budget_flops", "budget_flops_total"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        v = f"{v:g}".replace("e+", "e")
    return re.sub(r"[^A-Za-z0-9.-]+", "-", str(v)).strip("-")


def run_name(values: dict) -> str:
    """Directory name from swept values: {"model.moe.num_experts": 8, ...} -> "e8_k2"."""
    parts = []
    for key, v in values.items():
        leaf = key.rsplit(".", 1)[-1]
        parts.append(_ABBREV.get(leaf, leaf) + _fmt_value(v))
    return "_".join(parts) or "base"


def make_points(raw_points) -> list[Point]:
    """Checks the points of get_sweep() and names them; returns them in
    dependency (topological) order, ties kept in get_sweep() order."""
    if not isinstance(raw_points, (list, tuple)) or not raw_points:
        raise ConfigError("get_sweep() must return a non-empty list of dicts")
    points, names = [], {}
    for i, p in enumerate(raw_points):
        if hasattr(p, "to_dict"):
            p = p.to_dict()
        if not isinstance(p, dict):
            raise ConfigError(f"sweep point {i}: expected a dict, got {type(p).__name__}")
        overrides = {k: v for k, v in p.items() if k not in SPECIAL}
        for k in overrides:
            if "." not in k:
                raise ConfigError(
                    f"sweep point {i}: unknown key {k!r} (config keys are dotted, "
                    f"special keys: {', '.join(SPECIAL)})"
                )
        src = p.get("from")
        if src is not None and not (isinstance(src, dict) and isinstance(src.get("run"), str)):
            raise ConfigError(f"sweep point {i}: 'from' must be a dict with a 'run' name")
        post = tuple(p.get("post") or ())
        for s in post:
            if not (isinstance(s, dict) and isinstance(s.get("kind"), str)):
                raise ConfigError(f"sweep point {i}: each 'post' stage needs a 'kind'")
        pt = Point(
            index=i,
            name="",
            overrides=overrides,
            source=src,
            budget_flops=p.get("budget_flops"),
            budget_flops_total=p.get("budget_flops_total"),
            trainer=p.get("trainer"),
            post=post,
            tags=dict(p.get("tags") or {}),
        )
        name = p.get("name") or run_name(pt.swept)
        if src is not None and not p.get("name"):
            name = f"{src['run']}_from{src.get('step', 'last')}" + ("_" + name if pt.swept else "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@=+-]*", name):
            raise ConfigError(f"sweep point {i}: bad run name {name!r}")
        if name in names:
            raise ConfigError(
                f"sweep points {names[name]} and {i} have the same name {name!r}; give them explicit 'name's"
            )
        names[name] = i
        points.append(dataclasses.replace(pt, name=name))
    by_name = {p.name: p for p in points}
    for p in points:
        if p.parent is not None and p.parent not in by_name:
            raise ConfigError(f"sweep point {p.name!r}: 'from' run {p.parent!r} is not a point")
    ordered, done = [], set()
    remaining = list(points)
    while remaining:
        ready = [p for p in remaining if p.parent is None or p.parent in done]
        if not ready:
            raise ConfigError(
                "sweep: 'from' dependencies form a cycle: " + ", ".join(p.name for p in remaining)
            )
        for p in ready:
            ordered.append(p)
            done.add(p.name)
        remaining = [p for p in remaining if p.name not in done]
    return ordered


def load_sweep(config_arg: str, overrides: dict | None = None) -> tuple[dict, list[Point]]:
    """(base raw config with command-line overrides applied, points in run order)."""
    base = load_raw(config_arg, "get_config")
    base = apply_overrides(base if base is not None else {}, overrides or {})
    return base, make_points(load_raw(config_arg, "get_sweep"))


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: want I/N with 0 <= I < N (e.g. 0/4)")
    return int(m[1]), int(m[2])


def shard_points(points: list[Point], shard: tuple[int, int]) -> list[Point]:
    i, n = shard
    return [p for k, p in enumerate(points) if k % n == i]
