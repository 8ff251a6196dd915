"""moe_lab: sparse MoE and recursive transformers in JAX."""
__version__ = "0.1.0"
