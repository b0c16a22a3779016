"""The one entry every uploader calls: which kind a dir is, and its validation against the base model.

    info = inspect(path, base_config, max_rank)   # LoraAdapterInfo | FullModelInfo, or AdapterFormatError

The API's upload route calls it with the server's `max_lora_rank`; the CLI calls it, before it sends
anything, with the rank the server reports (or None when the server does not say: the server decides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from adapters.errors import MissingFileError
from adapters.format.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, as_dir, is_file
from adapters.format.full import FullModelInfo, inspect_full_checkpoint
from adapters.format.lora import LoraAdapterInfo, inspect_lora_adapter


def detect_kind(path: str | Path) -> Literal["lora", "full"]:
    """"lora" for a PEFT adapter dir (adapter_config.json), "full" for a model dir (config.json)."""
    root = as_dir(path, "LoRA adapter or model")
    if is_file(root / ADAPTER_CONFIG):
        return "lora"
    if is_file(root / MODEL_CONFIG):
        return "full"
    if is_file(root / ADAPTER_WEIGHTS) or is_file(root / "adapter_model.bin"):
        raise MissingFileError(
            f"the directory has adapter weights but no {ADAPTER_CONFIG}: copy the adapter_config.json that PEFT "
            "saved next to the weights"
        )
    raise MissingFileError(
        f"the directory is neither a LoRA adapter (no {ADAPTER_CONFIG}) nor a full model (no {MODEL_CONFIG}); "
        "point to the directory PEFT's or transformers' save_pretrained() wrote"
    )


def inspect(path: str | Path, base_config: dict, max_rank: int | None, *,
            check_finite: bool = True) -> LoraAdapterInfo | FullModelInfo:
    """Validate a LoRA adapter or full fine-tune dir against the base model's config.json dict.

    `max_rank`: the serving engine's max LoRA rank (None: no ceiling here). LoRA weights are always
    scanned for NaN/Inf (they are small); a full checkpoint's only with `check_finite` (it reads every byte).
    """
    if detect_kind(path) == "lora":
        return inspect_lora_adapter(path, base_config, max_rank=max_rank)
    return inspect_full_checkpoint(path, base_config, check_finite=check_finite)
