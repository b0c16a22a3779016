"""adapters.format against real PEFT adapters and transformers checkpoints of a tiny random Llama.

Every adapter here is made by PEFT itself (LoraConfig + get_peft_model + save_pretrained); each broken
case starts from a good one and breaks exactly one thing. No downloads; the models have 2 layers.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.errors import (
    AdapterFormatError,
    BaseModelMismatchError,
    CorruptWeightsError,
    InvalidConfigError,
    MissingFileError,
    MissingTensorError,
    NonFiniteWeightsError,
    NotRegularFileError,
    PickledWeightsError,
    RankError,
    TensorDtypeError,
    UnexpectedTensorError,
    UnsupportedAdapterError,
)
from adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FullModelInfo,
    LoraAdapterInfo,
    detect_kind,
    inspect_full_checkpoint,
    inspect_lora_adapter,
    load_lora_tensors,
)

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=256,
)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


def tiny_model(dtype=None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    return model.to(dtype) if dtype is not None else model


def make_adapter(dest: Path, *, model_overrides=None, dtype=None, **lora) -> Path:
    """Save a real PEFT LoRA adapter of the tiny Llama to `dest` (B non-zero: init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            tiny_model(dtype, **(model_overrides or {})),
            LoraConfig(task_type="CAUSAL_LM", **lora),
            autocast_adapter_dtype=False,  # keep LoRA weights in the model's dtype (PEFT upcasts to fp32 otherwise)
        )
        peft_model.save_pretrained(dest)
    return dest


def save_full(dest: Path, **overrides) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(**overrides).save_pretrained(dest)
    return dest


def read_config(d: Path, name=ADAPTER_CONFIG) -> dict:
    return json.loads((d / name).read_text())


def edit_config(d: Path, name=ADAPTER_CONFIG, **changes) -> Path:
    cfg = read_config(d, name)
    cfg.update(changes)
    (d / name).write_text(json.dumps(cfg))
    return d


def edit_tensors(d: Path, fn, name=ADAPTER_WEIGHTS) -> Path:
    tensors = load_file(str(d / name))
    fn(tensors)
    save_file(tensors, str(d / name), metadata={"format": "pt"})
    return d


class _Bomb:
    """Unpickling this creates a marker file: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_pickle_bomb(path: Path) -> Path:
    marker = path.parent.parent / f"UNPICKLED-{path.name}"
    path.write_bytes(pickle.dumps(_Bomb(marker)))
    return marker


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_full(tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def base_config(base_dir) -> dict:
    return json.loads((base_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def good_src(tmp_path_factory) -> Path:
    """r=8, alpha=16, q_proj + v_proj, float32: the adapter every broken case starts from."""
    return make_adapter(tmp_path_factory.mktemp("good") / "adapter", r=8, lora_alpha=16)


@pytest.fixture
def good(good_src, tmp_path) -> Path:
    return Path(shutil.copytree(good_src, tmp_path / "adapter"))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickle attempt fails the test loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("something tried to unpickle a user file")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)


# --------------------------------------------------------------------------------------------------
# Good adapters


GOOD_CASES = {
    "r8-alpha16-qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 8, 2.0, ("q_proj", "v_proj")),
    "r16-rslora-all": (dict(r=16, lora_alpha=32, use_rslora=True, target_modules=ALL), 16, 8.0, tuple(sorted(ALL))),
    "r16-alpha8-attn": (dict(r=16, lora_alpha=8, target_modules=ATTN), 16, 0.5, tuple(sorted(ATTN))),
    "all-linear": (dict(r=8, lora_alpha=8, target_modules="all-linear"), 8, 1.0, tuple(sorted(ALL))),
    "regex": (dict(r=8, lora_alpha=4, target_modules=r".*\.(q_proj|down_proj)"), 8, 0.5, ("down_proj", "q_proj")),
    "full-names": (dict(r=4, lora_alpha=8, target_modules=[
        "self_attn.k_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
    ]), 4, 2.0, ("k_proj", "up_proj")),
    "exclude": (dict(r=8, lora_alpha=8, target_modules=ALL, exclude_modules=["o_proj", "down_proj"]), 8, 1.0,
                ("gate_proj", "k_proj", "q_proj", "up_proj", "v_proj")),
    "harmless-pattern": (dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 16}),
                         8, 2.0, ("q_proj", "v_proj")),
    "copy-pasted-extra-names": (dict(r=8, lora_alpha=8, target_modules=["q_proj", "c_attn", "query_key_value"]),
                                8, 1.0, ("q_proj",)),
}


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_good_adapter(case, tmp_path, base_config):
    lora, rank, scaling, modules = GOOD_CASES[case]
    d = make_adapter(tmp_path / case, **lora)
    info = inspect_lora_adapter(d, base_config)
    assert isinstance(info, LoraAdapterInfo)
    assert info.rank == rank
    assert info.alpha == lora["lora_alpha"]
    assert info.use_rslora == lora.get("use_rslora", False)
    assert info.scaling == pytest.approx(scaling)
    assert info.target_modules == modules
    assert info.num_layers_with_lora == 2 and info.layers == (0, 1)
    assert info.dtype == "float32"
    tensors = load_file(str(d / ADAPTER_WEIGHTS))
    assert info.size_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(info.modules) * 2 == len(tensors)
    assert detect_kind(d) == "lora"


def test_size_bytes_and_modules_exact(tmp_path, base_config):
    info = inspect_lora_adapter(make_adapter(tmp_path / "a", r=8, lora_alpha=16), base_config)
    # per layer: q A [8,64] + B [64,8], v A [8,64] + B [32,8]; 2 layers; fp32
    assert info.size_bytes == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) * 4
    assert info.modules == ((0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj"))


def test_layers_to_transform(tmp_path, base_config):
    d = make_adapter(tmp_path / "a", r=8, lora_alpha=8, target_modules=ATTN, layers_to_transform=[1])
    info = inspect_lora_adapter(d, base_config)
    assert info.layers == (1,) and info.num_layers_with_lora == 1
    assert info.target_modules == tuple(sorted(ATTN))


def test_bf16_adapter_and_missing_target_modules(tmp_path, base_config):
    d = make_adapter(tmp_path / "a", dtype=torch.bfloat16, r=8, lora_alpha=16)
    info = inspect_lora_adapter(d, base_config)
    assert info.dtype == "bfloat16"
    # target_modules absent: inferred from the tensors
    edit_config(d, target_modules=None)
    assert inspect_lora_adapter(d, base_config).target_modules == ("q_proj", "v_proj")


def test_base_config_defaults(tmp_path, base_config):
    """head_dim absent -> hidden // heads; num_key_value_heads absent -> heads (MHA base)."""
    cfg = {k: v for k, v in base_config.items() if k != "head_dim"}
    d = make_adapter(tmp_path / "gqa", r=8, lora_alpha=8, target_modules=ATTN)
    assert inspect_lora_adapter(d, cfg).rank == 8
    mha = make_adapter(tmp_path / "mha", model_overrides=dict(num_key_value_heads=4), r=8, lora_alpha=8,
                       target_modules=ATTN)
    cfg_mha = {k: v for k, v in cfg.items() if k != "num_key_value_heads"}
    assert inspect_lora_adapter(mha, cfg_mha).rank == 8
    with pytest.raises(BaseModelMismatchError, match="num_key_value_heads"):
        inspect_lora_adapter(d, cfg_mha)  # GQA adapter on an MHA base


def test_load_weights_match_peft_delta(tmp_path, base_config):
    """scaling * B @ A from our loader equals PEFT's own delta weight, for plain and rsLoRA."""
    from peft import LoraConfig, get_peft_model

    for rslora in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(tiny_model(), LoraConfig(r=8, lora_alpha=12, use_rslora=rslora,
                                                         target_modules=ALL, init_lora_weights=False))
            d = tmp_path / f"rs{rslora}"
            pm.save_pretrained(d)
        info = inspect_lora_adapter(d, base_config)
        weights = info.load_weights()
        assert set(weights) == {(layer, m) for layer in range(2) for m in ALL}
        for (layer, module), (a, b) in weights.items():
            parent = "self_attn" if module in ATTN else "mlp"
            lora_layer = getattr(getattr(pm.base_model.model.model.layers[layer], parent), module)
            expected = lora_layer.get_delta_weight("default")
            torch.testing.assert_close(info.scaling * (b @ a), expected)
        a, b = load_lora_tensors(d, info, dtype=torch.bfloat16)[(0, "k_proj")]
        assert a.dtype == torch.bfloat16 and tuple(a.shape) == (8, 64) and tuple(b.shape) == (32, 8)


def test_load_refuses_file_changed_since_inspection(good, base_config):
    info = inspect_lora_adapter(good, base_config)
    edit_tensors(good, lambda t: t.pop(f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"))
    with pytest.raises(AdapterFormatError, match="inspect it again"):
        info.load_weights()


# --------------------------------------------------------------------------------------------------
# Broken adapters: each starts from a good one and breaks one thing


def _pickle_only(d: Path, tmp: Path) -> Path:
    (d / ADAPTER_WEIGHTS).unlink()
    write_pickle_bomb(d / "adapter_model.bin")
    return d


def _drop(*names):
    def fn(t):
        for n in names:
            del t[n]
    return fn


def _set(name, value_fn):
    def fn(t):
        t[name] = value_fn(t[name])
    return fn


def _nan(x):
    x = x.clone()
    x[0, 0] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x[-1, -1] = float("inf")
    return x


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _truncate(d: Path, tmp: Path) -> Path:
    p = d / ADAPTER_WEIGHTS
    p.write_bytes(p.read_bytes()[:-10])
    return d


def _garbage_header(d: Path, tmp: Path) -> Path:
    (d / ADAPTER_WEIGHTS).write_bytes(b"this is not a safetensors file at all")
    return d


Q0A, Q0B = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
V1A, V1B = f"{PREFIX}.1.self_attn.v_proj.lora_A.weight", f"{PREFIX}.1.self_attn.v_proj.lora_B.weight"

# id -> (break(good_dir, tmp_path) -> dir, error type, message fragment[, inspect kwargs])
BROKEN = {
    # files
    "pickled-bin-only": (_pickle_only, PickledWeightsError, "convert to safetensors"),
    "no-adapter-config": (lambda d, t: (d / ADAPTER_CONFIG).unlink() or d, MissingFileError, "no adapter_config.json"),
    "no-safetensors": (lambda d, t: (d / ADAPTER_WEIGHTS).unlink() or d, MissingFileError,
                       "no adapter_model.safetensors"),
    "invalid-json": (lambda d, t: _write(d / ADAPTER_CONFIG, '{"r": 8,'), InvalidConfigError,
                     "not valid JSON"),
    "json-not-object": (lambda d, t: _write(d / ADAPTER_CONFIG, "[1, 2]"), InvalidConfigError,
                        "JSON object"),
    "not-a-dir": (lambda d, t: d / ADAPTER_CONFIG, MissingFileError, "not a directory"),
    "does-not-exist": (lambda d, t: d / "nope", MissingFileError, "does not exist"),
    "truncated-safetensors": (_truncate, CorruptWeightsError, "truncated"),
    "garbage-safetensors": (_garbage_header, CorruptWeightsError, "safetensors"),
    # config options
    "peft-type-loha": (lambda d, t: edit_config(d, peft_type="LOHA"), UnsupportedAdapterError, "peft_type 'LOHA'"),
    "no-peft-type": (lambda d, t: edit_config(d, peft_type=None), InvalidConfigError, "no peft_type"),
    "task-seq-cls": (lambda d, t: edit_config(d, task_type="SEQ_CLS"), UnsupportedAdapterError, "task_type"),
    "modules-to-save": (lambda d, t: make_adapter(t / "m", modules_to_save=["lm_head"]), UnsupportedAdapterError,
                        "modules_to_save"),
    "embed-tokens-target": (lambda d, t: make_adapter(t / "m", target_modules=["embed_tokens", "q_proj"]),
                            UnsupportedAdapterError, "embed_tokens"),
    "lm-head-target": (lambda d, t: make_adapter(t / "m", target_modules=["q_proj", "lm_head"]),
                       UnsupportedAdapterError, "lm_head"),
    "regex-hits-lm-head": (lambda d, t: edit_config(d, target_modules=r".*(q_proj|v_proj|lm_head)"),
                           UnsupportedAdapterError, "lm_head"),
    "embed-tensor-only": (lambda d, t: edit_tensors(d, lambda x: x.update(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 256)})),
        UnsupportedAdapterError, "embedding"),
    "dora": (lambda d, t: make_adapter(t / "m", use_dora=True), UnsupportedAdapterError, "DoRA"),
    "dora-tensors-config-says-no": (lambda d, t: edit_config(make_adapter(t / "m", use_dora=True), use_dora=False),
                                    UnsupportedAdapterError, "magnitude"),
    "lora-bias": (lambda d, t: make_adapter(t / "m", lora_bias=True), UnsupportedAdapterError, "lora_bias"),
    "bias-all": (lambda d, t: edit_config(d, bias="all"), UnsupportedAdapterError, "bias 'all'"),
    "layer-replication": (lambda d, t: edit_config(d, layer_replication=[[0, 2], [1, 2]]), UnsupportedAdapterError,
                          "layer_replication"),
    "fan-in-fan-out": (lambda d, t: edit_config(d, fan_in_fan_out=True), UnsupportedAdapterError, "fan_in_fan_out"),
    "target-parameters": (lambda d, t: edit_config(d, target_parameters=["mlp.experts.down_proj"]),
                          UnsupportedAdapterError, "target_parameters"),
    "trainable-tokens": (lambda d, t: edit_config(d, trainable_token_indices=[1, 2]), UnsupportedAdapterError,
                         "trainable_token_indices"),
    "rank-pattern": (lambda d, t: make_adapter(t / "m", r=8, rank_pattern={"v_proj": 4}), UnsupportedAdapterError,
                     "rank_pattern"),
    "alpha-pattern": (lambda d, t: edit_config(d, alpha_pattern={"q_proj": 32}), UnsupportedAdapterError,
                      "alpha_pattern"),
    "unknown-targets": (lambda d, t: edit_config(d, target_modules=["c_attn"]), UnsupportedAdapterError,
                        "matches none"),
    "bad-regex": (lambda d, t: edit_config(d, target_modules="(q_proj"), InvalidConfigError, "regular expression"),
    "target-modules-number": (lambda d, t: edit_config(d, target_modules=5), InvalidConfigError, "target_modules"),
    # ranks
    "rank-128-over-64": (lambda d, t: make_adapter(t / "m", r=128), RankError, "maximum rank 64"),
    "rank-over-custom-max": (lambda d, t: d, RankError, "maximum rank 4", dict(max_rank=4)),
    "rank-zero": (lambda d, t: edit_config(d, r=0), RankError, "must be positive"),
    "rank-not-int": (lambda d, t: edit_config(d, r="eight"), InvalidConfigError, "r = 'eight'"),
    "rank-config-vs-tensors": (lambda d, t: edit_config(d, r=4), RankError, "r = 4"),
    "alpha-not-number": (lambda d, t: edit_config(d, lora_alpha="16"), InvalidConfigError, "lora_alpha"),
    # base model mismatch
    "hidden-128-vs-64": (lambda d, t: make_adapter(t / "m", model_overrides=dict(hidden_size=128)),
                         BaseModelMismatchError, "adapter was trained for hidden_size 128, base model has 64"),
    "intermediate": (lambda d, t: make_adapter(t / "m", model_overrides=dict(intermediate_size=256),
                                               target_modules=["down_proj"]),
                     BaseModelMismatchError, "intermediate_size 256, base model has 128"),
    "kv-heads": (lambda d, t: make_adapter(t / "m", model_overrides=dict(num_key_value_heads=4),
                                           target_modules=["k_proj"]),
                 BaseModelMismatchError, "num_key_value_heads*head_dim 64, base model has 32"),
    "more-layers": (lambda d, t: make_adapter(t / "m", model_overrides=dict(num_hidden_layers=3)),
                    BaseModelMismatchError, "layer 2"),
    "more-layers-full-names": (lambda d, t: edit_config(d, target_modules=["model.layers.5.self_attn.q_proj"]),
                               BaseModelMismatchError, "only 2 layers"),
    "fewer-layers": (lambda d, t: make_adapter(t / "m", model_overrides=dict(num_hidden_layers=1)),
                     MissingTensorError, "fewer layers"),
    "name-hint": (lambda d, t: edit_config(make_adapter(t / "m", model_overrides=dict(hidden_size=128)),
                                           base_model_name_or_path="meta-llama/Llama-3.1-8B"),
                  BaseModelMismatchError, "meta-llama/Llama-3.1-8B"),
    # tensors
    "a-without-b": (lambda d, t: edit_tensors(d, _drop(Q0B)), MissingTensorError, "no lora_B"),
    "b-without-a": (lambda d, t: edit_tensors(d, _drop(V1A)), MissingTensorError, "no lora_A"),
    "module-missing-on-a-layer": (lambda d, t: edit_tensors(d, _drop(V1A, V1B)), MissingTensorError,
                                  "model.layers.1.self_attn.v_proj"),
    "no-tensors": (lambda d, t: edit_tensors(d, lambda x: x.clear()), MissingTensorError, "no tensors"),
    "unexpected-tensor": (lambda d, t: edit_tensors(d, lambda x: x.update({"extra.weight": torch.zeros(2)})),
                          UnexpectedTensorError, "'extra.weight'"),
    "unsupported-module-tensor": (lambda d, t: edit_tensors(d, lambda x: x.update(
        {f"{PREFIX}.0.self_attn.qkv_proj.lora_A.weight": torch.zeros(8, 64)})), UnexpectedTensorError, "qkv_proj"),
    "tensor-not-in-target-modules": (lambda d, t: edit_config(d, target_modules=["q_proj"]), UnexpectedTensorError,
                                     "does not select"),
    "nan": (lambda d, t: edit_tensors(d, _set(Q0B, _nan)), NonFiniteWeightsError, "NaN"),
    "inf-bf16": (lambda d, t: edit_tensors(make_adapter(t / "m", dtype=torch.bfloat16), _set(V1A, _inf)),
                 NonFiniteWeightsError, "1 NaN/Inf"),
    "nan-fp16": (lambda d, t: edit_tensors(make_adapter(t / "m", dtype=torch.float16), _set(Q0A, _nan)),
                 NonFiniteWeightsError, "NaN"),
    "int-dtype": (lambda d, t: edit_tensors(d, _set(Q0A, lambda x: x.to(torch.int32))), TensorDtypeError,
                  "non-float dtype I32"),
    "zero3-1d-tensor": (lambda d, t: edit_tensors(d, _set(Q0A, lambda x: x.flatten())), CorruptWeightsError, "2-D"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter(case, good, tmp_path, base_config, no_unpickling):
    breaker, error, fragment, *kwargs = BROKEN[case]
    d = breaker(good, tmp_path)
    with pytest.raises(error) as exc_info:
        inspect_lora_adapter(d, base_config, **(kwargs[0] if kwargs else {}))
    assert fragment in str(exc_info.value)
    assert isinstance(exc_info.value, AdapterFormatError) and isinstance(exc_info.value, ValueError)
    assert str(tmp_path) not in str(exc_info.value)  # files by name: on a server the dir is a temp dir


def test_pickle_never_opened(good, base_config, no_unpickling):
    (good / ADAPTER_WEIGHTS).unlink()
    marker = write_pickle_bomb(good / "adapter_model.bin")
    with pytest.raises(PickledWeightsError, match="adapter_model.bin") as exc_info:
        inspect_lora_adapter(good, base_config)
    assert "never opened" in str(exc_info.value)
    assert not marker.exists()


def test_bin_next_to_safetensors_is_ignored(good, base_config, no_unpickling):
    """Trainer dirs often carry training_args.bin: never opened, the safetensors adapter is used."""
    marker = write_pickle_bomb(good / "training_args.bin")
    assert inspect_lora_adapter(good, base_config).rank == 8
    assert not marker.exists()


def test_bad_base_config_is_not_an_adapter_error(good, base_config):
    cfg = {k: v for k, v in base_config.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size") as exc_info:
        inspect_lora_adapter(good, cfg)
    assert not isinstance(exc_info.value, AdapterFormatError)


def test_inspect_is_the_one_entry_for_both_kinds(good, base_dir, base_config):
    from adapters.format import inspect

    lora = inspect(good, base_config, 8)
    assert isinstance(lora, LoraAdapterInfo) and lora.kind == "lora" and lora.rank == 8
    full = inspect(base_dir, base_config, 8)
    assert isinstance(full, FullModelInfo) and full.kind == "full"
    with pytest.raises(RankError, match="maximum rank 4"):
        inspect(good, base_config, 4)
    assert inspect(good, base_config, None).rank == 8  # no ceiling known: the server decides
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        inspect(good, base_config, 0)


# --------------------------------------------------------------------------------------------------
# Full checkpoints


def test_full_checkpoint_ok(base_dir, base_config):
    info = inspect_full_checkpoint(base_dir, base_config, check_finite=True)
    assert isinstance(info, FullModelInfo)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (2, 64, 256)
    assert info.dtype == "float32" and info.files == ("model.safetensors",)
    assert info.num_tensors == 3 + 9 * 2  # embed, norm, lm_head + 9 per layer
    assert info.size_bytes == sum(t.numel() * 4 for t in load_file(str(base_dir / "model.safetensors")).values())
    assert detect_kind(base_dir) == "full"


def test_full_checkpoint_sharded_and_tied(tmp_path):
    d = tmp_path / "tied"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(tie_word_embeddings=True).save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    cfg = read_config(d, "config.json")
    info = inspect_full_checkpoint(d, cfg)
    assert info.tie_word_embeddings and len(info.files) > 1
    # a shard gone
    (d / info.files[-1]).unlink()
    with pytest.raises(MissingFileError, match=info.files[-1]):
        inspect_full_checkpoint(d, cfg)


def test_full_checkpoint_different_hidden(tmp_path, base_config):
    d = save_full(tmp_path / "wide", hidden_size=128)
    with pytest.raises(BaseModelMismatchError, match="hidden_size 128, base model has 64"):
        inspect_full_checkpoint(d, base_config)


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("architectures", ["MistralForCausalLM"], "architectures[0] 'MistralForCausalLM'"),
        ("vocab_size", 512, "vocab_size 512"),
        ("tie_word_embeddings", True, "tie_word_embeddings True"),
        ("num_key_value_heads", 4, "num_key_value_heads 4"),
        ("head_dim", 32, "head_dim 32"),
    ],
)
def test_full_checkpoint_config_mismatch(key, value, fragment, base_dir, base_config, tmp_path):
    d = Path(shutil.copytree(base_dir, tmp_path / "m"))
    edit_config(d, "config.json", **{key: value})
    with pytest.raises(BaseModelMismatchError) as exc_info:
        inspect_full_checkpoint(d, base_config)
    assert fragment in str(exc_info.value)


def test_full_checkpoint_bin_only_refused(base_dir, base_config, tmp_path, no_unpickling):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(base_dir / "config.json", d / "config.json")
    marker = write_pickle_bomb(d / "pytorch_model.bin")
    with pytest.raises(PickledWeightsError, match="convert to safetensors") as exc_info:
        inspect_full_checkpoint(d, base_config)
    assert "pytorch_model.bin" in str(exc_info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "case,error,fragment",
    [
        ("missing-tensor", MissingTensorError, "model.layers.1.mlp.up_proj.weight"),
        ("extra-tensor", UnexpectedTensorError, "'model.layers.0.mlp.extra.weight'"),
        ("nan", NonFiniteWeightsError, "NaN"),
        ("no-config", MissingFileError, "no config.json"),
        ("no-weights", MissingFileError, "no .safetensors"),
        ("int-weights", TensorDtypeError, "I64"),
    ],
)
def test_full_checkpoint_broken(case, error, fragment, base_dir, base_config, tmp_path):
    d = Path(shutil.copytree(base_dir, tmp_path / "m"))
    name = "model.safetensors"
    if case == "missing-tensor":
        edit_tensors(d, _drop("model.layers.1.mlp.up_proj.weight"), name)
    elif case == "extra-tensor":
        edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}), name)
    elif case == "nan":
        edit_tensors(d, _set("model.layers.0.mlp.down_proj.weight", _nan), name)
    elif case == "no-config":
        (d / "config.json").unlink()
    elif case == "no-weights":
        (d / name).unlink()
    elif case == "int-weights":
        edit_tensors(d, _set("model.norm.weight", lambda x: x.long()), name)
    with pytest.raises(error) as exc_info:
        inspect_full_checkpoint(d, base_config, check_finite=True)
    assert fragment in str(exc_info.value)
    assert str(tmp_path) not in str(exc_info.value)


# --------------------------------------------------------------------------------------------------
# detect_kind and module hygiene


def test_detect_kind_errors(tmp_path, good):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingFileError, match="neither a LoRA adapter"):
        detect_kind(empty)
    (good / ADAPTER_CONFIG).unlink()
    with pytest.raises(MissingFileError, match="no adapter_config.json"):
        detect_kind(good)
    with pytest.raises(MissingFileError, match="does not exist") as exc_info:
        detect_kind(tmp_path / "nope")
    assert str(tmp_path) not in str(exc_info.value)


# --------------------------------------------------------------------------------------------------
# Hostile input: every way in ends in an AdapterFormatError (HTTP 400), never another exception (HTTP 500)


NESTED = b"[" * 50_000 + b"]" * 50_000  # json.loads: RecursionError


def _nest(path: Path) -> None:
    if path.suffix == ".safetensors":
        path.write_bytes(struct.pack("<Q", len(NESTED)) + NESTED)
    else:
        path.write_bytes(NESTED)


@pytest.mark.parametrize("name,error", [(ADAPTER_WEIGHTS, CorruptWeightsError), (ADAPTER_CONFIG, InvalidConfigError)])
def test_deeply_nested_json_in_an_adapter(name, error, good, base_config):
    _nest(good / name)
    with pytest.raises(error, match="nested more than 64 levels deep") as exc_info:
        inspect_lora_adapter(good, base_config)
    assert str(exc_info.value).startswith(name)


@pytest.mark.parametrize("name,error", [("model.safetensors", CorruptWeightsError), ("config.json", InvalidConfigError),
                                        ("model.safetensors.index.json", InvalidConfigError)])
def test_deeply_nested_json_in_a_full_checkpoint(name, error, base_dir, base_config, tmp_path):
    d = Path(shutil.copytree(base_dir, tmp_path / "m"))
    _nest(d / name)
    with pytest.raises(error, match="nested more than 64 levels deep"):
        inspect_full_checkpoint(d, base_config)


def _link_out(d: Path, name: str) -> Path:
    """Move `name` out of the dir and leave a symlink to it: content that is not in the dir."""
    outside = d.parent / f"outside-{name}"
    shutil.move(d / name, outside)
    (d / name).symlink_to(outside)
    return d


@pytest.mark.parametrize("name", [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
def test_symlinks_in_an_adapter_are_refused_never_followed(name, good, base_config):
    _link_out(good, name)
    with pytest.raises(NotRegularFileError, match=f"^{name} is a symbolic link; hotswap uploads regular files only"):
        detect_kind(good)  # only an adapter_config.json link decides the kind...
        inspect_lora_adapter(good, base_config)  # ...the weights link is found here


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_symlinks_in_a_full_checkpoint_are_refused(name, base_dir, base_config, tmp_path):
    d = _link_out(Path(shutil.copytree(base_dir, tmp_path / "m")), name)
    with pytest.raises(NotRegularFileError, match=f"{name} is a symbolic link"):
        inspect_full_checkpoint(d, base_config)


def test_a_symlinked_shard_is_refused(tmp_path):
    d = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model().save_pretrained(d, max_shard_size="40KB")
    shard = sorted(d.glob("model-*.safetensors"))[0].name
    _link_out(d, shard)
    with pytest.raises(NotRegularFileError, match=f"{shard} is a symbolic link"):
        inspect_full_checkpoint(d, read_config(d, "config.json"))


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_fifo_or_dir_in_place_of_a_file_is_refused(kind, good, base_config):
    (good / ADAPTER_CONFIG).unlink()
    if kind == "fifo":
        os.mkfifo(good / ADAPTER_CONFIG)  # opening it for reading would block forever
    else:
        (good / ADAPTER_CONFIG).mkdir()
    with pytest.raises(NotRegularFileError, match="adapter_config.json is not a regular file"):
        inspect_lora_adapter(good, base_config)


@pytest.mark.parametrize("layer", ["9" * 5000, "1\u0661", "01"])
def test_odd_layer_numbers_in_tensor_names(layer, good, base_config):
    """int() refuses 5000 digits (ValueError), and reads "1" + an Arabic-Indic one as layer 11."""
    name = f"{PREFIX}.{layer}.self_attn.q_proj.lora_A.weight"
    edit_tensors(good, lambda t: t.update({name: torch.zeros(8, 64)}))
    with pytest.raises(UnexpectedTensorError, match="unexpected tensor"):
        inspect_lora_adapter(good, base_config)


def test_a_tensor_name_with_a_trailing_newline_is_not_a_lora_tensor(good, base_config):
    edit_tensors(good, lambda t: t.update({Q0A + "\n": t[Q0A].clone()}))
    with pytest.raises(UnexpectedTensorError, match="unexpected tensor"):
        inspect_lora_adapter(good, base_config)


@pytest.mark.parametrize("config_text", [
    '{"peft_type": "LORA", "r": ' + "1" * 5000 + "}",  # json.loads: ValueError (int over 4300 digits)
    json.dumps(dict(peft_type="LORA", r=8, lora_alpha=16,
                    target_modules=[f"model.layers.{'1' * 5000}.self_attn.q_proj"])),
    json.dumps(dict(peft_type="LORA", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                    layers_pattern="model|")),  # a top-level alternative: the idx group is None (TypeError)
    json.dumps(dict(peft_type="LORA", r=8, lora_alpha=16, target_modules="(" * 5000 + ")" * 5000)),  # RecursionError
    json.dumps(dict(peft_type="LORA", r=8, lora_alpha=16, target_modules="q_proj{99999999999}")),  # OverflowError
], ids=["huge-int", "huge-layer-in-target", "pattern-alternative", "deep-regex", "huge-repeat"])
def test_hostile_config_values_are_format_errors(config_text, good, base_config):
    (good / ADAPTER_CONFIG).write_text(config_text)
    with pytest.raises(AdapterFormatError):
        inspect_lora_adapter(good, base_config)


def test_module_imports_no_torch_worker_or_api():
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, adapters.format, adapters.errors\n"
        "bad = [m for m in ('torch', 'worker', 'api') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    for path in [*sorted((root / "adapters" / "format").glob("*.py")), root / "adapters" / "errors.py"]:
        name = str(path.relative_to(root))
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                if isinstance(node, ast.Attribute) and node.attr == "load":
                    assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), "torch.load"
                continue
            for mod in mods:
                top = mod.split(".")[0]
                assert top not in ("pickle", "dill", "joblib", "worker", "api"), f"{name} imports {mod}"
                if top == "torch" or mod == "safetensors.torch":  # only lazily, inside functions
                    assert node.col_offset > 0, f"{name} imports {mod} at module level"
