"""Sunk-compute study of orthogonal MoE growth (arXiv 2510.08008), as one resumable sweep.

    moe-lab sweep --config configs/growth_sunk_compute.py:tiny --workdir runs/sunk_tiny
    moe-lab sweep --config configs/growth_sunk_compute.py:tiny --workdir runs/sunk_tiny --dry-run

Stages (the runner orders them by their "from" dependencies; with --shard, a
point whose parent is not finished is skipped and picked up by a later call):

  base             the base MoE, WSD schedule (warmup -> constant -> linear anneal),
                   checkpoints kept every `keep_every` steps
  g<S>             grown from base step S (depth interposition x2, then width x2:
                   E -> 2E, k -> 2k, noise 0.01, Adam reset), continued at a constant
                   LR for the same extra FLOP budget B (steps = B / FLOPs per step of
                   the grown model, computed by the runner); S = the last step is
                   the annealed checkpoint (the paper finds growing there worse)
  scratch          the grown architecture trained from scratch with budget B
  stack_g<S>       depth *stacking* instead of interposition (then width), budget B
  total_g<S>       fixed TOTAL budget T = sunk + continued: continues with T - sunk(S)
  total_scratch    the grown architecture from scratch with T
  total_wsd_g<S>   (tiny) total_g<S> continued with the scratch run's WSD schedule and
                   peak LR instead of a constant 1e-3, to separate schedule from growth

Results: one row per run in SWEEP/results.jsonl with parent_step, sunk_flops,
total_flops, eval losses and accuracies (notebooks/sunk_compute.ipynb plots
final loss / accuracy against the base step grown from).

`paper` approximates the 3B study (20 layers, 64 experts, top-4; grown in depth
to 40 layers, as the paper's 3B -> 6B scan; each grown model gets +3e20 FLOPs).
With moe_lab's byte tokenizer the embedding is tiny, so active parameters are
lower than the paper's 0.7B at the same layer shapes.
"""

import ml_collections

_GROW = {
    "depth": {"method": "interpose", "factor": 2},
    "width": {"factor": 2, "noise": 0.01},
    "order": "depth,width",
    "opt_state": "reset",
}


def get_config(arg=None):
    arg = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.name = f"sunk_{arg}"
    if arg == "tiny":
        # The sparsity study's capacity-bound facts (experiments/sparsity_vs_reasoning:
        # 1000 facts, experts of hidden 16, facts:3; learnt from ~2400 steps on), so
        # that accuracies, not only losses, separate grown from scratch.  The earlier
        # design (experts of 128, 240 steps) gave accuracies of 0-9%.
        c.model = dict(
            d_model=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            max_seq_len=128,
            ffn="moe",
            moe=dict(num_experts=4, top_k=1, expert_hidden=16, router="softmax_topk", dispatch="dropless"),
        )
        c.data = dict(mixture="facts:3,arith:1", seq_len=128, facts_num_entities=200)
        c.train = dict(
            steps=2400,
            batch_size=16,
            lr=3e-3,
            schedule="wsd",
            warmup_steps=120,
            decay_fraction=0.2,
            log_every=400,
            eval_every=2400,
            checkpoint_every=600,
            keep_last=1,
            keep_every=600,
            progress=False,
        )
        c.eval = dict(num_examples=256, batch_size=64, max_new_tokens=48)
    elif arg == "micro":  # tests
        c.model = dict(
            d_model=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            max_seq_len=64,
            ffn="moe",
            moe=dict(num_experts=2, top_k=1, expert_hidden=32, router="softmax_topk", dispatch="dropless"),
        )
        c.data = dict(
            mixture="facts:1,arith:1",
            seq_len=48,
            facts_num_entities=20,
            arith_num_steps=2,
            arith_eval_num_steps=2,
            arith_modulus=11,
        )
        c.train = dict(
            steps=4,
            batch_size=8,
            lr=3e-3,
            schedule="wsd",
            warmup_steps=1,
            log_every=2,
            eval_every=4,
            checkpoint_every=2,
            keep_last=1,
            keep_every=2,
            eval_batches=1,
            progress=False,
            async_checkpoint=False,
        )
        c.eval = dict(num_examples=8, batch_size=8, max_new_tokens=16)
    elif arg == "paper":
        d = 1024
        c.model = dict(
            d_model=d,
            num_layers=20,
            num_heads=16,
            num_kv_heads=16,
            max_seq_len=4096,
            compute_dtype="bfloat16",
            remat="full",
            ffn="moe",
            moe=dict(num_experts=64, top_k=4, expert_hidden=768, router="softmax_topk", dispatch="dropless"),
        )
        c.data = dict(mixture="facts:1,arith:1", seq_len=4096)
        c.train = dict(
            steps=96_000,
            batch_size=1024,
            lr=3e-4,
            schedule="wsd",
            warmup_steps=2000,
            decay_fraction=0.1,
            log_every=50,
            eval_every=4000,
            checkpoint_every=1000,
            keep_last=2,
            keep_every=8000,
        )
        c.mesh = dict(data=-1, fsdp=8, expert=8)
    else:
        raise ValueError(f"unknown arg {arg!r} (tiny, micro or paper)")
    c.mesh = c.get("mesh", dict(data=-1))
    return c


def _flops_per_step(c) -> float:
    """Training FLOPs of one step of config dict `c` (moe_lab.accounting.flops conventions)."""
    from moe_lab.accounting.flops import train_flops_per_token
    from moe_lab.config.load import from_dict
    from moe_lab.config.schema import ModelConfig
    from moe_lab.data.tokenizer import load_tokenizer

    vocab = c.model.get("vocab_size") or load_tokenizer(c.data.get("tokenizer", "byte")).default_vocab_size()
    model = from_dict(ModelConfig, {**c.model.to_dict(), "vocab_size": vocab})
    return train_flops_per_token(model, c.data.seq_len) * c.train.batch_size * c.data.seq_len


def get_sweep(arg=None):
    arg = arg or "tiny"
    c = get_config(arg)
    steps = c.train.steps
    base_fps = _flops_per_step(c)
    if arg == "paper":
        grow_steps = (8000, 16000, 24000, 32000, 48000, 64000, 80000, 88000, 96000)
        grow = {"depth": {"method": "interpose", "factor": 2}, "opt_state": "reset"}
        budget = 3e20
        continued = {"train.schedule": "constant", "train.lr": 3e-4, "train.warmup_steps": 500}
        grown_arch = {"model.num_layers": 2 * c.model.num_layers}
        stack_at = (32000,)
        total_at = (16000, 64000)
    else:
        every = c.train.keep_every
        grow_steps = tuple(range(every, steps + 1, every))
        grow = _GROW
        budget = base_fps * steps  # the continued run gets the base run's whole cost again
        continued = {
            "train.schedule": "constant",
            "train.lr": 1e-3,
            "train.warmup_steps": 2,
            "train.checkpoint_every": 1000,
            "train.keep_every": 0,
        }
        grown_arch = {
            "model.num_layers": 2 * c.model.num_layers,
            "model.moe.num_experts": 2 * c.model.moe.num_experts,
            "model.moe.top_k": 2 * c.model.moe.top_k,
        }
        if c.model.moe.top_k == 1:  # width growth from top-1 keeps gates unnormalised
            grown_arch["model.moe.renormalize"] = False  # (growth.width_plan)
        stack_at = grow_steps[-2:-1]
        total_at = grow_steps[:-1]
    total = base_fps * steps + budget  # fixed-total-budget variant: base run + B
    tags = lambda study, s=None: {"tags": {"study": study, "grown_at": s}}
    points = [{"name": "base", **tags("base")}]
    for s in grow_steps:
        points.append(
            {
                "name": f"g{s}",
                "from": {"run": "base", "step": s, "grow": grow},
                "budget_flops": budget,
                **continued,
                **tags("grow", s),
            }
        )
    points.append(
        {"name": "scratch", **grown_arch, "budget_flops": budget, "train.keep_every": 0, **tags("grow", 0)}
    )
    for s in stack_at:
        stack = {**grow, "depth": {**grow["depth"], "method": "stack"}}
        points.append(
            {
                "name": f"stack_g{s}",
                "from": {"run": "base", "step": s, "grow": stack},
                "budget_flops": budget,
                **continued,
                **tags("stack", s),
            }
        )
    for s in total_at:
        points.append(
            {
                "name": f"total_g{s}",
                "from": {"run": "base", "step": s, "grow": grow},
                "budget_flops_total": total,
                **continued,
                **tags("total", s),
            }
        )
    points.append(
        {
            "name": "total_scratch",
            **grown_arch,
            "budget_flops": total,
            "train.keep_every": 0,
            **tags("total", 0),
        }
    )
    if arg == "tiny":  # the fixed-total comparison with the continued run annealed too
        # (WSD at the scratch run's peak LR): does scratch win only by its schedule?
        annealed = {
            **continued,
            "train.schedule": "wsd",
            "train.lr": c.train.lr,
            "train.warmup_steps": 20,
            "train.decay_fraction": c.train.decay_fraction,
        }
        for s in total_at[1:]:
            points.append(
                {
                    "name": f"total_wsd_g{s}",
                    "from": {"run": "base", "step": s, "grow": grow},
                    "budget_flops_total": total,
                    **annealed,
                    **tags("total_wsd", s),
                }
            )
        # a second seed (initialisation and data order) of that comparison's closest pair
        seed1 = {"train.seed": 1}
        s = total_at[1]
        points += [
            {"name": "base_s1", **seed1, **tags("base_s1")},
            {
                "name": "total_scratch_s1",
                **grown_arch,
                "budget_flops": total,
                "train.keep_every": 0,
                **seed1,
                **tags("total_s1", 0),
            },
            {
                "name": f"total_wsd_g{s}_s1",
                "from": {"run": "base_s1", "step": s, "grow": grow},
                "budget_flops_total": total,
                **annealed,
                **tags("total_wsd_s1", s),
            },
        ]
    return points
