"""Supervised fine-tuning (s1-style distillation on reasoning traces, arXiv 2501.19393)
of a trained or imported run: the loss covers only the completions.

    moe-lab import --hf HFDIR --to runs/base                   # or any moe_lab run
    moe-lab train --config configs/sft.py:traces.jsonl --init-from runs/base --workdir runs/sft

The data is a JSONL file of {"prompt", "working", "answer"} rows (working: the
reasoning trace, wrapped in <think> ... </think>; it may be left out), the `file`
source (moe_lab/data/tasks/file.py).  --init-from takes the base run's model and
tokenizer and starts a fresh optimizer and schedule; train.loss_on="completion"
trains on working + answer + EOS only (prompt tokens get exactly zero gradient).
s1 fine-tunes 5 epochs at lr 1e-5 with batch 16, cosine decay and 5% warm-up.
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.name = "sft"
    c.data = dict(mixture="file:1", files=arg or "data/sft/traces.jsonl", seq_len=512)
    c.train = dict(
        steps=300,
        batch_size=16,
        lr=1e-5,
        schedule="cosine",
        warmup_steps=15,
        end_lr_ratio=0.0,
        weight_decay=1e-4,
        loss_on="completion",
        log_every=10,
        eval_every=100,
        checkpoint_every=100,
    )
    c.eval = dict(at_end=False)  # score it with moe-lab eval --data / --lm-eval
    return c
