"""Byte-level tokenizer with a handful of special tokens.

Why bytes: the synthetic tasks (facts, modular arithmetic) and small user files
need no learned vocabulary, every string is encodable, and the vocabulary stays
tiny (272 ids), so the embedding/unembedding cost does not blur the FLOP and
parameter accounting of the MoE sweeps.

Id layout (fixed; checkpoints depend on it):

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)
    3 <think>   4 </think>   5 <answer>   6 <sep>
    7..15     <reserved_7> ... <reserved_15>   (room for later tasks)
    16..271   the 256 byte values (id = byte + 16)

`vocab_size` is padded up to a multiple of 8 (272 already is).

Task text is written with the literal special strings ("a=1 b=a+2 mod 23. b?
<think>b=3</think><answer>3"): `encode` maps every literal special string in the
text (except "<pad>") to its id, so `decode(encode(s)) == s` for every string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
THINK_START = "<think>"
THINK_END = "</think>"
ANSWER = "<answer>"
SEP = "<sep>"

NUM_SPECIAL = 16  # ids 0..15; bytes start here
_NAMED_SPECIALS = (PAD, BOS, EOS, THINK_START, THINK_END, ANSWER, SEP)
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<reserved_{i}>" for i in range(len(_NAMED_SPECIALS), NUM_SPECIAL)
)


class Tokenizer:
    """Bytes + specials. Stateless apart from lookup tables; safe to share."""

    def __init__(self):
        self.special_tokens = SPECIAL_TOKENS
        self.special_to_id = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
        self.byte_offset = NUM_SPECIAL
        self.vocab_size = 8 * ((NUM_SPECIAL + 256 + 7) // 8)
        self.pad_id = self.special_to_id[PAD]
        self.bos_id = self.special_to_id[BOS]
        self.eos_id = self.special_to_id[EOS]
        self.think_start_id = self.special_to_id[THINK_START]
        self.think_end_id = self.special_to_id[THINK_END]
        self.answer_id = self.special_to_id[ANSWER]
        self.sep_id = self.special_to_id[SEP]
        # <pad> is deliberately not parsed from text: decode drops pad ids, so a
        # literal "<pad>" must stay bytes for the round trip to be exact.
        parsed = sorted((s for s in SPECIAL_TOKENS if s != PAD), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in parsed) + ")")

    # ------------------------------------------------------------------ encode

    def encode_array(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Like `encode` but returns an int32 array (the pipeline's fast path)."""
        pieces = self._split_re.split(text)  # odd entries: the special strings found
        if len(pieces) == 1:  # no specials: one vectorised conversion
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        else:
            # bytes stay raw and specials are stored as (id - offset) so that a
            # single "+ offset" below finishes both (cheaper than per-piece arrays)
            raw: list[int] = []
            for k, piece in enumerate(pieces):
                if k % 2:
                    raw.append(self.special_to_id[piece] - self.byte_offset)
                else:
                    raw.extend(piece.encode("utf-8"))
            ids = np.array(raw, dtype=np.int32)
        ids += self.byte_offset
        if add_bos or add_eos:
            ids = np.concatenate([[self.bos_id]] * add_bos + [ids] + [[self.eos_id]] * add_eos)
            ids = ids.astype(np.int32)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids; literal special strings (e.g. "<think>") become their id."""
        return self.encode_array(text, add_bos, add_eos).tolist()

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Pad ids are dropped; specials are rendered as their string;
        nothing stops decoding (cut at EOS yourself if you need to). Invalid UTF-8
        byte runs (e.g. a sampled half character) decode with U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for t in ids:
            t = int(t)
            if t >= self.byte_offset:
                if t >= self.byte_offset + 256:
                    raise ValueError(f"token id {t} out of range (vocab {self.vocab_size})")
                buf.append(t - self.byte_offset)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if t == self.pad_id:
                continue
            if t < 0:
                raise ValueError(f"negative token id {t}")
            out.append(self.special_tokens[t])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        return 0 <= int(token_id) < self.byte_offset


TOKENIZER = Tokenizer()
