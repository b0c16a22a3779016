"""What to do about an adapter hotswap cannot serve: the advice several checks end their messages with."""

from __future__ import annotations

from typing import Any

from hotswap.quote import show

MERGE_HINT = (
    "merge it into the base model with PEFT (`merged = model.merge_and_unload(); merged.save_pretrained(dir)`) "
    "and register the result as a full fine-tune, or retrain as plain LoRA"
)
LORA_CONVERT_HINT = (
    "convert to safetensors: in a trusted environment load it with "
    "`PeftModel.from_pretrained(base_model, dir)` and `save_pretrained(out_dir)` it again "
    "(PEFT writes adapter_model.safetensors by default)"
)
FULL_CONVERT_HINT = (
    "convert to safetensors: in a trusted environment load it with "
    "`AutoModelForCausalLM.from_pretrained(dir)` and `save_pretrained(out_dir)` it again "
    "(transformers writes model.safetensors by default)"
)


def is_set(value: Any) -> bool:
    """A config option that is switched on (PEFT writes off options as null, false, 0 or empty)."""
    return value not in (None, False, 0, "", [], {})


def base_name_hint(cfg: dict) -> str:
    """The base model the adapter names (informational only, never trusted), for mismatch messages."""
    name = cfg.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return ""
    return f" (adapter_config.json names base_model_name_or_path {show(name)})"
