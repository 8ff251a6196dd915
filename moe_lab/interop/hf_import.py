"""`moe-lab import --hf DIR --to RUN`: a HF transformers checkpoint -> a moe_lab run.

    RUN/config.json                  derived from DIR/config.json (hf_config.py), then the
                                     --config.a.b=V overrides (data, train, eval, ...)
    RUN/checkpoints/0/               the weights (Orbax), step 0, no optimizer state (a
                                     restore starts Adam fresh)
    RUN/tokenizer/tokenizer.json     DIR's tokenizer (or tokenizer.model)
    RUN/lineage.json                 the source: directory, class, file sizes and sha256

Every tensor's shape is checked against the config first, from the safetensors headers
(a tensor that does not fit is named before anything is read).  The params tree is then
one `LazyArray` per leaf (train/checkpoint.py): the checkpoint writer makes each leaf in
turn (reading its HF tensors one at a time, with plain reads, not a memory map:
safetensors_io.TensorReader), writes it and drops it, so the import holds one leaf and
one tensor, never the model.  Measured on the 429 MB `moe-lab bench interop`
checkpoint: the whole tree made first and saved by Orbax in one call peaked at 2.9x the
checkpoint above the interpreter (1.0x of it the memory-mapped files, 1.8x the tree
and Orbax's copies); experiments/interop/README.md has the streamed figures.
Everything is written into RUN.importing-<pid> and renamed into place: a failed import
leaves nothing.

The tokenizer's pad / BOS / EOS take the vocabulary's own tokens (data/tokenizer.py
ROLE_ALIASES); the task delimiters (<think>, <answer>, ...) a pretrained vocabulary lacks
get ids after it.  Where those ids do not fit in the checkpoint's vocab_size, the
embedding (and unembedding) gain rows initialised to the mean of the existing rows
(as transformers' resize_token_embeddings does), the log says so, and the model's
probabilities over the original vocabulary shift slightly; export writes the larger
vocab_size.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import ml_dtypes
import numpy as np

from moe_lab.config.load import apply_overrides, from_dict
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate
from moe_lab.data.sources import file_sha256
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.interop import hf_config, hf_weights
from moe_lab.interop.safetensors_io import TensorReader
from moe_lab.models import tree
from moe_lab.train.checkpoint import LazyArray, write_checkpoint
from moe_lab.train.run_dir import (
    building,
    check_new_run_dir,
    config_path,
    keep_tokenizer,
    lineage_path,
    write_json_atomic,
)
from moe_lab.train.state import resolve_config, setup_on_devices

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def safetensors_files(hf_dir: str) -> list[str]:
    """The checkpoint's .safetensors files (the index's, when sharded)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(hf_dir, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"import: {index} names {missing[0]}, which does not exist")
        return files
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ConfigError(
            f"import: {hf_dir} holds no .safetensors weights (a PyTorch .bin "
            f"checkpoint must be re-saved with safe_serialization=True)"
        )
    return files


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"import: {hf_dir} has no config.json (not a HF model directory)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"import: {path} is not valid JSON ({e.msg})") from None


def hf_tokenizer_file(hf_dir: str) -> str:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            return os.path.join(hf_dir, name)
    raise ConfigError(f"import: {hf_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def imported_config(hf_dir: str, overrides: dict | None = None) -> tuple[Config, str, dict]:
    """(the run's Config, HF class, HF config) before any tensor is read."""
    hf = read_hf_config(hf_dir)
    model = hf_config.model_config_of(hf)
    tok = load_tokenizer(hf_tokenizer_file(hf_dir))
    # room for the specials the vocabulary lacks (see the module docstring)
    model = dataclasses.replace(model, vocab_size=max(model.vocab_size, tok.vocab_size))
    raw = Config(model=model, name=os.path.basename(os.path.normpath(hf_dir))).to_dict()
    raw["data"]["tokenizer"] = os.path.abspath(tok.source)
    raw["data"]["seq_len"] = min(raw["data"]["seq_len"], model.max_seq_len)  # short contexts
    cfg = validate(from_dict(Config, apply_overrides(raw, overrides or {})))
    return resolve_config(cfg, tokenizer=tok), hf["architectures"][0], hf


def _with_mean_rows(make, vocab_size: int, axis: int):
    """make() with rows past the checkpoint's vocabulary appended on `axis` (embedding:
    0, unembedding: 1), each the mean of the checkpoint's rows, so the new ids start
    where the model's average token is (as transformers' resize_token_embeddings)."""

    def grown():
        a = make()
        extra = vocab_size - a.shape[axis]
        mean = a.astype(np.float32).mean(axis=axis, keepdims=True).astype(a.dtype)
        return np.concatenate([a, np.repeat(mean, extra, axis=axis)], axis=axis)

    return grown


def lazy_params(m_hf, arch: str, reader: TensorReader, abstract_hf: dict, vocab_size: int, dtype) -> dict:
    """The params tree with a LazyArray per leaf (train/checkpoint.py): nothing is read
    until the checkpoint writer makes the leaf, one leaf at a time."""
    params: dict = {}
    for path, shape, make in hf_weights.param_makers(m_hf, arch, reader, abstract_hf, dtype):
        axis = {("embed_VD",): 0, ("unembed_DV",): 1}.get(path)
        if axis is not None and shape[axis] != vocab_size:
            make = _with_mean_rows(make, vocab_size, axis)
            shape = tuple(vocab_size if a == axis else d for a, d in enumerate(shape))
        params = tree.replace(params, path, LazyArray(shape, dtype, make))
    return params


def import_hf(hf_dir: str, to_dir: str, overrides: dict | None = None, *, log=print) -> dict:
    """Imports the HF checkpoint in hf_dir as a new run to_dir; returns the lineage."""
    dst = check_new_run_dir(to_dir, "import: --to")
    cfg, arch, hf = imported_config(hf_dir, overrides)
    files = safetensors_files(hf_dir)
    reader = TensorReader(files)
    hf_vocab = int(hf["vocab_size"])
    m_hf = dataclasses.replace(cfg.model, vocab_size=hf_vocab)
    missing = [n for n in hf_weights.hf_names(m_hf, arch) if n not in reader.names()]
    if missing:
        raise ConfigError(
            f"import: the checkpoint has no tensor {missing[0]} "
            f"({len(missing)} missing; is config.json the checkpoint's own?)"
        )
    setup = setup_on_devices(cfg)[1]
    abstract = setup.abstract_state
    want = abstract["params"]
    if hf_vocab != cfg.model.vocab_size:
        want = setup_on_devices(cfg.replace(model=m_hf))[1].abstract_state["params"]
    try:  # every tensor's shape, from the headers, before anything is read or written
        hf_weights.check_shapes(m_hf, arch, reader.shape, want)
    except hf_weights.HFShapeError as e:
        raise ConfigError(f"import: {e}") from None
    params = lazy_params(m_hf, arch, reader, want, cfg.model.vocab_size, NP_DTYPES[cfg.model.param_dtype])
    if hf_vocab != cfg.model.vocab_size:
        log(
            f"import: the tokenizer needs {cfg.model.vocab_size} ids, the checkpoint has "
            f"{hf_vocab}: {cfg.model.vocab_size - hf_vocab} embedding rows added (mean-"
            f"initialised); export will write vocab_size={cfg.model.vocab_size}"
        )

    def zeros(s):
        return np.zeros(s.shape, s.dtype)

    # no optimizer state: a restore gives fresh Adam moments (train/checkpoint.py), and
    # the checkpoint is a third of the size it would be with two zero moments
    state = {
        "params": params,
        "model_state": jax.tree.map(zeros, abstract["model_state"]),
        "step": np.zeros((), np.int32),
    }
    sources = [*files, os.path.join(hf_dir, "config.json"), cfg.data.tokenizer]
    # the lineage's hashes are computed beside the checkpoint write (hashlib releases the
    # GIL; 0.3-0.5 s of the 429 MB benchmark's import otherwise)
    with ThreadPoolExecutor(1) as pool, building(dst, "importing") as tmp:
        hashes = pool.map(file_sha256, sources)
        write_checkpoint(
            tmp,
            0,
            state,
            {
                "tokens_seen": 0.0,
                "flops_spent": 0.0,
                "wall_seconds": 0.0,
                "imported_from": os.path.abspath(hf_dir),
            },
        )
        lineage = {
            "imported_from": os.path.abspath(hf_dir),
            "hf_architecture": arch,
            "hf_vocab_size": hf_vocab,
            "files": {
                os.path.basename(f): {"bytes": os.path.getsize(f), "sha256": h}
                for f, h in zip(sources, hashes, strict=True)
            },
        }
        keep_tokenizer(tmp, load_tokenizer(cfg.data.tokenizer))
        write_json_atomic(lineage_path(tmp), lineage)
        write_json_atomic(config_path(tmp), cfg.to_dict())
    m = cfg.model
    log(
        f"import: {arch} {hf_dir} -> {dst}: {m.num_layers} layers, d_model {m.d_model}"
        + (f", {m.moe.num_experts} experts top-{m.moe.top_k}" if m.ffn == "moe" else "")
        + f", vocab {m.vocab_size}, {m.param_dtype}"
    )
    return lineage
