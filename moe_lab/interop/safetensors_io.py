"""safetensors files, read one tensor at a time and written as a stream.

Reading uses the `safetensors` package (numpy, bf16 through ml_dtypes).  Writing is
done here: the format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw bytes
(https://github.com/huggingface/safetensors#format).  Streaming needs the shapes
first (the header comes before the data) and then one tensor in memory at a time,
where safetensors.numpy.save_file takes the whole dict at once: exporting a model
that way would hold a second copy of it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from moe_lab.config.schema import ConfigError

DTYPE_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
               np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
               np.dtype(np.int64): "I64"}
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


class TensorReader:
    """name -> numpy array, one tensor at a time from .safetensors files."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open  # noqa: PLC0415  (import / export only)

        self._where = {}
        for f in files:
            try:
                h = safe_open(f, framework="np")
            except Exception as e:  # the Rust reader's message, on one line
                raise ConfigError(f"{f}: not a readable safetensors file "
                                  f"({str(e).splitlines()[0][:120]})") from None
            for name in h.keys():
                self._where[name] = h

    def names(self) -> set[str]:
        return set(self._where)

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"the checkpoint has no tensor {name}")
        return self._where[name].get_tensor(name)


def write_stream(path: str, specs: list[tuple[str, tuple, np.dtype]],
                 arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """Writes `path` from specs [(name, shape, dtype)] (the header) and then `arrays`,
    yielded in the same order, one at a time."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (got, a) in zip(specs, arrays, strict=True):
            if got != name or tuple(a.shape) != tuple(shape) or a.dtype != dtype:
                raise AssertionError(f"safetensors stream: {got} {a.shape} {a.dtype} where the "
                                     f"header says {name} {shape} {dtype}")
            f.write(np.ascontiguousarray(a).tobytes())


def write_sharded(out_dir: str, specs: list[tuple[str, tuple, np.dtype]],
                  arrays: Callable[[], Iterable[tuple[str, np.ndarray]]],
                  shard_bytes: int = SHARD_BYTES) -> list[str]:
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
        index = {"metadata": {"total_size": total},
                 "weight_map": {spec[0]: name for name, shard in zip(names, shards, strict=True)
                                for spec in shard}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return names
