"""What a compiled program holds, read from its optimised HLO text.

Collectives (kind, count, bytes of their results) and kernel custom calls (by
target, and by Mosaic kernel name for TPU custom calls).  Text parsing on
purpose: the HLO text is the one interface that is the same for every backend and
for compile-only (AOT) executables.
"""

from __future__ import annotations

import collections
import math
import re

# dtype -> bytes (HLO's names)
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 0.5,
    "u4": 0.5,
}
COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
# `%x = bf16[8,128]{1,0} all-gather(...)`, async `all-gather-start(`, tuple results too
_INSTR = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_KERNEL_NAME = re.compile(r'"?kernel_name"?\s*[:=]\s*\\?"([^"\\]+)')
# a kernel without a kernel_name is named by its op_name (`.../tokamax:{"op":{"__type":
# "...RaggedDot", ...}` -> "tokamax.RaggedDot"; "ragged-dot-metadata")
_OP_NAME = re.compile(r'op_name="([^"\\]*)')
_OP_TYPE = re.compile(r'__type\\*"\s*:\s*\\*"([\w.]+)')
# custom calls XLA itself emits for bookkeeping, not kernels
_BOOKKEEPING = (
    "AllocateBuffer",
    "PrepareAsyncCall",
    "AssumeGatherIndicesInBound",
    "GatherScatterIndicesBitpacked",
    "Sharding",
    "SPMDFullToShardShape",
    "SPMDShardToFullShape",
    "MoveToHost",
    "MoveToDevice",
    "annotate_device_placement",
    "X64Combine",
    "X64SplitLow",
    "X64SplitHigh",
    "LayoutConstraint",
    "cu_threefry2x32",
    "ConcatBitcast",
)


def shape_bytes(text: str) -> float:
    """Bytes of an HLO result type: `bf16[8,128]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _ITEMSIZE:
            total += _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes"}} over every collective instruction (async starts
    counted once; "-done" halves are not instructions of their own kind here)."""
    out: dict = collections.defaultdict(lambda: {"count": 0, "bytes": 0.0})
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        result_type, kind = m.group(1), m.group(2)
        if m.group(3) and result_type.startswith("("):
            # an async start's result is (operands, outputs[, context]): count the outputs
            parts = _split_tuple(result_type)
            result_type = parts[1] if len(parts) > 1 else result_type
        out[kind]["count"] += 1
        out[kind]["bytes"] += shape_bytes(result_type)
    return dict(out)


def _split_tuple(text: str) -> list[str]:
    """Top-level elements of an HLO tuple type '(a, (b, c), d)'."""
    inner, depth, cur, parts = text.strip()[1:-1], 0, "", []
    for ch in inner:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts


def kernel_calls(hlo_text: str) -> dict[str, int]:
    """{kernel: count} of custom calls that are kernels: Mosaic TPU kernels by their
    kernel name ("tpu_custom_call:<name>"), other targets by target name."""
    out: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.search(line)
        if not m or m.group(1).startswith(_BOOKKEEPING):
            continue
        target = m.group(1)
        if target == "tpu_custom_call":
            target = f"tpu_custom_call:{_tpu_kernel_name(line)}"
        out[target] += 1
    return dict(out)


def _tpu_kernel_name(line: str) -> str:
    name = _KERNEL_NAME.search(line)
    if name:
        return name.group(1)
    inst = re.match(r"\s*(?:ROOT\s+)?%?([A-Za-z_][\w\-]*?)(?:\.\d+)?\s*=", line)
    if inst and not inst.group(1).startswith(("custom-call", "custom_call")):
        return inst.group(1)  # Pallas kernels name their instruction ("gmm_megablox")
    op = _OP_NAME.search(line)
    if not op:
        return "?"
    base = op.group(1).rsplit("/", 1)[-1].split(":", 1)[0].split("{", 1)[0]
    kind = _OP_TYPE.search(line[op.start() : op.start() + 2000])
    return f"{base}.{kind.group(1).rsplit('.', 1)[-1]}" if kind else base


def largest_buffers(hlo_text: str, n: int = 3) -> list[tuple[float, str]]:
    """The n largest instruction results (bytes, 'dtype[dims] op'): where to look
    when a program does not fit."""
    found = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*([a-z0-9]+\[[0-9,]*\])\S*\s+([\w\-]+)", line)
        if m:
            found.append((shape_bytes(m.group(1)), f"{m.group(1)} {m.group(2)}"))
    return sorted(found, reverse=True)[:n]
