"""Sparsity vs reasoning (arXiv 2508.18672): a grid over experts E and top-k at fixed
expert size, so active parameters depend on k only and total on E.

    get_config('tiny')  -> CPU scale: d 64, 4 layers, small experts (hidden 16) so that
                           the experts' capacity, not the exposures, bounds how many of
                           the 1000 facts are stored; 2400 steps; get_sweep('tiny'):
                           E in {2, 4, 8, 16} x k in {1, 2} x seeds {0, 1} (16 runs,
                           measured 46 min on a 2-core CPU with two shards at once)
    get_sweep('tiny_steps') -> the tiny config's E 2 and E 16 (k 1, seed 0) at 600, 1200,
                           2400 and 4800 steps: how the gap between few and many
                           experts moves with training length (why the grid takes 2400)
    get_config('reason') -> the reasoning half (issue 33): the tiny model on a mixture
                           where arith is learnt (2-step chains mod 7, 2/3 of the
                           tokens) beside 500 facts; get_sweep('reason'): E in
                           {2, 4, 8, 16} x k in {1, 2} x seeds {0, 1, 2} at two data
                           budgets (800 and 1600 steps: TPP 5.4-13 and 11-26);
                           test-time compute and GRPO on the larger budget
                           (experiments/sparsity_vs_reasoning/run_reasoning.sh)
    get_config('micro') -> a few steps of a very small model (tests, CI, `make demo`)
    get_config('paper') -> the paper's recipe at d=1024 (16 layers, SwiGLU experts of
                           hidden 2d, 125B tokens, AdamW 0.9/0.95, wd 0.1, clip 1,
                           peak 4e-4 cosine to 4e-5 after 2000 warmup steps,
                           aux 1e-2, z 1e-3, softmax top-k, no dropping)
    get_sweep('paper')  -> d in {512, 1024, 2048} x E in {8..256} x k in {2..16}, k < E

    ARG+post (e.g. 'tiny+post', 'micro+post') -> the same grid, and after each run's
                           pre-training and evaluation two post stages: test-time
                           compute (coverage@k, majority@k, budget forcing on arith)
                           and GRPO on arith (post-GRPO greedy accuracy), so
                           results.jsonl can answer: does test-time compute or RL
                           change the ranking of sparsities? (2508.18672 sec. 5)

Run it with the resumable, shardable runner (see moe_lab/sweep/runner.py):

    moe-lab sweep --config configs/sparsity_sweep.py:tiny --workdir runs/sparsity_tiny
    moe-lab sweep --config configs/sparsity_sweep.py:tiny+post --workdir runs/sparsity_tiny_post
"""

import os

import ml_collections

# post stages per scale: (test-time compute spec, GRPO spec); keys of
# moe_lab.config.schema.TTCConfig and GRPOConfig
POST = {
    "tiny": (
        {"n": 16, "num_prompts": 32},
        {
            "steps": 100,
            "lr": 3e-4,
            "prompts_per_step": 8,
            "eval_every": 50,
            "checkpoint_every": 50,
            "eval_examples": 64,
            "devices": "one",
        },
    ),
    # reason: majority@k on 64 prompts; GRPO 40 steps at lr 1e-4 (experiments/grpo_arith:
    # 1e-4 sharpens without un-learning the arithmetic, 3e-4 un-learns it)
    "reason": (
        {"n": 16, "num_prompts": 64, "budgets": "4,16", "waits": "0"},
        {
            "steps": 40,
            "lr": 1e-4,
            "prompts_per_step": 8,
            "eval_every": 20,
            "checkpoint_every": 40,
            "eval_examples": 128,
            "devices": "one",
        },
    ),
    "micro": (
        {"n": 4, "num_prompts": 4, "budgets": "2,8", "waits": "0,1"},
        {
            "steps": 2,
            "lr": 3e-4,
            "prompts_per_step": 2,
            "num_rollouts": 2,
            "eval_every": 2,
            "checkpoint_every": 2,
            "eval_examples": 4,
            "devices": "one",
        },
    ),
    "paper": ({"n": 128, "num_prompts": 256}, {"steps": 200, "prompts_per_step": 64, "eval_examples": 512}),
}


def _split(arg):
    """'tiny+post' -> ('tiny', True)."""
    base, _, extra = (arg or "tiny").partition("+")
    if extra not in ("", "post"):
        raise ValueError(f"unknown suffix {extra!r} in {arg!r} (only +post)")
    return base or "tiny", extra == "post"


def post_stages(scale):
    ttc, grpo = POST[scale]
    return [
        {"kind": "moe_lab.eval.test_time:sweep_stage", **ttc},
        {
            "kind": "moe_lab.rl.grpo:sweep_stage",
            "to": "grpo",
            "config": os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo.py"),
            **grpo,
        },
    ]


def get_config(arg=None):
    arg, _ = _split(arg)
    c = ml_collections.ConfigDict()
    c.name = f"sparsity_{arg}"
    if arg in ("tiny", "tiny_steps", "reason"):
        # Capacity-bound memorization at CPU scale: 200 entities x 5 relations = 1000
        # facts (~5.3 bits each) against expert weights of 4 x 3 x 64 x 16 = 12k per
        # expert.  Measured (pilot, 1500 steps, seed 0, k 1): E 2 -> 16 moved the facts
        # accuracy 0.19 -> 0.28 and its answer loss 1.22 -> 0.99 bits/token; with experts
        # of hidden 64 (49k each) E 2 and 16 stored the same (no capacity bound), and
        # 400 entities gave accuracies of 0.02-0.11 (too few exposures per fact).
        # facts:3 gives each fact ~60 exposures per template over the 2400 steps; at
        # 1200 steps the accuracies were 0.10-0.18 (E 16 vs 2 within noise), at 2400
        # 0.47 (E 2) vs 0.72 (E 16): get_sweep('tiny_steps'), README.
        c.model = dict(
            d_model=64,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_seq_len=128,
            ffn="moe",
            moe=dict(num_experts=8, top_k=2, expert_hidden=16, router="softmax_topk", dispatch="dropless"),
        )
        c.data = dict(mixture="facts:3,arith:1", seq_len=128, facts_num_entities=200)
        c.train = dict(
            steps=2400,
            batch_size=16,
            lr=3e-3,
            warmup_steps=120,
            log_every=400,
            eval_every=2400,
            checkpoint_every=1200,
            keep_last=1,
            progress=False,
        )
        # 256 prompts per task: one prompt is 0.4 points, binomial s.e. <= 3 points
        c.eval = dict(num_examples=256, batch_size=64, max_new_tokens=48, longer_chains=5)
        c.mesh = dict(data=-1)
        if arg == "reason":
            # The reasoning half (issue 33).  The tiny grid's arith (3-step chains mod 23,
            # a quarter of the tokens) is never learnt: 0.15-0.17 at every E, chance 0.04.
            # Pilots (README, "The reasoning task"): 2-step chains mod 7 at half the tokens
            # reach 0.48 greedy at the dense point in 2000 steps (lr 3e-3; lr 1e-3: 0.28);
            # 2/3 of the tokens for arith and 500 facts (100 entities) keep both learnt
            # in 1600 steps.  Longer chains (3 steps) are evaluated beside.
            c.data = dict(
                mixture="facts:1,arith:2",
                seq_len=128,
                facts_num_entities=100,
                arith_modulus=7,
                arith_num_steps=2,
                arith_eval_num_steps=2,
            )
            c.train.update(steps=1600, warmup_steps=80, eval_every=1600, checkpoint_every=800)
            c.eval.update(longer_chains=3)
    elif arg == "micro":
        c.model = dict(
            d_model=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            max_seq_len=64,
            ffn="moe",
            moe=dict(num_experts=4, top_k=1, expert_hidden=32, router="softmax_topk", dispatch="dropless"),
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
            steps=6,
            batch_size=8,
            lr=3e-3,
            warmup_steps=2,
            log_every=3,
            eval_every=6,
            checkpoint_every=3,
            eval_batches=1,
            progress=False,
            async_checkpoint=False,
        )
        c.eval = dict(num_examples=8, batch_size=8, max_new_tokens=16, longer_chains=3)
        c.mesh = dict(data=-1)
    elif arg == "paper":
        d = 1024
        c.model = dict(
            d_model=d,
            num_layers=16,
            num_heads=16,
            num_kv_heads=16,
            max_seq_len=4096,
            init_std=0.02,
            tie_embeddings=False,
            param_dtype="float32",
            compute_dtype="bfloat16",
            remat="full",
            ffn="moe",
            moe=dict(
                num_experts=64,
                top_k=16,
                expert_hidden=2 * d,
                router="softmax_topk",
                renormalize=True,
                aux_loss_weight=1e-2,
                z_loss_weight=1e-3,
                dispatch="dropless",
            ),
        )
        c.data = dict(mixture="facts:1,arith:1", seq_len=4096)
        tokens = 125e9
        c.train = dict(
            steps=int(tokens // (1024 * 4096)),
            batch_size=1024,
            lr=4e-4,
            schedule="cosine",
            warmup_steps=2000,
            end_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            clip_norm=1.0,
            log_every=50,
            eval_every=1000,
            checkpoint_every=1000,
        )
        c.mesh = dict(data=-1, fsdp=8, expert=8)
    else:
        raise ValueError(f"unknown arg {arg!r} (tiny, tiny_steps, reason, micro or paper)")
    return c


def get_sweep(arg=None):
    scale, post = _split(arg)
    points = _grid(scale)
    if scale == "reason":
        return points  # its post stages are part of the grid
    if post:
        points = [{**p, "post": post_stages(scale)} for p in points]
    return points


def _grid(arg):
    if arg == "tiny":  # k = E = 2 is the dense point of its k (sparsity 0)
        return [
            {
                "name": f"e{e}_k{k}_s{seed}",
                "model.moe.num_experts": e,
                "model.moe.top_k": k,
                "train.seed": seed,
                "tags": {"seed": seed},
            }
            for seed in (0, 1)
            for k in (1, 2)
            for e in (2, 4, 8, 16)
        ]
    if arg == "tiny_steps":
        return [
            {
                "name": f"e{e}_k1_steps{n}",
                "model.moe.num_experts": e,
                "model.moe.top_k": 1,
                "train.steps": n,
                "train.warmup_steps": n // 20,
                "train.eval_every": n,
                "train.checkpoint_every": n // 2,
                "eval.num_examples": 64,
                "tags": {"seed": 0},
            }
            for n in (600, 1200, 2400, 4800)
            for e in (2, 16)
        ]
    if arg == "reason":
        return _reason_grid()
    if arg == "micro":
        return [{"model.moe.num_experts": e, "model.moe.top_k": k} for e, k in ((2, 1), (4, 1), (4, 2))]
    if arg != "paper":
        raise ValueError(f"unknown sweep {arg!r} (tiny, tiny_steps, reason, micro or paper)")
    points = []
    for d in (512, 1024, 2048):
        for e in (8, 16, 32, 64, 128, 256):
            for k in (2, 4, 8, 16):
                if k < e:
                    points.append(
                        {
                            "name": f"d{d}_e{e}_k{k}",
                            "model.d_model": d,
                            "model.moe.expert_hidden": 2 * d,
                            "model.num_heads": d // 64,
                            "model.num_kv_heads": d // 64,
                            "model.moe.num_experts": e,
                            "model.moe.top_k": k,
                        }
                    )
    return points


# The reasoning study's two data budgets (steps of 16 x 128 tokens): 1600 steps is
# 3.3M tokens, TPP 26 (E 2) to 11 (E 16); 800 steps is half that, TPP 13 to 5.4.
REASON_BUDGETS = (1600, 800)


def _reason_grid():
    """E x k x seed x budget; seeds outermost so that a study cut short still holds
    whole seeds.  Test-time compute and GRPO on the larger budget only (the base that
    has learnt the most arithmetic: GRPO sharpens, it does not teach; and the 90-minute
    budget of the study)."""
    ttc, grpo = post_stages("reason")
    points = []
    for seed in (0, 1, 2):
        for steps in REASON_BUDGETS:
            for k in (1, 2):
                for e in (2, 4, 8, 16):
                    points.append(
                        {
                            "name": f"n{steps}_e{e}_k{k}_s{seed}",
                            "model.moe.num_experts": e,
                            "model.moe.top_k": k,
                            "train.seed": seed,
                            "train.steps": steps,
                            "train.warmup_steps": steps // 20,
                            "train.eval_every": steps,
                            "train.checkpoint_every": steps // 2,
                            "tags": {"seed": seed, "budget_steps": steps},
                            "post": [ttc, grpo] if steps == max(REASON_BUDGETS) else [],
                        }
                    )
    return points
