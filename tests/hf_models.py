"""Tiny random HF transformers models of every class moe_lab imports, written by the
tests themselves (nothing is downloaded): config.json, model.safetensors and a
byte-level BPE tokenizer.json trained here on a few sentences.

Every weight is random, norms included (1 + noise), so a mapping that confuses two
tensors of the same shape changes the logits.
"""

from __future__ import annotations

import json
import os

import numpy as np

TEXT = [
    "the cat sat on the mat",
    "a dog ran to the park and back",
    "question: what is two plus three? answer: five",
    "numbers 0 1 2 3 4 5 6 7 8 9",
] * 8
VOCAB = 320  # the tokenizer's size; the HF configs hold 384 rows

BASE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=384,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="float32",
)
CLASSES = {
    # Llama with the options it brings: o-projection biases, llama3 RoPE scaling
    "LlamaForCausalLM": dict(
        attention_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    # a dense first layer, a sigmoid-gated shared expert, q/k/v biases
    "Qwen2MoeForCausalLM": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    ),
    "Qwen3MoeForCausalLM": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "OlmoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
}


def write_tokenizer(path: str) -> str:
    """A byte-level BPE of VOCAB ids trained on TEXT by moe-lab's own trainer (the 16
    specials at ids 0..15)."""
    from moe_lab.data.tokenizer_train import train_bpe

    text = path + ".train.jsonl"
    with open(text, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXT)
    train_bpe(text, VOCAB, path, log=lambda *_: None)
    os.remove(text)
    return path


def make_hf_model(arch: str, out_dir: str, seed: int = 0, **overrides):
    """Writes a random `arch` model (and the tokenizer) into out_dir; returns the model."""
    import torch
    import transformers

    kind = {
        "LlamaForCausalLM": "llama",
        "MixtralForCausalLM": "mixtral",
        "Qwen2MoeForCausalLM": "qwen2_moe",
        "Qwen3MoeForCausalLM": "qwen3_moe",
        "OlmoeForCausalLM": "olmoe",
    }[arch]
    cfg = transformers.AutoConfig.for_model(kind, **{**BASE, **CLASSES[arch], **overrides})
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn_like(p)
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:  # no BOS added
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "add_bos_token": False,
            },
            f,
        )
    return model


def hf_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens_BT, dtype=torch.long)).logits.float().numpy()
