"""The model facts the engine needs, read from a Hugging Face `config.json` and validated.

The dimensions come from `hotswap.model_dims` (the parser `adapters.format` uses too); this adds what
only the engine needs: the supported architecture, rope, norms, special tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hotswap.model_dims import ModelDims

# Architectures that are a Llama underneath: same blocks, optional q/k/v bias.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def same_shape_as(self, other: "ModelConfig") -> bool:
        """True when `other`'s weights can be copied into a model of this config (full fine-tunes)."""
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "qkv_bias", "tie_word_embeddings")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise ValueError(f"{model_dir} is not a model dir: it has no config.json")
        raw = json.loads(path.read_text())
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or raw.get('model_type')!r}: hotswap serves "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        if family in ("mistral", "qwen2") and _uses_sliding_window(raw):
            raise ValueError(
                f"{arch} with sliding-window attention (sliding_window={raw.get('sliding_window')}) is not supported"
            )
        dims = ModelDims.from_config(raw, "config.json")  # the one parser of the dimensions (torch-free)
        if dims.num_attention_heads % dims.num_key_value_heads:
            raise ValueError(f"num_attention_heads {dims.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {dims.num_key_value_heads}")
        gen = generation or {}
        return cls(
            architecture=arch,
            vocab_size=dims.vocab_size,
            hidden_size=dims.hidden_size,
            intermediate_size=dims.intermediate_size,
            num_layers=dims.num_hidden_layers,
            num_heads=dims.num_attention_heads,
            num_kv_heads=dims.num_key_value_heads,
            head_dim=dims.head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position=int(raw.get("max_position_embeddings", 4096)),
            rope=_rope_config(raw),
            tie_word_embeddings=dims.tie_word_embeddings,
            qkv_bias=family == "qwen2" or dims.attention_bias,
            eos_token_ids=_as_ids(gen.get("eos_token_id", raw.get("eos_token_id"))),
            bos_token_id=raw.get("bos_token_id"),
        )


def _uses_sliding_window(raw: dict) -> bool:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False:
        return False
    return int(window) < int(raw.get("max_position_embeddings", 0))


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _rope_config(raw: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(merged["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position=int(merged["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope scaling {kind!r}: hotswap supports default, linear and llama3")
