"""safetensors files, read one tensor at a time and written as a stream.

Both directions are done here (bf16 through ml_dtypes).  The format is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw bytes (https://github.com/huggingface/safetensors#format).  Reading uses plain
file reads, one tensor at a time (TensorReader says why not a memory map).  Writing
streams: it needs the shapes first (the header comes before the data) and then one
tensor in memory at a time, where safetensors.numpy.save_file takes the whole dict at
once: exporting a model that way would hold a second copy of it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from moe_lab.config.schema import ConfigError

DTYPE_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}
READ_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def read_header(path: str) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, the byte offset of the data) of a
    .safetensors file, checked: every entry's dtype known and its bytes inside the
    file.  A file that breaks any of it is one ConfigError naming the file."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{path}: not a readable safetensors file ({why})")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} does not fit in the file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_bytes = 8 + n, size - 8 - n
    for name, entry in header.items():
        try:
            dtype = READ_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise bad(
                f"tensor {name}: dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}"
                f" is not one of {sorted(READ_DTYPES)} or its entry is malformed"
            ) from None
        if not 0 <= begin <= end <= data_bytes or end - begin != count * dtype.itemsize:
            raise bad(
                f"tensor {name}: bytes [{begin}, {end}) do not hold shape "
                f"{entry['shape']} {entry['dtype']} inside the {data_bytes} data bytes "
                f"(truncated?)"
            )
    return header, data_start


class TensorReader:
    """name -> numpy array, one tensor at a time from .safetensors files.

    Read with plain file reads into a fresh array, not a memory map: the safetensors
    package maps the whole file, and every page of a mapped file that has been read
    counts in the process's RSS until the file is closed (measured: +1.0x the
    checkpoint for the length of an import).  Only the tensor being read is resident."""

    def __init__(self, files: list[str]):
        self._where: dict[str, tuple[str, dict, int]] = {}
        for path in files:
            header, data_start = read_header(path)
            for name, entry in header.items():
                self._where[name] = (path, entry, data_start)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._entry(name)[1]["shape"])

    def _entry(self, name: str):
        if name not in self._where:
            raise ConfigError(f"the checkpoint has no tensor {name}")
        return self._where[name]

    def __call__(self, name: str) -> np.ndarray:
        path, entry, data_start = self._entry(name)
        dtype, shape = READ_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
        with open(path, "rb") as f:
            f.seek(data_start + int(entry["data_offsets"][0]))
            out = np.fromfile(f, dtype=dtype, count=math.prod(shape))
        if out.size != math.prod(shape):
            raise ConfigError(f"{path}: tensor {name} ends past the end of the file (truncated?)")
        return out.reshape(shape)


def write_stream(
    path: str, specs: list[tuple[str, tuple, np.dtype]], arrays: Iterable[tuple[str, np.ndarray]]
) -> None:
    """Writes `path` from specs [(name, shape, dtype)] (the header) and then `arrays`,
    yielded in the same order, one at a time."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (got, a) in zip(specs, arrays, strict=True):
            if got != name or tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                raise AssertionError(
                    f"safetensors stream: {got} {a.shape} {a.dtype} where the "
                    f"header says {name} {shape} {dtype}"
                )
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)  # no bytes copy


def write_sharded(
    out_dir: str,
    specs: list[tuple[str, tuple, np.dtype]],
    arrays: Callable[[], Iterable[tuple[str, np.ndarray]]],
    shard_bytes: int = SHARD_BYTES,
) -> list[str]:
    """model.safetensors, or model-0000k-of-0000N.safetensors + model.safetensors.index.json
    above shard_bytes (transformers' names); returns the files written."""
    shards, size = [[]], 0
    for spec in specs:
        n = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    stream = iter(arrays())
    for name, shard in zip(names, shards, strict=True):
        write_stream(os.path.join(out_dir, name), shard, (next(stream) for _ in shard))
    if len(shards) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                spec[0]: name for name, shard in zip(names, shards, strict=True) for spec in shard
            },
        }
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
