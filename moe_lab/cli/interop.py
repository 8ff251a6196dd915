"""`moe-lab import` and `moe-lab export`: HF transformers checkpoints in and out.

    moe-lab import --hf HFDIR --to RUN [--config.a.b=V ...]
    moe-lab export --workdir RUN [--step N] --to HFDIR

import reads HFDIR/config.json, its safetensors (sharded or not) and its tokenizer
for LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM and
OlmoeForCausalLM, and writes a run (config.json, checkpoint step 0, tokenizer,
lineage.json) that `moe-lab train / eval / grow --workdir RUN` use like any other.
export writes what `transformers.AutoModelForCausalLM.from_pretrained(HFDIR)` loads.
Neither writes into a directory that exists and is not empty.
"""

from __future__ import annotations

import argparse

from moe_lab.config.schema import ConfigError
from moe_lab.interop.hf_export import export_hf
from moe_lab.interop.hf_import import import_hf


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("import", help="a HF transformers checkpoint -> a moe_lab run")
    p.add_argument(
        "--hf", required=True, help="HF model directory (config.json, safetensors, tokenizer.json)"
    )
    p.add_argument("--to", dest="to_dir", required=True, help="new run directory")
    p.set_defaults(fn=run_import)
    return p


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="a moe_lab checkpoint -> HF transformers files")
    p.add_argument("--workdir", required=True, help="the run to export")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--to", dest="to_dir", required=True, help="new HF model directory")
    p.set_defaults(fn=run_export)
    return p


def run_import(args, overrides: dict) -> int:
    import_hf(args.hf, args.to_dir, overrides)
    return 0


def run_export(args, overrides: dict) -> int:
    if overrides:
        raise ConfigError("export takes no --config overrides (it writes the run as it is)")
    export_hf(args.workdir, args.to_dir, step=args.step)
    return 0
