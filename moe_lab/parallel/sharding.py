"""Meshes and the logical-axis rule table.

Modules name their dimensions logically ("embed", "mlp", "expert", ...); the
config's rule table maps each logical name to zero or more mesh axes
("data", "fsdp", "expert", "tensor").  This file turns (logical axes, rules,
mesh) into PartitionSpecs for parameters, optimizer state, batches and
activation constraints, and prints the table so nobody has to guess.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_lab.config.schema import MESH_AXES, ConfigError, MeshConfig

# The rules in force for activation constraints (set by `use_rules`).
_ACTIVE: dict[str, Any] = {"rules": None, "mesh": None}


def make_mesh(mesh_cfg: MeshConfig, devices: list | None = None) -> jax.sharding.Mesh:
    """The configured mesh on `devices` (default: all), laid out by jax's device-aware
    builder (a TPU torus: each mesh axis a product of physical axes).  Where no such
    assignment exists (data 2 x fsdp 8 x expert 8 on a 4x4x8 v5p torus), physical axes
    are split (mesh_utils' allow_split_physical_axes) rather than failing; a mesh that
    still cannot be laid out is a one-line ConfigError."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_cfg.shape(len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1 or mesh_cfg.dcn_data > 1:
        return _hybrid_mesh(mesh_cfg, shape, devices, slices, types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        pass
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape))} cannot be laid out on these "
            f"{len(devices)} {devices[0].device_kind} devices: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def _hybrid_mesh(mesh_cfg: MeshConfig, shape, devices, slices: int, types):
    """Multi-slice: data parallelism over DCN across the slices (mesh.dcn_data of them),
    every other axis inside a slice (mesh_utils.create_hybrid_device_mesh)."""
    if mesh_cfg.dcn_data != slices:
        raise ConfigError(
            f"the devices span {slices} slice(s) but mesh.dcn_data="
            f"{mesh_cfg.dcn_data}; set mesh.dcn_data={slices} (data "
            "parallelism across slices)"
        )
    if shape[0] % slices:
        raise ConfigError(f"mesh data={shape[0]} does not split over {slices} slices")
    ici = (shape[0] // slices,) + tuple(shape[1:])
    dcn = (slices,) + (1,) * (len(shape) - 1)
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError) as e:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, shape))} over {slices} slices cannot be "
            f"laid out: {str(e).splitlines()[0][:200]}"
        ) from None
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def mesh_platform(mesh) -> str | None:
    """The platform of a mesh's devices ('cpu', 'tpu', 'gpu'); None for an abstract mesh."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    return None


def make_abstract_mesh(mesh_cfg: MeshConfig, num_devices: int):
    """A device-less mesh of the configured shape (plans for pods on a laptop)."""
    shape = mesh_cfg.shape(num_devices)
    return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Iterable[str | None], rules, mesh=None, shape: tuple[int, ...] | None = None, name: str = ""
) -> P:
    """Maps logical names to a PartitionSpec; a mesh axis is used at most once.

    With `shape` and `mesh`, mesh axes that do not divide the dimension are an
    error naming the array (GSPMD would pad silently and waste memory).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, la in enumerate(logical_axes):
        axes = tuple(a for a in _as_tuple(table.get(la)) if a not in used) if la else ()
        if mesh is not None:  # an axis the mesh lacks (a hand-made mesh) shards nothing
            axes = tuple(a for a in axes if dict(mesh.shape).get(a, 1) > 1)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                raise ConfigError(
                    f"sharding: {name or 'array'} dim {i} ('{la}', size {shape[i]}) is not "
                    f"divisible by mesh axes {axes} (size {size}); change the mesh or mesh.rules"
                )
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def variable_logical_axes(variable: nnx.Variable) -> tuple:
    """A variable's logical axes; stacked (scanned) layers get a leading 'layers'."""
    axes = logical_axes_of(variable) or (None,) * variable.ndim
    extra = variable.ndim - len(axes)
    return ("layers",) * extra + tuple(axes)


def state_logical_axes(abstract_model: nnx.Module, variable_type=nnx.Variable) -> dict:
    """Pure-dict tree of logical-axis tuples for the model's variables."""
    state = nnx.state(abstract_model, variable_type)
    pure = nnx.to_pure_dict(state)  # same nesting; leaves replaced below
    flat = dict(nnx.to_flat_state(state))
    return _replace_leaves(pure, (), flat)


def _replace_leaves(node, path, flat):
    if isinstance(node, dict):
        return {k: _replace_leaves(v, path + (k,), flat) for k, v in node.items()}
    return variable_logical_axes(flat[path])


def tree_specs(logical_tree: dict, shapes_tree: dict, rules, mesh) -> dict:
    def one(path, la, shape):
        return logical_to_spec(la, rules, mesh, shape.shape, jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(
        one, logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple)
    )


def opt_state_specs(tx: optax.GradientTransformation, opt_shapes, param_specs):
    """Optimizer moments take their parameter's spec; counters are replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        opt_shapes,
        param_specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )


def named(mesh, spec_tree):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules, mesh=None) -> P:
    return logical_to_spec(("batch", None), rules, mesh)


@contextlib.contextmanager
def use_rules(rules, mesh):
    """Activates the rule table for `constrain` (activation sharding constraints)."""
    old = dict(_ACTIVE)
    _ACTIVE.update(rules=rules, mesh=mesh)
    try:
        yield
    finally:
        _ACTIVE.update(old)


def ambient_mesh():
    """The mesh of the enclosing `jax.set_mesh` (abstract: this runs while tracing), or
    None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


@contextlib.contextmanager
def model_rules(rules):
    """A model's own rule table, in force while it is traced under `jax.set_mesh` and no
    caller has set one (`use_rules` wins): the rules travel with the model, so tracing
    it from a notebook or a new script keeps its constraints and its all-to-all."""
    if _ACTIVE["rules"] is not None or ambient_mesh() is None:
        yield
        return
    with use_rules(rules, ambient_mesh()):
        yield


def active_rules_and_mesh():
    """(rules, mesh) set by `use_rules` while a model is traced; (None, None) outside."""
    return _ACTIVE["rules"], _ACTIVE["mesh"]


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without active rules."""
    rules, mesh = _ACTIVE["rules"], _ACTIVE["mesh"]
    if rules is None or mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def format_rules(rules, mesh) -> str:
    platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else "planned (abstract)"
    lines = [f"mesh {dict(mesh.shape)} on {mesh.size} {platform} device(s)", "logical axis -> mesh axes"]
    for la, axes in rules:
        active = [a for a in _as_tuple(axes) if mesh.shape.get(a, 1) > 1]
        lines.append(
            f"  {la:<10} -> {', '.join(_as_tuple(axes)) or '(replicated)'}"
            + ("" if active or not _as_tuple(axes) else "   [size-1 axes: replicated]")
        )
    return "\n".join(lines)


def describe_specs(spec_tree, max_lines: int = 40) -> str:
    flat = jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=lambda x: isinstance(x, P))[0]
    lines = [f"  {jax.tree_util.keystr(p):<48} {s}" for p, s in flat[:max_lines]]
    if len(flat) > max_lines:
        lines.append(f"  ... {len(flat) - max_lines} more")
    return "\n".join(lines)


def host_local_batch_to_global(batch: dict[str, np.ndarray], mesh, spec: P) -> dict:
    """Builds global jax.Arrays from each process's local slice of the batch."""
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


LOGICAL_AXES_KEY = "logical_axes"


def logical_axes_of(variable: nnx.Variable) -> tuple | None:
    return variable.get_metadata().get(LOGICAL_AXES_KEY)
