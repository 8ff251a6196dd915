"""Reading the user's JSONL files: one clear ConfigError line per bad row."""

from __future__ import annotations

import json
from collections.abc import Iterator

from moe_lab.config.schema import ConfigError


def iter_jsonl(path: str, what: str) -> Iterator[tuple[int, object]]:
    """Yields (line number, parsed row) for non-blank lines; `what` prefixes errors
    (e.g. "data.files" or "eval --data")."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{what} {path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{what} {path}:{lineno}: invalid JSON ({e.msg})") from None
