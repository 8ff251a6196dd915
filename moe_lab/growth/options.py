"""Growth options, one typed object: what `moe-lab grow`'s flags, a sweep point's "grow"
spec and `grow_run` share.  A new option is a field here (and its flag in cli/grow.py).

    GrowOptions(depth=DepthGrowth(method="stack"), width=WidthGrowth(noise=0.0),
                order=("width", "depth"), opt_state="reset", seed=0)

Defaults are 2510.08008's (interposition at 2x depth; 2x experts with 1% noise on copies).
"""

from __future__ import annotations

import dataclasses

from moe_lab.config.schema import ConfigError
from moe_lab.growth.transforms import WIDTH_INITS

DEPTH_METHODS = ("interpose", "stack")
WIDTH_LAYOUTS = ("append", "interleave")
OPT_STATES = ("reset", "grow")


@dataclasses.dataclass(frozen=True)
class DepthGrowth:
    method: str = "interpose"  # interpose (copy each layer next to itself) | stack (repeat the stack)
    factor: int = 2
    keep_first: int = 0  # the first N layers stay single
    keep_last: int = 0  # the last N layers stay single
    zero_copies: bool = False  # copies' output projections zeroed: function-preserving


@dataclasses.dataclass(frozen=True)
class WidthGrowth:
    factor: int = 2
    noise: float = 0.01  # relative noise on the copies (breaks their symmetry)
    layout: str = "append"  # append | interleave (where a copy sits among the experts)
    init: str = "copy"  # copy | random_router | random_experts
    grow_e: bool = True  # more experts
    grow_k: bool = True  # more experts per token (top-k x factor)


@dataclasses.dataclass(frozen=True)
class GrowOptions:
    depth: DepthGrowth | None = None
    width: WidthGrowth | None = None
    order: tuple[str, ...] = ("depth", "width")
    opt_state: str = "reset"  # reset | grow (the optimizer state grown like the params)
    seed: int = 0

    def __post_init__(self):  # neither depth nor width: a plain continuation (sweeps)
        for value, choices, what in (
            (self.depth and self.depth.method, DEPTH_METHODS, "depth method"),
            (self.width and self.width.layout, WIDTH_LAYOUTS, "width layout"),
            (self.width and self.width.init, WIDTH_INITS, "width init"),
            (self.opt_state, OPT_STATES, "opt_state"),
        ):
            if value is not None and value not in choices:
                raise ConfigError(f"grow: {what} {value!r} is not one of {', '.join(choices)}")
        if sorted(self.order) != ["depth", "width"]:
            raise ConfigError(f"grow: order {','.join(self.order)!r} is not depth,width or width,depth")

    def transforms(self) -> list[tuple[str, dict]]:
        """[("depth" | "width", the transform's keyword arguments)] in order."""
        return [
            (what, dataclasses.asdict(getattr(self, what)))
            for what in self.order
            if getattr(self, what) is not None
        ]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_spec(cls, spec: dict | None) -> GrowOptions:
        """A sweep point's "grow" spec: {"depth": {...}, "width": {...}, "order":
        "depth,width", "opt_state": "reset", "seed": 0}; unknown keys refused."""
        spec = dict(spec or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(spec) - known:
            raise ConfigError(
                f"sweep: unknown grow option(s) {sorted(set(spec) - known)} ({', '.join(sorted(known))})"
            )

        def part(kind, key):
            if key not in spec:
                return None
            kw = dict(spec[key] or {})
            names = {f.name for f in dataclasses.fields(kind)}
            if set(kw) - names:
                raise ConfigError(f"sweep: unknown grow {key} option(s) {sorted(set(kw) - names)}")
            return kind(**kw)

        order = spec.get("order", "depth,width")
        return cls(
            depth=part(DepthGrowth, "depth"),
            width=part(WidthGrowth, "width"),
            order=tuple(order.split(",") if isinstance(order, str) else order),
            opt_state=spec.get("opt_state", "reset"),
            seed=int(spec.get("seed", 0)),
        )

    def cli_flags(self) -> list[str]:
        """The `moe-lab grow` flags that give these options (a sweep's --dry-run)."""
        flags = []
        if self.depth:
            d = self.depth
            flags += ["--depth", d.method, "--depth-factor", str(d.factor)]
            flags += ["--keep-first", str(d.keep_first)] if d.keep_first else []
            flags += ["--keep-last", str(d.keep_last)] if d.keep_last else []
            flags += ["--zero-copies"] if d.zero_copies else []
        if self.width:
            w = self.width
            flags += [
                "--width-factor",
                str(w.factor),
                "--noise",
                str(w.noise),
                "--width-layout",
                w.layout,
                "--width-init",
                w.init,
            ]
            flags += ["--only-e"] if not w.grow_k else []
            flags += ["--only-k"] if not w.grow_e else []
        return flags + [
            "--order",
            ",".join(self.order),
            "--opt-state",
            self.opt_state,
            "--seed",
            str(self.seed),
        ]
