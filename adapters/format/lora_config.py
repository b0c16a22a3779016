"""A PEFT `adapter_config.json` as the engine reads it: LoRA only, no options that change the forward
pass beyond `scaling * B @ A @ x`, and a rank within the server's maximum.

Options that do not change inference math are ignored: `init_lora_weights`, `lora_dropout`, the
`loftq`/`eva`/`corda`/`lora_ga`/`velora` configs, `base_model_name_or_path` (informational only: the
base match is decided by tensor shapes, the name only appears as a hint in mismatch messages).
"""

from __future__ import annotations

import math
from pathlib import Path

from adapters.errors import InvalidConfigError, RankError, UnsupportedAdapterError
from adapters.format.hints import MERGE_HINT, is_set
from hotswap.quote import show

DEFAULT_MAX_RANK = 64

# (config key, what it is) for options that change the forward pass in ways the engine does not implement.
_UNSUPPORTED_OPTIONS = (
    ("use_dora", "DoRA (use_dora: true) rescales each output by a learned magnitude vector, which hotswap "
                 "does not implement: " + MERGE_HINT),
    ("lora_bias", "lora_bias: true adds a trained bias to lora_B, which hotswap does not implement: " + MERGE_HINT),
    ("fan_in_fan_out", "fan_in_fan_out: true stores weights transposed (GPT-2 Conv1D layout); a Llama-family "
                       "adapter never needs it: retrain with fan_in_fan_out false"),
    ("layer_replication", "layer_replication changes the number of layers of the base model, which hotswap "
                          "does not support: " + MERGE_HINT),
    ("target_parameters", "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported: "
                          "target the q/k/v/o/gate/up/down projections instead"),
    ("trainable_token_indices", "trainable_token_indices trains embedding rows, which hotswap does not "
                                "support: " + MERGE_HINT),
    ("use_qalora", "QALoRA (use_qalora: true) pools inputs for a quantized base, which hotswap does not "
                   "implement: retrain as plain LoRA"),
    ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens) switches the adapter on mid-sequence, "
                                "which hotswap does not implement: retrain as plain LoRA"),
    ("use_bdlora", "BD-LoRA (use_bdlora) uses block-diagonal factors, which hotswap does not implement: "
                   + MERGE_HINT),
    ("kasa_config", "KaSA (kasa_config) modifies the base weights' singular values, which hotswap does not "
                    "implement: " + MERGE_HINT),
    ("monteclora_config", "MonteCLoRA (monteclora_config) is not supported: " + MERGE_HINT),
    ("arrow_config", "Arrow routing (arrow_config) mixes several LoRAs per token, which hotswap does not "
                     "implement: register each expert adapter on its own"),
)


def check_max_rank(max_rank: int | None) -> None:
    """None: no ceiling (a client that could not learn the server's; the server still applies its own)."""
    if max_rank is None:
        return
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def _check_supported(cfg: dict, cfg_path: Path) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InvalidConfigError(f"{cfg_path.name} has no peft_type: is this a PEFT adapter_config.json?")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has peft_type {show(peft_type)}: hotswap serves LoRA adapters only (peft_type LORA); "
            "merge other adapter types into the base model and register the result as a full fine-tune"
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has task_type {show(task_type)}: hotswap serves causal language models only (CAUSAL_LM)"
        )
    modules_to_save = cfg.get("modules_to_save")
    if is_set(modules_to_save):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has modules_to_save {show(modules_to_save)}: those modules are saved as full trained "
            "copies, not low-rank deltas, and hotswap cannot swap them per request: " + MERGE_HINT
        )
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has bias {show(bias)}: training the base model's biases is not supported; "
            "retrain with bias='none', or " + MERGE_HINT
        )
    for key, why in _UNSUPPORTED_OPTIONS:
        if is_set(cfg.get(key)):
            raise UnsupportedAdapterError(f"{cfg_path.name}: {why}")


def lora_hyperparameters(cfg: dict, cfg_path: Path, max_rank: int | None) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of a supported LoRA config; `max_rank` None skips the ceiling."""
    _check_supported(cfg, cfg_path)
    r = cfg.get("r", 8)  # PEFT's defaults for a missing key
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if isinstance(r, bool) or not isinstance(r, int):
        raise InvalidConfigError(f"{cfg_path.name} has r = {show(r)}; the LoRA rank must be an integer")
    if r <= 0:
        raise RankError(f"{cfg_path.name} has r = {r}; the LoRA rank must be positive")
    if max_rank is not None and r > max_rank:
        raise RankError(
            f"{cfg_path.name} has LoRA rank r = {r}, above the engine's maximum rank {max_rank}: retrain with "
            f"r <= {max_rank}, raise the server's max LoRA rank, or " + MERGE_HINT
        )
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidConfigError(f"{cfg_path.name} has lora_alpha = {show(alpha)}; expected a number")
    use_rslora = cfg.get("use_rslora", False)
    if use_rslora is None:
        use_rslora = False
    if not isinstance(use_rslora, bool):
        raise InvalidConfigError(f"{cfg_path.name} has use_rslora = {show(use_rslora)}; expected true or false")
    return r, float(alpha), use_rslora
