"""Train-step phases: a run that compiles a different step for its first N steps.

Expert-choice MoR capacity warm-up (`model.mor.capacity_warmup_steps`): for the
first N steps every recursion keeps all tokens (capacities 1, full depth, as in
the token-choice warm-up), then the configured capacities (1, 2/3, 1/3 by
default).  Capacities fix the static top-k sizes k_r, so the warm-up is a second
jitted step built from the same parameters under a full-capacity graphdef;
switching is a Python decision per step (one extra compilation, no traced
condition, no wasted compute after the warm-up).  FLOPs are counted per phase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from moe_lab.config.schema import Config
from moe_lab.train.state import build_model, split_model


def capacity_warmup_config(cfg: Config) -> Config | None:
    """The full-capacity config of the warm-up phase, or None if the run has none."""
    m = cfg.model
    mor = m.mor
    if m.stack != "recursive" or mor.routing != "expert_choice" or mor.capacity_warmup_steps <= 0:
        return None
    full = ",".join(["1"] * mor.num_recursions)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, mor=dataclasses.replace(mor, capacities=full))
    )


def warmup_graphdef(warm_cfg: Config):
    """Graphdef of the warm-up model (same parameter tree; only static capacities differ)."""

    return split_model(nnx.eval_shape(lambda: build_model(warm_cfg)))[0]


@dataclasses.dataclass
class PhasedStep:
    """main (and optional warm-up) step functions with their train FLOPs per step."""

    main: Callable
    main_flops: float
    warm: Callable | None = None
    warm_flops: float = 0.0
    warm_until: int = 0  # steps [0, warm_until) run `warm`

    def at(self, step: int) -> tuple[Callable, float]:
        """(step function, FLOPs) for the step that starts at `step` completed steps."""
        if self.warm is not None and step < self.warm_until:
            return self.warm, self.warm_flops
        return self.main, self.main_flops
