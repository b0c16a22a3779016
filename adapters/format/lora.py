"""PEFT LoRA adapters: `inspect_lora_adapter` validates a dir against the base model without loading
a tensor; `load_lora_tensors` then reads the validated tensors with torch (imported only there).

The resolved `target_modules` must equal the set of (layer, module) pairs with tensors: PEFT saves
every targeted layer. A missing `target_modules` is inferred from the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from adapters.errors import (
    AdapterFormatError, MissingFileError, MissingTensorError, PickledWeightsError, RankError, UnexpectedTensorError,
)
from adapters.format.dims import base_dims
from adapters.format.files import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, as_dir, is_file, pickled_files, read_json_object,
)
from adapters.format.header import check_finite, dtype_summary, fingerprint
from adapters.format.hints import LORA_CONVERT_HINT, base_name_hint
from adapters.format.lora_config import DEFAULT_MAX_RANK, check_max_rank, lora_hyperparameters
from adapters.format.lora_tensors import lora_tensors
from adapters.format.targets import check_patterns, describe, lora_tensor_names, module_path, resolve_targets
from hotswap.quote import show


@dataclass(frozen=True)
class LoraAdapterInfo:
    """What the engine needs to know about a validated LoRA adapter.

    The delta applied to a targeted projection is `scaling * B @ A @ x`, with A `[rank, in]` and
    B `[out, rank]` as returned by `load_weights()` (B is *not* pre-scaled).
    """

    kind: ClassVar[str] = "lora"
    path: str
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rsLoRA
    target_modules: tuple[str, ...]  # sorted short names, e.g. ("k_proj", "q_proj", "v_proj")
    num_layers_with_lora: int
    dtype: str  # "bfloat16" | "float16" | "float32" | "float64" | "mixed"
    size_bytes: int  # bytes of LoRA tensor data in the file
    layers: tuple[int, ...] = ()  # sorted layer indices carrying LoRA
    modules: tuple[tuple[int, str], ...] = ()  # every (layer, module) pair, sorted
    base_model_name_or_path: str | None = None  # informational only, never trusted
    _fingerprint: tuple[int, int] = field(default=(0, 0), repr=False, compare=False)

    def load_weights(self, dtype: Any = None, device: Any = "cpu") -> dict[tuple[int, str], tuple[Any, Any]]:
        """The LoRA tensors as torch tensors: `{(layer, module): (A [r, in], B [out, r])}`."""
        return load_lora_tensors(self.path, self, dtype=dtype, device=device)


def _weights_file(root: Path) -> Path:
    """adapter_model.safetensors, after making sure the config is there too (a specific error if not)."""
    if not is_file(root / ADAPTER_CONFIG):
        hint = (f"; it has a {MODEL_CONFIG}, so it looks like a full model: register it as a full fine-tune"
                if is_file(root / MODEL_CONFIG) else
                ": copy the adapter_config.json PEFT saved next to the weights")
        raise MissingFileError(f"the directory has no {ADAPTER_CONFIG}{hint}")
    weights = root / ADAPTER_WEIGHTS
    if not is_file(weights):
        pickled = pickled_files(root)
        if pickled:
            raise PickledWeightsError(
                f"the directory has only pickled weights ({', '.join(pickled)}) and no {ADAPTER_WEIGHTS}; "
                f"pickled files can run arbitrary code and are never opened: {LORA_CONVERT_HINT}"
            )
        raise MissingFileError(
            f"the directory has no {ADAPTER_WEIGHTS}: upload the weights file PEFT's save_pretrained() wrote next to "
            f"{ADAPTER_CONFIG}"
        )
    return weights


def inspect_lora_adapter(
    path: str | Path, base_config: dict, max_rank: int | None = DEFAULT_MAX_RANK
) -> LoraAdapterInfo:
    """Validate a PEFT LoRA adapter dir against the base model's config.json dict.

    Raises an `AdapterFormatError` subclass for every broken or unsupported adapter; a plain
    `ValueError` if `base_config` itself is unusable. `max_rank=None` applies no rank ceiling.
    """
    check_max_rank(max_rank)
    dims = base_dims(base_config, need_vocab=False)
    root = as_dir(path, "LoRA adapter")
    weights = _weights_file(root)
    cfg_path = root / ADAPTER_CONFIG

    cfg = read_json_object(cfg_path)
    r, alpha, use_rslora = lora_hyperparameters(cfg, cfg_path, max_rank)
    expected = resolve_targets(cfg, cfg_path, dims)
    if expected is not None:  # before the tensors: a per-module rank would otherwise read as a rank mismatch
        check_patterns(cfg, cfg_path, expected, r, alpha)
    pairs = lora_tensors(weights, cfg, dims, r)

    for (layer, module), slot in sorted(pairs.items()):
        if len(slot) != 2:
            have, lack = ("lora_A", "lora_B") if "A" in slot else ("lora_B", "lora_A")
            raise MissingTensorError(
                f"{weights.name} has {have} but no {lack} for {module_path(layer, module)}: "
                "every LoRA module needs both; the file is incomplete, save the adapter again with PEFT"
            )
    present = set(pairs)
    if expected is None:  # no target_modules in the config: the tensors say what is targeted
        modules = {m for _, m in present}
        expected = {(layer, m) for layer in range(dims.num_hidden_layers) for m in modules}
        check_patterns(cfg, cfg_path, present, r, alpha)
    missing, extra = expected - present, present - expected
    if extra:
        raise UnexpectedTensorError(
            f"{weights.name} has LoRA tensors for {describe(extra)}, which target_modules "
            f"{show(cfg.get('target_modules'))} in {ADAPTER_CONFIG} does not select: config and weights disagree"
        )
    if missing:
        raise MissingTensorError(
            f"{ADAPTER_CONFIG} targets {describe(missing)} ({len(missing)} module(s) in all), but {weights.name} "
            "has no LoRA tensors for them: the file is incomplete, or the adapter was trained for a base model "
            f"with fewer layers{base_name_hint(cfg)}"
        )

    tensors = [t for slot in pairs.values() for t in slot.values()]
    check_finite(weights, tensors, "LoRA")

    name = cfg.get("base_model_name_or_path")
    return LoraAdapterInfo(
        path=str(root),
        rank=r,
        alpha=alpha,
        use_rslora=use_rslora,
        scaling=alpha / math.sqrt(r) if use_rslora else alpha / r,
        target_modules=tuple(sorted({m for _, m in present})),
        num_layers_with_lora=len({layer for layer, _ in present}),
        dtype=dtype_summary(tensors),
        size_bytes=sum(t.nbytes for t in tensors),
        layers=tuple(sorted({layer for layer, _ in present})),
        modules=tuple(sorted(present)),
        base_model_name_or_path=name if isinstance(name, str) else None,
        _fingerprint=fingerprint(weights),
    )


def load_lora_tensors(
    path: str | Path, info: LoraAdapterInfo, dtype: Any = None, device: Any = "cpu"
) -> dict[tuple[int, str], tuple[Any, Any]]:
    """Load an inspected adapter's tensors: `{(layer, module): (A [r, in], B [out, r])}` as torch tensors.

    B is not pre-scaled: the engine multiplies by `info.scaling`. `dtype` / `device` optionally cast/move.
    Refuses (AdapterFormatError) if the file changed since `inspect_lora_adapter` validated it.
    """
    from safetensors import safe_open  # framework="pt" imports torch: only here, never at module import

    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        changed = fingerprint(weights) != info._fingerprint
    except OSError:
        changed = True
    if changed:
        raise AdapterFormatError(f"{weights.name} changed or vanished since it was inspected: inspect it again")
    out: dict[tuple[int, str], tuple[Any, Any]] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        wanted = set()
        for layer, module in info.modules:
            a_name, b_name = lora_tensor_names(layer, module)
            wanted.update((a_name, b_name))
            if a_name not in keys or b_name not in keys:
                raise MissingTensorError(f"{weights.name} lacks {a_name} / {b_name}: inspect it again")
            a, b = f.get_tensor(a_name), f.get_tensor(b_name)  # A [r, in], B [out, r]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != info.rank or b.shape[1] != info.rank:
                prefix = a_name.removesuffix(".lora_A.weight")
                raise RankError(f"{weights.name}: {prefix} no longer has rank {info.rank}: inspect it again")
            if dtype is not None or str(device) != "cpu":
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
            out[(layer, module)] = (a, b)
        if keys - wanted:
            raise UnexpectedTensorError(f"{weights.name} has tensors it did not have when inspected: inspect it again")
    return out
