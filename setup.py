"""moe_lab: sparse MoE and recursive transformers in JAX (see README.md)."""

from setuptools import find_packages, setup

import os


def requirements(name: str) -> list[str]:
    """requirements/<name>.txt without comments (the Makefile installs the same files)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements", name)
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


HF = requirements("hf.txt")  # torch (the CPU build) and transformers
EVAL = requirements("eval.txt")  # lm-evaluation-harness
HF_BACKEND = requirements("hf_backend.txt")  # lm-eval's own HF backend (the tests' cross-check)

setup(
    name="moe_lab",
    version="0.1.0",
    description="JAX research codebase for sparse Mixture-of-Experts and recursive transformers",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/lm_eval/ (the offline lm-eval task YAMLs) installs as moe_lab.lm_eval_tasks,
    # so a wheel install finds them too (moe_lab/eval/lm_eval_model.py: tasks_dir)
    packages=find_packages(include=["moe_lab", "moe_lab.*"]) + ["moe_lab.lm_eval_tasks"],
    package_dir={"moe_lab.lm_eval_tasks": "configs/lm_eval"},
    package_data={"moe_lab.lm_eval_tasks": ["*.yaml"]},
    install_requires=[
        # the stack, pinned to the versions tested together
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "numpy>=2.0,<3",
        "pandas>=2.2,<4",
        "matplotlib>=3.9,<4",
        "tqdm>=4.66,<5",  # progress bar with ETA
        "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow
        # real corpora and vocabularies (data/tokenizer.py, data/prepare.py)
        "array-record>=0.8.6,<0.9",  # grain's random-access shard format
        "tokenizers>=0.22.2,<0.23",  # HF tokenizer.json; byte-level BPE training
        "sentencepiece>=0.2.1,<0.3",
        "pyarrow>=25.0.1,<26",  # Parquet inputs, read in row batches
        "safetensors>=0.8,<0.9",  # HF checkpoints in and out (moe_lab/interop/)
        # accelerator kernels: flash / chunked attention and grouped matmul (Pallas);
        # imported only where used (layers/attention_kernels.py, layers/moe_kernels/)
        "tokamax==0.0.12",
    ],
    extras_require={
        # compiling for TPU pods from any host (moe-lab compile); also in [dev]
        "tpu": ["libtpu==0.0.42.1"],
        # HF transformers beside moe_lab (export checks, the tests' reference models).
        # torch pinned to the CPU build this project was verified with.
        "hf": HF,
        # lm-evaluation-harness (moe-lab eval --lm-eval)
        "eval": HF + EVAL,
        "dev": HF + EVAL + HF_BACKEND + [
            # libtpu: AOT compilation for TPU topologies on this host (moe-lab compile,
            # tests/test_compile.py).  Pinned with jax: jax[tpu]==0.10.2 takes
            # libtpu==0.0.42.*.  Wheels exist for linux x86-64 only; elsewhere the
            # compile tests skip.
            "libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'",
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            # pinned: `make lint` runs `ruff format --check`, whose output moves between
            # releases (0.17.6: the version the tree was formatted with)
            "ruff==0.17.6",
            "nbformat>=5.10,<6",
            "nbclient>=0.10,<1",
            "ipykernel>=6.29",
        ],
    },
    entry_points={"console_scripts": ["moe-lab=moe_lab.cli.main:main"]},
)
