"""`moe-lab tokenizer train`: a byte-level BPE vocabulary from local text (HF
`tokenizers`), so an offline user gets a real vocabulary.

Byte-level (GPT-2 style): every string is encodable and decode(encode(s)) == s.
The 16 special strings of moe_lab (data/tokenizer.py) are ids 0..15 of the
result, so its tokenizer.json needs nothing appended.
"""

from __future__ import annotations

import os

from moe_lab.config.schema import ConfigError
from moe_lab.data import sources
from moe_lab.data.tokenizer import SPECIAL_TOKENS, load_tokenizer

MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials and the byte alphabet


def train_bpe(
    inputs: str, vocab_size: int, out: str, *, fmt: str | None = None, field: str = "text", log=print
) -> str:
    """Trains the tokenizer on every document of `inputs`; writes `out` (a new file)."""
    import tokenizers  # optional dependency of this command
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"--vocab-size must be >= {MIN_VOCAB} (16 specials + 256 bytes), got {vocab_size}")
    if not out.endswith(".json"):
        raise ConfigError(f"--out {out}: a HF tokenizer file ends in .json")
    if os.path.exists(out):
        raise ConfigError(f"--out {out} exists; moe-lab never overwrites a file it did not make")
    units = sources.plan_units(sources.expand_inputs(inputs), fmt, field)
    skipped = sources.Skipped()
    seen = [0]

    def documents():
        for unit in units:
            for doc in sources.iter_unit(unit, field, skipped):
                seen[0] += 1
                yield doc

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(documents(), trainer=trainer)
    if not seen[0]:  # a vocabulary of nothing: refused before anything is written
        raise ConfigError(
            f"--input {inputs}: no usable text (0 documents; "
            f"{sources.Skipped.describe(skipped.counts()) or 'no rows'})"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    loaded = load_tokenizer(out)
    said = sources.Skipped.describe(skipped.counts())
    log(f"tokenizer: {loaded.describe()} from {seen[0]:,} documents -> {out}" + (f"; {said}" if said else ""))
    return out
