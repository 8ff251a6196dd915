"""A tiny sparse MoE decoder for CPU: 4 layers, 8 experts, top-2, dropless dispatch.

    moe-lab train --config configs/moe_tiny.py --workdir runs/m
    moe-lab train --config configs/moe_tiny.py:capacity --workdir runs/m_cap   # capacity dispatch
    moe-lab train --config configs/moe_tiny.py:sigmoid --workdir runs/m_sig    # loss-free balancing

metrics.jsonl gets moe/tokens_per_expert_E (load), moe/max_violation,
moe/drop_fraction, moe/router_entropy, moe/load_balance_loss and moe/z_loss.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "moe_tiny"
    # Experts are half the dense hidden size so that top-2 matches configs/tiny.py's
    # active FFN size (2 x 192 = 384).
    c.model = dict(
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        mlp_hidden=384,
        max_seq_len=128,
        ffn="moe",
        moe=dict(
            num_experts=8,
            top_k=2,
            expert_hidden=192,
            router="softmax_topk",
            renormalize=True,
            aux_loss_weight=1e-2,
            z_loss_weight=1e-3,
            dispatch="dropless",
            capacity_factor=1.25,
            metrics="per_layer",
        ),
    )
    c.data = dict(
        mixture="facts:1,arith:1",
        seq_len=128,
        facts_num_entities=100,
        arith_num_steps=2,
        arith_eval_num_steps=2,
        arith_modulus=23,
    )
    # reasoning is evaluated in distribution (2 steps) and on longer chains (3 steps)
    c.eval = dict(num_examples=64, longer_chains=3)
    c.train = dict(
        steps=300,
        batch_size=16,
        lr=3e-3,
        schedule="cosine",
        warmup_steps=20,
        log_every=25,
        eval_every=100,
        checkpoint_every=100,
        eval_batches=2,
    )
    c.mesh = dict(data=-1)
    if arg == "capacity":
        c.model.moe.dispatch = "capacity"
    elif arg == "sigmoid":
        c.model.moe.router = "sigmoid"
        c.model.moe.aux_loss_weight = 0.0
    elif arg == "expert_choice":
        c.model.moe.router = "expert_choice"
    elif arg not in (None, ""):
        raise ValueError(f"unknown arg {arg!r} (use capacity, sigmoid or expert_choice)")
    return c
