"""`moe-lab info`: what a config costs before anyone runs it.

Parameters (total / active / sparsity), FLOPs per token, tokens per parameter,
per-device memory of params, optimizer state and activations under the mesh,
and the rule table with the resulting PartitionSpecs.
"""

from __future__ import annotations

import json
import os

import jax

from moe_lab.accounting import flops
from moe_lab.accounting.plan import device_memory_gib, memory_plan
from moe_lab.cli.args import config_from_args
from moe_lab.config.schema import Config
from moe_lab.config.validate import validate_for_devices
from moe_lab.data.corpus import describe_corpora
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.layers import expert_parallel
from moe_lab.parallel import sharding
from moe_lab.train.run_dir import lineage_path
from moe_lab.train.state import make_setup, resolve_config


def add_info_parser(subparsers):
    i = subparsers.add_parser("info", help="params, FLOPs, TPP, memory, mesh rules of a config")
    i.add_argument("--config")
    i.add_argument("--workdir")
    i.add_argument("--devices", type=int, help="plan for this many devices (abstract mesh)")
    i.add_argument("--hardware", help="chip kind for the memory plan: tpu-v5p, tpu-v6e, h100, ...")
    i.set_defaults(fn=cmd_info)
    return i


def cmd_info(args, overrides) -> int:
    cfg = config_from_args(args, overrides)
    print_info(cfg, workdir=getattr(args, "workdir", None), devices=args.devices, hardware=args.hardware)
    return 0


def print_info(
    cfg: Config, workdir: str | None = None, devices: int | None = None, hardware: str | None = None
) -> None:

    cfg = resolve_config(cfg)
    n = devices or cfg.mesh.plan_devices or jax.device_count()
    hardware = (
        hardware
        or cfg.mesh.plan_hardware
        or ("cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind.lower())
    )
    validate_for_devices(cfg, n)
    m = cfg.model
    s = flops.run_summary(cfg)
    print(
        f"config '{cfg.name}': d_model {m.d_model}, layers {m.num_layers}, heads {m.num_heads}"
        f"/{m.num_kv_heads} kv, ffn {m.ffn}, vocab {m.vocab_size}, seq {cfg.data.seq_len}"
    )
    if m.ffn == "moe":
        e = m.moe
        print(
            f"moe: {e.num_experts} experts x hidden {m.resolved_expert_hidden}, top-{e.top_k}, "
            f"{e.num_shared_experts} shared, router {e.router}, dispatch {e.dispatch}, "
            f"sparsity 1-k/E = {s['sparsity']:.3f}"
        )
    print(
        f"params: total {s['params_total']:,}  active {s['params_active']:,}  "
        f"(non-embedding {s['params_total_non_embedding']:,} / {s['params_active_non_embedding']:,})"
    )
    print(
        f"FLOPs/token: forward {s['forward_flops_per_token']:.4g}, train {s['train_flops_per_token']:.4g} "
        f"(2507.10524's iso-FLOP convention, no LM head, K/V at d x d: forward "
        f"{s['forward_flops_per_token_mor_paper']:.4g})"
    )
    print(
        f"run: {cfg.train.steps} steps x {cfg.train.batch_size} x {cfg.data.seq_len} = "
        f"{s['train_tokens']:,} tokens, {s['train_flops']:.4g} FLOPs, TPP {s['tpp']:.3g} "
        f"(1x Chinchilla for active size: {s['chinchilla_flops_active']:.3g} FLOPs)"
    )
    tok = load_tokenizer(cfg.data.tokenizer)
    print(f"tokenizer: {tok.describe()}")
    if cfg.data.corpus:
        print(describe_corpora(cfg.data.corpus, tok, s["train_tokens"], s["params_active"]))
    mesh = (
        sharding.make_mesh(cfg.mesh) if n == jax.device_count() else sharding.make_abstract_mesh(cfg.mesh, n)
    )
    print(sharding.format_rules(cfg.mesh.rules, mesh))
    if m.ffn == "moe":
        print(expert_parallel.plan_line(cfg, mesh))
    setup = make_setup(cfg, mesh)
    plan = memory_plan(cfg, setup, mesh)
    gib = 2**30
    steady = plan["params"] + plan["opt_state"] + plan["grads"]
    print(
        f"memory per device (mesh {dict(mesh.shape)}, {plan['batch_per_device']} sequences/device"
        f"{f' per microbatch of {cfg.train.microbatches}' if cfg.train.microbatches > 1 else ''}): "
        f"params {plan['params'] / gib:.3f} GiB, optimizer {plan['opt_state'] / gib:.3f} GiB, "
        f"grads {plan['grads'] / gib:.3f} GiB, activations ~{plan['activations'] / gib:.3f} GiB "
        f"with remat={m.remat} (remat=full: ~{plan['activations_remat_full'] / gib:.3f} GiB)"
    )
    step_flops = s["train_flops_per_token"] * cfg.train.batch_size * cfg.data.seq_len
    print(f"step FLOPs: {step_flops:.4g} total, {step_flops / n:.4g} per device")
    cap = device_memory_gib(hardware)
    if cap:
        total = (steady + plan["activations"]) / gib
        verdict = "fits" if total <= cap else "does NOT fit"
        remat_total = (steady + plan["activations_remat_full"]) / gib
        print(
            f"plan on {n} x {hardware} ({cap:.0f} GiB each): ~{total:.2f} GiB per device -> "
            f"{verdict}"
            + ("" if total <= cap or m.remat == "full" else f" (with remat=full ~{remat_total:.2f} GiB)")
        )
        if m.stack == "recursive":  # experiments/pod_plans/README.md
            print(
                "  (a recursive stack's plan is a lower bound with remat=dots or full, and an "
                "upper bound with remat=none; `moe-lab compile` gives the compiler's figure)"
            )
    print("parameter shardings:")
    print(sharding.describe_specs(setup.specs["params"]))
    if workdir and os.path.exists(lineage_path(workdir)):
        with open(lineage_path(workdir)) as f:
            print("lineage: " + json.dumps(json.load(f), indent=2))
