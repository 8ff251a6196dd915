"""A tiny Mixture-of-Recursions decoder for CPU (arXiv 2507.10524).

    moe-lab train --config configs/mor_tiny.py --workdir runs/r
    moe-lab train --config configs/mor_tiny.py:token_choice --workdir runs/r_tc
    moe-lab train --config configs/mor_tiny.py:kv_shared --workdir runs/r_kv
    moe-lab train --config configs/mor_tiny.py:fixed --workdir runs/r_fixed  # every token N_r steps

Middle-cycle sharing, 5 layers = unique first + 1 shared layer x N_r=3 + unique
last; expert-choice routing with capacities 1, 2/3, 1/3 and the auxiliary BCE loss.
metrics.jsonl gets mor/depth_hist (fraction of tokens that took 0..3 steps),
mor/mean_depth, mor/dead_token_ratio, mor/sampling_accuracy, mor/bce_loss.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "mor_tiny"
    c.model = dict(
        d_model=128,
        num_layers=5,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=384,
        max_seq_len=128,
        stack="recursive",
        mor=dict(
            num_recursions=3,
            sharing="middle_cycle",
            routing="expert_choice",
            router_type="linear",
            alpha=0.1,
            update="add",
            causal_aux="bce",
            bce_weight=1e-3,
            kv_cache="recursion_wise",
        ),
    )
    c.data = dict(
        mixture="facts:1,arith:1",
        seq_len=128,
        facts_num_entities=100,
        arith_num_steps=2,
        arith_eval_num_steps=3,
        arith_modulus=23,
    )
    c.train = dict(
        steps=200,
        batch_size=16,
        lr=3e-3,
        schedule="wsd",
        warmup_steps=10,
        decay_fraction=0.2,
        log_every=20,
        eval_every=100,
        checkpoint_every=100,
        eval_batches=2,
    )
    c.mesh = dict(data=-1)
    if arg == "token_choice":
        c.name = "mor_tiny_tc"
        c.model.mor.update(routing="token_choice", balance="loss", balance_weight=0.1, z_loss_weight=1e-3)
    elif arg == "kv_shared":
        c.name = "mor_tiny_kv_shared"
        c.model.mor.kv_cache = "shared"
    elif arg == "fixed":
        c.name = "mor_tiny_fixed"
        c.model.mor.routing = "none"
    elif arg not in (None, ""):
        raise ValueError(f"unknown arg {arg!r} (use token_choice, kv_shared or fixed)")
    return c
