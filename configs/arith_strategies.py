"""A base with two strategies for `arith`, for test-time compute and GRPO at CPU scale
(issue 21 d, e; experiments/grpo_arith/README.md, "2026-12-07").

    moe-lab train --config configs/arith_strategies.py --workdir runs/strategies
    moe-lab eval  --workdir runs/strategies --ttc --ttc-n 16 --ttc-prompts 256 --ttc-waits 0
    moe-lab rl    --from runs/strategies --to runs/strategies_grpo_s0 \
                  --config configs/grpo.py:strategies --config.seed=0

The tiny dense model on 2-step chains mod 7 where 60% of the training solutions show
no working (`data.arith_direct`): greedy decoding answers at once (the likelier first
move), which works on a minority of held-out problems; samples also work the problem
out, which is right almost always once the steps are learnt.  Majority votes then
converge on the worked answer, and GRPO can move greedy decoding to the working.

Learning rate 1e-3, not the tiny config's 3e-3: measured on the same task (mod 7,
half the rows direct, 256 held-out prompts), 3e-3 left the steps at chance after 2000
steps (first step right for 17% of prompts, chance 14%), while 1e-3 went from 0.32
greedy accuracy at step 1000 to 1.00 at step 1500 (the steps are learnt in a jump).
"""

import ml_collections


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"configs/arith_strategies.py takes no argument, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.name = "arith_strategies"
    c.model = dict(
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=384,
        max_seq_len=128,
        tie_embeddings=False,
        ffn="dense",
    )
    c.data = dict(
        mixture="arith:1",
        seq_len=128,
        arith_num_steps=2,
        arith_eval_num_steps=2,
        arith_modulus=7,
        arith_direct=0.6,
    )
    c.eval = dict(num_examples=256, longer_chains=0)
    c.train = dict(
        steps=3000,
        batch_size=16,
        lr=1e-3,
        schedule="cosine",
        warmup_steps=100,
        log_every=25,
        eval_every=500,
        checkpoint_every=500,
        keep_every=500,
        eval_batches=2,
    )
    c.mesh = dict(data=-1)
    return c
