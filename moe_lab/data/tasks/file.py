"""`file`: the user's own .txt / .jsonl documents with a hash split."""

from __future__ import annotations

import os
from collections.abc import Sequence

from moe_lab.config.schema import ConfigError
from moe_lab.data.jsonl import iter_jsonl
from moe_lab.data.tasks.base import Example, Task, _held_out, stable_hash
from moe_lab.data.tokenizer import ANSWER, THINK_END, THINK_START

# ------------------------------------------------------------------------ file


def _chunk_text(text: str, max_tokens: int) -> list[str]:
    """Splits a long document into pieces of <= max_tokens byte tokens, at
    character boundaries, so nothing is silently truncated by the packer."""
    if len(text.encode("utf-8")) <= max_tokens:
        return [text]
    chunks, start, acc = [], 0, 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        if acc + n > max_tokens:
            chunks.append(text[start:i])
            start, acc = i, 0
        acc += n
    chunks.append(text[start:])
    return [c for c in chunks if c.strip()]


def _read_txt(path: str) -> list[tuple[int, Example]]:
    """Documents of a .txt file: paragraphs separated by blank lines; a file with
    no blank line at all has one document per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.files: {path}: not UTF-8 text (byte {e.start})") from None
    docs: list[tuple[int, Example]] = []
    if any(not ln.strip() for ln in lines):
        para, first = [], 0
        for lineno, ln in enumerate(lines + [""], start=1):
            if ln.strip():
                if not para:
                    first = lineno
                para.append(ln)
            elif para:
                docs.append((first, _plain("\n".join(para))))
                para = []
    else:
        docs = [(n, _plain(ln)) for n, ln in enumerate(lines, start=1) if ln.strip()]
    return docs


def _plain(text: str) -> Example:
    return Example(prompt=text, answer="", marker="", key=text)


def _read_jsonl(path: str) -> list[tuple[int, Example]]:
    docs: list[tuple[int, Example]] = []
    for lineno, row in iter_jsonl(path, "data.files:"):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            if row["text"].strip():
                docs.append((lineno, _plain(row["text"])))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("prompt"), str)
            and isinstance(row.get("answer"), str)
        ):
            working = row.get("working", "")
            if not isinstance(working, str):
                raise ConfigError(f"data.files: {path}:{lineno}: 'working' must be a string")
            if working:
                working = THINK_START + working + THINK_END
            docs.append(
                (
                    lineno,
                    Example(
                        prompt=row["prompt"],
                        answer=row["answer"],
                        working=working,
                        key=row["prompt"] + ANSWER + row["answer"],
                    ),
                )
            )
        else:
            raise ConfigError(
                f"data.files: {path}:{lineno}: row needs a string 'text', or string "
                "'prompt' and 'answer' fields"
            )
    return docs


class FileTask(Task):
    """Documents from local .txt / .jsonl files (see `_read_txt`, `_read_jsonl`).

    Eval split: documents whose content hash falls in a 5% bucket (identical
    documents therefore land on the same side). Plain-text documents longer than
    `max_doc_tokens` are split into chunks after the split, so chunks of one
    document never straddle train and eval; prompt/answer rows are kept whole
    (the pipeline truncates them to seq_len if they are longer).
    """

    name = "file"

    def __init__(
        self,
        paths: Sequence[str],
        seed: int = 0,
        max_doc_tokens: int | None = None,
        eval_fraction: float = 0.05,
    ):
        if not paths:
            raise ConfigError("data.files is empty but the mixture uses 'file'")
        self.seed, self.paths = seed, list(paths)
        docs: list[tuple[str, int, Example]] = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise ConfigError(f"data.files: no such file: {path}")
            if path.endswith(".jsonl"):
                file_docs = _read_jsonl(path)
            elif path.endswith(".txt"):
                file_docs = _read_txt(path)
            else:
                raise ConfigError(f"data.files: {path}: unsupported extension (use .txt or .jsonl)")
            if not file_docs:
                raise ConfigError(f"data.files: {path}: no documents (empty file)")
            docs.extend((path, n, ex) for n, ex in file_docs)
        if len(docs) < 2:
            raise ConfigError(
                f"data.files: need at least 2 documents for a train/eval split, "
                f"found {len(docs)} in {', '.join(self.paths)}"
            )
        held = [_held_out("file-split/" + ex.key, eval_fraction) for _, _, ex in docs]
        if not any(held):  # tiny files: the document with the smallest hash goes to eval
            held[min(range(len(docs)), key=lambda k: stable_hash(docs[k][2].key))] = True
        if all(held):
            held[0] = False
        self.train_docs: list[Example] = []
        self.eval_docs: list[Example] = []
        self.sources: dict[str, str] = {}  # key -> "path:line" for error messages / debugging
        for (path, lineno, ex), is_eval in zip(docs, held):
            self.sources.setdefault(ex.key, f"{path}:{lineno}")
            pieces = [ex]
            if max_doc_tokens and not ex.answer:
                pieces = [_plain(c) for c in _chunk_text(ex.prompt, max_doc_tokens)]
            (self.eval_docs if is_eval else self.train_docs).extend(pieces)
        self.num_train, self.num_eval = len(self.train_docs), len(self.eval_docs)

    def train_example(self, i: int) -> Example:
        return self.train_docs[i % self.num_train]

    def eval_example(self, i: int) -> Example:
        return self.eval_docs[i % self.num_eval]
