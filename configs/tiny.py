"""The tiny config: a 4-layer dense decoder that trains on CPU in a few minutes.

moe-lab train --config configs/tiny.py --workdir runs/tiny
moe-lab train --config configs/tiny.py:moe --workdir runs/tiny_moe   # MoE FFN
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "tiny"
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
    if arg == "moe":
        c.name = "tiny_moe"
        c.model.ffn = "moe"
        c.model.moe = dict(
            num_experts=8, top_k=2, expert_hidden=192, router="softmax_topk", dispatch="dropless"
        )
    elif arg not in (None, ""):
        raise ValueError(f"configs/tiny.py: unknown arg {arg!r} (use '' or 'moe')")
    return c
