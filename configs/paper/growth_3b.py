"""arXiv 2510.08008's sunk-cost study at paper scale: a ~3.5B-total / 0.7B-active MoE
base (20 layers, 64 fine-grained experts, top-4) trained with WSD; checkpoints kept
from the constant phase; grown by depth interposition (x2) then width (E 64 -> 128,
top-4 -> top-8) and continued at constant LR 3e-4 with fresh Adam moments.

    moe-lab info --config configs/paper/growth_3b.py                 # base on v5p-256 (128 chips)
    moe-lab compile --config configs/paper/growth_3b.py --topology v5p-256
    moe-lab info --config configs/paper/growth_3b.py:grown           # after depth x2
    moe-lab train --config configs/paper/growth_3b.py --workdir gs://.../base
    moe-lab grow --from gs://.../base --step 16000 --to gs://.../g16k --depth interpose
    moe-lab train --workdir gs://.../g16k --config.train.schedule=constant --config.train.lr=3e-4 ...

The model size is our reconstruction from the paper's description (the vocabulary
is GPT-NeoX's 50,304); d_model and expert size are chosen to hit 0.7B active.

Real corpora: --config.data.mixture=corpus:1 --config.data.corpus=DIR
--config.data.tokenizer=tok.json (experiments/launch/README.md).
"""

import ml_collections


def get_config(arg=None):
    grown = arg == "grown"
    c = ml_collections.ConfigDict()
    c.name = "growth_3b" + ("_grown" if grown else "")
    c.model = dict(
        vocab_size=50304,
        d_model=2048,
        num_layers=40 if grown else 20,
        num_heads=16,
        num_kv_heads=16,
        max_seq_len=4096,
        compute_dtype="bfloat16",
        remat="full",
        ffn="moe",
        moe=dict(
            num_experts=64,
            top_k=4,
            expert_hidden=384,
            router="softmax_topk",
            aux_loss_weight=1e-2,
            z_loss_weight=1e-3,
            dispatch="dropless",
        ),
    )
    c.data = dict(mixture="facts:1,arith:1", seq_len=4096)
    c.train = dict(
        steps=96000,
        batch_size=512,
        lr=3e-4 if grown else 4e-4,
        schedule="constant" if grown else "wsd",
        warmup_steps=0 if grown else 2000,
        decay_fraction=0.1,
        log_every=50,
        eval_every=2000,
        checkpoint_every=2000,
        keep_every=8000,
    )
    c.mesh = dict(data=-1, fsdp=16, expert=8, plan_devices=128, plan_hardware="tpu-v5p")
    return c
