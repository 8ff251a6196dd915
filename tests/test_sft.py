"""Supervised fine-tuning: train.loss_on="completion" (prompt tokens get exactly zero
gradient; the EOS after a completion counts) and --init-from (a new run from another
run's weights, fresh optimizer)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from conftest import tiny_config

from moe_lab.cli.main import main
from moe_lab.data import pipeline
from moe_lab.data.tokenizer import BYTE_TOKENIZER
from moe_lab.train.checkpoint import Checkpointer, write_checkpoint
from moe_lab.train.run_dir import config_path, write_json_atomic
from moe_lab.train.state import setup_on_devices
from moe_lab.train.step import loss_weights, make_train_step


def _stepper(cfg):
    """batch -> (params after one train step from the same init, loss, grad norm)."""
    setup = setup_on_devices(cfg)[1]
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, cfg, 1, setup.schedule, BYTE_TOKENIZER.eos_id))
    state = jax.device_get(setup.init_state())

    def run(batch):
        new, metrics = step(state, batch)
        return jax.device_get(new["params"]), {k: float(metrics[k]) for k in ("loss", "grad_norm")}

    return run


def test_completion_loss_gives_prompt_tokens_exactly_zero_gradient():
    small = {"num_layers": 1}
    cfg = tiny_config(model=small, data={"mixture": "arith:1"}, train={"loss_on": "completion"})
    batch = jax.tree.map(
        np.asarray,
        next(
            iter(
                pipeline.make_train_iterator(cfg.data, cfg.train.batch_size, seed=0, tokenizer=BYTE_TOKENIZER)
            )
        ),
    )
    batch = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    w = np.asarray(loss_weights(batch, "completion", BYTE_TOKENIZER.eos_id))
    prompt = (batch["weights"] > 0) & (w == 0)
    assert prompt.any() and (w > 0).any()
    # the EOS after each completion is trained on, the prompt's targets are not
    eos = (batch["targets"] == BYTE_TOKENIZER.eos_id) & (batch["weights"] > 0)
    assert (w[eos] == 1).all() and (w <= batch["answer_mask"] + eos).all()
    # changing every prompt target changes nothing, bit for bit: zero gradient
    other = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % 200 + 16, batch["targets"]))
    completion = _stepper(cfg)
    (p1, m1), (p2, m2) = completion(batch), completion(other)
    assert m1 == m2
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    # ... which the loss on every token does see (weights on the prompt targets)
    assert (np.asarray(loss_weights(batch, "all", BYTE_TOKENIZER.eos_id))[prompt] == 1).all()


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path, capsys):
    base, sft = str(tmp_path / "base"), tmp_path / "sft"
    cfg = tiny_config(model={"num_layers": 1})
    setup = setup_on_devices(cfg)[1]
    os.makedirs(base)
    write_checkpoint(base, 3, jax.device_get(setup.init_state()), {"tokens_seen": 0.0})
    write_json_atomic(config_path(base), cfg.to_dict())
    traces = tmp_path / "traces.jsonl"
    traces.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+{i}=?", "working": f"{i}+{i}", "answer": str(2 * i)}) + "\n"
            for i in range(20)
        )
    )
    common = [
        "--config",
        f"configs/sft.py:{traces}",
        "--config.train.batch_size=8",
        "--config.data.seq_len=32",
        "--config.train.progress=false",
    ]
    assert (
        main(
            [
                "train",
                *common,
                "--init-from",
                base,
                "--workdir",
                str(sft),
                "--config.train.steps=1",
                "--config.train.lr=1e-12",
                "--config.train.warmup_steps=0",
                "--config.train.checkpoint_every=1",
            ]
        )
        == 0
    )
    assert "initialised from" in capsys.readouterr().out
    got = json.load(open(sft / "config.json"))
    assert got["model"] == cfg.to_dict()["model"] and got["train"]["loss_on"] == "completion"
    with Checkpointer(base, create=False) as a, Checkpointer(str(sft), create=False) as b:
        pa, pb = a.restore_raw(3)["params"], b.restore_raw(1)
    assert int(pb["step"]) == 1  # a fresh step counter; params moved by lr 1e-12 only
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb["params"])
    # a source without a checkpoint at that step: one line, nothing written
    assert main(["train", *common, "--init-from", f"{base}:7", "--workdir", str(tmp_path / "x")]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
