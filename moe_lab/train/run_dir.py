"""A run directory: every file name of a run, and atomic writes into it.

DIR/config.json          the run's config (written once the run is known to start)
DIR/metrics.jsonl        one JSON object per logged step
DIR/tb/                  TensorBoard event files
DIR/checkpoints/<step>/  checkpoints (train/checkpoint.py)
DIR/eval/<step>.json     evaluation results
DIR/lineage.json         where a grown / post-trained run came from
DIR/rl.json              a GRPO run's config and parent
DIR/reference/           a GRPO run's frozen start (a checkpoint dir of its own)
DIR/stages/              a sweep point's post-stage results
DIR/tokenizer/<file>     the run's tokenizer file (learned vocabularies; byte: none)
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil

from moe_lab.config.schema import Config, ConfigError
from moe_lab.data.tokenizer import BYTE, Tokenizer, load_tokenizer
from moe_lab.train.run_lock import lock_path_beside, locked

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
LINEAGE = "lineage.json"
RL = "rl.json"
REFERENCE = "reference"
STAGES = "stages"
TOKENIZER = "tokenizer"


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS)


def checkpoint_path(workdir: str, step: int, *item: str) -> str:
    """DIR/checkpoints/<step>[/item]."""
    return os.path.join(workdir, CHECKPOINTS, str(step), *item)


def lineage_path(workdir: str) -> str:
    return os.path.join(workdir, LINEAGE)


def rl_path(workdir: str) -> str:
    return os.path.join(workdir, RL)


def reference_dir(workdir: str) -> str:
    return os.path.join(workdir, REFERENCE)


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, EVAL)


def eval_file(workdir: str, name: str) -> str:
    """DIR/eval/<name>.json (name: "<step>", "<step>-ttc", "<step>-<data>-<K>shot")."""
    return os.path.join(workdir, EVAL, f"{name}.json")


def stage_path(workdir: str, index: int, kind: str) -> str:
    """DIR/stages/<index>-<kind>.json: a sweep post stage's columns."""
    return os.path.join(workdir, STAGES, f"{index}-{kind}.json")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def tokenizer_copy(workdir: str, spec: str) -> str:
    """DIR/tokenizer/<the tokenizer file's name>."""
    return os.path.join(workdir, TOKENIZER, os.path.basename(spec))


def keep_tokenizer(workdir: str, tok: Tokenizer) -> None:
    """Copies the run's tokenizer file into the run directory (once; atomic), so the
    run reads and generates with it wherever the original goes."""
    if tok.kind == BYTE:
        return
    dst = tokenizer_copy(workdir, tok.source)
    if os.path.isfile(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp.{os.getpid()}"
    shutil.copyfile(tok.source, tmp)
    os.replace(tmp, dst)


def run_tokenizer(workdir: str, cfg: Config) -> Tokenizer:
    """The tokenizer of the run in `workdir`: its own copy (else data.tokenizer), checked
    against the fingerprint in its config."""
    spec = cfg.data.tokenizer
    if spec != BYTE and os.path.isfile(tokenizer_copy(workdir, spec)):
        spec = tokenizer_copy(workdir, spec)
    tok = load_tokenizer(spec)
    want = cfg.data.tokenizer_fingerprint
    if want and want != tok.fingerprint:
        raise ConfigError(
            f"run {workdir} was made with tokenizer fingerprint {want}; {tok.source} has {tok.fingerprint}"
        )
    return tok


def check_new_run_dir(path: str, what: str) -> str:
    """realpath of a directory a command is about to create: refused if it exists and is
    not an empty directory (no command overwrites what it did not make)."""
    dst = os.path.realpath(path)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConfigError(f"{what} {path} exists and is not empty; refusing to write there")
    return dst


@contextlib.contextmanager
def building(dst: str, verb: str, log=print):
    """Yields DST.<verb>-<pid>, a fresh sibling to write a new directory into; renamed to
    dst (checked empty or absent by check_new_run_dir) when the block ends, removed if
    it raises: a failed or killed grow / import / export leaves nothing at dst.

    Held under dst's lock (train/run_lock.py), so a second writer is refused; the
    leftovers of killed builders (DST.<verb>-<pid> of a process that is gone: with the
    lock held, no live builder has one) are removed first, and said so."""
    with locked(lock_path_beside(dst), f"moe-lab {verb.removesuffix('ing')}", log=log):
        if os.path.isdir(dst) and os.listdir(dst):  # another writer finished meanwhile
            raise ConfigError(f"{dst} is not empty")
        for old in sorted(glob.glob(f"{glob.escape(dst)}.*-*")):
            if re.fullmatch(r"\.(growing|importing|exporting)-\d+", old[len(dst) :]) and os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
                log(f"removed {old}, left by a killed {old[len(dst) + 1 :].split('-')[0]}")
        tmp = f"{dst}.{verb}-{os.getpid()}"
        os.makedirs(tmp)
        try:
            yield tmp
            if os.path.isdir(dst):
                os.rmdir(dst)  # empty (checked before)
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
