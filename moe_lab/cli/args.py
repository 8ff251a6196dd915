"""What several commands parse the same way: the run's config from --config (+ overrides)
or from a --workdir's config.json."""

from __future__ import annotations

import json
import os

from moe_lab.config.load import apply_overrides, from_dict, load_config, stored_meaning
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate
from moe_lab.train.run_dir import config_path


def config_from_args(args, overrides: dict) -> Config:
    """--config FILE (+ overrides), else the config.json of --workdir (+ overrides)."""
    if args.config:
        return load_config(args.config, overrides)
    workdir = getattr(args, "workdir", None)
    path = config_path(workdir) if workdir else None
    if not path or not os.path.isfile(path):
        raise ConfigError("--config is required (or a --workdir that holds config.json)")
    with open(path) as f:
        raw = json.load(f)
    return validate(from_dict(Config, apply_overrides(stored_meaning(raw), overrides)))
