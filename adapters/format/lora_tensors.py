"""A LoRA adapter's `adapter_model.safetensors`, checked from its header alone: every tensor is an A or
B of a supported projection, float, 2-D, of the config's rank and of the base model's dimensions
(A [r, in_features], B [out_features, r])."""

from __future__ import annotations

import re
from pathlib import Path

from adapters.errors import (
    BaseModelMismatchError,
    CorruptWeightsError,
    MissingTensorError,
    RankError,
    UnexpectedTensorError,
    UnsupportedAdapterError,
)
from adapters.format.dims import MISMATCH_PRIORITY, labelled_io
from adapters.format.files import ADAPTER_CONFIG
from adapters.format.header import Tensor, check_float, read_header
from adapters.format.hints import MERGE_HINT, base_name_hint
from adapters.format.targets import LORA_PREFIX, PARENT, SUPPORTED_MODULES, Projection
from hotswap.model_dims import ModelDims
from hotswap.quote import show

# fullmatch + ASCII: no trailing newline, no non-ASCII digits (int("٣") == 3), and at most 9 digits
# (int() refuses numbers over 4300 digits with a ValueError).
_LORA_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,8})\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B)\.weight",
    re.ASCII,
)


def _classify(t: Tensor, weights: Path) -> tuple[int, str, str]:
    """(layer, module, "A"|"B") for a LoRA tensor name, or a specific error for anything else."""
    name = t.name
    if "lora_magnitude_vector" in name:
        raise UnsupportedAdapterError(
            f"{weights.name} holds DoRA magnitude vectors ({show(name)}): DoRA is not supported: " + MERGE_HINT
        )
    if "embed_tokens" in name or "lm_head" in name or "lora_embedding_" in name:
        raise UnsupportedAdapterError(
            f"{weights.name} holds {show(name)}: LoRA on (or trained copies of) the embedding / output layer is "
            f"not supported; hotswap applies LoRA to {', '.join(SUPPORTED_MODULES)} only: " + MERGE_HINT
        )
    if name.endswith(".lora_B.bias") or name.endswith(".lora_A.bias"):
        raise UnsupportedAdapterError(
            f"{weights.name} holds LoRA bias {show(name)} (lora_bias): not supported: " + MERGE_HINT
        )
    match = _LORA_TENSOR.fullmatch(name)
    expected_names = (
        f"hotswap expects only LoRA pairs named {LORA_PREFIX}<i>.<self_attn|mlp>.<module>.lora_A.weight / "
        f".lora_B.weight with <module> one of {', '.join(SUPPORTED_MODULES)}"
    )
    if match is None:
        raise UnexpectedTensorError(f"unexpected tensor {show(name)} in {weights.name}: {expected_names}")
    layer, parent, module, which = match.groups()
    if module not in PARENT:
        raise UnexpectedTensorError(
            f"{weights.name} has LoRA weights for {parent}.{module} ({show(name)}), which is not a projection hotswap "
            f"supports: {expected_names}"
        )
    if PARENT[module] != parent:
        raise UnexpectedTensorError(f"unexpected tensor {show(name)} in {weights.name}: {module} belongs under "
                                    f"{PARENT[module]}, not {parent}")
    return int(layer), module, which[-1]


def lora_tensors(weights: Path, cfg: dict, dims: ModelDims, r: int) -> dict[Projection, dict[str, Tensor]]:
    """Validate names, dtypes, layer range and shapes from the header; return {(layer, module): {"A": .., "B": ..}}."""
    header = read_header(weights)
    if not header:
        raise MissingTensorError(
            f"{weights.name} holds no tensors: the adapter was saved before training or is damaged"
        )
    pairs: dict[Projection, dict[str, Tensor]] = {}
    mismatches: list[tuple[int, str]] = []  # (priority, message): report the most telling one
    rank_errors: list[str] = []
    hint = base_name_hint(cfg)
    for t in sorted(header.values(), key=lambda t: t.name):
        layer, module, which = _classify(t, weights)
        check_float(weights, t, "LoRA")
        if len(t.shape) != 2:
            raise CorruptWeightsError(
                f"LoRA tensor {show(t.name)} in {weights.name} has shape {show(list(t.shape))}, not 2-D: "
                "adapters saved from DeepSpeed ZeRO-3 / FSDP without gathering the shards look like this; save it "
                "again with the full parameters gathered"
            )
        if layer >= dims.num_hidden_layers:
            mismatches.append((4, f"adapter has LoRA weights for layer {layer} ({show(t.name)}), but the base model "
                                  f"has only {dims.num_hidden_layers} layers (num_hidden_layers): the adapter was "
                                  f"trained for a different base model{hint}"))
        (in_label, in_dim), (out_label, out_dim) = labelled_io(dims, module)
        if which == "A":  # A [r, in]
            found, want, label, rank = t.shape[1], in_dim, in_label, t.shape[0]
        else:  # B [out, r]
            found, want, label, rank = t.shape[0], out_dim, out_label, t.shape[1]
        if found != want:
            mismatches.append((MISMATCH_PRIORITY[label], (
                f"adapter was trained for {label} {show(found)}, base model has {want} ({show(t.name)} has shape "
                f"{show(list(t.shape))}): this adapter belongs to a different base model{hint}"
            )))
        if rank != r:
            rank_errors.append(
                f"LoRA tensor {show(t.name)} has rank {show(rank)} (shape {show(list(t.shape))}), but "
                f"{ADAPTER_CONFIG} says r = {r}"
            )
        slot = pairs.setdefault((layer, module), {})
        slot[which] = t
    if mismatches:
        raise BaseModelMismatchError(min(mismatches, key=lambda m: m[0])[1])
    if rank_errors:
        raise RankError(rank_errors[0] + ": the config and weights disagree; re-save the adapter with PEFT")
    return pairs
