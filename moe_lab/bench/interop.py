"""HF interop benchmark (`moe-lab bench interop`): import and export against the plain
file work they cannot avoid, each case in a fresh process (time and peak RSS).

  import: `import_hf` (read, check, convert to moe_lab's layout, write the Orbax
          checkpoint with its zero Adam moments, tokenizer, lineage with sha256)
          / reading every tensor with safetensors (each made a jax array: Orbax
          saves those with less memory than numpy leaves) + an Orbax save of them;
  export: `export_hf` (restore, convert, stream the safetensors, tokenizer files)
          / an Orbax restore of the params + safetensors.numpy.save_file of them.
Targets (issue 20): time ratio <= 1.5 each; peak RSS <= 1.5x the checkpoint's bytes,
counting what the work adds to the process (VmHWM minus the RSS after the imports:
python + jax alone hold a few hundred MB, which is no part of either algorithm; the
raw VmHWM is reported too).

The checkpoint is a random Mixtral-format one written here (no torch needed): full
d_model 512, 8 layers, 8 experts of 1024 (~420 MB, f32); quick: a ~10 MB one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from flax import nnx

from moe_lab.bench.common import print_targets, target
from moe_lab.config.schema import Config
from moe_lab.data.tokenizer import BYTE_TOKENIZER
from moe_lab.interop import hf_config, hf_weights
from moe_lab.interop.hf_tokenizer import hf_tokenizer_of
from moe_lab.interop.safetensors_io import write_sharded
from moe_lab.train.state import build_model, split_model

_CHILD = r"""
import json, sys, time
what, a, b = sys.argv[1:4]
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
import numpy as np, jax, orbax.checkpoint as ocp
from moe_lab.interop.hf_import import import_hf, safetensors_files
from moe_lab.interop.hf_export import export_hf
from moe_lab.interop.safetensors_io import TensorReader
from moe_lab.train.checkpoint import Checkpointer
base = rss("VmRSS")
t0 = time.perf_counter()
if what == "import":
    import_hf(a, b, log=lambda *x: None)
elif what == "read+save":
    read = TensorReader(safetensors_files(a))  # jax arrays: Orbax's cheaper input
    arrays = {n.replace(".", "_"): jax.device_put(read(n)) for n in sorted(read.names())}
    ck = ocp.StandardCheckpointer()
    ck.save(b, arrays)
    ck.wait_until_finished()
elif what == "export":
    export_hf(a, b, log=lambda *x: None)
elif what == "restore+save":
    from safetensors.numpy import save_file
    with Checkpointer(a, create=False) as ckpt:
        params = ckpt.restore_raw(0, parts=("params",))["params"]
    flat = {jax.tree_util.keystr(p): np.ascontiguousarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    save_file(flat, b)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": rss("VmHWM"), "base": base}))
"""


def _child(what: str, a: str, b: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, what, a, b], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(f"bench interop {what}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_random_mixtral(out_dir: str, *, d_model: int, layers: int, experts: int,
                         hidden: int, vocab: int) -> int:
    """A random Mixtral checkpoint (config.json, model.safetensors, the byte tokenizer as
    tokenizer.json); returns the safetensors bytes."""
    hf = {"architectures": [hf_config.MIXTRAL], "model_type": "mixtral", "hidden_size": d_model,
          "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
          "intermediate_size": hidden, "num_local_experts": experts, "num_experts_per_tok": 2,
          "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
          "rope_theta": 1e6, "tie_word_embeddings": False, "torch_dtype": "float32"}
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f)
    hf_tokenizer_of(BYTE_TOKENIZER).save(os.path.join(out_dir, "tokenizer.json"))
    m = hf_config.model_config_of(hf)
    rng = np.random.default_rng(0)

    def arrays():
        for name, shape, _ in specs:
            yield name, (0.02 * rng.standard_normal(shape, np.float32))

    specs = hf_weights.hf_specs(m, hf_config.MIXTRAL, _param_shapes(m))
    write_sharded(out_dir, specs, arrays)
    return sum(int(np.prod(s)) * 4 for _, s, _ in specs)


def _param_shapes(m) -> dict:
    """The params tree of model config `m`, abstract (shapes and dtypes only)."""
    return split_model(nnx.eval_shape(lambda: build_model(Config(model=m))))[1]


def run(quick: bool = False) -> dict:
    size = (dict(d_model=64, layers=2, experts=4, hidden=128, vocab=272) if quick else
            dict(d_model=512, layers=8, experts=8, hidden=1024, vocab=272))
    tmp = tempfile.mkdtemp(prefix="moe_lab_bench_interop_")
    try:
        hf_dir = os.path.join(tmp, "hf")
        nbytes = write_random_mixtral(hf_dir, **size)
        res = {"checkpoint_bytes": nbytes, "config": size}
        res["read+save"] = _child("read+save", hf_dir, os.path.join(tmp, "orbax"))
        res["import"] = _child("import", hf_dir, os.path.join(tmp, "run"))
        res["restore+save"] = _child("restore+save", os.path.join(tmp, "run"),
                                     os.path.join(tmp, "plain.safetensors"))
        res["export"] = _child("export", os.path.join(tmp, "run"), os.path.join(tmp, "back"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def added(case):
        return (res[case]["peak"] - res[case]["base"]) / nbytes

    res["targets"] = [
        target("import time / (safetensors read + Orbax save)",
               res["import"]["seconds"] / res["read+save"]["seconds"], 1.5),
        target("import peak RSS added / checkpoint bytes", added("import"), 1.5),
        target("export time / (Orbax restore + safetensors save)",
               res["export"]["seconds"] / res["restore+save"]["seconds"], 1.5),
        target("export peak RSS added / checkpoint bytes", added("export"), 1.5),
    ]
    res["name"] = "interop"
    return res


def main_print(res: dict) -> None:
    mb = res["checkpoint_bytes"] / 1e6
    print(f"interop: random Mixtral checkpoint {mb:.0f} MB ({res['config']})")
    for case in ("read+save", "import", "restore+save", "export"):
        r = res[case]
        print(f"  {case:13s} {r['seconds']:7.2f} s  peak RSS {r['peak'] / 1e6:7.0f} MB "
              f"(after imports {r['base'] / 1e6:.0f} MB)")
    print_targets(res["targets"])
