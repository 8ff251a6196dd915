"""`moe-lab eval`: evaluate a run's checkpoint, on the built-in tasks or on a user file.

    moe-lab eval --workdir DIR [--step N] [--num-examples N] [--config.eval.KEY=V ...]
    moe-lab eval --workdir DIR --data FILE.jsonl [--shots K] [--limit N] [--step N]
    moe-lab eval --workdir DIR --ttc [--ttc-n 16] [--ttc-prompts 32] [--ttc-task arith]
                 [--ttc-budgets 2,4,8,16,32] [--ttc-waits 0,1,2,4] [--ttc-temperature 1.0]

    moe-lab eval --workdir DIR --lm-eval TASK[,TASK] [--include-path DIR] [--limit N]
                 [--num-fewshot K] [--lm-eval-data TASK=FILE]

The first form writes DIR/eval/<step>.json (eval loss, task loss in bits/token
and greedy exact-match accuracy per task, memorization and reasoning groups;
see moe_lab/eval/evaluate.py).  The second scores a JSONL file of
{"prompt", "answer"[, "choices"]} rows (moe_lab/eval/harness.py) and writes
DIR/eval/<step>-<file>-<K>shot.json.  Both print a table.  Only `eval.*`
config keys may be overridden: the checkpoint fixes everything else.  The third
(test-time compute, moe_lab/eval/test_time.py) prints coverage@k / majority@k
and the budget-forcing tables (s1 Control / Scaling / Performance; recursive
models also accuracy and log-likelihood vs recursion depth) and writes
DIR/eval/<step>-ttc.json.  The fourth runs lm-evaluation-harness tasks (offline: the
YAMLs of configs/lm_eval/ read local GSM8K / TriviaQA / HellaSwag files) through
moe_lab/eval/lm_eval_model.py and writes DIR/eval/<step>-lm_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os

from moe_lab.config.load import config_from_json, ttc_config_from
from moe_lab.config.schema import ConfigError, EvalConfig
from moe_lab.eval.evaluate import evaluate
from moe_lab.eval.harness import load_items, run_harness, shot_indices
from moe_lab.eval.test_time import evaluate_ttc
from moe_lab.train.run_dir import config_path


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="evaluate a checkpoint (built-in tasks or a JSONL file)")
    e.add_argument("--workdir", required=True, help="the run to evaluate")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--data", default=None, help="JSONL file of prompt/answer[/choices] rows")
    e.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt (--data)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N rows (--data)")
    e.add_argument("--max-new-tokens", type=int, default=64, help="generation budget (--data)")
    e.add_argument(
        "--num-examples",
        type=int,
        default=None,
        help="prompts per built-in task (default: the run's eval.num_examples)",
    )
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    e.add_argument(
        "--ttc", action="store_true", help="test-time compute: majority/coverage@k and budget forcing tables"
    )
    e.add_argument("--ttc-n", type=int, default=16, help="samples per prompt (--ttc)")
    e.add_argument("--ttc-prompts", type=int, default=32, help="prompts (--ttc)")
    e.add_argument("--ttc-task", default="", help="task (--ttc; default arith if trained)")
    e.add_argument("--ttc-temperature", type=float, default=1.0, help="sampling T (--ttc)")
    e.add_argument("--ttc-top-p", type=float, default=1.0, help="nucleus mass (--ttc)")
    e.add_argument("--ttc-budgets", default="2,4,8,16,32", help="max thinking tokens (--ttc)")
    e.add_argument("--ttc-waits", default="0,1,2,4", help="'Wait' counts N (--ttc)")
    e.add_argument("--ttc-depths", default="", help="recursion depths (--ttc, MoR models)")
    e.add_argument("--ttc-seed", type=int, default=0, help="sampling seed (--ttc)")
    e.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASK[,TASK]",
        help="lm-evaluation-harness tasks (offline: configs/lm_eval/, --include-path)",
    )
    e.add_argument("--include-path", default=None, help="more lm-eval task YAMLs (--lm-eval)")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (--lm-eval)")
    e.add_argument(
        "--lm-eval-data",
        default="",
        metavar="TASK=FILE[,TASK=FILE]",
        help="local data file of a shipped task (--lm-eval; default data/lm_eval/<name>.jsonl)",
    )
    e.add_argument("--batch-size", type=int, default=8, help="sequences per batch (--lm-eval)")
    e.set_defaults(fn=cmd_eval)
    return e


def eval_config_from(workdir: str, overrides: dict) -> EvalConfig | None:
    """The run's eval section with `--config.eval.*` overrides applied (validated;
    nothing is written: everything else is fixed by the checkpoint)."""
    if not overrides:
        return None
    bad = [k for k in overrides if not k.startswith("eval.")]
    if bad:
        raise ConfigError(f"eval: only --config.eval.* may be overridden, not {bad[0]}")
    return config_from_json(config_path(workdir), overrides).eval  # validated as train does


def cmd_eval(args, overrides: dict | None = None) -> int:
    if not os.path.isfile(config_path(args.workdir)):
        raise ConfigError(f"eval: --workdir {args.workdir} holds no run (no config.json)")
    if args.num_examples is not None and args.num_examples <= 0:
        raise ConfigError(f"eval: --num-examples must be > 0, got {args.num_examples}")
    if args.lm_eval is not None:
        return _cmd_lm_eval(args, overrides)
    if args.ttc:
        if args.data is not None or overrides:
            raise ConfigError("eval --ttc takes neither --data nor --config overrides")

        ttc = ttc_config_from(
            {
                "n": args.ttc_n,
                "num_prompts": args.ttc_prompts,
                "task": args.ttc_task,
                "temperature": args.ttc_temperature,
                "top_p": args.ttc_top_p,
                "budgets": args.ttc_budgets,
                "waits": args.ttc_waits,
                "depths": args.ttc_depths,
                "seed": args.ttc_seed,
            }
        )
        result = evaluate_ttc(args.workdir, args.step, ttc=ttc)
    elif args.data is None:
        if args.shots or args.limit is not None:
            raise ConfigError("eval: --shots and --limit need --data FILE.jsonl")
        eval_cfg = eval_config_from(args.workdir, overrides or {})

        result = evaluate(args.workdir, args.step, num_examples=args.num_examples, eval_cfg=eval_cfg)
    else:
        if overrides:
            raise ConfigError("eval --data takes no --config overrides")

        items = load_items(args.data)  # a bad file fails before the model loads
        if args.shots < 0:
            raise ConfigError(f"eval: --shots must be >= 0, got {args.shots}")
        shot_indices(len(items), 0, args.shots)
        result = run_harness(
            args.workdir,
            args.data,
            shots=args.shots,
            step=args.step,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
        )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


def _cmd_lm_eval(args, overrides: dict) -> int:
    """moe-lab eval --lm-eval: the [eval] extra's lm-evaluation-harness on the run."""
    if overrides or args.data is not None or args.ttc:
        raise ConfigError("eval --lm-eval takes neither --data, --ttc nor --config overrides")
    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("eval --lm-eval: no task named")
    data = {}
    for item in filter(None, (s.strip() for s in args.lm_eval_data.split(","))):
        task, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"eval --lm-eval-data {item!r}: want TASK=FILE")
        data[task] = path
    for name, v in (("--limit", args.limit), ("--num-fewshot", args.num_fewshot)):
        if v is not None and v < (1 if name == "--limit" else 0):
            raise ConfigError(f"eval: {name} must be >= {1 if name == '--limit' else 0}, got {v}")
    if args.batch_size <= 0:
        raise ConfigError(f"eval: --batch-size must be > 0, got {args.batch_size}")
    try:
        from moe_lab.eval.lm_eval_model import run_lm_eval  # optional extra
    except ImportError as e:
        raise ConfigError(
            f"eval --lm-eval needs lm-evaluation-harness: pip install 'moe_lab[eval]' ({e})"
        ) from None
    result = run_lm_eval(
        args.workdir,
        tasks,
        step=args.step,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        data=data,
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "table"}))
    return 0
