"""moe_lab: sparse MoE and recursive transformers in JAX."""
from moe_lab.parallel.host_allocator import tune_host_allocator

__version__ = "0.1.0"

# before jax starts its thread pools: see moe_lab/host_allocator.py
tune_host_allocator()
