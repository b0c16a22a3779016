"""The base model's dimensions as the format checks use them: parsed once per inspection with the one
config.json parser (`hotswap.model_dims`), plus the labels that name a dimension in a message."""

from __future__ import annotations

from typing import Any

from hotswap.model_dims import ModelDims

# How a projection's in/out size is named in a message; also the order in which a mismatch is the most telling.
_LABELS = ("hidden_size", "intermediate_size", "num_attention_heads*head_dim", "num_key_value_heads*head_dim")
MISMATCH_PRIORITY = {label: i for i, label in enumerate(_LABELS)}
_IO_LABELS = {  # projection -> (label of in_features, label of out_features)
    "q_proj": (0, 2), "k_proj": (0, 3), "v_proj": (0, 3), "o_proj": (2, 0),
    "gate_proj": (0, 1), "up_proj": (0, 1), "down_proj": (1, 0),
}


def base_dims(base_config: Any, need_vocab: bool) -> ModelDims:
    # A broken *base* config is the server's problem: plain ValueError, not AdapterFormatError.
    return ModelDims.from_config(base_config, "base model config", ValueError, need_vocab)


def labelled_io(dims: ModelDims, module: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """((label, in_features), (label, out_features)) of a projection, e.g. (("hidden_size", 576), ...)."""
    in_dim, out_dim = dims.projection_shapes()[module]
    in_label, out_label = _IO_LABELS[module]
    return (_LABELS[in_label], in_dim), (_LABELS[out_label], out_dim)
