"""Bad config input: one clear line naming the key, exit code non-zero, before compiling."""

import subprocess
import sys

import pytest

from moe_lab.config.load import apply_overrides, from_dict, load_config, parse_override_args
from moe_lab.config.schema import Config, ConfigError
from moe_lab.config.validate import validate, validate_for_devices

TINY = "configs/tiny.py"


def _load(**overrides):
    return load_config(TINY, {k: str(v) for k, v in overrides.items()})


def test_tiny_config_loads_and_overrides_apply():
    cfg = _load(**{"train.steps": 7, "model.d_model": 64, "model.tie_embeddings": "true"})
    assert cfg.train.steps == 7 and cfg.model.d_model == 64 and cfg.model.tie_embeddings is True
    moe = load_config(TINY + ":moe")
    assert moe.model.ffn == "moe" and moe.model.moe.num_experts == 8


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"model.nonsense": 1}, "unknown config key 'model.nonsense'"),
        ({"train.steps": "abc"}, "'train.steps': expected an int"),
        ({"train.steps": 0}, "'train.steps' must be > 0"),
        ({"train.microbatches": 3}, "train.microbatches=3 does not divide train.batch_size="),
        ({"model.num_heads": 5}, "num_heads=5 does not divide model.d_model=128"),
        ({"model.num_kv_heads": 3}, "num_kv_heads=3 does not divide model.num_heads=4"),
        ({"model.ffn": "sparse"}, "'model.ffn'='sparse' is not one of"),
        ({"data.seq_len": 4096}, "exceeds model.max_seq_len"),
        ({"data.mixture": "facts:1,poetry:2"}, "unknown task 'poetry'"),
        ({"data.files": "/no/such/file.jsonl", "data.mixture": "file:1"}, "no such file"),
        ({"model.ffn": "moe", "model.moe.top_k": 9}, "top_k=9 must be in [1, model.moe.num_experts=8]"),
        ({"model.ffn": "moe", "model.moe.capacity_factor": 0}, "capacity_factor must be > 0"),
        (
            {"model.ffn": "moe", "model.moe.router": "expert_choice", "model.moe.num_shared_experts": 1},
            "not supported with router='expert_choice'",
        ),
        (
            {"model.ffn": "moe", "model.moe.kernel": "blocks", "model.moe.dispatch": "capacity"},
            "kernel='blocks' needs model.moe.dispatch='dropless'",
        ),
        (
            {"model.ffn": "moe", "model.moe.kernel": "buffer"},
            "kernel='buffer' needs model.moe.dispatch='capacity'",
        ),
        (
            {"model.ffn": "moe", "model.moe.router": "expert_choice", "model.moe.kernel": "ragged"},
            "kernel='ragged' is for token choice",
        ),
        ({"model.ffn": "moe", "model.moe.kernel": "cuda"}, "'model.moe.kernel'='cuda' is not one of"),
        (
            {"model.ffn": "moe", "model.moe.router": "topk_softmax", "model.moe.top_k": 1},
            "router='topk_softmax' with top_k=1 gives every token gate 1",
        ),
        ({"train.lr": "nan"}, "'train.lr' must be a finite number"),
        ({"model.ffn": "moe", "model.moe.capacity_factor": "inf"}, "must be a finite number"),
        ({"model.mlp_hidden": -8}, "'model.mlp_hidden' must be >= 0"),
        ({"model.head_dim": -2}, "'model.head_dim' must be >= 0"),
        ({"model.rope_theta": 0}, "'model.rope_theta' must be > 0"),
        ({"eval.batch_size": 0}, "'eval.batch_size' must be > 0"),
        ({"mesh.rules": '[["batch", ["bogus"]]]'}, "unknown mesh axis 'bogus'"),
        ({"train.profile": "5:3"}, "'train.profile'='5:3' must be START:STOP"),
        ({"train.profile": "5"}, "'train.profile'='5' must be START:STOP"),
    ],
)
def test_bad_values_raise_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        _load(**overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_mesh_must_match_device_count():
    cfg = _load(**{"mesh.data": 3})
    with pytest.raises(ConfigError, match="needs 3 devices, have 8"):
        validate_for_devices(cfg, 8)
    cfg = _load(**{"mesh.data": -1, "mesh.tensor": 3})
    with pytest.raises(ConfigError, match="do not divide"):
        validate_for_devices(cfg, 8)
    assert validate_for_devices(_load(**{"mesh.data": -1, "mesh.fsdp": 2}), 8) == (4, 2, 1, 1)


def test_expert_axis_must_divide_experts():
    cfg = _load(
        **{
            "model.ffn": "moe",
            "model.moe.num_experts": 6,
            "model.moe.top_k": 2,
            "mesh.data": -1,
            "mesh.expert": 4,
        }
    )
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by mesh.expert=4"):
        validate_for_devices(cfg, 8)
    # every microbatch spans every batch shard
    sliced = _load(**{"train.batch_size": 16, "train.microbatches": 4, "mesh.data": -1})
    with pytest.raises(ConfigError, match="batch_size / train.microbatches = 4 is not divisible by"):
        validate_for_devices(sliced, 8)


def test_missing_config_file_and_bad_arg():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.py")
    with pytest.raises(ConfigError, match="unknown arg"):
        load_config(TINY + ":bogus")


def test_override_parsing():
    ov, rest = parse_override_args(["train", "--config.a.b=1", "--config.c", "2", "--workdir", "x"])
    assert ov == {"a.b": "1", "c": "2"} and rest == ["train", "--workdir", "x"]
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        apply_overrides({}, {"train.bogus": 1})


def test_config_json_round_trip():
    cfg = _load()
    assert validate(from_dict(Config, cfg.to_dict())) == cfg


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["train", "--config", TINY, "--config.model.d_model=63", "--workdir", "x"],
            "num_heads=4 does not divide",
        ),
        (["train", "--config", "missing.py", "--workdir", "x"], "config file not found"),
        (["info", "--config", TINY, "--config.train.steps=-5"], "'train.steps' must be > 0"),
        (["bench", "nope"], "unknown benchmark 'nope'"),
    ],
)
def test_cli_errors_exit_nonzero_with_one_line(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_vocab_smaller_than_the_tokenizer_is_an_error():
    from moe_lab.train.state import resolve_config

    with pytest.raises(ConfigError, match="model.vocab_size=5 is smaller than the tokenizer"):
        resolve_config(_load(**{"model.vocab_size": 5}))
    assert resolve_config(_load(**{"model.vocab_size": 512})).model.vocab_size == 512


def test_truncated_config_json_is_a_one_line_error(tmp_path):
    from moe_lab.config.load import config_from_json

    path = tmp_path / "config.json"
    path.write_text('{"model": {"d_model": 6')
    with pytest.raises(ConfigError, match="is not valid JSON") as e:
        config_from_json(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "source, needle",
    [
        ('def get_config(arg=None):\n    return {"model": {\n', "bad.py:2: '{' was never closed"),
        ("import no_such_module_here\n", "bad.py:1: ModuleNotFoundError"),
    ],
)
def test_broken_config_file_is_one_line_naming_file_and_line(source, needle, tmp_path):
    from moe_lab.config.load import load_raw

    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ConfigError) as e:
        load_raw(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_study_configs_load_and_validate():
    """configs/arith_strategies.py (issue 21 d, e) and its GRPO preset: a base that
    answers directly in 60% of its training rows, and the RL settings for it."""
    from moe_lab.data.tasks.registry import make_task

    cfg = load_config("configs/arith_strategies.py")
    assert (cfg.data.arith_direct, cfg.data.arith_modulus, cfg.train.lr) == (0.6, 7, 1e-3)
    assert make_task("arith", cfg.data).direct == 0.6
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_cfg", "configs/grpo.py")
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    assert grpo.get_config("strategies")["eval_examples"] == 256
    with pytest.raises(ValueError, match="unknown arg"):
        grpo.get_config("nope")


def test_grpo_and_ttc_configs_load_like_run_configs():
    """`rl` and `eval --ttc` configs are schema dataclasses: the same coercion (one bool
    parser, "4,16" integer lists), Literal choices and one-line errors as a run's."""
    from moe_lab.config.load import load_grpo_config, ttc_config_from

    rl = load_grpo_config(None, {"kl_estimator": "k1", "scale_rewards": "false", "steps": "7"})
    assert (rl.kl_estimator, rl.scale_rewards, rl.steps) == ("k1", False, 7)
    for bad, match in (
        ({"loss_agg": "mean"}, "'loss_agg'='mean' is not one of sequence, token"),
        ({"nope": 1}, "unknown config key 'rl.nope'"),
        ({"scale_rewards": "maybe"}, "'rl.scale_rewards': expected a bool"),
        ({"num_rollouts": 1}, "'num_rollouts' must be >= 2"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_grpo_config(None, bad)
    t = ttc_config_from({"kind": "moe_lab.eval.test_time:sweep_stage", "budgets": "4,16", "waits": [0, 2]})
    assert (t.budgets, t.waits) == ((4, 16), (0, 2))
    for bad, match in (
        ({"budgets": "4,a"}, "'ttc.budgets': expected integers"),
        ({"nope": 1}, "unknown config key 'ttc.nope'"),
        ({"waits": "1,1"}, "waits must be distinct"),
    ):
        with pytest.raises(ConfigError, match=match):
            ttc_config_from(bad)
