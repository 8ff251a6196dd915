"""A run's tokenizer as HF transformers files (tokenizer.json + tokenizer_config.json),
with the same ids as moe_lab's (data/tokenizer.py), so an exported model reads text
the way it was trained.

- byte: a byte-level BPE with no merges whose vocabulary is the 16 specials (ids 0..15)
  and the 256 byte symbols at byte + 16: exactly the byte kind's ids.
- tokenizer.json: the run's file, plus the specials moe_lab appended after its
  vocabulary, added in the same order (so they land on the same ids).
- SentencePiece (.model): rebuilt as a `tokenizers` pipeline from the model's proto,
  the way SentencePiece encodes (what transformers' LlamaConverter does for Llama 2,
  made general): the proto's normalizer (its precompiled charsmap, extra whitespace
  removed, the dummy "▁" prefix, spaces escaped as "▁") and its model, BPE (merges
  ranked by the merged piece's score: SentencePiece merges the best-scored pair
  first) or Unigram (the pieces' log-probabilities), with byte fallback; decoding
  undoes the escaping and the prefix.  Written as a fast tokenizer (tokenizer.json):
  transformers' slow SentencePiece classes number added tokens their own way.
  Tested id for id against SentencePiece itself (tests/test_interop.py).  Known
  differences: decoded text keeps the dummy-prefix space after a special token
  ("<sep> b", moe_lab decodes each run of text apart: "<sep>b"), an unknown piece
  decodes as "<unk>" (SentencePiece: " ⁇ "), and a Unigram model can match the spelled
  name of a byte or control piece ("<0x41>") where its vocabulary lacks the characters
  (tokenizers' unknown-character penalty is fixed).
"""

from __future__ import annotations

import json
import os

from moe_lab.config.schema import ConfigError
from moe_lab.data.tokenizer import BYTE, NUM_SPECIAL, SPECIAL_TOKENS, Tokenizer


def _byte_level_tokenizer():
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: NUM_SPECIAL + b for b in range(256)})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# SentencePiece's piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def _sentencepiece_as_hf(path: str):
    """A `tokenizers.Tokenizer` encoding text as the SentencePiece model at `path` does
    (module doc); what it cannot mirror is refused, naming the proto field."""
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    for field, bad in (
        ("trainer_spec.treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix),
        ("trainer_spec.model_type", trainer.model_type not in (_UNIGRAM, _BPE)),
        ("normalizer_spec.escape_whitespaces", not norm.escape_whitespaces),
        ("user_defined pieces", any(p.type == _USER_DEFINED for p in proto.pieces)),
    ):
        if bad:
            raise ConfigError(
                f"export: SentencePiece model {path}: {field} is not supported "
                f"(its encoding has no tokenizers equivalent here)"
            )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = trainer.unk_id
    if trainer.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        merges = []  # every split of a normal piece into two pieces, best-scored first
        for i, (piece, score, kind) in enumerate(pieces):
            if kind != _NORMAL:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((-score, i, vocab[left], left, right))
        merges.sort()
        model = models.BPE(
            vocab,
            [(a, b) for *_, a, b in merges],
            unk_token=pieces[unk][0],
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    else:
        # SentencePiece never matches a control, byte or unused piece in text (literal
        # "<0x41>" stays characters); tokenizers' Viterbi would: score them out
        model = models.Unigram(
            [(piece, score if kind == _NORMAL else -1e9) for piece, score, kind in pieces],
            unk_id=unk,
            byte_fallback=trainer.byte_fallback,
        )
    hf = tokenizers.Tokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    hf.normalizer = normalizers.Sequence(steps)
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    return hf


def hf_tokenizer_of(tok: Tokenizer):
    """A `tokenizers.Tokenizer` giving `tok`'s ids (specials registered as special)."""
    import tokenizers

    if tok.kind == BYTE:
        hf = _byte_level_tokenizer()
    elif tok.kind == "hf":
        hf = tokenizers.Tokenizer.from_file(tok.source)
    elif tok.kind == "sentencepiece":
        hf = _sentencepiece_as_hf(tok.source)
    else:
        raise ConfigError(f"export: a {tok.kind} tokenizer ({tok.source}) cannot be exported")
    # moe_lab's specials, registered as special: those in the vocabulary keep their ids,
    # those moe_lab appended after it are added in id order (so they get the same ids);
    # a role alias ("<s>" played by "<|begin_of_text|>") is the vocabulary's token already
    base = hf.get_vocab_size(with_added_tokens=True)
    ids = tok.special_to_id
    mine = sorted((s for s in SPECIAL_TOKENS if hf.token_to_id(s) == ids[s] or ids[s] >= base), key=ids.get)
    hf.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in mine])
    wrong = [s for s in mine if hf.token_to_id(s) != ids[s]]
    if wrong:
        raise ConfigError(
            f"export: special {wrong[0]} gets id {hf.token_to_id(wrong[0])} in the "
            f"HF tokenizer, the run uses {ids[wrong[0]]}"
        )
    return hf


def write_hf_tokenizer(tok: Tokenizer, out_dir: str, max_len: int) -> None:
    hf = hf_tokenizer_of(tok)
    hf.save(os.path.join(out_dir, "tokenizer.json"))

    def name(i):
        return hf.id_to_token(i)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
        "pad_token": name(tok.pad_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
