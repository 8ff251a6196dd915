"""arXiv 2508.18672 at paper scale: Mixtral-style MoE, 16 layers, SwiGLU experts of
hidden 2d, 125B tokens.  arg = "D[,E,K][@HW]", e.g. "1024,64,16@tpu-v5p-256".

    moe-lab info --config configs/paper/sparsity.py:1024,64,16@tpu-v5p-256
    moe-lab info --config configs/paper/sparsity.py:2048,256,16@8xh100   # says whether it fits
    moe-lab compile --config configs/paper/sparsity.py:1024,64,16@tpu-v5p-256 --topology v5p-256

Meshes: TPU v5p/v6e slices use fsdp x expert with data on the rest; an 8xH100 node
uses fsdp=8 (experts sharded by fsdp on their embed dim).  The byte tokenizer
and the synthetic tasks are the defaults; a real run reads a prepared corpus
(experiments/launch/README.md), model.vocab_size following the tokenizer:

    moe-lab train --config configs/paper/sparsity.py:1024,64,16@tpu-v5p-256 \
        --config.data.mixture=corpus:1 --config.data.corpus=/shared/corpora/web \
        --config.data.tokenizer=/shared/tok/web32k.json --workdir ...
"""

import ml_collections

# hardware -> (devices, mesh axes).  Cloud TPU names v5p slices by TensorCores (2 per
# chip): a v5p-256 is 128 chips (4x4x8); v6e slices are named by chips (16x16).
MESHES = {
    "tpu-v5p-256": (128, dict(data=-1, fsdp=8, expert=8)),
    "tpu-v5p-128": (64, dict(data=-1, fsdp=8, expert=8)),
    "tpu-v6e-256": (256, dict(data=-1, fsdp=16, expert=8)),
    "8xh100": (8, dict(data=1, fsdp=8)),
}


def get_config(arg=None):
    arg = arg or "1024,64,16@tpu-v5p-256"
    dims, _, hw = arg.partition("@")
    hw = hw or "tpu-v5p-256"
    parts = [int(x) for x in dims.split(",")]
    d, e, k = (parts + [64, 16][len(parts) - 1 :])[:3]
    if hw not in MESHES:
        raise ValueError(f"unknown hardware {hw!r} (one of {', '.join(MESHES)})")
    devices, mesh = MESHES[hw]
    c = ml_collections.ConfigDict()
    c.name = f"sparsity_d{d}_e{e}_k{k}"
    c.model = dict(
        d_model=d,
        num_layers=16,
        num_heads=d // 64,
        num_kv_heads=d // 64,
        max_seq_len=4096,
        init_std=0.02,
        tie_embeddings=False,
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
        ffn="moe",
        moe=dict(
            num_experts=e,
            top_k=k,
            expert_hidden=2 * d,
            router="softmax_topk",
            renormalize=True,
            aux_loss_weight=1e-2,
            z_loss_weight=1e-3,
            dispatch="dropless",
        ),
    )
    c.data = dict(mixture="facts:1,arith:1", seq_len=4096)
    c.train = dict(
        steps=int(125e9 // (1024 * 4096)),
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
        keep_every=5000,
    )
    if hw == "8xh100":
        # 1024 x 4096 tokens a step on 8 GPUs is 128 sequences per GPU: gradient
        # accumulation over 8 slices (`moe-lab info` plans ~40 GiB per H100 so)
        c.train.microbatches = 8
    chip = "h100" if hw == "8xh100" else hw.rsplit("-", 1)[0]  # tpu-v5p-256 -> tpu-v5p
    c.mesh = dict(mesh, plan_devices=devices, plan_hardware=chip)
    return c
