"""A run's tokenizer as HF transformers files (tokenizer.json + tokenizer_config.json),
with the same ids as moe_lab's (data/tokenizer.py), so an exported model reads text
the way it was trained.

- byte: a byte-level BPE with no merges whose vocabulary is the 16 specials (ids 0..15)
  and the 256 byte symbols at byte + 16: exactly the byte kind's ids.
- tokenizer.json: the run's file, plus the specials moe_lab appended after its
  vocabulary, added in the same order (so they land on the same ids).
- SentencePiece: refused (transformers' slow sentencepiece tokenizers number added
  tokens their own way); convert the vocabulary to a tokenizer.json first.
"""

from __future__ import annotations

import json
import os

from moe_lab.config.schema import ConfigError
from moe_lab.data.tokenizer import BYTE, NUM_SPECIAL, SPECIAL_TOKENS, Tokenizer


def _byte_level_tokenizer():
    import tokenizers  # noqa: PLC0415
    from tokenizers import decoders, models, pre_tokenizers  # noqa: PLC0415

    alphabet = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: NUM_SPECIAL + b for b in range(256)})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_tokenizer_of(tok: Tokenizer):
    """A `tokenizers.Tokenizer` giving `tok`'s ids (specials registered as special)."""
    import tokenizers  # noqa: PLC0415

    if tok.kind == BYTE:
        hf = _byte_level_tokenizer()
    elif tok.kind == "hf":
        hf = tokenizers.Tokenizer.from_file(tok.source)
    else:
        raise ConfigError(f"export: a {tok.kind} tokenizer ({tok.source}) cannot be exported; "
                          f"convert it to a HF tokenizer.json and train with that")
    # moe_lab's specials, registered as special: those in the vocabulary keep their ids,
    # those moe_lab appended after it are added in id order (so they get the same ids);
    # a role alias ("<s>" played by "<|begin_of_text|>") is the vocabulary's token already
    base = hf.get_vocab_size(with_added_tokens=True)
    ids = tok.special_to_id
    mine = sorted((s for s in SPECIAL_TOKENS if hf.token_to_id(s) == ids[s] or ids[s] >= base),
                  key=ids.get)
    hf.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                           for s in mine])
    wrong = [s for s in mine if hf.token_to_id(s) != ids[s]]
    if wrong:
        raise ConfigError(f"export: special {wrong[0]} gets id {hf.token_to_id(wrong[0])} in the "
                          f"HF tokenizer, the run uses {ids[wrong[0]]}")
    return hf


def write_hf_tokenizer(tok: Tokenizer, out_dir: str, max_len: int) -> None:
    hf = hf_tokenizer_of(tok)
    hf.save(os.path.join(out_dir, "tokenizer.json"))

    def name(i):
        return hf.id_to_token(i)

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
              "pad_token": name(tok.pad_id), "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
