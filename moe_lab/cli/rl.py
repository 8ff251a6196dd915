"""`moe-lab rl`: GRPO post-training of a run's checkpoint (moe_lab/rl/grpo.py).

    moe-lab rl --from DIR --to NEWDIR [--config configs/grpo.py] [--step N]
               [--config.KEY=V ...]

KEYs are the fields of `GRPOConfig` (task, steps, num_rollouts, lr, kl_coef,
clip_eps, temperature, ...).  NEWDIR becomes an ordinary run directory
(`moe-lab eval --workdir NEWDIR` works); running the same command again resumes
it.  An existing, non-empty NEWDIR that holds no GRPO run is refused.
"""

from __future__ import annotations

import argparse
import json
import os

from moe_lab.config.load import load_grpo_config
from moe_lab.config.schema import ConfigError
from moe_lab.rl.grpo import run_grpo
from moe_lab.train.run_dir import config_path


def add_rl_parser(subparsers) -> argparse.ArgumentParser:
    r = subparsers.add_parser("rl", help="GRPO post-training with verifiable rewards")
    r.add_argument("--from", dest="src", required=True, help="the run to start from")
    r.add_argument("--to", dest="dst", required=True, help="new run directory (or one to resume)")
    r.add_argument(
        "--config", default=None, help="GRPO config file, path.py[:arg] (default: GRPOConfig defaults)"
    )
    r.add_argument("--step", type=int, default=None, help="checkpoint of --from (default: latest)")
    r.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps of this invocation (resume later)",
    )
    r.set_defaults(fn=cmd_rl)
    return r


def cmd_rl(args, overrides: dict | None = None) -> int:
    if not os.path.isfile(config_path(args.src)):
        raise ConfigError(f"rl: --from {args.src} holds no run (no config.json)")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"rl: --max-steps must be >= 1, got {args.max_steps}")

    rl = load_grpo_config(args.config, overrides or {})
    summary = run_grpo(args.src, args.dst, rl, step=args.step, max_steps=args.max_steps)
    rewards = summary.pop("rewards")
    summary["reward_mean_last5"] = sum(rewards[-5:]) / max(len(rewards[-5:]), 1)
    print("summary: " + json.dumps(summary))
    return 0
