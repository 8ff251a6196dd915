"""Reading a text corpus from local files as a stream of documents, in work units.

    txt      one document per blank-line-separated block (a file with no blank
             lines is one document); one work unit per file
    jsonl    one document per row, the string field `field` ("text"); work units
             are byte ranges of UNIT_BYTES aligned to lines (a unit owns the rows
             that start inside it), so one big file still tokenizes in parallel
    parquet  one document per row of column `field`, read with pyarrow in row
             batches (HF datasets' Parquet dumps work as they are); one work unit
             per row group

Units depend on the files only, never on the number of workers: the shards a
prepare writes are the same whatever --workers.  Text that is not UTF-8 is
skipped document by document and counted (the count is reported and kept in the
corpus's meta.json): one bad byte in a crawl should not stop a day-long prepare.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Iterator

from moe_lab.config.schema import ConfigError

FORMATS = ("txt", "jsonl", "parquet")
UNIT_BYTES = 16 << 20  # jsonl work unit: 16 MiB of the file


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: documents of `path` in [start, end) (bytes, or row groups)."""

    path: str
    fmt: str
    start: int
    end: int


def expand_inputs(pattern: str) -> list[str]:
    """The files of a comma-separated list of globs, sorted, each once."""
    files: list[str] = []
    for part in (p for p in pattern.split(",") if p):
        hits = sorted(f for f in glob.glob(os.path.expanduser(part), recursive=True) if os.path.isfile(f))
        if not hits:
            raise ConfigError(f"--input {part!r} matches no file")
        files += [f for f in hits if f not in files]
    if not files:
        raise ConfigError("--input is empty")
    for f in files:  # before anything is planned or written (a PermissionError later)
        if not os.access(f, os.R_OK):
            raise ConfigError(f"--input {f} is not readable (permissions)")
    return files


def file_format(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    ext = {"text": "txt", "json": "jsonl", "pq": "parquet"}.get(ext, ext)
    if ext not in FORMATS:
        raise ConfigError(
            f"{path}: cannot tell the format from the extension; pass --format ({'|'.join(FORMATS)})"
        )
    return ext


def check_field(path: str, fmt: str, field: str) -> None:
    """A Parquet file without the field is refused before any work starts."""
    if fmt != "parquet":
        return
    import pyarrow.parquet as pq  # optional: Parquet inputs only

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:
        raise ConfigError(f"{path}: not a Parquet file ({str(e).splitlines()[0][:100]})") from None
    if field not in names:
        raise ConfigError(f"{path}: no column {field!r} (has {', '.join(names[:10])}); pass --field")


def plan_units(files: list[str], fmt: str | None, field: str) -> list[Unit]:
    units = []
    for path in files:
        f = file_format(path, fmt)
        check_field(path, f, field)
        if f == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(path).metadata.num_row_groups
            units += [Unit(path, f, g, g + 1) for g in range(groups)]
        elif f == "jsonl":
            size = os.path.getsize(path)
            units += [Unit(path, f, s, min(s + UNIT_BYTES, size)) for s in range(0, max(size, 1), UNIT_BYTES)]
        else:
            units.append(Unit(path, f, 0, os.path.getsize(path)))
    return units


class Skipped:
    """Counts the rows a unit could not use, by kind: not UTF-8, no text field (JSONL /
    Parquet), a text field that is not a string, an empty text."""

    KINDS = {
        "not_utf8": "not UTF-8",
        "no_text": "without the text field",
        "not_string": "whose text is not a string",
        "empty": "with an empty text",
    }

    def __init__(self):
        self.not_utf8 = self.no_text = self.not_string = self.empty = 0

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.KINDS}

    @classmethod
    def describe(cls, counts: dict[str, int]) -> str:
        """'skipped 2 rows not UTF-8, 1 row with an empty text' ('' if none)."""
        parts = [f"{n:,} row{'s' if n != 1 else ''} {cls.KINDS[k]}" for k, n in counts.items() if n]
        return f"skipped {', '.join(parts)}" if parts else ""


def iter_unit(unit: Unit, field: str, skipped: Skipped) -> Iterator[str]:
    """The documents of one unit, in file order."""
    if unit.fmt == "parquet":
        yield from _parquet_docs(unit, field, skipped)
    elif unit.fmt == "jsonl":
        yield from _jsonl_docs(unit, field, skipped)
    else:
        yield from _txt_docs(unit, skipped)


def _decode(raw: bytes, skipped: Skipped) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped.not_utf8 += 1
        return None


def _txt_docs(unit: Unit, skipped: Skipped) -> Iterator[str]:
    with open(unit.path, "rb") as f:
        block: list[bytes] = []
        for line in f:
            if line.strip():
                block.append(line)
                continue
            if block:
                text = _decode(b"".join(block), skipped)
                block = []
                if text is not None:
                    yield text.rstrip("\n")
        if block:
            text = _decode(b"".join(block), skipped)
            if text is not None:
                yield text.rstrip("\n")


def _jsonl_docs(unit: Unit, field: str, skipped: Skipped) -> Iterator[str]:
    with open(unit.path, "rb") as f:
        pos = unit.start
        if unit.start > 0:  # the row that straddles `start` belongs to the unit before
            f.seek(unit.start - 1)
            pos = unit.start - 1 + len(f.readline())
        while pos < unit.end:
            line = f.readline()
            if not line:
                break
            lineno_hint = pos
            pos += len(line)
            if not line.strip():
                continue
            text = _decode(line, skipped)
            if text is None:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{unit.path} (byte {lineno_hint}): invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row or row[field] is None:
                skipped.no_text += 1
            elif not isinstance(row[field], str):
                skipped.not_string += 1
            elif not row[field]:
                skipped.empty += 1
            else:
                yield row[field]


def _parquet_docs(unit: Unit, field: str, skipped: Skipped) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    for batch in pf.iter_batches(
        batch_size=1024, row_groups=list(range(unit.start, unit.end)), columns=[field]
    ):
        for value in batch.column(0).to_pylist():
            if value is None:
                skipped.no_text += 1
                continue
            if isinstance(value, bytes):
                value = _decode(value, skipped)
                if value is None:
                    continue
            if not isinstance(value, str):
                skipped.not_string += 1
            elif not value:
                skipped.empty += 1
            else:
                yield value


def file_sha256(path: str) -> str:
    """The sha256 of a file, read in 16 MiB blocks (source hashes in meta.json and lineage)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
