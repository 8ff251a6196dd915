"""Task names -> Task objects built from the DataConfig knobs."""

from __future__ import annotations

from moe_lab.config.schema import ConfigError, DataConfig
from moe_lab.data.tasks.arith import ArithTask
from moe_lab.data.tasks.base import Task
from moe_lab.data.tasks.countdown import CountdownTask
from moe_lab.data.tasks.facts import FactsTask
from moe_lab.data.tasks.file import FileTask

# --------------------------------------------------------------------- factory


def make_task(name: str, data_cfg: DataConfig) -> Task:
    """Builds a task from the DataConfig knobs. `arith_self_correct` and `arith_direct`
    are read if the config has them (default 0: runs stored before them)."""
    if name == "facts":
        return FactsTask(seed=data_cfg.seed, num_entities=data_cfg.facts_num_entities)
    if name == "arith":
        return ArithTask(
            seed=data_cfg.seed,
            num_steps=data_cfg.arith_num_steps,
            eval_num_steps=data_cfg.arith_eval_num_steps,
            modulus=data_cfg.arith_modulus,
            self_correct=float(getattr(data_cfg, "arith_self_correct", 0.0)),
            direct=float(getattr(data_cfg, "arith_direct", 0.0)),
        )
    if name == "countdown":
        return CountdownTask(
            seed=data_cfg.seed,
            num_numbers=data_cfg.countdown_num_numbers,
            max_number=data_cfg.countdown_max_number,
        )
    if name == "file":
        paths = [p.strip() for p in data_cfg.files.split(",") if p.strip()]
        # BOS + content + EOS = seq_len + 1 tokens -> seq_len (input, target) pairs
        return FileTask(paths, seed=data_cfg.seed, max_doc_tokens=max(1, data_cfg.seq_len - 1))
    raise ConfigError(f"data.mixture: unknown task '{name}' (valid: facts, arith, countdown, file)")
