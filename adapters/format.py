"""Read and validate what users register: PEFT LoRA adapters and full fine-tunes of the base model.

A LoRA adapter is a PEFT dir: `adapter_config.json` + `adapter_model.safetensors`. A full fine-tune is
a Hugging Face model dir: `config.json` + `*.safetensors` (optionally sharded with an index). Both are
checked against the base model's `config.json` dict before the engine ever sees them, and every broken
or unsupported case raises its own `AdapterFormatError` subclass naming what is wrong and what to do.

Public entry points:

- `detect_kind(path) -> "lora" | "full"`
- `inspect_lora_adapter(path, base_config, max_rank=64) -> LoraAdapterInfo`
- `load_lora_tensors(path, info) -> {(layer, module): (A [r, in], B [out, r])}` (torch; also `info.load_weights()`)
- `inspect_full_checkpoint(path, base_config, check_finite=False) -> FullModelInfo`

How files are read: safetensors headers are parsed here directly (8-byte length + JSON), so shapes,
dtypes and layout are validated without loading any tensor data; NaN/Inf checks then stream one tensor
at a time in bounded chunks with numpy (bf16/fp16 by their exponent bits, no torch needed). torch is
imported only inside `load_lora_tensors`. Pickled files (.bin/.pt/...) are never opened: no torch.load,
no pickle, ever. Symlinks are never followed: a link in an upload could point anywhere on the machine
(/etc/passwd), so only regular files are read and anything else is refused (`NotRegularFileError`).
All JSON goes through `hotswap.safe_json` (deep nesting is an error, not a RecursionError).

Error messages name files by their name inside the directory (`adapter_config.json`), never by a full
path: on the server the directory is a temp dir the user never saw. Callers that know the user's path
(the CLI) put it in front.

Decisions:

- `target_modules` is resolved exactly as PEFT does (list: exact name or `.`-suffix match; string: a regex
  `re.fullmatch`ed against module names; "all-linear"), against this base's module names
  `model.layers.{i}.self_attn.q_proj` ... `model.layers.{i}.mlp.down_proj`, `model.embed_tokens`, `lm_head`;
  `layers_to_transform`/`layers_pattern` and `exclude_modules` are honoured. List entries matching nothing
  are ignored (PEFT ignores them too, and copy-pasted configs often list e.g. "c_attn"); a config that
  matches no projection at all is refused. A missing `target_modules` is inferred from the tensors.
  The resolved set must equal the set of (layer, module) pairs with tensors: PEFT saves every targeted layer.
- `rank_pattern` / `alpha_pattern` are refused when they give any targeted module a rank or alpha other
  than `r` / `lora_alpha` (the engine applies one scaling per adapter); entries without effect are accepted.
- Options that do not change inference math are ignored: `init_lora_weights`, `lora_dropout`, the
  `loftq`/`eva`/`corda`/`lora_ga`/`velora` configs, `base_model_name_or_path` (informational only: the
  base match is decided by tensor shapes, the name only appears as a hint in mismatch messages).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

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
from hotswap import safe_json

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_MAX_RANK",
    "SUPPORTED_MODULES",
    "AdapterFormatError",
    "FullModelInfo",
    "LoraAdapterInfo",
    "detect_kind",
    "inspect_full_checkpoint",
    "inspect_lora_adapter",
    "load_lora_tensors",
    "open_regular_file",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_INDEX = "model.safetensors.index.json"

# Files an upload may carry; anything else (a pickled .bin above all) is refused by name, unopened.
# \Z, not $: $ also matches before a trailing newline ("README.md\n").
UPLOADABLE_FILE = re.compile(
    r"^(adapter_config\.json|adapter_model\.safetensors|config\.json|generation_config\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|tokenizer\.json|"
    r"tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja|README\.md)\Z"
)
DEFAULT_MAX_RANK = 64

# The projections a LoRA may target, in the engine's order, and the sub-module each lives under.
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_LORA_PREFIX = "base_model.model.model.layers."
# fullmatch + ASCII: no trailing newline, no non-ASCII digits (int("٣") == 3), and at most 9 digits
# (int() refuses numbers over 4300 digits with a ValueError).
_LORA_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,8})\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)\.weight",
    re.ASCII,
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_JSON_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_CHUNK_BYTES = 32 << 20  # finiteness checks read at most this much at a time (a multiple of every itemsize)

# safetensors dtype -> (itemsize, name); only the float ones are accepted as weights.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

_MERGE_HINT = (
    "merge it into the base model with PEFT (`merged = model.merge_and_unload(); merged.save_pretrained(dir)`) "
    "and register the result as a full fine-tune, or retrain as plain LoRA"
)
_LORA_CONVERT_HINT = (
    "convert to safetensors: in a trusted environment load it with "
    "`PeftModel.from_pretrained(base_model, dir)` and `save_pretrained(out_dir)` it again "
    "(PEFT writes adapter_model.safetensors by default)"
)
_FULL_CONVERT_HINT = (
    "convert to safetensors: in a trusted environment load it with "
    "`AutoModelForCausalLM.from_pretrained(dir)` and `save_pretrained(out_dir)` it again "
    "(transformers writes model.safetensors by default)"
)


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class LoraAdapterInfo:
    """What the engine needs to know about a validated LoRA adapter.

    The delta applied to a targeted projection is `scaling * B @ A @ x`, with A `[rank, in]` and
    B `[out, rank]` as returned by `load_weights()` (B is *not* pre-scaled).
    """

    path: str
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA
    target_modules: tuple[str, ...]  # sorted short names, e.g. ("k_proj", "q_proj", "v_proj")
    num_layers_with_lora: int
    dtype: str  # "bfloat16" | "float16" | "float32" | "float64" | "mixed"
    size_bytes: int  # bytes of LoRA tensor data in the file
    layers: tuple[int, ...] = ()  # sorted layer indices carrying LoRA
    modules: tuple[tuple[int, str], ...] = ()  # every (layer, module) pair, sorted
    base_model_name_or_path: str | None = None  # informational only, never trusted
    _fingerprint: tuple[int, int] = field(default=(0, 0), repr=False, compare=False)

    def load_weights(self, dtype: Any = None, device: Any = "cpu") -> dict[tuple[int, str], tuple[Any, Any]]:
        """The LoRA tensors as torch tensors: `{(layer, module): (A [r, in], B [out, r])}`."""
        return load_lora_tensors(self.path, self, dtype=dtype, device=device)


@dataclass(frozen=True)
class FullModelInfo:
    """A validated full fine-tune: same architecture and dimensions as the base model."""

    path: str
    architecture: str | None
    num_layers: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str  # "bfloat16" | "float16" | "float32" | "float64" | "mixed"
    size_bytes: int  # bytes of tensor data over all files
    num_tensors: int
    files: tuple[str, ...]  # safetensors file names, sorted


# --------------------------------------------------------------------------------------------------
# Base model facts


@dataclass(frozen=True)
class _Dims:
    architecture: str | None
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "Qwen2ForCausalLM" or self.attention_bias

    def io(self, module: str) -> tuple[tuple[str, int], tuple[str, int]]:
        """((label, in_features), (label, out_features)) of a projection."""
        h = ("hidden_size", self.hidden_size)
        i = ("intermediate_size", self.intermediate_size)
        q = ("num_attention_heads*head_dim", self.q_size)
        kv = ("num_key_value_heads*head_dim", self.kv_size)
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }[module]

    @classmethod
    def from_config(cls, raw: Any, what: str, error: type[ValueError], need_vocab: bool) -> "_Dims":
        if not isinstance(raw, dict):
            raise error(f"{what} must be a JSON object, got {type(raw).__name__}")

        def integer(key: str, default: int | None = None) -> int:
            value = raw.get(key)
            if value is None:
                if default is None:
                    raise error(f"{what} lacks {_show(key)}")
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise error(f"{what} has {key} = {_show(value)}; expected a positive integer")
            return value

        def flag(key: str) -> bool:
            value = raw.get(key, False)
            if value is None:
                return False
            if not isinstance(value, bool):
                raise error(f"{what} has {key} = {_show(value)}; expected true or false")
            return value

        archs = raw.get("architectures")
        if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
            raise error(f"{what} has architectures = {_show(archs)}; expected a list of class names")
        hidden = integer("hidden_size")
        heads = integer("num_attention_heads")
        return cls(
            architecture=archs[0] if archs else None,
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=integer("num_key_value_heads", heads),
            head_dim=integer("head_dim", max(hidden // heads, 1)),
            vocab_size=integer("vocab_size") if need_vocab or raw.get("vocab_size") is not None else None,
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=flag("attention_bias"),
            mlp_bias=flag("mlp_bias"),
        )


def _base_dims(base_config: Any, need_vocab: bool) -> _Dims:
    # A broken *base* config is the server's problem: plain ValueError, not AdapterFormatError.
    return _Dims.from_config(base_config, "base model config", ValueError, need_vocab)


# --------------------------------------------------------------------------------------------------
# Files, JSON and safetensors headers


def _as_dir(path: str | Path, what: str) -> Path:
    root = Path(path)  # the directory itself may be a link (the user's choice); what is inside may not
    if not root.exists():
        raise MissingFileError(f"the {what} directory does not exist")
    if not root.is_dir():
        raise MissingFileError(f"not a directory: expected a {what} dir")
    return root


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__  # str(exc) would repeat the full path


def _is_file(path: Path) -> bool:
    """True for a regular file, False if nothing is there; a symlink (or FIFO, device, dir) is refused.

    lstat, not Path.is_file(): is_file() follows links, and a link in a user's dir may point anywhere.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte or unencodable character in the name
        why = _why(exc) if isinstance(exc, OSError) else "not a valid file name"
        raise MissingFileError(f"cannot read {path.name!r}: {why}") from None
    if stat.S_ISLNK(mode):
        raise NotRegularFileError(f"{path.name} is a symbolic link; hotswap uploads regular files only "
                                  "(copy the file into the directory)")
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{path.name} is not a regular file; hotswap uploads regular files only")
    return True


# O_NOFOLLOW: a link swapped in after the lstat above still fails (no check-then-open race);
# O_NONBLOCK: a FIFO swapped in cannot hang the open.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_regular_file(path: str | Path):
    """Open a file of a user's dir for binary reading, refusing anything but a regular file (never follows links)."""
    path = Path(path)
    if not _is_file(path):
        raise MissingFileError(f"{path.name} does not exist")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(f"{path.name} is a symbolic link; hotswap uploads regular files only "
                                      "(copy the file into the directory)") from None
        raise MissingFileError(f"cannot read {path.name}: {_why(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{path.name} is not a regular file; hotswap uploads regular files only")
    return os.fdopen(fd, "rb")


def _pickled_files(root: Path) -> list[str]:
    # Only named in a message, never opened or followed.
    return sorted(p.name for p in root.iterdir() if p.name.lower().endswith(_PICKLE_SUFFIXES))


def _read_json(path: Path) -> Any:
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > _MAX_JSON_BYTES:
            raise InvalidConfigError(f"{path.name} is {size} bytes; a config file should be a few KB")
        data = f.read(_MAX_JSON_BYTES)
    try:
        return safe_json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidConfigError(f"{path.name} is not valid JSON: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(
            f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except safe_json.JSONDepthError as exc:
        raise InvalidConfigError(f"{path.name} cannot be used: {exc}") from None
    except ValueError:  # json.loads refuses integers of over 4300 digits
        raise InvalidConfigError(f"{path.name} is not usable JSON: it holds a number too long to read") from None


def _read_json_object(path: Path) -> dict:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise InvalidConfigError(f"{path.name} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    """repr() for a message, cut short: a hostile file may hold a 10 MB name or list."""
    return _clip(repr(value))


def _numel(shape: list[int], limit: int) -> int:
    """prod(shape), or limit + 1 as soon as it passes limit: a shape of huge numbers costs nothing."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _read_header(path: Path) -> dict[str, _Tensor]:
    """Parse and validate a safetensors header (the same layout rules as the safetensors library)."""
    file = path.name
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptWeightsError(f"{file} is not a safetensors file: only {size} bytes long")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CorruptWeightsError(
                    f"{file} is not a valid safetensors file: header length {n} does not fit in {size} bytes "
                    "(truncated upload, or not a safetensors file at all)"
                )
            blob = f.read(n)
    except OSError as exc:
        raise MissingFileError(f"cannot read {file}: {_why(exc)}") from None
    try:  # safe_json: a header nested 50,000 deep is a ValueError here, not a RecursionError
        header = safe_json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # UnicodeDecodeError included
        raise CorruptWeightsError(f"{file} has a corrupt safetensors header: {_clip(str(exc))}") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{file} has a corrupt safetensors header: not a JSON object")

    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, _Tensor] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if spec is not None and (
                not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values())
            ):
                raise CorruptWeightsError(f"{file} has a corrupt safetensors header: bad __metadata__")
            continue
        bad = f"{file} has a corrupt safetensors header: entry {_show(name)} "
        if not isinstance(spec, dict):
            raise CorruptWeightsError(bad + "is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str):
            raise CorruptWeightsError(bad + f"has dtype {_show(dtype)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CorruptWeightsError(bad + f"has shape {_show(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptWeightsError(bad + f"has data_offsets {_show(offsets)}")
        if offsets[1] > data_len:
            raise CorruptWeightsError(
                f"{file} is truncated: tensor {_show(name)} ends at data byte {_show(offsets[1])}, but the file "
                f"holds only {data_len} data bytes (an interrupted upload or copy?); upload the complete file"
            )
        itemsize = _ITEMSIZE.get(dtype)
        span = offsets[1] - offsets[0]
        if itemsize is not None and _numel(shape, span) * itemsize != span:
            raise CorruptWeightsError(bad + f"claims shape {_show(shape)} of {dtype} but spans {span} bytes")
        tensors[name] = _Tensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    position = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != position:
            raise CorruptWeightsError(f"{file} has overlapping or gapped tensor data at {_show(t.name)}")
        position = t.end
    if position != size:
        raise CorruptWeightsError(
            f"{file} has {size - position} bytes after its last tensor: not a well-formed safetensors file"
        )
    return tensors


def _check_float(path: Path, t: _Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_NAMES:
        kind = f"an unknown dtype {_show(t.dtype)}" if t.dtype not in _ITEMSIZE else f"a non-float dtype {t.dtype}"
        raise TensorDtypeError(
            f"{what} tensor {_show(t.name)} in {path.name} has {kind}: weights must be "
            "float16, bfloat16 or float32 (quantized or integer weights are not supported; "
            "save the unquantized weights)"
        )


def _count_non_finite(f, t: _Tensor) -> int:
    """NaN/Inf count of one tensor, read in bounded chunks (one chunk in memory at a time)."""
    f.seek(t.start)
    remaining, bad = t.nbytes, 0
    while remaining:
        n = min(remaining, _CHUNK_BYTES)
        buf = f.read(n)
        if len(buf) != n:
            raise CorruptWeightsError(f"tensor {_show(t.name)} is truncated: the file changed while being read")
        if t.dtype == "F32" or t.dtype == "F64":
            values = np.frombuffer(buf, dtype="<f4" if t.dtype == "F32" else "<f8")
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        else:  # F16 / BF16: non-finite exactly when every exponent bit is set
            mask = 0x7C00 if t.dtype == "F16" else 0x7F80
            bits = np.frombuffer(buf, dtype="<u2")
            bad += int(np.count_nonzero((bits & mask) == mask))
        remaining -= n
    return bad


def _check_finite(path: Path, tensors: list[_Tensor], what: str) -> None:
    with open_regular_file(path) as f:
        for t in sorted(tensors, key=lambda t: t.start):
            bad = _count_non_finite(f, t)
            if bad:
                raise NonFiniteWeightsError(
                    f"{what} tensor {_show(t.name)} in {path.name} contains {bad} NaN/Inf value(s) out of "
                    f"{math.prod(t.shape)}: the training run diverged or the file is damaged; "
                    "use an earlier checkpoint or retrain"
                )


def _dtype_summary(tensors: list[_Tensor]) -> str:
    names = {_FLOAT_NAMES[t.dtype] for t in tensors}
    return names.pop() if len(names) == 1 else "mixed"


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.lstat()  # a link swapped in later reads as a change
    return st.st_size, st.st_mtime_ns


# --------------------------------------------------------------------------------------------------
# detect_kind


def detect_kind(path: str | Path) -> Literal["lora", "full"]:
    """"lora" for a PEFT adapter dir (adapter_config.json), "full" for a model dir (config.json)."""
    root = _as_dir(path, "LoRA adapter or model")
    if _is_file(root / ADAPTER_CONFIG):
        return "lora"
    if _is_file(root / MODEL_CONFIG):
        return "full"
    if _is_file(root / ADAPTER_WEIGHTS) or _is_file(root / "adapter_model.bin"):
        raise MissingFileError(
            f"the directory has adapter weights but no {ADAPTER_CONFIG}: copy the adapter_config.json that PEFT "
            "saved next to the weights"
        )
    raise MissingFileError(
        f"the directory is neither a LoRA adapter (no {ADAPTER_CONFIG}) nor a full model (no {MODEL_CONFIG}); "
        "point to the directory PEFT's or transformers' save_pretrained() wrote"
    )


# --------------------------------------------------------------------------------------------------
# LoRA: config


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "", [], {})


# (config key, what it is) for options that change the forward pass in ways the engine does not implement.
_UNSUPPORTED_OPTIONS = (
    ("use_dora", "DoRA (use_dora: true) rescales each output by a learned magnitude vector, which hotswap "
                 "does not implement: " + _MERGE_HINT),
    ("lora_bias", "lora_bias: true adds a trained bias to lora_B, which hotswap does not implement: " + _MERGE_HINT),
    ("fan_in_fan_out", "fan_in_fan_out: true stores weights transposed (GPT-2 Conv1D layout); a Llama-family "
                       "adapter never needs it: retrain with fan_in_fan_out false"),
    ("layer_replication", "layer_replication changes the number of layers of the base model, which hotswap "
                          "does not support: " + _MERGE_HINT),
    ("target_parameters", "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported: "
                          "target the q/k/v/o/gate/up/down projections instead"),
    ("trainable_token_indices", "trainable_token_indices trains embedding rows, which hotswap does not "
                                "support: " + _MERGE_HINT),
    ("use_qalora", "QALoRA (use_qalora: true) pools inputs for a quantized base, which hotswap does not "
                   "implement: retrain as plain LoRA"),
    ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens) switches the adapter on mid-sequence, "
                                "which hotswap does not implement: retrain as plain LoRA"),
    ("use_bdlora", "BD-LoRA (use_bdlora) uses block-diagonal factors, which hotswap does not implement: "
                   + _MERGE_HINT),
    ("kasa_config", "KaSA (kasa_config) modifies the base weights' singular values, which hotswap does not "
                    "implement: " + _MERGE_HINT),
    ("monteclora_config", "MonteCLoRA (monteclora_config) is not supported: " + _MERGE_HINT),
    ("arrow_config", "Arrow routing (arrow_config) mixes several LoRAs per token, which hotswap does not "
                     "implement: register each expert adapter on its own"),
)


def _lora_hyperparameters(cfg: dict, cfg_path: Path, max_rank: int) -> tuple[int, float, bool]:
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InvalidConfigError(f"{cfg_path.name} has no peft_type: is this a PEFT adapter_config.json?")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has peft_type {_show(peft_type)}: hotswap serves LoRA adapters only (peft_type LORA); "
            "merge other adapter types into the base model and register the result as a full fine-tune"
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has task_type {_show(task_type)}: hotswap serves causal language models only (CAUSAL_LM)"
        )
    modules_to_save = cfg.get("modules_to_save")
    if _is_set(modules_to_save):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has modules_to_save {_show(modules_to_save)}: those modules are saved as full trained "
            "copies, not low-rank deltas, and hotswap cannot swap them per request: " + _MERGE_HINT
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has bias {_show(bias)}: training the base model's biases is not supported; "
            "retrain with bias='none', or " + _MERGE_HINT
        )
    for key, why in _UNSUPPORTED_OPTIONS:
        if _is_set(cfg.get(key)):
            raise UnsupportedAdapterError(f"{cfg_path.name}: {why}")

    r = cfg.get("r", 8)  # PEFT's defaults for a missing key
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if isinstance(r, bool) or not isinstance(r, int):
        raise InvalidConfigError(f"{cfg_path.name} has r = {_show(r)}; the LoRA rank must be an integer")
    if r <= 0:
        raise RankError(f"{cfg_path.name} has r = {r}; the LoRA rank must be positive")
    if r > max_rank:
        raise RankError(
            f"{cfg_path.name} has LoRA rank r = {r}, above the engine's maximum rank {max_rank}: retrain with "
            f"r <= {max_rank}, raise the server's max LoRA rank, or " + _MERGE_HINT
        )
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidConfigError(f"{cfg_path.name} has lora_alpha = {_show(alpha)}; expected a number")
    use_rslora = cfg.get("use_rslora", False)
    if use_rslora is None:
        use_rslora = False
    if not isinstance(use_rslora, bool):
        raise InvalidConfigError(f"{cfg_path.name} has use_rslora = {_show(use_rslora)}; expected true or false")
    return r, float(alpha), use_rslora


def _module_names(dims: _Dims) -> dict[str, tuple[int, str] | None]:
    """Every module name PEFT could have matched on this base -> (layer, module), None for embed/lm_head."""
    names: dict[str, tuple[int, str] | None] = {"model.embed_tokens": None, "lm_head": None}
    for layer in range(dims.num_hidden_layers):
        for module in SUPPORTED_MODULES:
            names[f"model.layers.{layer}.{_PARENT[module]}.{module}"] = (layer, module)
    return names


def _compile(pattern: str, cfg_path: Path, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:  # "(" x 10,000 / "a{99999999999}" raise the last two
        raise InvalidConfigError(
            f"{cfg_path.name} has {key} {_show(pattern)}, not a valid regular expression: {_clip(str(exc))}"
        ) from None


def _as_name_list(value: Any, cfg_path: Path, key: str) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidConfigError(
        f"{cfg_path.name} has {key} = {_show(value)}; expected a list of module names or a regex string"
    )


def _layer_filter(cfg: dict, cfg_path: Path):
    """PEFT's layers_to_transform / layers_pattern rule (list-form target_modules only), or None."""
    indexes = cfg.get("layers_to_transform")
    if indexes is None or indexes == []:
        return None
    if isinstance(indexes, int) and not isinstance(indexes, bool):
        indexes = [indexes]
    if not isinstance(indexes, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
        raise InvalidConfigError(f"{cfg_path.name} has layers_to_transform = {_show(indexes)}; expected integers")
    patterns = cfg.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns:
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise InvalidConfigError(f"{cfg_path.name} has layers_pattern = {_show(patterns)}; expected names")
        regexes = [_compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", cfg_path, "layers_pattern") for p in patterns]
    else:
        regexes = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    wanted = set(indexes)

    def keep(name: str) -> bool:
        for rx in regexes:
            match = rx.match(name)
            if match and match.group("idx") is not None:  # None when a pattern like "x|" adds an alternative
                return int(match.group("idx")) in wanted
        return False

    return keep


def _resolve_targets(cfg: dict, cfg_path: Path, dims: _Dims) -> set[tuple[int, str]] | None:
    """The (layer, module) pairs `target_modules` selects on this base, as PEFT would; None if unset."""
    target = cfg.get("target_modules")
    if target is None:
        return None
    names = _module_names(dims)
    if isinstance(target, str) and target.lower() == "all-linear":
        matched = [n for n, v in names.items() if v is not None]  # PEFT excludes the output layer
    elif isinstance(target, str):
        rx = _compile(target, cfg_path, "target_modules")
        matched = [n for n in names if rx.fullmatch(n)]
    else:
        entries = _as_name_list(target, cfg_path, "target_modules")
        matched = []
        for entry in entries:
            hits = [n for n in names if n == entry or n.endswith("." + entry)]
            if not hits:
                # ASCII digits, at most 9: int() of a 5000-digit number is a ValueError
                deeper = re.fullmatch(r"(?:.*\.)?layers\.([0-9]{1,9})\.(?:self_attn|mlp)\.(\w+)", entry)
                if deeper and deeper.group(2) in _PARENT and int(deeper.group(1)) >= dims.num_hidden_layers:
                    raise BaseModelMismatchError(
                        f"{cfg_path.name} targets {_show(entry)}, but the base model has only {dims.num_hidden_layers} "
                        f"layers (num_hidden_layers): the adapter was trained for a different base model"
                        + _base_name_hint(cfg)
                    )
            matched.extend(hits)
        keep = _layer_filter(cfg, cfg_path)
        if keep is not None:
            matched = [n for n in matched if names[n] is None or keep(n)]

    excluded = cfg.get("exclude_modules")
    if _is_set(excluded):
        if isinstance(excluded, str):
            ex = _compile(excluded, cfg_path, "exclude_modules")
            matched = [n for n in matched if not ex.fullmatch(n)]
        else:
            ex_list = _as_name_list(excluded, cfg_path, "exclude_modules")
            matched = [n for n in matched if not (n in ex_list or any(n.endswith("." + e) for e in ex_list))]

    special = sorted({n.rpartition(".")[2] for n in matched if names[n] is None})
    if special:
        raise UnsupportedAdapterError(
            f"{cfg_path.name} targets {' and '.join(special)} (target_modules {_show(target)}): LoRA on the "
            "embedding or "
            f"output layer is not supported; hotswap applies LoRA to {', '.join(SUPPORTED_MODULES)} only. "
            "Retrain without it, or " + _MERGE_HINT
        )
    resolved = {names[n] for n in matched}
    if not resolved:
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has target_modules {_show(target)}, which matches none of the projections hotswap "
            "supports "
            f"({', '.join(SUPPORTED_MODULES)}, named like model.layers.0.self_attn.q_proj) on this base model"
        )
    return resolved  # type: ignore[return-value]


def _check_patterns(cfg: dict, cfg_path: Path, pairs: set[tuple[int, str]], r: int, alpha: float) -> None:
    """Refuse rank_pattern / alpha_pattern entries that give a targeted module a different rank/alpha."""
    for key, default, what in (("rank_pattern", r, "rank"), ("alpha_pattern", alpha, "alpha")):
        pattern = cfg.get(key)
        if not _is_set(pattern):
            continue
        if not isinstance(pattern, dict):
            raise InvalidConfigError(f"{cfg_path.name} has {key} = {_show(pattern)}; expected an object")
        compiled = [(_compile(rf"(.*\.)?({k})$", cfg_path, key), k, v) for k, v in pattern.items()]
        for layer, module in sorted(pairs):
            name = f"model.layers.{layer}.{_PARENT[module]}.{module}"
            for rx, k, value in compiled:  # PEFT's get_pattern_key: first matching key wins
                if rx.match(name):
                    if value != default:
                        raise UnsupportedAdapterError(
                            f"{cfg_path.name} has {key} {{{_show(k)}: {_show(value)}}}, giving {name} {what} "
                            f"{_show(value)} instead of "
                            f"{default:g}: per-module ranks/alphas are not supported (one scaling per adapter); "
                            "retrain with uniform r / lora_alpha, or " + _MERGE_HINT
                        )
                    break


def _base_name_hint(cfg: dict) -> str:
    name = cfg.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return ""
    return f" (adapter_config.json names base_model_name_or_path {_show(name)})"


# --------------------------------------------------------------------------------------------------
# LoRA: tensors


def _classify_lora_tensor(t: _Tensor, weights: Path) -> tuple[int, str, str]:
    """(layer, module, "A"|"B") for a LoRA tensor name, or a specific error for anything else."""
    name = t.name
    if "lora_magnitude_vector" in name:
        raise UnsupportedAdapterError(
            f"{weights.name} holds DoRA magnitude vectors ({_show(name)}): DoRA is not supported: " + _MERGE_HINT
        )
    if "embed_tokens" in name or "lm_head" in name or "lora_embedding_" in name:
        raise UnsupportedAdapterError(
            f"{weights.name} holds {_show(name)}: LoRA on (or trained copies of) the embedding / output layer is "
            f"not supported; hotswap applies LoRA to {', '.join(SUPPORTED_MODULES)} only: " + _MERGE_HINT
        )
    if name.endswith(".lora_B.bias") or name.endswith(".lora_A.bias"):
        raise UnsupportedAdapterError(
            f"{weights.name} holds LoRA bias {_show(name)} (lora_bias): not supported: " + _MERGE_HINT
        )
    match = _LORA_TENSOR.fullmatch(name)
    expected_names = (
        f"hotswap expects only LoRA pairs named {_LORA_PREFIX}<i>.<self_attn|mlp>.<module>.lora_A.weight / "
        f".lora_B.weight with <module> one of {', '.join(SUPPORTED_MODULES)}"
    )
    if match is None:
        raise UnexpectedTensorError(f"unexpected tensor {_show(name)} in {weights.name}: {expected_names}")
    layer, parent, module, which = match.groups()
    if module not in _PARENT:
        raise UnexpectedTensorError(
            f"{weights.name} has LoRA weights for {parent}.{module} ({_show(name)}), which is not a projection hotswap "
            f"supports: {expected_names}"
        )
    if _PARENT[module] != parent:
        raise UnexpectedTensorError(f"unexpected tensor {_show(name)} in {weights.name}: {module} belongs under "
                                    f"{_PARENT[module]}, not {parent}")
    return int(layer), module, which[-1]


def _lora_tensors(
    weights: Path, cfg: dict, dims: _Dims, r: int
) -> dict[tuple[int, str], dict[str, _Tensor]]:
    """Validate names, dtypes, layer range and shapes from the header; return the A/B entries per pair."""
    header = _read_header(weights)
    if not header:
        raise MissingTensorError(
            f"{weights.name} holds no tensors: the adapter was saved before training or is damaged"
        )
    pairs: dict[tuple[int, str], dict[str, _Tensor]] = {}
    mismatches: list[tuple[int, str]] = []  # (priority, message): report the most telling one
    rank_errors: list[str] = []
    priority = {"hidden_size": 0, "intermediate_size": 1, "num_attention_heads*head_dim": 2,
                "num_key_value_heads*head_dim": 3}
    hint = _base_name_hint(cfg)
    for t in sorted(header.values(), key=lambda t: t.name):
        layer, module, which = _classify_lora_tensor(t, weights)
        _check_float(weights, t, "LoRA")
        if len(t.shape) != 2:
            raise CorruptWeightsError(
                f"LoRA tensor {_show(t.name)} in {weights.name} has shape {_show(list(t.shape))}, not 2-D: "
                "adapters saved from DeepSpeed ZeRO-3 / FSDP without gathering the shards look like this; save it "
                "again with the full parameters gathered"
            )
        if layer >= dims.num_hidden_layers:
            mismatches.append((4, f"adapter has LoRA weights for layer {layer} ({_show(t.name)}), but the base model "
                                  f"has only {dims.num_hidden_layers} layers (num_hidden_layers): the adapter was "
                                  f"trained for a different base model{hint}"))
        (in_label, in_dim), (out_label, out_dim) = dims.io(module)
        if which == "A":
            found, want, label, rank = t.shape[1], in_dim, in_label, t.shape[0]
        else:
            found, want, label, rank = t.shape[0], out_dim, out_label, t.shape[1]
        if found != want:
            mismatches.append((priority[label], (
                f"adapter was trained for {label} {_show(found)}, base model has {want} ({_show(t.name)} has shape "
                f"{_show(list(t.shape))}): this adapter belongs to a different base model{hint}"
            )))
        if rank != r:
            rank_errors.append(
                f"LoRA tensor {_show(t.name)} has rank {_show(rank)} (shape {_show(list(t.shape))}), but "
                f"{ADAPTER_CONFIG} says r = {r}"
            )
        slot = pairs.setdefault((layer, module), {})
        slot[which] = t
    if mismatches:
        raise BaseModelMismatchError(min(mismatches, key=lambda m: m[0])[1])
    if rank_errors:
        raise RankError(rank_errors[0] + ": the config and weights disagree; re-save the adapter with PEFT")
    return pairs


def _describe(pairs) -> str:
    names = [f"model.layers.{layer}.{_PARENT[m]}.{m}" for layer, m in sorted(pairs)]
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more


def inspect_lora_adapter(
    path: str | Path, base_config: dict, max_rank: int = DEFAULT_MAX_RANK
) -> LoraAdapterInfo:
    """Validate a PEFT LoRA adapter dir against the base model's config.json dict.

    Raises an `AdapterFormatError` subclass for every broken or unsupported adapter; a plain
    `ValueError` if `base_config` itself is unusable.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    dims = _base_dims(base_config, need_vocab=False)
    root = _as_dir(path, "LoRA adapter")
    cfg_path, weights = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS

    if not _is_file(cfg_path):
        hint = (f"; it has a {MODEL_CONFIG}, so it looks like a full model: register it as a full fine-tune"
                if _is_file(root / MODEL_CONFIG) else
                ": copy the adapter_config.json PEFT saved next to the weights")
        raise MissingFileError(f"the directory has no {ADAPTER_CONFIG}{hint}")
    if not _is_file(weights):
        pickled = _pickled_files(root)
        if pickled:
            raise PickledWeightsError(
                f"the directory has only pickled weights ({', '.join(pickled)}) and no {ADAPTER_WEIGHTS}; "
                f"pickled files can run arbitrary code and are never opened: {_LORA_CONVERT_HINT}"
            )
        raise MissingFileError(
            f"the directory has no {ADAPTER_WEIGHTS}: upload the weights file PEFT's save_pretrained() wrote next to "
            f"{ADAPTER_CONFIG}"
        )

    cfg = _read_json_object(cfg_path)
    r, alpha, use_rslora = _lora_hyperparameters(cfg, cfg_path, max_rank)
    expected = _resolve_targets(cfg, cfg_path, dims)
    if expected is not None:  # before the tensors: a per-module rank would otherwise read as a rank mismatch
        _check_patterns(cfg, cfg_path, expected, r, alpha)
    pairs = _lora_tensors(weights, cfg, dims, r)

    for (layer, module), slot in sorted(pairs.items()):
        if len(slot) != 2:
            have, lack = ("lora_A", "lora_B") if "A" in slot else ("lora_B", "lora_A")
            raise MissingTensorError(
                f"{weights.name} has {have} but no {lack} for model.layers.{layer}.{_PARENT[module]}.{module}: "
                "every LoRA module needs both; the file is incomplete, save the adapter again with PEFT"
            )
    present = set(pairs)
    if expected is None:  # no target_modules in the config: the tensors say what is targeted
        modules = {m for _, m in present}
        expected = {(layer, m) for layer in range(dims.num_hidden_layers) for m in modules}
        _check_patterns(cfg, cfg_path, present, r, alpha)
    missing, extra = expected - present, present - expected
    if extra:
        raise UnexpectedTensorError(
            f"{weights.name} has LoRA tensors for {_describe(extra)}, which target_modules "
            f"{_show(cfg.get('target_modules'))} in {ADAPTER_CONFIG} does not select: config and weights disagree"
        )
    if missing:
        raise MissingTensorError(
            f"{ADAPTER_CONFIG} targets {_describe(missing)} ({len(missing)} module(s) in all), but {weights.name} "
            "has no LoRA tensors for them: the file is incomplete, or the adapter was trained for a base model "
            f"with fewer layers{_base_name_hint(cfg)}"
        )

    tensors = [t for slot in pairs.values() for t in slot.values()]
    _check_finite(weights, tensors, "LoRA")

    name = cfg.get("base_model_name_or_path")
    return LoraAdapterInfo(
        path=str(root),
        rank=r,
        alpha=alpha,
        use_rslora=use_rslora,
        scaling=alpha / math.sqrt(r) if use_rslora else alpha / r,
        target_modules=tuple(sorted({m for _, m in present})),
        num_layers_with_lora=len({layer for layer, _ in present}),
        dtype=_dtype_summary(tensors),
        size_bytes=sum(t.nbytes for t in tensors),
        layers=tuple(sorted({layer for layer, _ in present})),
        modules=tuple(sorted(present)),
        base_model_name_or_path=name if isinstance(name, str) else None,
        _fingerprint=_fingerprint(weights),
    )


def load_lora_tensors(
    path: str | Path, info: LoraAdapterInfo, dtype: Any = None, device: Any = "cpu"
) -> dict[tuple[int, str], tuple[Any, Any]]:
    """Load an inspected adapter's tensors: `{(layer, module): (A [r, in], B [out, r])}` as torch tensors.

    B is not pre-scaled: the engine multiplies by `info.scaling`. `dtype` / `device` optionally cast/move.
    Refuses (AdapterFormatError) if the file changed since `inspect_lora_adapter` validated it.
    """
    from safetensors import safe_open  # framework="pt" imports torch: only here, never at module import

    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        changed = _fingerprint(weights) != info._fingerprint
    except OSError:
        changed = True
    if changed:
        raise AdapterFormatError(f"{weights.name} changed or vanished since it was inspected: inspect it again")
    out: dict[tuple[int, str], tuple[Any, Any]] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        wanted = set()
        for layer, module in info.modules:
            prefix = f"{_LORA_PREFIX}{layer}.{_PARENT[module]}.{module}"
            a_name, b_name = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
            wanted.update((a_name, b_name))
            if a_name not in keys or b_name not in keys:
                raise MissingTensorError(f"{weights.name} lacks {a_name} / {b_name}: inspect it again")
            a, b = f.get_tensor(a_name), f.get_tensor(b_name)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != info.rank or b.shape[1] != info.rank:
                raise RankError(f"{weights.name}: {prefix} no longer has rank {info.rank}: inspect it again")
            if dtype is not None or str(device) != "cpu":
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            out[(layer, module)] = (a, b)
        if keys - wanted:
            raise UnexpectedTensorError(f"{weights.name} has tensors it did not have when inspected: inspect it again")
    return out


# --------------------------------------------------------------------------------------------------
# Full fine-tunes


_COMPARED = (
    "architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias",
)


def _full_weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = root / MODEL_INDEX
    if _is_file(index):
        raw = _read_json_object(index)
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise InvalidConfigError(f"{index.name} has no valid weight_map (tensor name -> file name)")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
                raise InvalidConfigError(f"{index.name} refers to {_show(name)}: shards must be .safetensors "
                                         "files in the same dir")
            if not _is_file(root / name):
                raise MissingFileError(f"{index.name} refers to {_show(name)}, which is not in the directory: "
                                       "upload every shard")
            files.append(root / name)
        return files, weight_map
    files = [p for p in sorted(root.glob("*.safetensors")) if _is_file(p)]
    if not files:
        pickled = _pickled_files(root)
        if pickled:
            raise PickledWeightsError(
                f"the directory has only pickled weights ({', '.join(pickled)}) and no .safetensors; pickled files can "
                f"run arbitrary code and are never opened: {_FULL_CONVERT_HINT}"
            )
        raise MissingFileError(f"the directory has no .safetensors weights next to its {MODEL_CONFIG}")
    return files, None


def _expected_full_tensors(d: _Dims) -> dict[str, tuple[int, ...]]:
    h, i, v = d.hidden_size, d.intermediate_size, d.vocab_size or 0
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not d.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for layer in range(d.num_hidden_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for module in SUPPORTED_MODULES:
            (_, in_dim), (_, out_dim) = d.io(module)
            out[f"{p}{_PARENT[module]}.{module}.weight"] = (out_dim, in_dim)
            if (module in ("q_proj", "k_proj", "v_proj") and d.qkv_bias) or (
                module == "o_proj" and d.attention_bias and d.architecture != "Qwen2ForCausalLM"
            ) or (_PARENT[module] == "mlp" and d.mlp_bias):
                out[f"{p}{_PARENT[module]}.{module}.bias"] = (out_dim,)
    return out


def inspect_full_checkpoint(path: str | Path, base_config: dict, check_finite: bool = False) -> FullModelInfo:
    """Validate a full fine-tune dir: same architecture and dimensions as the base, safetensors only.

    Shapes, dtypes and the tensor set come from the safetensors headers (cheap). NaN/Inf scanning reads
    every byte of the checkpoint, so it is off by default (the engine's loader checks values as it
    copies them); `check_finite=True` streams each tensor in bounded chunks.
    """
    base = _base_dims(base_config, need_vocab=True)
    root = _as_dir(path, "model")
    cfg_path = root / MODEL_CONFIG
    if not _is_file(cfg_path):
        hint = (f"; it has an {ADAPTER_CONFIG}, so it is a LoRA adapter: register it as one"
                if _is_file(root / ADAPTER_CONFIG) else "")
        raise MissingFileError(f"the directory has no {MODEL_CONFIG}{hint}")
    ckpt = _Dims.from_config(_read_json_object(cfg_path), cfg_path.name, InvalidConfigError, need_vocab=True)

    for key in _COMPARED:
        mine, theirs = getattr(ckpt, key), getattr(base, key)
        if key == "architecture" and theirs is None:
            continue  # the base config names no class: nothing to compare
        if mine != theirs:
            label = "architectures[0]" if key == "architecture" else key
            raise BaseModelMismatchError(
                f"checkpoint was trained for {label} {_show(mine)}, base model has {theirs!r} ({cfg_path.name}): "
                "a full fine-tune must keep the base model's architecture and dimensions; serve it on a deployment "
                "of its own base model"
            )

    files, weight_map = _full_weight_files(root)
    expected = _expected_full_tensors(base)
    found: dict[str, tuple[Path, _Tensor]] = {}
    for file in files:
        for name, t in _read_header(file).items():
            if name in found:
                raise CorruptWeightsError(f"tensor {_show(name)} appears in both {found[name][0].name} and {file.name}")
            found[name] = (file, t)
    if weight_map is not None:
        for name, file_name in sorted(weight_map.items()):
            if name not in found or found[name][0].name != file_name:
                raise MissingTensorError(f"{MODEL_INDEX} places {_show(name)} in {_show(file_name)}, but it is "
                                         "not there: the upload is incomplete")

    used: list[tuple[Path, _Tensor]] = []
    for name, (file, t) in sorted(found.items()):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints carry; recomputed by the engine
        _check_float(file, t, "checkpoint")
        want = expected.get(name)
        if want is None:
            raise UnexpectedTensorError(
                f"unexpected tensor {_show(name)} in {file.name}: it has no place in a {base.architecture or 'Llama'} "
                "model with the base model's config"
            )
        if t.shape != want:
            raise BaseModelMismatchError(
                f"checkpoint tensor {_show(name)} in {file.name} has shape {_show(list(t.shape))}, base model expects "
                f"{list(want)}: the weights do not match their own config.json"
            )
        used.append((file, t))
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise MissingTensorError(
            f"the checkpoint is missing weights: {', '.join(missing[:4])}{more}; upload every shard"
        )

    if check_finite:
        by_file: dict[Path, list[_Tensor]] = {}
        for file, t in used:
            by_file.setdefault(file, []).append(t)
        for file, tensors in by_file.items():
            _check_finite(file, tensors, "checkpoint")

    tensors = [t for _, t in used]
    return FullModelInfo(
        path=str(root),
        architecture=ckpt.architecture,
        num_layers=ckpt.num_hidden_layers,
        hidden_size=ckpt.hidden_size,
        vocab_size=ckpt.vocab_size or 0,
        tie_word_embeddings=ckpt.tie_word_embeddings,
        dtype=_dtype_summary(tensors),
        size_bytes=sum(t.nbytes for t in tensors),
        num_tensors=len(tensors),
        files=tuple(sorted(f.name for f in files)),
    )
