"""MoR vs vanilla at equal training FLOPs (arXiv 2507.10524), as one resumable sweep.

    moe-lab sweep --config configs/mor_study.py:tiny --workdir runs/mor_study
    python experiments/mor_vs_vanilla/plot.py runs/mor_study   # table + figure

Points (each with seeds 0, 1, 2, `train.seed`: the initialisation and the data order):
  vanilla   the plain L-layer decoder, `VANILLA_STEPS` steps
  fixed3    a recursive stack without routing (middle-cycle, N_r = 3: every token
            takes every step; the same FLOPs as vanilla, a third of its middle layers)
  mor2      MoR expert choice N_r = 2 (capacities 1, 1/2), middle-cycle
  mor3      MoR expert choice N_r = 3 (capacities 1, 2/3, 1/3), middle-cycle
All at vanilla's training FLOPs in the paper's convention (no LM head, K/V at d x d:
moe_lab/accounting/flops.py "mor_paper"), so the routed models train more steps,
as the paper's MoR runs do (N_r = 3: 1.5x).  Recipe as the paper's, scaled down:
AdamW lr 3e-3, betas (0.9, 0.95), wd 0.1, clip 1, WSD (5% warm-up, 20% decay);
expert choice alpha 0.1 sigmoid, aux BCE 1e-3 (summed over steps, as released).
Data: facts (100 invented entities x 5 relations: memorization) + arith (2-step
chains mod 23: reasoning), 1:1, seq 128.
"""

import ml_collections

VANILLA_STEPS = {"tiny": 1000, "micro": 4}
SEEDS = {"tiny": (0, 1, 2), "micro": (0,)}
ARMS = {  # name -> model overrides
    "vanilla": {},
    "fixed3": {"model.stack": "recursive", "model.mor.num_recursions": 3, "model.mor.routing": "none"},
    "mor2": {"model.stack": "recursive", "model.mor.num_recursions": 2},
    "mor3": {"model.stack": "recursive", "model.mor.num_recursions": 3},
}


def get_config(arg=None):
    arg = arg or "tiny"
    if arg not in VANILLA_STEPS:
        raise ValueError(f"unknown arg {arg!r} (tiny or micro)")
    c = ml_collections.ConfigDict()
    c.name = f"mor_study_{arg}"
    steps = VANILLA_STEPS[arg]
    if arg == "tiny":
        c.model = dict(d_model=96, num_layers=8, num_heads=4, num_kv_heads=2, mlp_hidden=256, max_seq_len=128)
        c.data = dict(
            mixture="facts:1,arith:1",
            seq_len=128,
            facts_num_entities=100,
            arith_num_steps=2,
            arith_eval_num_steps=2,
            arith_modulus=23,
        )
        c.eval = dict(num_examples=96, batch_size=48, max_new_tokens=48, longer_chains=3)
        batch = 16
    else:  # tests
        c.model = dict(d_model=32, num_layers=5, num_heads=2, num_kv_heads=2, mlp_hidden=64, max_seq_len=64)
        c.data = dict(
            mixture="facts:1,arith:1",
            seq_len=48,
            facts_num_entities=20,
            arith_num_steps=2,
            arith_eval_num_steps=2,
            arith_modulus=11,
        )
        c.eval = dict(num_examples=8, batch_size=8, max_new_tokens=16)
        batch = 8
    # the MoR arms' settings (used once model.stack = "recursive")
    c.model.mor = dict(
        sharing="middle_cycle",
        routing="expert_choice",
        router_type="linear",
        alpha=0.1,
        update="add",
        causal_aux="bce",
        bce_weight=1e-3,
        kv_cache="recursion_wise",
    )
    c.train = dict(
        steps=steps,
        batch_size=batch,
        lr=3e-3,
        schedule="wsd",
        warmup_steps=max(1, steps // 20),
        decay_fraction=0.2,
        end_lr_ratio=0.0,
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        log_every=100,
        eval_every=steps,
        checkpoint_every=steps,
        keep_last=1,
        progress=False,
    )
    c.mesh = dict(data=-1)
    return c


def _model(c, overrides: dict):
    """The ModelConfig of config dict c with dotted model overrides applied."""
    from moe_lab.config.load import apply_overrides, from_dict
    from moe_lab.config.schema import ModelConfig
    from moe_lab.data.tokenizer import load_tokenizer

    raw = apply_overrides(c.to_dict(), overrides)
    vocab = raw["model"].get("vocab_size") or load_tokenizer("byte").default_vocab_size()
    return from_dict(ModelConfig, {**raw["model"], "vocab_size": vocab})


def get_sweep(arg=None):
    arg = arg or "tiny"
    c = get_config(arg)
    from moe_lab.accounting.flops import iso_flop_steps

    vanilla = _model(c, {})
    points = []
    for name, over in ARMS.items():
        steps = iso_flop_steps(
            _model(c, over), vanilla, c.train.steps, c.data.seq_len, convention="mor_paper"
        )
        for seed in SEEDS[arg]:
            points.append(
                {
                    "name": f"{name}_s{seed}",
                    **over,
                    "train.seed": seed,
                    "train.steps": steps,
                    "train.warmup_steps": max(1, steps // 20),
                    "train.eval_every": steps,
                    "train.checkpoint_every": steps,
                    "tags": {"arm": name, "seed": seed},
                }
            )
    return points
