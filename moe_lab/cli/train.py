"""`moe-lab train`: train or resume the run in --workdir, then evaluate it at the end.

moe-lab train --config configs/tiny.py --workdir runs/tiny [--config.a.b=V ...]
moe-lab train --workdir runs/tiny --config.train.steps=600     # resume, extended
moe-lab train --config configs/sft.py --init-from runs/imported --workdir runs/sft
"""

from __future__ import annotations

import json

import jax

from moe_lab.cli.args import config_from_args
from moe_lab.config.schema import ConfigError
from moe_lab.eval.evaluate import evaluate
from moe_lab.parallel import distributed
from moe_lab.train.loop import train


def add_train_parser(subparsers):
    t = subparsers.add_parser("train", help="train or resume a run (overrides: --config.a.b=V)")
    t.add_argument("--config", help="config file, path.py[:arg]")
    t.add_argument("--workdir", required=True)
    t.add_argument(
        "--init-from",
        default=None,
        metavar="RUN[:STEP]",
        help="a new run starts from RUN's weights (its model and tokenizer), fresh "
        "optimizer and schedule (SFT; sets train.init_from)",
    )
    distributed.add_flags(t)
    t.set_defaults(fn=cmd_train)
    return t


# what --init-from takes from its source run (train/init_from.py): an override of it
# would be ignored, so it is refused
_FROM_SOURCE = ("model.", "data.tokenizer")


def cmd_train(args, overrides) -> int:
    if args.init_from:
        overrides = {**overrides, "train.init_from": args.init_from}
    if overrides.get("train.init_from"):
        taken = sorted(k for k in overrides if k.startswith(_FROM_SOURCE))
        if taken:
            raise ConfigError(
                f"--init-from {overrides['train.init_from']} takes the model and "
                f"tokenizer of that run; --config.{taken[0]} cannot change them "
                "(drop the override, or train from scratch)"
            )
    cfg = config_from_args(args, overrides)
    distributed.initialize(args)
    summary = train(cfg, args.workdir)
    if cfg.eval.at_end and summary["step"] == cfg.train.steps:  # training, then evaluation
        res = evaluate(args.workdir, summary["step"], devices="one" if jax.process_count() == 1 else "all")
        summary.update({f"{g}/{k}": v for g, d in res["groups"].items() for k, v in d.items()})
    if summary.get("process_index", 0) != 0:
        return 0
    print(
        "summary: "
        + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()})
    )
    return 0
