"""moe_lab: sparse MoE and recursive transformers in JAX (see README.md).

Importing moe_lab has no side effects; the command-line entry point and the benchmarks
tune the host allocator (moe_lab/parallel/host_allocator.py) before jax starts.
"""

__version__ = "0.1.0"
