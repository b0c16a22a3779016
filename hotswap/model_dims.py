"""A Llama-family base model's dimensions, read from its Hugging Face `config.json` dict.

The one parser of those numbers: the engine's `ModelConfig` (worker/models/config.py) builds on it,
and `adapters.format` checks adapters and full fine-tunes against it. torch-free, so the API can use it.

    dims = ModelDims.from_config(raw, "base model config", ValueError, need_vocab=False)
    dims.projection_shapes()["k_proj"]  # (in, out) = (hidden_size, num_key_value_heads * head_dim)

`PROJECTIONS` names the seven projections a LoRA may target, in the engine's order, with the
sub-module each lives under in a decoder layer (`model.layers.{i}.{parent}.{name}`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hotswap.quote import show

# projection -> its parent sub-module, in the engine's order (q, k, v, o, gate, up, down)
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@dataclass(frozen=True)
class ModelDims:
    architecture: str | None  # architectures[0], None when the config names no class
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None  # None only when not asked for and absent
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "Qwen2ForCausalLM" or self.attention_bias

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-able projection."""
        return projection_shapes(self.hidden_size, self.intermediate_size,
                                 q_size=self.num_attention_heads * self.head_dim,
                                 kv_size=self.num_key_value_heads * self.head_dim)

    @classmethod
    def from_config(cls, raw: Any, what: str, error: type[ValueError] = ValueError,
                    need_vocab: bool = True) -> "ModelDims":
        """Validate and read the dimensions; `error(message)` names `what` and the key at fault."""
        if not isinstance(raw, dict):
            raise error(f"{what} must be a JSON object, got {type(raw).__name__}")

        def integer(key: str, default: int | None = None) -> int:
            value = raw.get(key)
            if value is None:
                if default is None:
                    raise error(f"{what} lacks {show(key)}")
                return default
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise error(f"{what} has {key} = {show(value)}; expected a positive integer")
            return value

        def flag(key: str) -> bool:
            value = raw.get(key, False)
            if value is None:
                return False
            if not isinstance(value, bool):
                raise error(f"{what} has {key} = {show(value)}; expected true or false")
            return value

        archs = raw.get("architectures")
        if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
            raise error(f"{what} has architectures = {show(archs)}; expected a list of class names")
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


def projection_shapes(hidden: int, intermediate: int, q_size: int, kv_size: int) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per projection; q_size = heads * head_dim, kv_size = kv_heads * head_dim."""
    h, i, q, kv = hidden, intermediate, q_size, kv_size
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }
