"""KV-cache decoding against the no-cache reference: the same tokens."""

import numpy as np
import pytest
from conftest import tiny_config

from moe_lab.eval.generate import generate
from moe_lab.train.state import build_model, split_model

PROMPTS = [[5, 17, 33, 80, 81, 100], [7, 8], [200, 201, 202, 9]]


def _model(**model_kw):
    cfg = tiny_config(model=dict(init_std=0.2, **model_kw))  # larger init: peaked logits
    return split_model(build_model(cfg))


@pytest.mark.parametrize(
    "model_kw",
    [
        dict(),
        dict(norm_placement="post", tie_embeddings=True),
        dict(ffn="moe", moe=dict(num_experts=4, top_k=2, expert_hidden=32, dispatch="dropless")),
    ],
)
def test_cached_decode_matches_reference(model_kw):
    gd, params, rest = _model(**model_kw)
    for temperature, top_p in [(0.0, 1.0), (1.0, 0.9)]:
        kw = dict(max_new_tokens=6, temperature=temperature, top_p=top_p, seed=3)
        fast = generate(gd, params, rest, PROMPTS, use_cache=True, **kw)
        slow = generate(gd, params, rest, PROMPTS, use_cache=False, **kw)
        assert fast == slow
        assert all(len(r) == 6 for r in fast)


def test_padding_does_not_change_a_prompts_continuation():
    gd, params, rest = _model()
    batch = generate(gd, params, rest, PROMPTS, max_new_tokens=6)
    for prompt, row in zip(PROMPTS, batch):
        assert generate(gd, params, rest, [prompt], max_new_tokens=6)[0] == row


def test_sampling_is_seeded_and_varies():
    gd, params, rest = _model()
    a = generate(gd, params, rest, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    b = generate(gd, params, rest, PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
    c = generate(gd, params, rest, PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
    assert a == b and a != c


def test_eos_truncates():
    gd, params, rest = _model()
    row = generate(gd, params, rest, PROMPTS[:1], max_new_tokens=8)[0]
    eos = row[3]
    cut = generate(gd, params, rest, PROMPTS[:1], max_new_tokens=8, eos_id=eos)[0]
    assert cut == row[: row.index(eos)]
    assert np.all(np.array(cut) != eos)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p must be in (0, 1]"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
    ],
)
def test_bad_sampling_arguments_are_one_line_errors(kw, needle):
    gd, params, rest = _model()
    with pytest.raises(ValueError) as e:
        generate(gd, params, rest, PROMPTS, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
