"""TPU pod slices by name: generations, chip counts, and compile-only devices.

A slice is named two ways, and both parse here:

  * libtpu's topology form "v5p:4x4x8" (chips along each torus axis), and
  * Cloud TPU's accelerator-type form "v5p-256".  The number counts TensorCores on
    generations with two per chip that appear as one megacore device (v4, v5p: a
    v5p-256 is 128 chips) and chips on one-core generations (v5e, v6e: a v6e-256 is
    256 chips).  tpu7x (Ironwood) shows its two TensorCores as two devices and is
    taken in the topology form only.

`compile_devices(topology)` asks libtpu for the slice's devices: compile-only
devices that `jax.jit(...).lower(...).compile()` targets from any host, CPU
included (MaxText's train_compile.py works the same way).  Nothing runs on them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from jax.experimental import topologies

from moe_lab.config.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str  # libtpu's name ("v5p")
    dims: int  # torus dimensions (3: v4, v5p, tpu7x; 2: v5e, v6e)
    devices_per_chip: int  # jax devices a chip shows (2 on tpu7x, else 1)
    cores_in_name: int  # TensorCores per chip counted by the "-N" name (0: no such name)
    hbm_gib_per_chip: float  # datasheet HBM per chip
    bf16_tflops_per_chip: float  # datasheet dense bf16 peak per chip
    chip_config: str = "default"  # libtpu chip config (v4: megacore, one device a chip)
    hardware: str = ""  # the memory-plan key (accounting/plan.py), e.g. "tpu-v5p"


# Datasheets (cloud.google.com/tpu/docs/<generation>): HBM and dense bf16 peak per chip.
GENERATIONS = {
    g.name: g
    for g in (
        TpuGeneration("v4", 3, 1, 2, 32, 275, chip_config="megacore", hardware="tpu-v4"),
        TpuGeneration("v5e", 2, 1, 1, 16, 197, hardware="tpu-v5e"),
        TpuGeneration("v5p", 3, 1, 2, 95, 459, hardware="tpu-v5p"),
        TpuGeneration("v6e", 2, 1, 1, 32, 918, hardware="tpu-v6e"),
        TpuGeneration("tpu7x", 3, 2, 0, 192, 2307, hardware="tpu-7x"),
    )
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v7x": "tpu7x"}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: TpuGeneration
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def devices(self) -> int:
        return self.chips * self.generation.devices_per_chip

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def hbm_gib_per_device(self) -> float:
        return self.generation.hbm_gib_per_chip / self.generation.devices_per_chip

    def describe(self) -> str:
        g = self.generation
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return (
            f"{self.libtpu_name}{slices}: {self.chips} chips, {self.devices} devices, "
            f"{self.hbm_gib_per_device:g} GiB HBM and "
            f"{g.bf16_tflops_per_chip / g.devices_per_chip:g} bf16 TFLOP/s per device"
        )


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The torus Cloud TPU gives a slice of `chips` chips: from 2x2(x1), double the
    last of the smallest axes (v5p-128 -> 4x4x4, v5p-256 -> 4x4x8, v6e-256 -> 16x16)."""
    if chips < 4 or chips & (chips - 1):
        small = {1: (1, 1), 2: (1, 2)}.get(chips)
        if small is None:
            raise ConfigError(
                f"topology: {chips} chips is not a power of two >= 4 (give the torus, e.g. v5p:4x4x8)"
            )
        return small + (1,) * (dims - 2)
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p:4x4x8' or 'v5p-256' (Cloud naming, see module doc) -> Topology."""
    text = name.strip().lower().removeprefix("tpu-")
    m = re.fullmatch(r"([a-z0-9]+?)(?::(\d+(?:x\d+)*)|-(\d+))", text)
    gen_name = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen_name not in GENERATIONS:
        raise ConfigError(
            f"unknown TPU topology {name!r}: use GEN:AxB[xC] or GEN-N with GEN one "
            f"of {', '.join(GENERATIONS)} (e.g. v5p:4x4x8, v5p-256, v6e:16x16)"
        )
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
    gen = GENERATIONS[gen_name]
    if m.group(2):
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise ConfigError(
                f"topology {name!r}: {gen.name} is a {gen.dims}-D torus "
                f"(e.g. {gen.name}:{'x'.join(['2'] * 2 + ['1'] * (gen.dims - 2))})"
            )
        return Topology(gen, shape, num_slices)
    if not gen.cores_in_name:
        raise ConfigError(
            f"topology {name!r}: name {gen.name} slices by torus ({gen.name}:AxBxC), not by a core count"
        )
    count = int(m.group(3))
    if count % gen.cores_in_name:
        raise ConfigError(
            f"topology {name!r}: {gen.name}-N counts {gen.cores_in_name} "
            f"TensorCores per chip, so N is a multiple of {gen.cores_in_name}"
        )
    return Topology(gen, default_shape(count // gen.cores_in_name, gen.dims), num_slices)


def tpu_generation_of(device_kind: str) -> TpuGeneration | None:
    """The generation of a jax device kind ('TPU v5', 'TPU v6 lite', 'TPU7x', ...)."""
    kind = device_kind.lower().replace(" ", "")
    table = {
        "tpuv4": "v4",
        "tpuv5lite": "v5e",
        "tpuv5e": "v5e",
        "tpuv5": "v5p",
        "tpuv5p": "v5p",
        "tpuv6lite": "v6e",
        "tpuv6e": "v6e",
        "tpu7x": "tpu7x",
    }
    return GENERATIONS.get(table.get(kind, ""))


def quiet_libtpu_on_cpu_host() -> None:
    """libtpu prints 5 warning lines when it starts on a host without TPU chips (no
    TPU metadata server, no worker hostnames), and takes a lock that one process
    holds.  On such a host (no /dev/accel*, no /dev/vfio devices) its variables are
    set to a one-host, no-metadata start unless the user set them; a TPU VM is left
    alone."""
    on_tpu_vm = any(n.startswith("accel") for n in _listdir("/dev")) or any(
        n.isdigit() for n in _listdir("/dev/vfio")
    )
    if on_tpu_vm:
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # only read at start-up
    # libtpu locks /tmp/libtpu_lockfile for the one process that owns the chips; with
    # no chips, several compile-only processes (a test suite's workers) may share it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


LIBTPU_MISSING = (
    "libtpu is not installed: compiling for a TPU topology needs it "
    '(pip install "jax[tpu]==<your jax version>", or `pip install -e .[dev]`)'
)


def compile_devices(topology: Topology) -> list:
    """libtpu's compile-only devices of the slice(s), slice-major."""
    if not libtpu_installed():
        raise ConfigError(LIBTPU_MISSING)
    quiet_libtpu_on_cpu_host()
    kwargs = {"num_slices": topology.num_slices} if topology.num_slices > 1 else {}
    if topology.generation.chip_config != "default":
        kwargs["chip_config_name"] = topology.generation.chip_config
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name, **kwargs)
    return list(desc.devices)
