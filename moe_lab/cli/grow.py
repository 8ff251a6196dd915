"""`moe-lab grow`: grow a trained checkpoint into a new run (arXiv 2510.08008).

    moe-lab grow --from DIR [--step N] --to NEWDIR [--depth interpose|stack]
                 [--depth-factor 2] [--keep-first N] [--keep-last N] [--zero-copies]
                 [--width-factor 2] [--noise 0.01] [--width-layout append|interleave]
                 [--width-init copy|random_router|random_experts] [--only-e | --only-k]
                 [--order depth,width|width,depth] [--opt-state reset|grow] [--seed S]

Any depth option turns on depth growth (method interpose unless --depth says
otherwise); any width option turns on width growth (factor 2 unless
--width-factor says otherwise).  DIR is only read.  NEWDIR gets config.json
(the grown model; train settings unchanged: set the continued schedule with
overrides at train time), checkpoints/0 (step 0, no data-iterator state) and
lineage.json (parent, transforms, sunk FLOPs, param counts).  Everything is
built in a sibling temp dir and renamed into place only after the written
checkpoint was reloaded and, for function-preserving transforms, its logits
were checked against the parent's on a real batch (REFERENCES.md sec. 5,
complaint 3).  Then `moe-lab train --workdir NEWDIR` continues from it.
"""

from __future__ import annotations

import argparse

from moe_lab.config.schema import ConfigError
from moe_lab.growth.grow import grow_run
from moe_lab.growth.options import (
    DEPTH_METHODS,
    OPT_STATES,
    WIDTH_INITS,
    WIDTH_LAYOUTS,
    DepthGrowth,
    GrowOptions,
    WidthGrowth,
)


def add_grow_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `grow` subcommand to `subparsers` (from add_subparsers)."""
    g = subparsers.add_parser("grow", help="grow a checkpoint in depth and/or width (2510.08008)")
    g.add_argument("--from", dest="from_dir", required=True, help="the parent run's workdir")
    g.add_argument("--step", type=int, default=None, help="parent checkpoint step (default: latest)")
    g.add_argument("--to", dest="to_dir", required=True, help="new workdir (must not exist or be empty)")
    g.add_argument("--depth", choices=DEPTH_METHODS, default=None)
    g.add_argument("--depth-factor", type=int, default=None)
    g.add_argument("--keep-first", type=int, default=None, help="first N layers stay single")
    g.add_argument("--keep-last", type=int, default=None, help="last N layers stay single")
    g.add_argument(
        "--zero-copies",
        action="store_true",
        default=None,
        help="zero the output projections of the copies (function-preserving)",
    )
    g.add_argument("--width-factor", type=int, default=None)
    g.add_argument("--noise", type=float, default=None, help="relative noise on copies (0.01)")
    g.add_argument("--width-layout", choices=WIDTH_LAYOUTS, default=None)
    g.add_argument(
        "--width-init",
        choices=WIDTH_INITS,
        default=None,
        help="copy (the paper's method); random_router: the released code's baseline "
        "(whole router redrawn, experts copied); random_experts: the paper "
        "text's (new experts and their router columns drawn fresh)",
    )
    only = g.add_mutually_exclusive_group()
    only.add_argument("--only-e", action="store_true", default=None, help="grow experts, not top-k")
    only.add_argument("--only-k", action="store_true", default=None, help="grow top-k, not experts")
    g.add_argument("--order", choices=("depth,width", "width,depth"), default="depth,width")
    g.add_argument("--opt-state", choices=OPT_STATES, default="reset")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the logits check against the parent"
    )
    g.set_defaults(fn=cmd_grow)
    return g


def options_from_args(args) -> GrowOptions:
    """The flags as GrowOptions: any depth flag turns depth growth on, any width flag
    width growth; the rest take GrowOptions' defaults."""
    depth = {
        "method": args.depth,
        "factor": args.depth_factor,
        "keep_first": args.keep_first,
        "keep_last": args.keep_last,
        "zero_copies": args.zero_copies,
    }
    width = {
        "factor": args.width_factor,
        "noise": args.noise,
        "layout": args.width_layout,
        "init": args.width_init,
        "grow_e": None if args.only_k is None else not args.only_k,
        "grow_k": None if args.only_e is None else not args.only_e,
    }

    def given(kw):
        return {k: v for k, v in kw.items() if v is not None}

    if not given(depth) and not given(width):
        raise ConfigError("grow: nothing to grow (give --depth ... and/or --width-factor ...)")
    return GrowOptions(
        depth=DepthGrowth(**given(depth)) if given(depth) else None,
        width=WidthGrowth(**given(width)) if given(width) else None,
        order=tuple(args.order.split(",")),
        opt_state=args.opt_state,
        seed=args.seed,
    )


def cmd_grow(args, overrides: dict | None = None) -> int:
    """Entry point for `moe-lab grow` (cli.main calls fn(args, overrides))."""
    if overrides:
        raise ConfigError("grow takes no --config overrides (set them at train time)")
    grow_run(args.from_dir, args.to_dir, options_from_args(args), step=args.step, verify=args.verify)
    print(f"continue with: moe-lab train --workdir {args.to_dir} [--config.train.steps=N ...]")
    return 0
