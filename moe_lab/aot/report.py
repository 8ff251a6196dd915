"""Reading a CompileResult: per-device memory against HBM and the plan, collectives,
kernels, the MoE layer's FLOPs check, and the one line that says why a run cannot go."""

from __future__ import annotations

from moe_lab.accounting.plan import device_memory_gib
from moe_lab.aot.compile import CompileResult, Program, resident_bytes
from moe_lab.config.schema import Config
from moe_lab.parallel.topology import Topology, tpu_generation_of

GIB = 2**30
# the MoE layer's compiled FLOPs may exceed the analytic ones by this much (capacity
# padding, the router's softmax and top-k) before it counts as replicated expert work
FLOPS_TOLERANCE = 1.3


def hbm_bytes_per_device(result: CompileResult) -> float | None:
    gen = tpu_generation_of(result.device_kind) if result.platform == "tpu" else None
    if gen:
        return gen.hbm_gib_per_chip / gen.devices_per_chip * GIB
    if result.platform == "cpu":
        return device_memory_gib("cpu") * GIB / result.devices
    return None


def plan_total(plan: dict) -> int:
    """`moe-lab info`'s analytic bytes per device: params, optimizer, grads, activations."""
    return plan["params"] + plan["opt_state"] + plan["grads"] + plan["activations"]


# kernels whose FLOPs XLA's cost analysis counts: XLA:TPU's own ragged-dot emitter
# (lax.ragged_dot); a Pallas kernel (tokamax's gmm_megablox, flash attention) is opaque
_COUNTED_KERNELS = ("tpu_custom_call:ragged-dot",)


def flops_ratio(program: Program) -> float | None:
    """Compiled / analytic per-device FLOPs of the MoE layer; None where a kernel's
    custom call hides its FLOPs from the cost analysis, or nothing compiled."""
    opaque = [k for k in program.kernels if not k.startswith(_COUNTED_KERNELS)]
    if not program.ok or not program.flops or not program.analytic_flops or opaque:
        return None
    return program.flops / program.analytic_flops


def resize_error(cfg: Config, topo: Topology) -> str:
    """'' where the topology is the one the config states (mesh.plan_devices chips of
    mesh.plan_hardware), else why not (compile refuses it without --allow-resize)."""
    m = cfg.mesh
    if m.plan_devices and m.plan_devices != topo.devices:
        return (
            f"{cfg.name} states {m.plan_devices} devices (mesh.plan_devices) but "
            f"{topo.libtpu_name} has {topo.devices}; pass --allow-resize to compile anyway"
        )
    if m.plan_hardware.startswith("tpu") and m.plan_hardware != topo.generation.hardware:
        return (
            f"{cfg.name} is written for {m.plan_hardware} (mesh.plan_hardware), not "
            f"{topo.generation.hardware}; pass --allow-resize to compile anyway"
        )
    return ""


def slices_error(cfg: Config, num_slices: int) -> str:
    """'' where the mesh's DCN axis spans `num_slices` slices (mesh.dcn_data), else why not."""
    if cfg.mesh.dcn_data == num_slices:
        return ""
    what = (
        "the mesh has no DCN axis to span slices with"
        if cfg.mesh.dcn_data == 1
        else f"the mesh spans mesh.dcn_data={cfg.mesh.dcn_data} slices"
    )
    return (
        f"--num-slices {num_slices}: {what}; set --config.mesh.dcn_data={num_slices} "
        "(data parallelism across slices)"
    )


def _gib(b: float) -> str:
    return f"{b / GIB:.3f} GiB" if b < 10 * GIB else f"{b / GIB:.1f} GiB"


def _bytes(b: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def format_report(result: CompileResult, where: str) -> str:
    hbm = hbm_bytes_per_device(result)
    plan = plan_total(result.plan)
    lines = [
        f"compiled {result.cfg.name} for {where}",
        f"mesh {result.mesh_shape} ({result.device_kind}, {result.devices} devices)",
        *result.kernel_notes,
    ]
    for name, p in result.programs.items():
        if not p.ok:
            lines.append(f"{name:<9} FAILED after {p.seconds:.1f} s: {p.error}")
            continue
        mem = p.memory
        resident = resident_bytes(mem)
        line = (
            f"{name:<9} {p.seconds:6.1f} s | per device: "
            + (f"peak {_gib(mem['peak'])}, " if mem.get("peak") else "")
            + f"total {_gib(mem['total'])}"
            + (f"; {100 * resident / hbm:.0f}% of {hbm / GIB:g} GiB HBM" if hbm else "")
            + f" (args {_gib(mem['arguments'])}, out {_gib(mem['outputs'])}, aliased "
            f"{_gib(mem['aliased'])}, temp {_gib(mem['temporaries'])})"
        )
        if name == "train":
            line += f" | plan {_gib(plan)} (compiler / plan {mem['total'] / plan:.2f})"
        lines.append(line)
        coll = (
            ", ".join(f"{k} {v['count']} ({_bytes(v['bytes'])})" for k, v in sorted(p.collectives.items()))
            or "none"
        )
        kern = ", ".join(f"{k} x{v}" for k, v in sorted(p.kernels.items())) or "none (XLA only)"
        lines.append(f"{'':<9} collectives: {coll} | kernels: {kern}")
        if name == "moe_layer":
            ratio = flops_ratio(p)
            lines.append(
                f"{'':<9} MoE layer FLOPs per device: compiled {p.flops:.4g}, analytic "
                f"{p.analytic_flops:.4g}"
                + (
                    f" (ratio {ratio:.2f}; > {FLOPS_TOLERANCE}: expert work replicated)"
                    if ratio
                    else " (kernel FLOPs are invisible to the cost analysis)"
                )
            )
    return "\n".join(lines)


def failure_line(result: CompileResult) -> str:
    """'' if the train step compiled and fits, else one line saying why not."""
    train = result.programs.get("train")
    if train is None:
        failed = [p for p in result.programs.values() if not p.ok]
        return f"{failed[0].name} does not compile: {failed[0].error}" if failed else ""
    if not train.ok:
        return f"the train step does not compile: {train.error}"
    hbm = hbm_bytes_per_device(result)
    if hbm and resident_bytes(train.memory) > hbm:
        big = "; ".join(f"{desc} {_bytes(b)}" for b, desc in train.largest)
        return (
            f"the train step does not fit: {_gib(resident_bytes(train.memory))} per device > "
            f"{hbm / GIB:g} GiB HBM (temporaries {_gib(train.memory['temporaries'])}; "
            f"largest buffers: {big})"
        )
    return ""
