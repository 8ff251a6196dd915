"""Tokenizers: one interface, three kinds, the task's special tokens in each.

    byte                 the embedded byte-level tokenizer (default; ids below, fixed)
    PATH/tokenizer.json  a HF `tokenizers` vocabulary (BPE, WordPiece, Unigram, ...)
    PATH/NAME.model      a SentencePiece model

Every kind carries the same 16 special strings (SPECIAL_TOKENS: pad, BOS, EOS,
the task delimiters <think> </think> <answer> <sep>, reserved ones).  Text is
split on the literal special strings first (so "<think>" in task text is always
one token, whatever the vocabulary), the pieces in between go to the underlying
vocabulary, and a special string gets the vocabulary's own id where it already
has that token (a tokenizer.json from `moe-lab tokenizer train` has all 16 at
ids 0..15) and an id appended after the vocabulary otherwise.  `fingerprint`
names the vocabulary file and the special ids: a corpus prepared with one
tokenizer is refused by a run with another (data/corpus.py).

Why bytes by default: the synthetic tasks (facts, modular arithmetic) and small
user files need no learned vocabulary, every string is encodable, and the
vocabulary stays tiny (272 ids), so the embedding/unembedding cost does not blur
the FLOP and parameter accounting of the MoE sweeps.  Byte id layout (fixed;
checkpoints depend on it):

    0 <pad>   1 <s> (BOS)   2 </s> (EOS)
    3 <think>   4 </think>   5 <answer>   6 <sep>
    7..15     <reserved_7> ... <reserved_15>   (room for later tasks)
    16..271   the 256 byte values (id = byte + 16)

Task text is written with the literal special strings ("a=1 b=a+2 mod 23. b?
<think>b=3</think><answer>3"): `encode` maps every literal special string in the
text (except "<pad>") to its id, so for the byte kind `decode(encode(s)) == s`
for every string (a learned vocabulary round-trips what its normalizer keeps).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from moe_lab.config.schema import ConfigError

PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
THINK_START = "<think>"
THINK_END = "</think>"
ANSWER = "<answer>"
SEP = "<sep>"

NUM_SPECIAL = 16  # ids 0..15 in the byte kind; bytes start here
_NAMED_SPECIALS = (PAD, BOS, EOS, THINK_START, THINK_END, ANSWER, SEP)
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<reserved_{i}>" for i in range(len(_NAMED_SPECIALS), NUM_SPECIAL)
)
BYTE = "byte"
VOCAB_MULTIPLE = 128  # learned vocabularies: model.vocab_size rounded up to this (tiling)


class TokenizerError(ConfigError):
    """A tokenizer file that cannot be read (the message names it)."""


class Tokenizer:
    """The interface every kind implements: specials split out of the text, the rest
    encoded by the kind's `_encode_plain` / decoded by `_decode_plain`."""

    kind: str
    source: str  # "byte" or the vocabulary file's path
    fingerprint: str
    vocab_size: int  # ids the tokenizer can produce (specials included)

    def _set_specials(self, special_ids: dict[str, int]) -> None:
        self.special_tokens = SPECIAL_TOKENS
        self.special_to_id = dict(special_ids)
        self.id_to_special = {i: s for s, i in special_ids.items()}
        self.pad_id = special_ids[PAD]
        self.bos_id = special_ids[BOS]
        self.eos_id = special_ids[EOS]
        self.think_start_id = special_ids[THINK_START]
        self.think_end_id = special_ids[THINK_END]
        self.answer_id = special_ids[ANSWER]
        self.sep_id = special_ids[SEP]
        # <pad> is deliberately not parsed from text: decode drops pad ids, so a
        # literal "<pad>" must stay text for the round trip to be exact.
        parsed = sorted((s for s in SPECIAL_TOKENS if s != PAD), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in parsed) + ")")

    def _encode_plain(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode_array(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Text -> int32 ids; literal special strings (e.g. "<think>") become their id."""
        pieces = self._split_re.split(text)  # odd entries: the special strings found
        parts = [np.asarray([self.bos_id], np.int32)] if add_bos else []
        for k, piece in enumerate(pieces):
            if k % 2:
                parts.append(np.asarray([self.special_to_id[piece]], np.int32))
            elif piece:
                parts.append(self._encode_plain(piece))
        if add_eos:
            parts.append(np.asarray([self.eos_id], np.int32))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_array(text, add_bos, add_eos).tolist()

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[np.ndarray]:
        """encode_array of each text (kinds override it with a faster batched path)."""
        return [self.encode_array(t, add_bos, add_eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text.  Pad ids are dropped; specials are rendered as their string; an
        id past the vocabulary (a model's padded rows: vocab_size is rounded up to 128)
        is rendered U+FFFD, like an invalid byte run; nothing stops decoding (cut at
        EOS yourself if you need to)."""
        out: list[str] = []
        run: list[int] = []
        for t in ids:
            t = int(t)
            if t < 0:
                raise ValueError(f"negative token id {t}")
            if t >= self.vocab_size:  # an embedding row past the vocabulary (the 128 padding)
                t = -1
            special = self.id_to_special.get(t)
            if special is None:
                run.append(t)
                continue
            if run:
                out.append(self._decode_runs(run))
                run = []
            if t != self.pad_id:
                out.append(special)
        if run:
            out.append(self._decode_runs(run))
        return "".join(out)

    def _decode_runs(self, ids: list[int]) -> str:
        """Decodes ids of the vocabulary; -1 (an id past it) is rendered U+FFFD."""
        parts, run = [], []
        for t in ids:
            if t == -1:
                if run:
                    parts.append(self._decode_plain(run))
                    run = []
                parts.append("\ufffd")
            else:
                run.append(t)
        if run:
            parts.append(self._decode_plain(run))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.id_to_special

    def default_vocab_size(self) -> int:
        """model.vocab_size when the config leaves it 0: the tokenizer's size rounded up
        to a multiple of 128 (the byte kind keeps its 272: rounding would add 112 dead
        rows, +41% embedding on the tiny configs, and change every byte run's size)."""
        return VOCAB_MULTIPLE * math.ceil(self.vocab_size / VOCAB_MULTIPLE)

    def __reduce__(self):  # grain workers and spawned processes load it again by path
        return (load_tokenizer, (self.source,))

    def describe(self) -> str:
        where = "" if self.source == self.kind else f" {self.source}"
        return f"{self.kind}{where} ({self.vocab_size} ids, fingerprint {self.fingerprint})"


def _fingerprint(kind: str, payload: bytes, special_ids: dict[str, int]) -> str:
    h = hashlib.sha256(kind.encode())
    h.update(payload)
    h.update(repr(sorted(special_ids.items())).encode())
    return h.hexdigest()[:16]


class ByteTokenizer(Tokenizer):
    """Bytes + specials (the layout in the module docstring). Stateless; safe to share."""

    kind = BYTE
    source = BYTE

    def __init__(self):
        self._set_specials({s: i for i, s in enumerate(SPECIAL_TOKENS)})
        self.byte_offset = NUM_SPECIAL
        self.vocab_size = 8 * ((NUM_SPECIAL + 256 + 7) // 8)
        self.fingerprint = _fingerprint(BYTE, b"bytes+16", self.special_to_id)

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

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Pad ids are dropped; specials are rendered as their string;
        nothing stops decoding (cut at EOS yourself if you need to). Invalid UTF-8
        byte runs (e.g. a sampled half character) and ids past the vocabulary decode
        as U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for t in ids:
            t = int(t)
            if self.byte_offset <= t < self.byte_offset + 256:
                buf.append(t - self.byte_offset)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if t == self.pad_id:
                continue
            if t < 0:
                raise ValueError(f"negative token id {t}")
            # past the vocabulary (a model with model.vocab_size > 272): U+FFFD
            out.append(self.special_tokens[t] if t < self.byte_offset else "\ufffd")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        return 0 <= int(token_id) < self.byte_offset

    def default_vocab_size(self) -> int:
        return self.vocab_size


BYTE_TOKENIZER = ByteTokenizer()


# A pretrained vocabulary names its pad / BOS / EOS differently (Llama 3, Gemma, GPT-2 /
# Qwen, ...); its own token plays the role, first name found wins, so an imported
# model keeps the ids it was trained with (interop/).  "<|endoftext|>" is GPT-2's and
# Qwen's BOS and EOS at once.
ROLE_ALIASES = {
    PAD: ("<|pad|>", "<|finetune_right_pad_id|>", "<|padding|>"),
    BOS: ("<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    EOS: ("<|end_of_text|>", "<eos>", "<|endoftext|>"),
}


def _with_specials(lookup, base_size: int) -> dict[str, int]:
    """Each special string's id: the vocabulary's own (lookup(s) -> id or None; for pad,
    BOS and EOS also their ROLE_ALIASES), else the next id after the vocabulary, in
    SPECIAL_TOKENS order."""
    ids, nxt = {}, base_size
    for s in SPECIAL_TOKENS:
        own = lookup(s)
        for alias in ROLE_ALIASES.get(s, ()):
            own = own if own is not None else lookup(alias)
        if own is None:
            own, nxt = nxt, nxt + 1
        ids[s] = int(own)
    return ids


class HFTokenizer(Tokenizer):
    """A HF `tokenizers` tokenizer.json (the `tokenizers` library; Rust, batched)."""

    kind = "hf"

    def __init__(self, path: str):
        import tokenizers  # optional: only a run with a tokenizer.json needs it

        with open(path, "rb") as f:
            payload = f.read()
        try:
            self._tok = tokenizers.Tokenizer.from_str(payload.decode("utf-8"))
        except Exception as e:  # the Rust parser's message, on one line
            raise TokenizerError(
                f"tokenizer {path}: not a HF tokenizer.json ({str(e).splitlines()[0][:120]})"
            ) from None
        base = self._tok.get_vocab_size(with_added_tokens=True)
        self._set_specials(_with_specials(self._tok.token_to_id, base))
        self.vocab_size = max(base, max(self.special_to_id.values()) + 1)
        self.source, self.fingerprint = path, _fingerprint(self.kind, payload, self.special_to_id)

    def _encode_plain(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        if any(self._split_re.search(t) for t in texts):
            return super().encode_batch(texts, add_bos, add_eos)
        encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [np.asarray(head + e.ids + tail, np.int32) for e in encs]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model (Llama 2, Gemma, T5 style vocabularies)."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece  # optional: only a run with a .model needs it

        with open(path, "rb") as f:
            payload = f.read()
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(payload)
        except Exception:
            raise TokenizerError(f"tokenizer {path}: not a SentencePiece model") from None
        unk = self._sp.unk_id()

        def lookup(s):  # piece_to_id answers unk for a piece it does not have
            i = self._sp.piece_to_id(s)
            return None if i == unk and s != self._sp.id_to_piece(unk) else i

        base = self._sp.get_piece_size()
        self._set_specials(_with_specials(lookup, base))
        self.vocab_size = max(base, max(self.special_to_id.values()) + 1)
        self.source, self.fingerprint = path, _fingerprint(self.kind, payload, self.special_to_id)

    def _encode_plain(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


@functools.lru_cache(maxsize=8)
def _load_cached(kind: str, path: str, mtime_ns: int, size: int) -> Tokenizer:
    return HFTokenizer(path) if kind == "hf" else SentencePieceTokenizer(path)


def tokenizer_kind(spec: str) -> str:
    """ "byte", "hf" (a .json) or "sentencepiece" (a .model) from a data.tokenizer value."""
    if spec == BYTE:
        return BYTE
    if spec.endswith(".json"):
        return "hf"
    if spec.endswith(".model"):
        return "sentencepiece"
    raise TokenizerError(
        f"data.tokenizer={spec!r}: use 'byte', a HF tokenizer.json or a SentencePiece .model file"
    )


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer of a data.tokenizer value (cached while the file is unchanged)."""
    kind = tokenizer_kind(spec)
    if kind == BYTE:
        return BYTE_TOKENIZER
    if not os.path.isfile(spec):
        raise TokenizerError(f"data.tokenizer: no such file: {spec}")
    st = os.stat(spec)
    return _load_cached(kind, os.path.abspath(spec), st.st_mtime_ns, st.st_size)
