"""Read and validate what users register: PEFT LoRA adapters and full fine-tunes of the base model.

A LoRA adapter is a PEFT dir: `adapter_config.json` + `adapter_model.safetensors`. A full fine-tune is
a Hugging Face model dir: `config.json` + `*.safetensors` (optionally sharded with an index). Both are
checked against the base model's `config.json` dict before the engine ever sees them, and every broken
or unsupported case raises its own `AdapterFormatError` subclass naming what is wrong and what to do.

Public entry points:

- `inspect(path, base_config, max_rank) -> LoraAdapterInfo | FullModelInfo` (what uploaders call)
- `detect_kind(path) -> "lora" | "full"`
- `inspect_lora_adapter(path, base_config, max_rank=64) -> LoraAdapterInfo`
- `load_lora_tensors(path, info) -> {(layer, module): (A [r, in], B [out, r])}` (torch; also `info.load_weights()`)
- `inspect_full_checkpoint(path, base_config, check_finite=False) -> FullModelInfo`

Modules, one job each:

- `files`: the names hotswap reads, regular files only (symlinks are never followed), bounded JSON
- `header`: safetensors headers parsed directly (no tensor data loaded) and NaN/Inf scans in bounded chunks
- `dims`: the base model's dimensions (`hotswap.model_dims`, the one config.json parser) with message labels
- `targets`: PEFT names and `target_modules` <-> the engine's projections (also used by worker/lora/layout.py)
- `lora_config`, `lora_tensors`, `lora`: LoRA adapters; `full`: full checkpoints; `entry`: `detect_kind`, `inspect`

Pickled files (.bin/.pt/...) are never opened: no torch.load, no pickle, ever. torch is imported only
inside `load_lora_tensors`. Error messages name files by their name inside the directory
(`adapter_config.json`), never by a full path: on the server the directory is a temp dir the user never
saw. Callers that know the user's path (the CLI) put it in front.
"""

from adapters.errors import AdapterFormatError
from adapters.format.entry import detect_kind, inspect
from adapters.format.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CONFIG,
    MODEL_INDEX,
    UPLOADABLE_FILE,
    open_regular_file,
)
from adapters.format.full import FullModelInfo, inspect_full_checkpoint
from adapters.format.lora import LoraAdapterInfo, inspect_lora_adapter, load_lora_tensors
from adapters.format.lora_config import DEFAULT_MAX_RANK
from adapters.format.targets import SUPPORTED_MODULES

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_MAX_RANK",
    "MODEL_CONFIG",
    "MODEL_INDEX",
    "SUPPORTED_MODULES",
    "UPLOADABLE_FILE",
    "AdapterFormatError",
    "FullModelInfo",
    "LoraAdapterInfo",
    "detect_kind",
    "inspect",
    "inspect_full_checkpoint",
    "inspect_lora_adapter",
    "load_lora_tensors",
    "open_regular_file",
]
