"""Mixture-of-Recursions at the paper's 135M Llama shape (SmolLM-135M: d_model 576,
30 layers, 9 heads, 3 KV heads, SwiGLU 1536). Same args and recipe as mor_360m.py:

    moe-lab train --config configs/paper/mor_135m.py:3 --workdir runs/mor135_ec3
    moe-lab info  --config configs/paper/mor_135m.py:2

Real corpora: --config.data.mixture=corpus:1 --config.data.corpus=DIR
--config.data.tokenizer=tok.json (experiments/launch/README.md).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "_mor_360m", os.path.join(os.path.dirname(os.path.abspath(__file__)), "mor_360m.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.mor_config("135m", arg)
