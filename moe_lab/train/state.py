"""Building the model, optimizer and sharded train state from a Config.

The model is first built abstractly (nnx.eval_shape: no memory, no compute) to
read its logical axes; the rule table turns them into shardings; then the real
initialisation runs under jit with those out_shardings, so every array is born
on its devices (no host round trip, no full copy on one device).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe_lab.config.schema import Config, ConfigError
from moe_lab.data.tokenizer import Tokenizer, load_tokenizer
from moe_lab.layers import kernel_choice
from moe_lab.layers.attention_kernels import attention_impl_error
from moe_lab.models.transformer import Transformer
from moe_lab.parallel import sharding
from moe_lab.train.optim import make_optimizer, make_schedule


def resolve_config(cfg: Config, tokenizer: Tokenizer | None = None) -> Config:
    """Fills derived values so config.json is explicit: the tokenizer's fingerprint and
    (model.vocab_size 0) its default vocabulary size.  A config that has both (a run's
    config.json) is returned as it is, without reading the tokenizer file; `tokenizer`
    (a run's own copy) is checked against the config's fingerprint."""
    d, m = cfg.data, cfg.model
    if tokenizer is None and m.vocab_size and d.tokenizer_fingerprint:
        return cfg
    tok = tokenizer or load_tokenizer(d.tokenizer)
    if d.tokenizer_fingerprint and d.tokenizer_fingerprint != tok.fingerprint:
        raise ConfigError(
            f"tokenizer {tok.source} has fingerprint {tok.fingerprint}, but the "
            f"run was made with {d.tokenizer_fingerprint}"
        )
    if m.vocab_size and m.vocab_size < tok.vocab_size:  # token ids past the embedding table
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} ids ({tok.source}; 0: use the tokenizer's)"
        )
    return cfg.replace(
        data=dataclasses.replace(d, tokenizer_fingerprint=tok.fingerprint),
        model=dataclasses.replace(m, vocab_size=m.vocab_size or tok.default_vocab_size()),
    )


def build_model(cfg: Config, seed: int | None = None, platform: str | None = None) -> Transformer:
    """The model of cfg with its kernels chosen for `platform` (the devices it is
    compiled for; default: the host's backend); a platform that cannot run its
    attention is refused first."""
    m = cfg.model
    why = attention_impl_error(m.attention_impl, m.compute_dtype, m.resolved_head_dim, platform)
    if why:
        raise ConfigError(why)
    if platform is not None:
        m, _ = kernel_choice.for_platform(m, platform)
    seed = cfg.train.seed if seed is None else seed
    return Transformer(m, rngs=nnx.Rngs(params=seed), rules=cfg.mesh.rules)


def split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@dataclasses.dataclass
class TrainSetup:
    cfg: Config
    mesh: Any
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Any
    logical: dict  # {"params": tree of logical-axis tuples, "model_state": ...}
    specs: dict  # PartitionSpec tree of the whole train state
    shardings: dict  # NamedSharding tree of the whole train state
    abstract_state: dict  # ShapeDtypeStruct tree with shardings (for restores)
    batch_sharding: Any
    given_tokenizer: Tokenizer | None = None  # the run's own copy, where the caller has it
    platform: str | None = None  # of the mesh's devices: the kernels were chosen for it
    kernel_notes: tuple[str, ...] = ()  # start-up lines: what 'auto' kernels resolved to

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (text <-> ids for eval, generation, RL): the one given to
        make_setup, else data.tokenizer's (read when first needed)."""
        return self.given_tokenizer or load_tokenizer(self.cfg.data.tokenizer)

    def init_state(self) -> dict:
        cfg, tx = self.cfg, self.tx

        def init():
            _, params, rest = split_model(build_model(cfg, platform=self.platform))
            return {
                "params": params,
                "opt_state": tx.init(params),
                "model_state": rest,
                "step": jnp.zeros((), jnp.int32),
            }

        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.shardings)()


def make_setup(cfg: Config, mesh, tokenizer: Tokenizer | None = None) -> TrainSetup:
    platform = sharding.mesh_platform(mesh)
    abstract = nnx.eval_shape(lambda: build_model(cfg, platform=platform))
    graphdef, params_shape, rest_shape = split_model(abstract)
    logical_params = sharding.state_logical_axes(abstract, nnx.Param)
    rest_filter = nnx.Not(nnx.Param)
    logical_rest = sharding.state_logical_axes(abstract, rest_filter) if rest_shape else {}
    rules = cfg.mesh.rules
    tx = make_optimizer(cfg.train, logical_params)
    param_specs = sharding.tree_specs(logical_params, params_shape, rules, mesh)
    rest_specs = sharding.tree_specs(logical_rest, rest_shape, rules, mesh)
    opt_shape = jax.eval_shape(tx.init, params_shape)
    opt_specs = sharding.opt_state_specs(tx, opt_shape, param_specs)
    specs = {"params": param_specs, "opt_state": opt_specs, "model_state": rest_specs, "step": P()}
    shardings = sharding.named(mesh, specs)
    shapes = {
        "params": params_shape,
        "opt_state": opt_shape,
        "model_state": rest_shape,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(rules, mesh))
    return TrainSetup(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        tx=tx,
        schedule=make_schedule(cfg.train),
        logical={"params": logical_params, "model_state": logical_rest},
        specs=specs,
        shardings=shardings,
        abstract_state=abstract_state,
        batch_sharding=batch_sharding,
        given_tokenizer=tokenizer,
        platform=platform,
        kernel_notes=tuple(
            kernel_choice.for_platform(cfg.model, platform, cfg.data.seq_len)[1] if platform else ()
        ),
    )


def setup_on_devices(
    cfg: Config, devices: str = "one", tokenizer: Tokenizer | None = None
) -> tuple[Config, TrainSetup]:
    """(cfg with its mesh, setup) on one device ("one": evaluation, growth checks, RL on one
    host; every mesh axis 1) or on all devices ("all": the config's own mesh)."""
    if devices == "one":
        mesh_cfg = dataclasses.replace(cfg.mesh, data=1, fsdp=1, expert=1, tensor=1)
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    elif devices == "all":
        mesh_cfg = cfg.mesh
        mesh = sharding.make_mesh(mesh_cfg)
    else:
        raise ConfigError(f"devices must be 'one' or 'all', got {devices!r}")
    cfg = cfg.replace(mesh=mesh_cfg)
    return cfg, make_setup(cfg, mesh, tokenizer)
