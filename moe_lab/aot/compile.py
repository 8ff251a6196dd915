"""Ahead-of-time compilation of a run for any device set, a TPU pod from a CPU host included.

`compile_run(cfg, devices)` lowers and compiles what `moe-lab train` would run on
those devices: the same jitted train step (train/step.py: jit_train_step, with the
state's shardings and donation), the eval step and the KV-cache decode step, plus
one MoE layer's forward pass alone, whose FLOPs the compiler's cost analysis can
count (a scanned stack shows its body once; a Pallas kernel's custom call shows
none; XLA:TPU's own ragged-dot kernel is counted exactly forward, but its weight-
gradient form as if dense over the groups, so the check is on the forward pass,
whose sharding the backward mirrors).
Nothing runs: the devices may be libtpu's compile-only devices
(parallel/topology.py).  For each program it reports the compiler's per-device
memory, the collectives and kernel calls in the optimised HLO, and compile time.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from moe_lab.accounting import flops
from moe_lab.accounting.plan import memory_plan
from moe_lab.aot import hlo
from moe_lab.config.schema import Config, ConfigError, parse_mixture
from moe_lab.config.validate import validate_for_devices
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.eval.generate import decode_logits
from moe_lab.layers import kernel_choice
from moe_lab.layers.base import dtype_of
from moe_lab.layers.moe import MoE
from moe_lab.models.transformer import total_aux_loss
from moe_lab.parallel import sharding
from moe_lab.train.state import make_setup, resolve_config
from moe_lab.train.step import batch_shapes, jit_eval_step, jit_train_step

PROGRAMS = ("train", "eval", "decode", "moe_layer")


@dataclasses.dataclass
class Program:
    """One compiled program, per device."""

    name: str
    seconds: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)  # bytes: see memory_stats
    collectives: dict = dataclasses.field(default_factory=dict)  # hlo.collectives
    kernels: dict = dataclasses.field(default_factory=dict)  # hlo.kernel_calls
    flops: float | None = None  # the compiler's cost analysis (XLA ops only)
    analytic_flops: float | None = None  # what the program should cost per device
    error: str = ""  # the compiler's first line where it failed
    largest: list = dataclasses.field(default_factory=list)  # hlo.largest_buffers

    @property
    def ok(self) -> bool:
        return not self.error

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompileResult:
    cfg: Config
    devices: int
    platform: str
    device_kind: str
    mesh_shape: dict
    plan: dict  # accounting/plan.py: memory_plan, bytes per device
    kernel_notes: tuple
    programs: dict  # name -> Program

    def to_dict(self) -> dict:
        return {
            "name": self.cfg.name,
            "devices": self.devices,
            "platform": self.platform,
            "device_kind": self.device_kind,
            "mesh": self.mesh_shape,
            "plan": self.plan,
            "kernel_notes": list(self.kernel_notes),
            "programs": {k: p.to_dict() for k, p in self.programs.items()},
        }


def memory_stats(compiled) -> dict:
    """The compiler's per-device bytes: arguments, outputs, aliased (donated inputs
    reused as outputs), temporaries, generated code, and their total in HBM."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    # the most bytes live at once (arguments included): what the compiler's own HBM check
    # enforces.  Below the total on scanned stacks, whose temp_size counts buffers that
    # are never live together (experiments/pod_plans/README.md); 0 where not reported
    out["peak"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


def resident_bytes(memory: dict) -> int:
    """Bytes a program needs on the device: the compiler's peak where it reports one,
    else the total (arguments + outputs - aliased + temporaries + code)."""
    return memory.get("peak") or memory["total"]


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:400]}"


def _compile(program: Program, devices, lower) -> Program:
    """Lowers (under the first device as default: tokamax's kernels ask the default
    device what they run on) and compiles; failures are recorded, not raised."""
    t0 = time.perf_counter()
    try:
        with jax.default_device(devices[0]):
            compiled = lower().compile()
    except Exception as e:  # the compiler's verdict is the report
        program.error, program.seconds = _first_line(e), time.perf_counter() - t0
        return program
    program.seconds = time.perf_counter() - t0
    text = compiled.as_text()
    program.memory = memory_stats(compiled)
    program.collectives = hlo.collectives(text)
    program.kernels = hlo.kernel_calls(text)
    program.largest = hlo.largest_buffers(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    program.flops = float(cost["flops"]) if cost and "flops" in cost else None
    return program


def compile_run(cfg: Config, devices: list, programs=PROGRAMS) -> CompileResult:
    """Compiles `programs` of cfg's run for `devices` (see module doc)."""
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ConfigError(f"unknown programs {sorted(unknown)} (one of {', '.join(PROGRAMS)})")
    tok = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve_config(cfg, tok)
    validate_for_devices(cfg, len(devices))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    setup = make_setup(cfg, mesh, tok)
    num_tasks = len(parse_mixture(cfg.data.mixture))
    out = {}
    with jax.set_mesh(mesh), sharding.use_rules(cfg.mesh.rules, mesh):
        if "train" in programs:
            batch = batch_shapes(setup, cfg.train.batch_size, cfg.data.seq_len)
            step = jit_train_step(setup, cfg, setup.graphdef, num_tasks, tok.eos_id)
            out["train"] = _compile(
                Program("train"), devices, lambda: step.lower(setup.abstract_state, batch)
            )
        if "eval" in programs:
            batch = batch_shapes(setup, cfg.train.batch_size, cfg.data.seq_len)
            step = jit_eval_step(setup, num_tasks)
            st = setup.abstract_state
            out["eval"] = _compile(
                Program("eval"), devices, lambda: step.lower(st["params"], st["model_state"], batch)
            )
        if "decode" in programs:
            out["decode"] = _compile(Program("decode"), devices, _decode_lowering(cfg, setup))
        if "moe_layer" in programs and cfg.model.ffn == "moe":
            out["moe_layer"] = _compile_moe_layer(cfg, setup, devices)
    return CompileResult(
        cfg=cfg,
        devices=len(devices),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        mesh_shape=dict(mesh.shape),
        plan=memory_plan(cfg, setup, mesh),
        kernel_notes=setup.kernel_notes,
        programs=out,
    )


def _decode_lowering(cfg: Config, setup):
    """One KV-cache decode step (eval/generate.py: decode_logits) for a batch of
    train.batch_size rows and a cache of data.seq_len slots, batch-sharded."""
    graphdef, st = setup.graphdef, setup.abstract_state
    rows, slots = cfg.train.batch_size, cfg.data.seq_len

    def cache_of(batch):
        return jax.eval_shape(
            lambda p, s: nnx.merge(graphdef, p, s).init_cache(batch, slots), st["params"], st["model_state"]
        )

    batch_axes = sharding.batch_spec(cfg.mesh.rules, setup.mesh)[0]

    def sharded(x, other=None):
        """x with its batch dimension (the one that differs from `other`, the same
        cache for one more row; a [B] vector's only one) over the batch axes."""
        dims = [None] * len(x.shape)
        batch = (
            0 if other is None else next(i for i, (a, b) in enumerate(zip(x.shape, other.shape)) if a != b)
        )
        dims[batch] = batch_axes
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(setup.mesh, jax.sharding.PartitionSpec(*dims))
        )

    cache = jax.tree.map(sharded, cache_of(rows), cache_of(rows + 1))
    token = sharded(jax.ShapeDtypeStruct((rows,), jnp.int32))

    def step(params, model_state, cache, token_B, pos_B, index):
        return decode_logits(nnx.merge(graphdef, params, model_state), token_B, pos_B, cache, index)

    fn = jax.jit(step, donate_argnums=2, out_shardings=(None, None))
    return lambda: fn.lower(
        st["params"], st["model_state"], cache, token, token, jax.ShapeDtypeStruct((), jnp.int32)
    )


def _compile_moe_layer(cfg: Config, setup, devices) -> Program:
    """One MoE layer of the model, forward, alone: the per-device FLOPs the compiler
    counts against the analytic forward FLOPs / devices.  A ratio well above 1 is
    expert work replicated across devices (every device sorting and computing every
    token's rows: the global-sort path measures X x on an expert axis of X).  Pallas
    kernels are invisible to the cost analysis: `flops` is then only the XLA part
    (Program.kernels says which, and report.flops_ratio gives no ratio)."""
    m, _ = kernel_choice.for_platform(cfg.model, setup.platform)
    rules, mesh = cfg.mesh.rules, setup.mesh
    abstract = nnx.eval_shape(lambda: MoE(m, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    logical = sharding.state_logical_axes(abstract, nnx.Param)
    p_pure, r_pure = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    specs = sharding.tree_specs(logical, p_pure, rules, mesh)
    p_abs = jax.tree.map(
        lambda s, sp: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, sp)),
        p_pure,
        specs,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    rows, seq = cfg.train.batch_size, cfg.data.seq_len
    x_spec = sharding.logical_to_spec(("batch", None, None), rules, mesh)
    x = jax.ShapeDtypeStruct(
        (rows, seq, m.d_model), dtype_of(m.compute_dtype), sharding=NamedSharding(mesh, x_spec)
    )

    def loss(p, x_BTD):
        layer = nnx.merge(graphdef, p, r_pure) if r_pure else nnx.merge(graphdef, p)
        y_BTD, aux = layer(x_BTD, train=True, rng=jax.random.key(0))
        return jnp.mean(y_BTD.astype(jnp.float32) ** 2) + total_aux_loss({"moe": aux})

    fn = jax.jit(loss)
    prog = _compile(Program("moe_layer"), devices, lambda: fn.lower(p_abs, x))
    prog.analytic_flops = flops.moe_layer_train_flops_per_token(m) / 3 * rows * seq / len(devices)
    return prog


def fits(result: CompileResult, hbm_bytes: float, headroom: float = 1.0) -> bool:
    train = result.programs.get("train")
    return bool(train and train.ok and resident_bytes(train.memory) <= headroom * hbm_bytes)
