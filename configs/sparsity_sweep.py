"""Sparsity vs reasoning (arXiv 2508.18672): a grid over experts E and top-k at fixed
expert size, so active parameters depend on k only and total on E.

    get_config('tiny')  -> CPU scale (d 64, 4 layers), get_sweep('tiny') its grid
    get_config('paper') -> the paper's recipe at d=1024 (16 layers, SwiGLU experts of
                           hidden 2d, 125B tokens, AdamW 0.9/0.95, wd 0.1, clip 1,
                           peak 4e-4 cosine to 4e-5 after 2000 warmup steps,
                           aux 1e-2, z 1e-3, softmax top-k, no dropping)
    get_sweep('paper')  -> d in {512, 1024, 2048} x E in {8..256} x k in {2..16}, k < E

The sweep runner (`moe-lab sweep`) is tracked in the evaluation issue; each point
here is an override dict usable as `--config.KEY=VALUE` flags today.
"""

import ml_collections


def get_config(arg=None):
    arg = arg or "tiny"
    c = ml_collections.ConfigDict()
    c.name = f"sparsity_{arg}"
    if arg == "tiny":
        c.model = dict(d_model=64, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=128,
                       ffn="moe", moe=dict(num_experts=8, top_k=2, expert_hidden=128,
                                           router="softmax_topk", dispatch="dropless"))
        c.data = dict(mixture="facts:1,arith:1", seq_len=128, facts_num_entities=200)
        c.train = dict(steps=400, batch_size=16, lr=3e-3, warmup_steps=40, log_every=50,
                       eval_every=200, checkpoint_every=200)
        c.mesh = dict(data=-1)
    elif arg == "paper":
        d = 1024
        c.model = dict(d_model=d, num_layers=16, num_heads=16, num_kv_heads=16,
                       max_seq_len=4096, init_std=0.02, tie_embeddings=False,
                       param_dtype="float32", compute_dtype="bfloat16", remat="full",
                       ffn="moe", moe=dict(num_experts=64, top_k=16, expert_hidden=2 * d,
                                           router="softmax_topk", renormalize=True,
                                           aux_loss_weight=1e-2, z_loss_weight=1e-3,
                                           dispatch="dropless"))
        c.data = dict(mixture="facts:1,arith:1", seq_len=4096)
        tokens = 125e9
        c.train = dict(steps=int(tokens // (1024 * 4096)), batch_size=1024, lr=4e-4,
                       schedule="cosine", warmup_steps=2000, end_lr_ratio=0.1, b1=0.9,
                       b2=0.95, weight_decay=0.1, clip_norm=1.0, log_every=50,
                       eval_every=1000, checkpoint_every=1000)
        c.mesh = dict(data=-1, fsdp=8, expert=8)
    else:
        raise ValueError(f"unknown arg {arg!r} (tiny or paper)")
    return c


def get_sweep(arg=None):
    arg = arg or "tiny"
    if arg == "tiny":
        grid = [(e, k) for e in (4, 8, 16) for k in (1, 2) if k < e]
        return [{"model.moe.num_experts": e, "model.moe.top_k": k} for e, k in grid]
    points = []
    for d in (512, 1024, 2048):
        for e in (8, 16, 32, 64, 128, 256):
            for k in (2, 4, 8, 16):
                if k < e:
                    points.append({"model.d_model": d, "model.moe.expert_hidden": 2 * d,
                                   "model.num_heads": d // 64, "model.num_kv_heads": d // 64,
                                   "model.moe.num_experts": e, "model.moe.top_k": k})
    return points
