"""Layers: attention, feed-forwards, norms, MoE. Nothing here imports train/ or eval/."""
