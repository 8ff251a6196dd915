"""HF transformers checkpoints in and out (moe_lab/interop/), against transformers itself.

Every class: a tiny random HF model the test writes -> `moe-lab import` -> moe_lab's
logits equal transformers' -> `moe-lab export` -> transformers loads it and gives the
original's logits.  Then the growth paper's workflow on an imported checkpoint (width
with noise 0, depth with zeroed copies), native runs exported (byte tokenizer, MoE ->
Mixtral), and the bad inputs.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from hf_models import CLASSES, VOCAB, hf_logits, make_hf_model, write_tokenizer

from moe_lab.cli.main import main
from moe_lab.config.load import config_from_json
from moe_lab.config.schema import ConfigError
from moe_lab.data.tokenizer import BYTE_TOKENIZER, load_tokenizer
from moe_lab.interop import hf_config
from moe_lab.interop.hf_tokenizer import hf_tokenizer_of
from moe_lab.train.checkpoint import Checkpointer, write_checkpoint
from moe_lab.train.run_dir import config_path, write_json_atomic
from moe_lab.train.state import setup_on_devices


def _transformers():
    """transformers (and torch), imported by the tests that use them, not at collection:
    every xdist worker collects every module, and the HF stack takes ~13-25 s to import."""
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{class: (HF dir, the torch model)}, written once for the module."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: (str(root / arch), make_hf_model(arch, str(root / arch))) for arch in CLASSES}


def moe_lab_logits(run: str, tokens=TOKENS) -> np.ndarray:
    cfg = config_from_json(config_path(run))
    setup = setup_on_devices(cfg)[1]
    with Checkpointer(run, create=False) as ckpt:
        state, _ = ckpt.restore(ckpt.latest_step(), setup.abstract_state)
        if "opt_state" not in ckpt.restore_raw(ckpt.latest_step()):  # an import: fresh Adam
            assert not any(np.any(x) for x in jax.tree.leaves(state["opt_state"]))
    fn = jax.jit(lambda p, m, t: nnx.merge(setup.graphdef, p, m)(t)[0])
    return np.asarray(fn(state["params"], state["model_state"], tokens))


def load_hf(path):
    import torch

    return _transformers().AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("arch", list(CLASSES))
def test_import_matches_transformers_and_export_round_trips(arch, hf_dirs, tmp_path):
    hf_dir, model = hf_dirs[arch]
    run, back = tmp_path / "run", tmp_path / "hf_back"
    assert cli("import", "--hf", hf_dir, "--to", run) == 0
    want = hf_logits(model, TOKENS)
    got = moe_lab_logits(str(run))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    lineage = json.load(open(run / "lineage.json"))
    assert lineage["hf_architecture"] == arch and "model.safetensors" in lineage["files"]
    assert cli("export", "--workdir", run, "--to", back) == 0
    assert json.load(open(back / "config.json"))["architectures"] == [arch]
    np.testing.assert_allclose(hf_logits(load_hf(str(back)), TOKENS), want, atol=1e-5, rtol=0)
    tok = _transformers().AutoTokenizer.from_pretrained(str(back))
    ours = load_tokenizer(str(run / "tokenizer" / "tokenizer.json"))
    text = "the cat <think>sat</think><answer>5"
    assert tok(text).input_ids == ours.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)


@pytest.mark.parametrize(
    "arch,grow",
    [
        ("MixtralForCausalLM", ["--width-factor", "2", "--noise", "0"]),
        ("LlamaForCausalLM", ["--depth", "interpose", "--zero-copies"]),
    ],
)
def test_imported_checkpoint_grows_and_exports_the_same_function(arch, grow, hf_dirs, tmp_path):
    """2510.08008 on a public-format checkpoint: import -> grow (function-preserving) ->
    export -> transformers' logits are the original model's."""
    hf_dir, model = hf_dirs[arch]
    run, grown, back = tmp_path / "run", tmp_path / "grown", tmp_path / "back"
    assert cli("import", "--hf", hf_dir, "--to", run) == 0
    assert cli("grow", "--from", run, "--to", grown, *grow) == 0
    assert cli("export", "--workdir", grown, "--to", back) == 0
    hf = json.load(open(back / "config.json"))
    orig = json.load(open(os.path.join(hf_dir, "config.json")))
    if arch == "MixtralForCausalLM":
        assert (hf["num_local_experts"], hf["num_experts_per_tok"]) == (
            2 * orig["num_local_experts"],
            2 * orig["num_experts_per_tok"],
        )
    else:
        assert hf["num_hidden_layers"] == 2 * orig["num_hidden_layers"]
    np.testing.assert_allclose(
        hf_logits(load_hf(str(back)), TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0
    )


def _native_run(tmp_path, **model) -> str:
    """A run of moe_lab's own (random init, byte tokenizer) with checkpoint 0."""
    cfg = tiny_config(model=model)
    setup = setup_on_devices(cfg)[1]
    run = str(tmp_path / "native")
    os.makedirs(run)
    write_checkpoint(run, 0, jax.device_get(setup.init_state()), {"tokens_seen": 0.0})
    write_json_atomic(config_path(run), cfg.to_dict())
    return run


@pytest.mark.parametrize(
    "model,arch",
    [
        ({}, "LlamaForCausalLM"),
        (
            {
                "ffn": "moe",
                "moe": {"num_experts": 4, "top_k": 2, "router": "topk_softmax", "expert_hidden": 32},
            },
            "MixtralForCausalLM",
        ),
    ],
)
def test_a_native_byte_run_exports_to_transformers(model, arch, tmp_path):
    run = _native_run(tmp_path, **model)
    back = tmp_path / "back"
    assert cli("export", "--workdir", run, "--to", back) == 0
    assert json.load(open(back / "config.json"))["architectures"] == [arch]
    tokens = np.asarray(
        [
            BYTE_TOKENIZER.encode(
                "<s>a=1 b=a+2 mod 11. b?<think>",
            )
        ]
    )
    np.testing.assert_allclose(
        hf_logits(load_hf(str(back)), tokens), moe_lab_logits(run, tokens), atol=1e-4, rtol=0
    )
    tok = _transformers().AutoTokenizer.from_pretrained(str(back))
    for text in ("x<sep>y", "naïve 日本 <answer>3</s>", " two  spaces\n"):
        assert tok(text).input_ids == BYTE_TOKENIZER.encode(text)
        assert tok.decode(tok(text).input_ids) == text


def test_sharded_export_loads_in_transformers_and_imports_back(tmp_path):
    """Above the shard size: model-0000k-of-0000N.safetensors + the index, which
    transformers loads and `import` reads (the Hub's layout of large checkpoints)."""
    from moe_lab.interop.hf_export import export_hf

    run = _native_run(tmp_path)
    back, again = str(tmp_path / "back"), str(tmp_path / "again")
    export_hf(run, back, shard_bytes=40_000, log=lambda *_: None)
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tokens = np.asarray([BYTE_TOKENIZER.encode("<s>x=1 y=x+1 mod 11. y?")])
    want = moe_lab_logits(run, tokens)
    np.testing.assert_allclose(hf_logits(load_hf(back), tokens), want, atol=1e-4, rtol=0)
    assert cli("import", "--hf", back, "--to", again) == 0
    np.testing.assert_allclose(moe_lab_logits(again, tokens), want, atol=1e-5, rtol=0)


def test_a_vocabulary_larger_than_the_checkpoint_gains_mean_rows(tmp_path, capsys):
    """The tokenizer has 320 ids, the checkpoint 300 rows: import adds 20 rows (the mean
    of the others) and says so; logits of the checkpoint's own ids are unchanged."""
    hf_dir, run = str(tmp_path / "hf"), tmp_path / "run"
    model = make_hf_model("LlamaForCausalLM", hf_dir, vocab_size=300)
    assert cli("import", "--hf", hf_dir, "--to", run) == 0
    assert "20 embedding rows added" in capsys.readouterr().out
    tokens = TOKENS % 300
    got = moe_lab_logits(str(run), tokens)
    assert got.shape[-1] == VOCAB
    np.testing.assert_allclose(got[..., :300], hf_logits(model, tokens), atol=1e-4, rtol=0)
    with Checkpointer(str(run), create=False) as ckpt:
        embed = ckpt.restore_raw(0, parts=("params",))["params"]["embed_VD"]
    np.testing.assert_allclose(embed[300:], np.broadcast_to(embed[:300].mean(0), (20, 32)), atol=1e-6)


def test_byte_tokenizer_as_hf_gives_the_same_ids():
    hf = hf_tokenizer_of(BYTE_TOKENIZER)
    for text in ("", "hello world", "<think>1+1</think><answer>2</s>", "\x00\xff é"):
        assert hf.encode(text, add_special_tokens=False).ids == BYTE_TOKENIZER.encode(text)


SP_TEXTS = (
    "",
    " ",
    "hello world",
    "  two  spaces  ",
    "a\tb\nc\r\nd",
    "   leading",
    "the cat<sep>sat<answer> 19</s>",
    "<think>12 + 7</think><answer>19",
    "résumé 中文 😀 ǅ ﬁ",
    "Ｆｕｌｌ　ｗｉｄｔｈ",
    "19+12=31\n\n\nParis",
    "▁already▁",
    "naïve\u00a0cat " * 5,
)


@pytest.mark.parametrize(
    "model_type,options",
    [
        ("bpe", {}),
        ("unigram", {}),
        # Llama 2's tokenizer.model: no NFKC, whitespace kept as it is
        ("bpe", {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}),
    ],
)
def test_sentencepiece_runs_export_with_sentencepieces_ids(model_type, options, tmp_path):
    """A run's SentencePiece model, written as tokenizer.json, gives SentencePiece's own
    ids through transformers' AutoTokenizer (moe_lab's specials split out first, the
    dummy prefix per piece of text, NFKC, extra whitespace, byte fallback) and decodes
    text without specials back as SentencePiece does."""
    import random

    import sentencepiece as spm

    from moe_lab.interop.hf_tokenizer import write_hf_tokenizer

    rng = random.Random(0)
    words = "the cat sat on a mat Paris is capital of 12 + 7 = 19 answer résumé naïve".split()
    path = str(tmp_path / "sp.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([" ".join(rng.choices(words, k=rng.randint(3, 20))) for _ in range(300)]),
            model_writer=f,
            vocab_size=300,
            model_type=model_type,
            byte_fallback=True,
            minloglevel=2,
            **options,
        )
    ours = load_tokenizer(path)
    write_hf_tokenizer(ours, str(tmp_path), 128)
    hf = _transformers().AutoTokenizer.from_pretrained(str(tmp_path))
    # the spelled name of a byte or control piece stays characters in both (Unigram:
    # only where the vocabulary has its characters; hf_tokenizer.py)
    for text in SP_TEXTS + (("<unk> <0x41> x",) if model_type == "bpe" else ()):
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids, text
        if not ours._split_re.search(text):
            assert hf.decode(ids) == ours.decode(ids), text


def test_pretrained_vocabularies_keep_their_own_bos_eos(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(
        models.WordLevel(
            {"a": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "[UNK]": 3}, unk_token="[UNK]"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    ours = load_tokenizer(path)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.pad_id >= 4 and ours.think_start_id >= 4  # appended after the vocabulary


def _copy(src, dst, edit=None, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    if edit:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        cfg.update(edit)
        json.dump(cfg, open(path, "w"))
    return dst


def _truncated(hf_dir):
    """The weights file cut 100 bytes short: the header's last tensor ends past it."""
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return hf_dir


def test_bad_inputs_are_one_line_errors_and_write_nothing(hf_dirs, tmp_path, capsys):
    src = hf_dirs["MixtralForCausalLM"][0]
    cases = [
        (_copy(src, tmp_path / "nocfg", drop=["config.json"]), "has no config.json"),
        (_copy(src, tmp_path / "noweights", drop=["model.safetensors"]), "no .safetensors"),
        (_copy(src, tmp_path / "notok", drop=["tokenizer.json"]), "has no tokenizer"),
        (
            _copy(src, tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"]}),
            "architectures=['GPT2LMHeadModel']",
        ),
        (_copy(src, tmp_path / "swa", {"sliding_window": 4096}), "sliding_window=4096"),
        (
            _copy(src, tmp_path / "shape", {"intermediate_size": 48}),
            "tensor model.layers.0.block_sparse_moe.experts.0.w1.weight has shape",
        ),
        (_truncated(_copy(src, tmp_path / "truncated")), "not a readable safetensors file"),
    ]
    for hf_dir, message in cases:
        to = tmp_path / f"run_{os.path.basename(hf_dir)}"
        assert cli("import", "--hf", hf_dir, "--to", to) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(to)
        assert not [p for p in os.listdir(tmp_path) if ".importing-" in p]
    run = tmp_path / "run"
    assert cli("import", "--hf", src, "--to", run) == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for argv, message in [
        (["import", "--hf", src, "--to", run], "exists and is not empty"),
        (["export", "--workdir", run, "--to", tmp_path / "full"], "exists and is not empty"),
        (["export", "--workdir", run, "--step", 7, "--to", tmp_path / "x"], "no checkpoint at step 7"),
    ]:
        assert cli(*argv) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize(
    "model,why",
    [
        ({"stack": "recursive", "num_layers": 5}, "a recursive"),
        ({"ffn": "moe", "moe": {"router": "expert_choice"}}, "experts choose tokens"),
        ({"ffn": "moe", "moe": {"router": "sigmoid"}}, "loss-free selection bias"),
        ({"norm_placement": "post"}, "post-norm"),
    ],
)
def test_export_refuses_what_no_hf_class_represents(model, why):
    with pytest.raises(ConfigError, match=why):
        hf_config.architecture_for(tiny_config(model=model).model)


def test_tokenizer_fixture_has_the_specials(tmp_path):
    tok = load_tokenizer(write_tokenizer(str(tmp_path / "t.json")))
    assert tok.vocab_size == VOCAB and tok.think_start_id < 16


def test_a_bf16_checkpoint_round_trips_bit_for_bit(hf_dirs, tmp_path):
    """A bf16 checkpoint (as on the Hub) imports as param_dtype bfloat16 and exports to
    the same bits, tensor for tensor: no float32 detour rounds anything."""
    import torch

    from moe_lab.interop.safetensors_io import TensorReader

    src, model = hf_dirs["MixtralForCausalLM"]
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
    model.to(torch.float32)  # the fixture is shared
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), bf16 / name)
    run, back = tmp_path / "run", tmp_path / "back"
    assert cli("import", "--hf", bf16, "--to", run) == 0
    assert config_from_json(config_path(str(run))).model.param_dtype == "bfloat16"
    assert cli("export", "--workdir", run, "--to", back) == 0
    from safetensors import safe_open  # the reference reader

    a, b = TensorReader([str(bf16 / "model.safetensors")]), TensorReader([str(back / "model.safetensors")])
    assert a.names() == b.names()
    with safe_open(str(back / "model.safetensors"), framework="np") as ref:
        assert set(ref.keys()) == b.names()
        for name in ref.keys():  # our reader against the safetensors package's own
            np.testing.assert_array_equal(
                b(name).view(np.uint16), ref.get_tensor(name).view(np.uint16), err_msg=name
            )
    for name in sorted(a.names()):
        x, y = a(name), b(name)
        assert x.dtype == y.dtype == np.dtype("bfloat16") and x.shape == y.shape, name
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16), err_msg=name)
