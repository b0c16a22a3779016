"""Full fine-tunes: a Hugging Face model dir (`config.json` + `*.safetensors`, optionally sharded with
an index) with exactly the base model's architecture, dimensions and tensor set, safetensors only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from adapters.errors import (
    BaseModelMismatchError, CorruptWeightsError, InvalidConfigError, MissingFileError, MissingTensorError,
    PickledWeightsError, UnexpectedTensorError,
)
from adapters.format.dims import base_dims
from adapters.format.files import (
    ADAPTER_CONFIG, MODEL_CONFIG, MODEL_INDEX, as_dir, is_file, pickled_files, read_json_object,
)
from adapters.format.header import Tensor, check_float, dtype_summary, read_header
from adapters.format.header import check_finite as scan_finite  # the name `check_finite` is a parameter below
from adapters.format.hints import FULL_CONVERT_HINT
from hotswap.model_dims import PROJECTIONS, ModelDims
from hotswap.quote import show


@dataclass(frozen=True)
class FullModelInfo:
    """A validated full fine-tune: same architecture and dimensions as the base model."""

    kind: ClassVar[str] = "full"
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


_COMPARED = (
    "architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias",
)


def _full_weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files (every shard the index names, or every *.safetensors) and the index's weight_map."""
    index = root / MODEL_INDEX
    if is_file(index):
        raw = read_json_object(index)
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise InvalidConfigError(f"{index.name} has no valid weight_map (tensor name -> file name)")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
                raise InvalidConfigError(f"{index.name} refers to {show(name)}: shards must be .safetensors "
                                         "files in the same dir")
            if not is_file(root / name):
                raise MissingFileError(f"{index.name} refers to {show(name)}, which is not in the directory: "
                                       "upload every shard")
            files.append(root / name)
        return files, weight_map
    files = [p for p in sorted(root.glob("*.safetensors")) if is_file(p)]
    if not files:
        pickled = pickled_files(root)
        if pickled:
            raise PickledWeightsError(
                f"the directory has only pickled weights ({', '.join(pickled)}) and no .safetensors; pickled files can "
                f"run arbitrary code and are never opened: {FULL_CONVERT_HINT}"
            )
        raise MissingFileError(f"the directory has no .safetensors weights next to its {MODEL_CONFIG}")
    return files, None


def _expected_full_tensors(d: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a model of these dims -> its shape (weights [out, in], biases [out], norms [h])."""
    h, v = d.hidden_size, d.vocab_size or 0
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not d.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    shapes = d.projection_shapes()
    for layer in range(d.num_hidden_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for module, parent in PROJECTIONS.items():
            in_dim, out_dim = shapes[module]
            out[f"{p}{parent}.{module}.weight"] = (out_dim, in_dim)
            if (module in ("q_proj", "k_proj", "v_proj") and d.qkv_bias) or (
                module == "o_proj" and d.attention_bias and d.architecture != "Qwen2ForCausalLM"
            ) or (parent == "mlp" and d.mlp_bias):
                out[f"{p}{parent}.{module}.bias"] = (out_dim,)
    return out


def _check_same_dims(ckpt: ModelDims, base: ModelDims, cfg_path: Path) -> None:
    for key in _COMPARED:
        mine, theirs = getattr(ckpt, key), getattr(base, key)
        if key == "architecture" and theirs is None:
            continue  # the base config names no class: nothing to compare
        if mine != theirs:
            label = "architectures[0]" if key == "architecture" else key
            raise BaseModelMismatchError(
                f"checkpoint was trained for {label} {show(mine)}, base model has {theirs!r} ({cfg_path.name}): "
                "a full fine-tune must keep the base model's architecture and dimensions; serve it on a deployment "
                "of its own base model"
            )


def _headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[Path, Tensor]]:
    """Every tensor of every file -> (its file, its header entry); each in one file, where the index says."""
    found: dict[str, tuple[Path, Tensor]] = {}
    for file in files:
        for name, t in read_header(file).items():
            if name in found:
                raise CorruptWeightsError(f"tensor {show(name)} appears in both {found[name][0].name} and {file.name}")
            found[name] = (file, t)
    if weight_map is not None:
        for name, file_name in sorted(weight_map.items()):
            if name not in found or found[name][0].name != file_name:
                raise MissingTensorError(f"{MODEL_INDEX} places {show(name)} in {show(file_name)}, but it is "
                                         "not there: the upload is incomplete")
    return found


def inspect_full_checkpoint(path: str | Path, base_config: dict, check_finite: bool = False) -> FullModelInfo:
    """Validate a full fine-tune dir: same architecture and dimensions as the base, safetensors only.

    Shapes, dtypes and the tensor set come from the safetensors headers (cheap). NaN/Inf scanning reads
    every byte of the checkpoint, so it is off by default (the engine's loader checks values as it
    copies them); `check_finite=True` streams each tensor in bounded chunks.
    """
    base = base_dims(base_config, need_vocab=True)
    root = as_dir(path, "model")
    cfg_path = root / MODEL_CONFIG
    if not is_file(cfg_path):
        hint = (f"; it has an {ADAPTER_CONFIG}, so it is a LoRA adapter: register it as one"
                if is_file(root / ADAPTER_CONFIG) else "")
        raise MissingFileError(f"the directory has no {MODEL_CONFIG}{hint}")
    ckpt = ModelDims.from_config(read_json_object(cfg_path), cfg_path.name, InvalidConfigError, need_vocab=True)
    _check_same_dims(ckpt, base, cfg_path)

    files, weight_map = _full_weight_files(root)
    expected = _expected_full_tensors(base)
    found = _headers(files, weight_map)
    used: list[tuple[Path, Tensor]] = []
    for name, (file, t) in sorted(found.items()):
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints carry; recomputed by the engine
        check_float(file, t, "checkpoint")
        want = expected.get(name)
        if want is None:
            raise UnexpectedTensorError(
                f"unexpected tensor {show(name)} in {file.name}: it has no place in a {base.architecture or 'Llama'} "
                "model with the base model's config"
            )
        if t.shape != want:
            raise BaseModelMismatchError(
                f"checkpoint tensor {show(name)} in {file.name} has shape {show(list(t.shape))}, base model expects "
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
        by_file: dict[Path, list[Tensor]] = {}
        for file, t in used:
            by_file.setdefault(file, []).append(t)
        for file, tensors in by_file.items():
            scan_finite(file, tensors, "checkpoint")

    tensors = [t for _, t in used]
    return FullModelInfo(
        path=str(root),
        architecture=ckpt.architecture,
        num_layers=ckpt.num_hidden_layers,
        hidden_size=ckpt.hidden_size,
        vocab_size=ckpt.vocab_size or 0,
        tie_word_embeddings=ckpt.tie_word_embeddings,
        dtype=dtype_summary(tensors),
        size_bytes=sum(t.nbytes for t in tensors),
        num_tensors=len(tensors),
        files=tuple(sorted(f.name for f in files)),
    )

