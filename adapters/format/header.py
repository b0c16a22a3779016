"""safetensors files read without loading them: the header (8-byte length + JSON) gives every
tensor's name, dtype, shape and byte range, validated with the safetensors library's own layout
rules; values are then checked for NaN/Inf one tensor at a time in bounded chunks with numpy
(bf16/fp16 by their exponent bits), so no torch is needed and memory stays flat.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.errors import CorruptWeightsError, MissingFileError, NonFiniteWeightsError, TensorDtypeError
from adapters.format.files import open_regular_file, why
from hotswap import safe_json
from hotswap.quote import clip, show

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_CHUNK_BYTES = 32 << 20  # finiteness checks read at most this much at a time (a multiple of every itemsize)

# safetensors dtype -> itemsize; only the float ones (FLOAT_NAMES) are accepted as weights.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class Tensor:
    """One header entry: a tensor of `shape` stored in bytes [start, end) of its file."""

    name: str
    dtype: str  # safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key)}")
        out[key] = value
    return out


def _read_raw_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON object, byte offset of the data, file size)."""
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
        raise MissingFileError(f"cannot read {file}: {why(exc)}") from None
    try:  # safe_json: a header nested 50,000 deep is a ValueError here, not a RecursionError
        header = safe_json.loads(blob.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:  # UnicodeDecodeError included
        raise CorruptWeightsError(f"{file} has a corrupt safetensors header: {clip(str(exc))}") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{file} has a corrupt safetensors header: not a JSON object")
    return header, 8 + n, size


def read_header(path: Path) -> dict[str, Tensor]:
    """Parse and validate a safetensors header (the same layout rules as the safetensors library)."""
    file = path.name
    header, data_start, size = _read_raw_header(path)
    data_len = size - data_start
    tensors: dict[str, Tensor] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if spec is not None and (
                not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values())
            ):
                raise CorruptWeightsError(f"{file} has a corrupt safetensors header: bad __metadata__")
            continue
        bad = f"{file} has a corrupt safetensors header: entry {show(name)} "
        if not isinstance(spec, dict):
            raise CorruptWeightsError(bad + "is not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str):
            raise CorruptWeightsError(bad + f"has dtype {show(dtype)}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CorruptWeightsError(bad + f"has shape {show(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CorruptWeightsError(bad + f"has data_offsets {show(offsets)}")
        if offsets[1] > data_len:
            raise CorruptWeightsError(
                f"{file} is truncated: tensor {show(name)} ends at data byte {show(offsets[1])}, but the file "
                f"holds only {data_len} data bytes (an interrupted upload or copy?); upload the complete file"
            )
        itemsize = _ITEMSIZE.get(dtype)
        span = offsets[1] - offsets[0]
        if itemsize is not None and _numel(shape, span) * itemsize != span:
            raise CorruptWeightsError(bad + f"claims shape {show(shape)} of {dtype} but spans {span} bytes")
        tensors[name] = Tensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    position = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != position:
            raise CorruptWeightsError(f"{file} has overlapping or gapped tensor data at {show(t.name)}")
        position = t.end
    if position != size:
        raise CorruptWeightsError(
            f"{file} has {size - position} bytes after its last tensor: not a well-formed safetensors file"
        )
    return tensors


def check_float(path: Path, t: Tensor, what: str) -> None:
    if t.dtype not in FLOAT_NAMES:
        kind = f"an unknown dtype {show(t.dtype)}" if t.dtype not in _ITEMSIZE else f"a non-float dtype {t.dtype}"
        raise TensorDtypeError(
            f"{what} tensor {show(t.name)} in {path.name} has {kind}: weights must be "
            "float16, bfloat16 or float32 (quantized or integer weights are not supported; "
            "save the unquantized weights)"
        )


def _count_non_finite(f, t: Tensor) -> int:
    """NaN/Inf count of one tensor, read in bounded chunks (one chunk in memory at a time)."""
    f.seek(t.start)
    remaining, bad = t.nbytes, 0
    while remaining:
        n = min(remaining, _CHUNK_BYTES)
        buf = f.read(n)
        if len(buf) != n:
            raise CorruptWeightsError(f"tensor {show(t.name)} is truncated: the file changed while being read")
        if t.dtype == "F32" or t.dtype == "F64":
            values = np.frombuffer(buf, dtype="<f4" if t.dtype == "F32" else "<f8")
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        else:  # F16 / BF16: non-finite exactly when every exponent bit is set
            mask = 0x7C00 if t.dtype == "F16" else 0x7F80
            bits = np.frombuffer(buf, dtype="<u2")
            bad += int(np.count_nonzero((bits & mask) == mask))
        remaining -= n
    return bad


def check_finite(path: Path, tensors: list[Tensor], what: str) -> None:
    with open_regular_file(path) as f:
        for t in sorted(tensors, key=lambda t: t.start):
            bad = _count_non_finite(f, t)
            if bad:
                raise NonFiniteWeightsError(
                    f"{what} tensor {show(t.name)} in {path.name} contains {bad} NaN/Inf value(s) out of "
                    f"{math.prod(t.shape)}: the training run diverged or the file is damaged; "
                    "use an earlier checkpoint or retrain"
                )


def dtype_summary(tensors: list[Tensor]) -> str:
    """"bfloat16" | "float16" | "float32" | "float64" when all agree, else "mixed"."""
    names = {FLOAT_NAMES[t.dtype] for t in tensors}
    return names.pop() if len(names) == 1 else "mixed"


def fingerprint(path: Path) -> tuple[int, int]:
    st = path.lstat()  # a link swapped in later reads as a change
    return st.st_size, st.st_mtime_ns
