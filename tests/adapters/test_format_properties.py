"""Property tests for adapters.format, the code that reads user bytes: whatever a client uploads, inspecting
it ends in a result or an `AdapterFormatError` (a 400 in the API, one line in the CLI), never in any other
exception (a 500, a traceback). Refusals name files, never the directory they were read from.

Files are written by hand here (8-byte length + JSON header + data), so no torch: fast enough for a few
hundred examples per property.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.errors import AdapterFormatError
from adapters.format import detect_kind, inspect_full_checkpoint, inspect_lora_adapter

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
PREFIX = "base_model.model.model.layers"
# A good adapter: q_proj [64 -> 64] and v_proj [64 -> 32] on both layers, r = 8.
LORA_SHAPES = {f"{PREFIX}.{layer}.self_attn.{m}.lora_{ab}.weight": shape
               for layer in range(2)
               for m, out in (("q_proj", 64), ("v_proj", 32))
               for ab, shape in (("A", [8, 64]), ("B", [out, 8]))}
GOOD_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
               "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": "tiny"}


def full_shapes() -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [256, 64], "model.norm.weight": [64], "lm_head.weight": [256, 64]}
    io = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = [64]
        for m, (d_in, d_out) in io.items():
            parent = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            shapes[f"{p}{parent}.{m}.weight"] = [d_out, d_in]
    return shapes


def safetensors_bytes(shapes: dict[str, list[int]], dtype: str = "F32") -> bytes:
    """A well-formed safetensors file of zeros."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return with_header(json.dumps(header).encode(), bytes(offset))


def with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def fresh_dir(scratch: Path, files: dict[str, bytes]) -> Path:
    d = Path(tempfile.mkdtemp(dir=scratch))
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def clean_outcome(fn, d: Path, *args, **kwargs) -> None:
    """Success, or an AdapterFormatError whose message names no server path; anything else fails the test."""
    try:
        fn(d, *args, **kwargs)
    except AdapterFormatError as exc:
        message = str(exc)
        assert str(d) not in message and str(d.parent) not in message, message
        assert len(message) < 2000, message  # hostile values are shown cut short
    finally:
        shutil.rmtree(d)


def inspect_lora(d: Path) -> None:
    detect_kind(d)
    inspect_lora_adapter(d, BASE)


def inspect_full(d: Path) -> None:
    detect_kind(d)
    inspect_full_checkpoint(d, BASE, check_finite=True)


def test_the_files_the_properties_start_from_are_valid(scratch):
    """So every property below varies something that is otherwise accepted."""
    lora = fresh_dir(scratch, {"adapter_config.json": dumps(GOOD_CONFIG),
                               "adapter_model.safetensors": safetensors_bytes(LORA_SHAPES)})
    assert inspect_lora_adapter(lora, BASE).rank == 8
    full = fresh_dir(scratch, {"config.json": dumps(BASE), "model.safetensors": safetensors_bytes(full_shapes())})
    assert inspect_full_checkpoint(full, BASE, check_finite=True).num_tensors == 21


# --------------------------------------------------------------------------------------------------
# Strategies


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80.safetensors", "q_proj\ud800"])
text = st.one_of(st.text(max_size=12), SURROGATES, st.sampled_from(["", "\x00", "../x", "a" * 5000]))
ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 8, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**4000]),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)),
    max_leaves=12,
)


def dumps(value) -> bytes:
    # ensure_ascii: a lone surrogate goes out as a "\ud800" escape, the way a hostile client would write it
    return json.dumps(value).encode()


# --------------------------------------------------------------------------------------------------
# safetensors headers


lora_names = st.one_of(
    st.sampled_from(sorted(LORA_SHAPES)),
    text,
    st.sampled_from([
        "__metadata__",
        f"{PREFIX}.{'9' * 5000}.self_attn.q_proj.lora_A.weight",  # int() refuses over 4300 digits
        f"{PREFIX}.\u0661.self_attn.q_proj.lora_A.weight",  # an Arabic-Indic digit one
        f"{PREFIX}.0.self_attn.q_proj.lora_A.weight\n",
        f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.lm_head.lora_A.weight",
    ]),
)
dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I32", "F8_E4M3", "BOOL", "X"]), json_values)
specs = st.one_of(
    st.fixed_dictionaries({}, optional={
        "dtype": dtypes,
        "shape": st.one_of(st.lists(ints, max_size=4), json_values),
        "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), st.lists(ints, max_size=3), json_values),
    }),
    json_values,
)
headers = st.dictionaries(lora_names, specs, max_size=5)


@SETTINGS
@given(header=headers, data=st.binary(max_size=64))
def test_arbitrary_header_entries(scratch, header, data):
    for weights, config, run in (("adapter_model.safetensors", ("adapter_config.json", GOOD_CONFIG), inspect_lora),
                                 ("model.safetensors", ("config.json", BASE), inspect_full)):
        files = {weights: with_header(dumps(header), data), config[0]: dumps(config[1])}
        clean_outcome(run, fresh_dir(scratch, files))


@st.composite
def laid_out_headers(draw):
    """Headers whose offsets are consistent, so inspection gets past the layout checks to names, shapes,
    dtypes and values; sometimes nudged off by one."""
    names = draw(st.lists(lora_names, min_size=1, max_size=6, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(["F32", "BF16", "F16", "I32", "F64"]))
        shape = draw(st.one_of(st.sampled_from(list(LORA_SHAPES.values())),
                               st.lists(st.integers(0, 16), max_size=3),
                               st.sampled_from([[0, 10**4000], [8, 0, 2**64]])))  # no bytes, huge dims
        n = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "F64": 8}[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    data = draw(st.sampled_from([b"\x00", b"\xff"])) * offset  # zeros, or NaN in every float dtype
    if draw(st.booleans()):
        data = data[:-1] if draw(st.booleans()) else data + b"\x00"
    return dumps(header), data


@SETTINGS
@given(laid_out=laid_out_headers())
def test_laid_out_headers(scratch, laid_out):
    header, data = laid_out
    d = fresh_dir(scratch, {"adapter_model.safetensors": with_header(header, data),
                            "adapter_config.json": dumps(GOOD_CONFIG)})
    clean_outcome(inspect_lora, d)


@SETTINGS
@given(length=st.integers(min_value=0, max_value=2**64 - 1), rest=st.binary(max_size=200))
def test_arbitrary_length_prefix_and_bytes(scratch, length, rest):
    d = fresh_dir(scratch, {"adapter_model.safetensors": struct.pack("<Q", length) + rest,
                            "adapter_config.json": dumps(GOOD_CONFIG)})
    clean_outcome(inspect_lora, d)


@SETTINGS
@given(header=st.one_of(st.binary(max_size=200), text.map(lambda s: s.encode("utf-8", "surrogatepass"))),
       data=st.binary(max_size=16))
def test_arbitrary_header_bytes_with_a_valid_length(scratch, header, data):
    d = fresh_dir(scratch, {"adapter_model.safetensors": with_header(header, data),
                            "adapter_config.json": dumps(GOOD_CONFIG)})
    clean_outcome(inspect_lora, d)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(min_value=1, max_value=100_000), opener=st.sampled_from(["[", '{"a":']))
def test_any_nesting_depth(scratch, depth, opener):
    closer = "]" if opener == "[" else "}"
    nested = (opener * depth + "1" + closer * depth).encode()
    for files in ({"adapter_model.safetensors": with_header(nested), "adapter_config.json": dumps(GOOD_CONFIG)},
                  {"adapter_model.safetensors": safetensors_bytes(LORA_SHAPES), "adapter_config.json": nested}):
        clean_outcome(inspect_lora, fresh_dir(scratch, files))


# --------------------------------------------------------------------------------------------------
# adapter_config.json and config.json


CONFIG_KEYS = ["peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path",
               "modules_to_save", "bias", "layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern",
               "alpha_pattern", "use_dora", "fan_in_fan_out", "lora_bias", "layer_replication"]
module_names = st.sampled_from(["q_proj", "v_proj", "k_proj", "lm_head", "embed_tokens", "c_attn",
                                "model.layers.0.self_attn.q_proj", f"model.layers.{'1' * 5000}.self_attn.q_proj",
                                "layers.\u0661.mlp.up_proj"])
config_values = st.one_of(
    json_values,
    st.lists(st.one_of(module_names, text), max_size=4),
    st.sampled_from(["all-linear", ".*q_proj", ".*(q_proj|v_proj)", "(", "x|", "model|", ")|(", "(?P<idx>x)",
                     "(" * 5000 + ")" * 5000, "a{99999999999}", "[/]", "LORA", "CAUSAL_LM", "none", "all", 8, 16, 0, -8, 1e300, float("nan"), 2**64]),
    st.dictionaries(st.one_of(module_names, text), json_values, max_size=3),
)


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), config_values, max_size=4))
def test_arbitrary_adapter_config_fields(scratch, changes):
    d = fresh_dir(scratch, {"adapter_config.json": dumps({**GOOD_CONFIG, **changes}),
                            "adapter_model.safetensors": safetensors_bytes(LORA_SHAPES)})
    clean_outcome(inspect_lora, d)


@SETTINGS
@given(config=json_values)
def test_adapter_config_of_any_json_value(scratch, config):
    d = fresh_dir(scratch, {"adapter_config.json": dumps(config),
                            "adapter_model.safetensors": safetensors_bytes(LORA_SHAPES)})
    clean_outcome(inspect_lora, d)


MODEL_KEYS = sorted(BASE) + ["head_dim", "attention_bias", "mlp_bias"]


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(MODEL_KEYS), config_values, max_size=3),
       index=st.one_of(st.none(), json_values, st.fixed_dictionaries({"weight_map": st.one_of(
           json_values, st.dictionaries(text, st.one_of(text, st.just("model.safetensors")), max_size=3))})))
def test_arbitrary_full_checkpoint_config_and_index(scratch, changes, index):
    files = {"config.json": dumps({**BASE, **changes}), "model.safetensors": safetensors_bytes(full_shapes())}
    if index is not None:
        files["model.safetensors.index.json"] = dumps(index)
    clean_outcome(inspect_full, fresh_dir(scratch, files))
