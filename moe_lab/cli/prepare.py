"""`moe-lab prepare` (tokenize a corpus into ArrayRecord shards, data/prepare.py) and
`moe-lab tokenizer train` (a byte-level BPE vocabulary, data/tokenizer_train.py).

    moe-lab tokenizer train --input 'text/*.txt' --vocab-size 8192 --out tok.json
    moe-lab prepare --input 'text/*.jsonl' --tokenizer tok.json --out corpora/web --workers 8
    moe-lab prepare --verify corpora/web     # read every record back (a copied corpus)
"""

from __future__ import annotations

from moe_lab.config.schema import ConfigError
from moe_lab.data.corpus import verify_corpus
from moe_lab.data.prepare import prepare
from moe_lab.data.sources import FORMATS
from moe_lab.data.tokenizer_train import train_bpe


def _input_flags(p, required: bool = True) -> None:
    p.add_argument("--input", required=required, help="glob(s), comma-separated")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from each file's extension")
    p.add_argument("--field", default="text", help="the text field of jsonl / parquet rows")


def add_prepare_parser(subparsers):
    p = subparsers.add_parser("prepare", help="tokenize a corpus once into ArrayRecord shards")
    _input_flags(p, required=False)
    p.add_argument("--tokenizer", default="byte", help="byte | tokenizer.json | NAME.model")
    p.add_argument("--out", default=None, help="the corpus directory (new, or one to resume)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument(
        "--heldout", type=float, default=0.001, help="share of documents held out for the eval loss"
    )
    p.add_argument(
        "--verify",
        default=None,
        metavar="DIR",
        help="instead: read every record of the prepared corpus DIR and check "
        "its chunk hashes and meta.json's counts",
    )
    p.set_defaults(fn=cmd_prepare)
    return p


def add_tokenizer_parser(subparsers):
    t = subparsers.add_parser("tokenizer", help="train a tokenizer on local text")
    sub = t.add_subparsers(dest="tokenizer_command", required=True)
    tr = sub.add_parser("train", help="byte-level BPE (HF tokenizers) -> tokenizer.json")
    _input_flags(tr)
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="the tokenizer.json to write (a new file)")
    tr.set_defaults(fn=cmd_tokenizer_train)
    return t


def cmd_prepare(args, overrides) -> int:
    if overrides:
        raise ConfigError("prepare takes no --config overrides")
    if args.verify:
        if args.input or args.out:
            raise ConfigError("prepare --verify DIR takes no --input / --out")
        read = verify_corpus(args.verify)
        print(
            f"verify: {args.verify} is intact: {read['documents']:,} documents, "
            f"{read['tokens']:,} tokens (+ held out {read['heldout_documents']:,} documents, "
            f"{read['heldout_tokens']:,} tokens), every record read"
        )
        return 0
    if not args.input or not args.out:
        raise ConfigError("prepare needs --input and --out (or --verify DIR)")
    prepare(
        args.input,
        args.tokenizer,
        args.out,
        fmt=args.format,
        field=args.field,
        workers=args.workers,
        heldout=args.heldout,
    )
    return 0


def cmd_tokenizer_train(args, overrides) -> int:
    if overrides:
        raise ConfigError("tokenizer train takes no --config overrides")
    train_bpe(args.input, args.vocab_size, args.out, fmt=args.format, field=args.field)
    return 0
