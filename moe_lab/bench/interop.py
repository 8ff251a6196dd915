"""HF interop benchmark (`moe-lab bench interop`): import and export against the plain
file work they cannot avoid, each case in a fresh process (time and peak RSS) that
tunes the host allocator as the `moe-lab` command does.

  import: `import_hf` (check every shape, then read, convert to moe_lab's layout and
          write the Orbax checkpoint one leaf at a time, tokenizer, lineage with sha256)
          / reading every tensor with the safetensors package (each made a jax array:
          Orbax saves those with less memory than numpy leaves) + an Orbax save of them;
  export: `export_hf` (restore one leaf at a time, convert, stream the safetensors,
          tokenizer files) / an Orbax restore of the params + safetensors.numpy.save_file.
Targets (issue 20): time ratio <= 1.5 each; peak RSS <= 1.5x the checkpoint's bytes,
counting what the work adds to the process (VmHWM minus the RSS after the imports:
python + jax alone hold a few hundred MB, which is no part of either algorithm; the
raw VmHWM is reported too).  Each case runs `pairs` times, paired with its baseline
and alternating which goes first; a time ratio is the median of the pairs' ratios (one
pair's ratio on this 2-core machine ranged 0.9-2.2 for the same code).

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
from moe_lab.parallel.host_allocator import tune_host_allocator
tune_host_allocator()  # as the moe-lab command does before its work (all four cases)
import numpy as np, jax, orbax.checkpoint as ocp
from moe_lab.interop.hf_import import import_hf, safetensors_files
from moe_lab.interop.hf_export import export_hf
from moe_lab.train.checkpoint import Checkpointer
base = rss("VmRSS")
t0 = time.perf_counter()
if what == "import":
    import_hf(a, b, log=lambda *x: None)
elif what == "read+save":
    from safetensors import safe_open  # the safetensors package's own reader
    arrays = {}
    for f in safetensors_files(a):
        with safe_open(f, framework="np") as h:  # jax arrays: Orbax's cheaper input
            arrays.update({n.replace(".", "_"): jax.device_put(h.get_tensor(n)) for n in h.keys()})
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
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, what, a, b],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode:
        raise RuntimeError(f"bench interop {what}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_random_mixtral(
    out_dir: str, *, d_model: int, layers: int, experts: int, hidden: int, vocab: int
) -> int:
    """A random Mixtral checkpoint (config.json, model.safetensors, the byte tokenizer as
    tokenizer.json); returns the safetensors bytes."""
    hf = {
        "architectures": [hf_config.MIXTRAL],
        "model_type": "mixtral",
        "hidden_size": d_model,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": hidden,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
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


def _paired(num: tuple, den: tuple, pairs: int) -> tuple[list[dict], list[dict]]:
    """`pairs` back-to-back runs of the child cases num and den (each (what, a, b)),
    alternating which goes first: on a shared machine both cases of a pair see the same
    load (the module's time ratios are medians over pairs, as common.paired_ratios)."""
    runs_num, runs_den = [], []
    for i in range(pairs):
        order = ((num, runs_num), (den, runs_den))
        for (what, a, b), out in order if i % 2 == 0 else order[::-1]:
            shutil.rmtree(b, ignore_errors=True)
            out.append(_child(what, a, b))
    return runs_num, runs_den


def _summary(runs: list[dict]) -> dict:
    """The median run's seconds and peak, with every run's seconds."""
    return {
        "seconds": float(np.median([r["seconds"] for r in runs])),
        "peak": float(np.median([r["peak"] for r in runs])),
        "base": float(np.median([r["base"] for r in runs])),
        "all_seconds": [r["seconds"] for r in runs],
    }


def run(quick: bool = False, pairs: int | None = None) -> dict:
    size = (
        dict(d_model=64, layers=2, experts=4, hidden=128, vocab=272)
        if quick
        else dict(d_model=512, layers=8, experts=8, hidden=1024, vocab=272)
    )
    pairs = pairs or (1 if quick else 3)
    tmp = tempfile.mkdtemp(prefix="moe_lab_bench_interop_")
    try:
        hf_dir, run_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
        nbytes = write_random_mixtral(hf_dir, **size)
        res = {"checkpoint_bytes": nbytes, "config": size, "pairs": pairs}
        imp, base = _paired(
            ("import", hf_dir, run_dir), ("read+save", hf_dir, os.path.join(tmp, "orbax")), pairs
        )
        exp, base_exp = _paired(
            ("export", run_dir, os.path.join(tmp, "back")),
            ("restore+save", run_dir, os.path.join(tmp, "plain.safetensors")),
            pairs,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for case, runs in (("read+save", base), ("import", imp), ("restore+save", base_exp), ("export", exp)):
        res[case] = _summary(runs)
    res["import_time_ratios"] = [a["seconds"] / b["seconds"] for a, b in zip(imp, base)]
    res["export_time_ratios"] = [a["seconds"] / b["seconds"] for a, b in zip(exp, base_exp)]

    def added(case):
        return (res[case]["peak"] - res[case]["base"]) / nbytes

    res["targets"] = [
        target(
            "import time / (safetensors read + Orbax save), median of pairs",
            float(np.median(res["import_time_ratios"])),
            1.5,
        ),
        target("import peak RSS added / checkpoint bytes", added("import"), 1.5),
        target(
            "export time / (Orbax restore + safetensors save), median of pairs",
            float(np.median(res["export_time_ratios"])),
            1.5,
        ),
        target("export peak RSS added / checkpoint bytes", added("export"), 1.5),
    ]
    res["name"] = "interop"
    return res


def main_print(res: dict) -> None:
    mb = res["checkpoint_bytes"] / 1e6
    print(
        f"interop: random Mixtral checkpoint {mb:.0f} MB ({res['config']}), {res['pairs']} "
        f"pairs of runs (each a fresh process), medians"
    )
    for case in ("read+save", "import", "restore+save", "export"):
        r = res[case]
        runs = ", ".join(f"{t:.2f}" for t in r["all_seconds"])
        print(
            f"  {case:13s} {r['seconds']:7.2f} s (runs {runs})  peak RSS {r['peak'] / 1e6:7.0f}"
            f" MB (after imports {r['base'] / 1e6:.0f} MB)"
        )
    print_targets(res["targets"])
