"""Learning-rate schedules and the AdamW optimizer.

- cosine: linear warmup, cosine decay to end_lr_ratio * lr (2508.18672 recipe:
  2000 warmup steps, 4e-4 -> 4e-5).
- wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM): linear warmup, constant,
  then linear decay over the final `decay_fraction` of the steps.  2510.08008
  grows from checkpoints of the constant phase; MoR uses warmup 5%, cooldown 20%.
- constant: linear warmup then constant (continued training after growth).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from moe_lab.config.schema import TrainConfig


def make_schedule(t: TrainConfig) -> optax.Schedule:
    peak, end = t.lr, t.lr * t.end_lr_ratio
    warmup = min(t.warmup_steps, t.steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
        if t.schedule == "constant":
            return jnp.where(step < warmup, warm, peak)
        if t.schedule == "cosine":
            frac = jnp.clip((step - warmup) / max(t.steps - warmup, 1), 0.0, 1.0)
            after = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
            return jnp.where(step < warmup, warm, after)
        # wsd
        decay_steps = int(round(t.decay_fraction * t.steps))
        decay_start = t.steps - decay_steps
        frac = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
        after = jnp.where(step < decay_start, peak, peak + (end - peak) * frac)
        return jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(logical_tree) -> dict:
    """Weight decay on matrices only: not on norm scales, biases or the router bias."""
    return jax.tree.map(
        lambda axes: len([a for a in axes if a != "layers"]) >= 2,
        logical_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(t: TrainConfig, logical_tree) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(t.clip_norm) if t.clip_norm > 0 else optax.identity(),
        optax.adamw(
            make_schedule(t),
            b1=t.b1,
            b2=t.b2,
            eps=t.eps,
            weight_decay=t.weight_decay,
            mask=decay_mask(logical_tree),
        ),
    )
