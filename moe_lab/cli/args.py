"""What several commands parse the same way: the run's config from --config (+ overrides)
or from a --workdir's config.json."""

from __future__ import annotations

import os

from moe_lab.config.load import config_from_json, load_config
from moe_lab.config.schema import Config, ConfigError
from moe_lab.train.run_dir import config_path


def config_from_args(args, overrides: dict) -> Config:
    """--config FILE (+ overrides), else the config.json of --workdir (+ overrides)."""
    if args.config:
        return load_config(args.config, overrides)
    workdir = getattr(args, "workdir", None)
    path = config_path(workdir) if workdir else None
    if not path or not os.path.isfile(path):
        raise ConfigError("--config is required (or a --workdir that holds config.json)")
    return config_from_json(path, overrides)
