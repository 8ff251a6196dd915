"""Gradient accumulation (train.microbatches): the step that runs the batch as slices
equals the step that runs it whole, on 8 fake devices with the batch sharded."""

from __future__ import annotations

import jax
import numpy as np
from conftest import tiny_config

from moe_lab.data import pipeline
from moe_lab.data.tokenizer import BYTE_TOKENIZER
from moe_lab.train.state import setup_on_devices
from moe_lab.train.step import jit_train_step

KEYS = ("loss", "total_loss", "grad_norm", "task_loss_sum", "task_weight_sum", "moe/tokens_per_expert_E")


def test_microbatched_step_equals_the_whole_batch_step():
    """A sigmoid-routed dropless MoE (routing per token: slicing the batch changes no
    assignment) with the aux losses off, trained on completions only (each row has
    its own number of loss tokens: a per-slice mean would weigh them wrongly).  Same
    params, optimizer state, router biases and metrics after one step."""
    model = dict(
        num_layers=1,
        ffn="moe",
        moe=dict(
            num_experts=4,
            top_k=2,
            expert_hidden=32,
            router="sigmoid",
            dispatch="dropless",
            aux_loss_weight=0.0,
            z_loss_weight=0.0,
            bias_update_rate=0.1,
        ),
    )
    out = {}
    for m in (1, 4):
        cfg = tiny_config(
            model=model,
            train={"batch_size": 32, "microbatches": m, "loss_on": "completion"},
            mesh={"data": -1},
        )
        cfg, setup = setup_on_devices(cfg, devices="all")
        batch = next(iter(pipeline.make_train_iterator(cfg.data, 32, seed=0, tokenizer=BYTE_TOKENIZER)))
        batch = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
        step = jit_train_step(setup, cfg, setup.graphdef, 2, BYTE_TOKENIZER.eos_id)
        state, metrics = step(setup.init_state(), jax.device_put(batch, setup.batch_sharding))
        out[m] = jax.device_get((state, {k: metrics[k] for k in KEYS}))
    (state1, metrics1), (state4, metrics4) = out[1], out[4]
    for k in KEYS:
        np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state4, state1)
    biases = jax.tree.leaves(state1["model_state"])
    assert biases and any(np.abs(b).sum() > 0 for b in biases)  # the biases did move
