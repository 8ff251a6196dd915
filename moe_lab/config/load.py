"""Loading configs: Python config files, `--config.a.b=V` overrides, config.json.

Beside config/schema.py (the dataclasses) and config/validate.py (the checks with
one-line errors).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import traceback
import types
import typing
from typing import Any

from moe_lab.config.schema import Config, ConfigError, GRPOConfig, TTCConfig, _to_jsonable
from moe_lab.config.validate import RENAMED, validate, validate_grpo, validate_ttc


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks/converts one leaf to the dataclass field type, naming `key` on error."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"config key '{key}': expected a bool, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an int, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a float, got {value!r}")
    if typ is str or typing.get_origin(typ) is typing.Literal:  # a choice: checked by validate()
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if typing.get_args(typ) == (int, Ellipsis):  # tuple[int, ...]: "2,4,8" or a sequence
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            try:
                return tuple(
                    _coerce(x.strip() if isinstance(x, str) else x, int, key) for x in items if str(x).strip()
                )
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected integers ('2,4,8'), got {value!r}")
    if typ is tuple:  # the rule table: a sequence of (logical, mesh axes) pairs
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config key '{key}': not valid JSON ({e})") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of pairs, got {value!r}")
        rules = []
        for pair in value:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ConfigError(f"config key '{key}': bad rule {pair!r}, want (logical, mesh)")
            axes = pair[1]
            if isinstance(axes, list):
                axes = tuple(axes)
            rules.append((pair[0], axes))
        return tuple(rules)
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def from_dict(cls, d: Any, prefix: str = ""):
    """Builds dataclass `cls` from a nested mapping; unknown keys are errors."""
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    if not isinstance(d, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, d[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(d[name], typ, prefix + name)
    return cls(**kwargs)


def _load_module(path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_moe_lab_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # one line naming file:line, not a traceback
        raise ConfigError(f"config file {e.filename or path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # an error raised while the file's top level runs
        line = next(
            (f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?"
        )
        raise ConfigError(f"config file {path}:{line}: {type(e).__name__}: {e}") from None
    return module


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
    path, _, arg = config_arg.partition(":")
    return path, (arg or None)


def load_raw(config_arg: str, fn: str = "get_config") -> Any:
    """Calls `fn(arg)` of the config file named by 'path.py[:arg]'."""
    path, arg = split_config_arg(config_arg)
    module = _load_module(path)
    if not hasattr(module, fn):
        raise ConfigError(f"config file {path} has no {fn}(arg=None)")
    try:
        return getattr(module, fn)(arg)
    except ConfigError:
        raise
    except Exception as e:  # a config file's own complaint, as one line
        raise ConfigError(f"config file {path}: {fn}({arg!r}) failed: {e}") from None


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Applies {'model.d_model': '64', ...}; the key must exist in the schema."""
    raw = json.loads(json.dumps(_to_jsonable(raw)))  # deep copy, plain types
    for key, value in overrides.items():
        parts = key.split(".")
        _check_key_in_schema(parts, key)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{p}' is not a section")
        node[parts[-1]] = value
    return raw


def _check_key_in_schema(parts: list[str], key: str) -> None:
    cls = Config
    for i, p in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if p not in fields:
            raise ConfigError(f"unknown config key '{key}' ('{p}' not in {', '.join(sorted(fields))})")
        typ = typing.get_type_hints(cls)[p]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(typ):
                raise ConfigError(f"unknown config key '{key}' ('{p}' is not a section)")
            cls = typ


def load_config(config_arg: str, overrides: dict[str, Any] | None = None) -> Config:
    raw = load_raw(config_arg)
    raw = apply_overrides(raw if raw is not None else {}, overrides or {})
    return validate(from_dict(Config, raw))


def run_config_dict(path: str) -> dict:
    """The one reader of a run's config.json: the stored dict, renamed values translated
    (stored_meaning); a missing, cut-short or non-object file is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json at {path}")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}); was it cut short?"
            ) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a config (a JSON object)")
    return stored_meaning(raw)


def config_from_json(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """A run's config.json (+ `--config.a.b=V` overrides), validated."""
    return validate(from_dict(Config, apply_overrides(run_config_dict(path), overrides or {})))


def stored_meaning(raw: dict) -> dict:
    """The stored config with renamed values (config.validate.RENAMED) translated to
    the values that compute what they did when the run was written."""
    for (dotted, old), (now, _) in RENAMED.items():
        *parents, key = dotted.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(key) == old:
            node[key] = now
    return raw


def parse_override_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Splits `--config.a.b=V` / `--config.a.b V` from the other arguments."""
    overrides, rest, i = {}, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config.") :]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {a} has no value")
                k, v = body, argv[i + 1]
                i += 1
            overrides[k] = v
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def load_grpo_config(config_arg: str | None, overrides: dict | None = None) -> GRPOConfig:
    """`moe-lab rl`'s GRPOConfig: a config file's get_config() (or the defaults) +
    overrides, coerced like a run's config and validated."""
    raw = (load_raw(config_arg) or {}) if config_arg else {}
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    return validate_grpo(from_dict(GRPOConfig, {**dict(raw), **(overrides or {})}, "rl."))


def ttc_config_from(spec: dict) -> TTCConfig:
    """TTCConfig from a sweep stage's spec or the CLI's flags ("budgets": "2,4" or a
    list); unknown keys refused, values coerced like a run's config and validated."""
    spec = {k: v for k, v in spec.items() if k not in ("kind", "step", "label")}
    return validate_ttc(from_dict(TTCConfig, spec, "ttc."))
