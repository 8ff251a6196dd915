"""`moe-lab export --workdir RUN [--step N] --to HFDIR`: a moe_lab checkpoint -> files
that `transformers.AutoModelForCausalLM.from_pretrained(HFDIR)` and
`AutoTokenizer.from_pretrained(HFDIR)` load.

    HFDIR/config.json            the HF class that computes what the model does
                                 (hf_config.architecture_for: dense -> Llama, ...)
    HFDIR/model.safetensors      (model-0000k-of-0000N.safetensors + index above 5 GB)
    HFDIR/tokenizer.json, tokenizer_config.json, generation_config.json

What no HF class represents (MoR, expert choice, the loss-free sigmoid router,
post-norm, ...) is refused before any checkpoint is read.  The tensors are written as
a stream, one at a time (safetensors_io.py), into HFDIR.exporting-<pid>, renamed into
place when complete; the checkpoint is read one leaf at a time (a partial restore per
leaf), so export holds one leaf and one tensor, not the model.
"""

from __future__ import annotations

import json
import os

from moe_lab.config.load import config_from_json
from moe_lab.config.schema import ConfigError
from moe_lab.interop import hf_config, hf_weights
from moe_lab.interop.hf_tokenizer import write_hf_tokenizer
from moe_lab.interop.safetensors_io import write_sharded
from moe_lab.train.checkpoint import Checkpointer
from moe_lab.train.run_dir import building, check_new_run_dir, config_path, run_tokenizer


def export_hf(
    workdir: str, to_dir: str, *, step: int | None = None, shard_bytes: int | None = None, log=print
) -> dict:
    """Writes the HF files of run `workdir` at `step` (default: latest); returns config.json."""
    if not os.path.isfile(config_path(workdir)):
        raise ConfigError(f"export: --workdir {workdir} holds no run (no config.json)")
    cfg = config_from_json(config_path(workdir))
    m = cfg.model
    arch = hf_config.architecture_for(m)  # refusals before anything is read
    dst = check_new_run_dir(to_dir, "export: --to")
    tok = run_tokenizer(workdir, cfg)
    hf = hf_config.hf_config_of(m, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    with Checkpointer(workdir, create=False) as ckpt:
        step = ckpt.resolve_step(step, "export")
        specs = hf_weights.hf_specs(m, arch, ckpt.saved_shapes(step)["params"])

        def leaf_of(path):  # one leaf in memory at a time (a partial restore each)
            return ckpt.restore_leaf(step, ("params", *path))

        with building(dst, "exporting") as tmp:
            files = write_sharded(
                tmp,
                specs,
                lambda: hf_weights.hf_tensors(m, arch, leaf_of),
                **({"shard_bytes": shard_bytes} if shard_bytes else {}),
            )
            write_hf_tokenizer(tok, tmp, m.max_seq_len)
            for name, obj in (
                ("config.json", hf),
                (
                    "generation_config.json",
                    {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
                ),
            ):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2)
    log(
        f"export: {workdir} step {step} -> {dst} ({arch}, {len(files)} safetensors file"
        f"{'s' if len(files) > 1 else ''}, {m.param_dtype})"
    )
    return hf
