"""8 fake CPU devices for sharding tests: XLA_FLAGS must be set before jax is imported."""

import os
import pathlib

# The suite's models are tiny: compiling them dominates, so LLVM runs without its
# expensive passes (HLO-level optimisation and fusion are unchanged; measured on
# test_sharding + test_train: 164 s -> 99 s).  The Makefile's `test` sets the same.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compare float32 layers with float64 numpy at rtol ~1e-4.  On CPU float32 dots
# are float32 anyway; on a GPU/TPU (JAX_PLATFORMS=cuda) the default is TF32 / bf16
# passes, which failed those comparisons on an H100 (experiments/accelerator_check).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# No persistent compilation cache: with jax 0.10.2 on CPU, multi-device programs
# loaded from the cache deadlocked in their collectives' rendezvous ("Expected 8
# threads to join the rendezvous, but only 4 of them arrived") where freshly
# compiled ones ran fine (seen on tests/test_sharding.py's expert-parallel test).

import pytest

from moe_lab.parallel.host_allocator import tune_host_allocator

# the suite runs with the allocator setting of the command line (no longer an import side effect)
tune_host_allocator()

from moe_lab.config.schema import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig


def tiny_config(**sections) -> Config:
    """A very small config for fast tests; override sections with dicts."""
    base = {
        "model": dict(
            vocab_size=0, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64, max_seq_len=64
        ),
        "data": dict(
            mixture="facts:1,arith:1", seq_len=32, facts_num_entities=20, arith_num_steps=2, arith_modulus=11
        ),
        "train": dict(
            steps=20,
            batch_size=8,
            lr=3e-3,
            warmup_steps=2,
            log_every=5,
            eval_every=10,
            checkpoint_every=10,
            eval_batches=1,
            progress=False,
            async_checkpoint=False,
        ),
        "eval": dict(at_end=False),
        "mesh": dict(data=-1),
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    from moe_lab.config.load import from_dict
    from moe_lab.config.validate import validate
    from moe_lab.train.state import resolve_config

    return resolve_config(validate(from_dict(Config, base)))


@pytest.fixture
def tiny():
    return tiny_config


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`moe-lab ARGV` in this process: (exit code, stdout, stderr)."""
    from moe_lab.cli.main import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


__all__ = ["tiny_config", "run_cli", "DataConfig", "MeshConfig", "ModelConfig", "TrainConfig"]


def _modules_with_shared_fixtures() -> set[str]:
    """Test modules (file names) that define a module-scoped fixture."""
    here = pathlib.Path(__file__).parent
    return {p.name for p in here.glob("test_*.py") if 'fixture(scope="module")' in p.read_text()}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "bench_smoke: a benchmark's own quick run (`make test-bench`; not in "
        "`make test`, whose 10-minute budget it does not fit)",
    )


HF_MODULES = {"test_interop.py", "test_lm_eval.py"}  # the tests that import the HF stack


def pytest_xdist_make_scheduler(config, log):
    """Under `-n`: a module whose tests share a module-scoped fixture is one work unit
    (one worker builds the fixture once; the micro-sweep that the sweep and notebook
    tests share costs ~50 s), every other test its own unit.  These units go out first
    (xdist orders units by size), so the long fixtures do not end the run on one
    worker.  Why not `--dist loadgroup`: with pytest 9 its node-id suffix is ignored
    and the groups are silently split."""
    from xdist.scheduler import LoadScopeScheduling

    shared = _modules_with_shared_fixtures()

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if os.path.basename(module) in HF_MODULES:
                return "hf"  # one worker imports torch / transformers / lm-eval (~13 s each)
            return module if os.path.basename(module) in shared else nodeid

    return SharedFixtureScheduling(config, log)
