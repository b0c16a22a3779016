"""PEFT module names <-> the engine's projections: the one place that maps them.

A projection is (layer, module) with module one of `SUPPORTED_MODULES` (engine order); its PEFT name is
`model.layers.{layer}.{parent}.{module}` and its tensors `base_model.model.` + that + `.lora_A/B.weight`.
`target_modules` is resolved exactly as PEFT does (list: exact name or `.`-suffix match; string: a regex
`re.fullmatch`ed against module names; "all-linear") against this base's module names, the embedding and
lm_head included (so targeting them is refused by name); `layers_to_transform` / `layers_pattern` and
`exclude_modules` are honoured. List entries matching nothing are ignored (PEFT ignores them too, and
copy-pasted configs often list e.g. "c_attn"); a config that matches no projection at all is refused.
`rank_pattern` / `alpha_pattern` are refused when they give a targeted module another rank or alpha.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adapters.errors import BaseModelMismatchError, InvalidConfigError, UnsupportedAdapterError
from adapters.format.hints import MERGE_HINT, base_name_hint, is_set
from hotswap.model_dims import PROJECTIONS, ModelDims
from hotswap.quote import clip, show

SUPPORTED_MODULES = tuple(PROJECTIONS)  # q, k, v, o, gate, up, down: the engine's order
PARENT = PROJECTIONS  # module -> "self_attn" | "mlp"
LORA_PREFIX = "base_model.model.model.layers."

Projection = tuple[int, str]  # (layer, module)


def module_path(layer: int, module: str) -> str:
    """PEFT's (and transformers') name of a projection: model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


def lora_tensor_names(layer: int, module: str) -> tuple[str, str]:
    """The names PEFT saves a projection's A [r, in] and B [out, r] under."""
    prefix = f"{LORA_PREFIX}{layer}.{PARENT[module]}.{module}"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def describe(pairs) -> str:
    """The first few projections of a set, by name, for a message."""
    names = [module_path(layer, m) for layer, m in sorted(pairs)]
    more = f" and {len(names) - 4} more" if len(names) > 4 else ""
    return ", ".join(names[:4]) + more


def _module_names(dims: ModelDims) -> dict[str, Projection | None]:
    """Every module name PEFT could have matched on this base -> (layer, module), None for embed/lm_head."""
    names: dict[str, Projection | None] = {"model.embed_tokens": None, "lm_head": None}
    for layer in range(dims.num_hidden_layers):
        for module in SUPPORTED_MODULES:
            names[module_path(layer, module)] = (layer, module)
    return names


def _compile(pattern: str, cfg_path: Path, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:  # "(" x 10,000 / "a{99999999999}" raise the last two
        raise InvalidConfigError(
            f"{cfg_path.name} has {key} {show(pattern)}, not a valid regular expression: {clip(str(exc))}"
        ) from None


def _as_name_list(value: Any, cfg_path: Path, key: str) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidConfigError(
        f"{cfg_path.name} has {key} = {show(value)}; expected a list of module names or a regex string"
    )


def _layer_filter(cfg: dict, cfg_path: Path):
    """PEFT's layers_to_transform / layers_pattern rule (list-form target_modules only), or None."""
    indexes = cfg.get("layers_to_transform")
    if indexes is None or indexes == []:
        return None
    if isinstance(indexes, int) and not isinstance(indexes, bool):
        indexes = [indexes]
    if not isinstance(indexes, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
        raise InvalidConfigError(f"{cfg_path.name} has layers_to_transform = {show(indexes)}; expected integers")
    patterns = cfg.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns:
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise InvalidConfigError(f"{cfg_path.name} has layers_pattern = {show(patterns)}; expected names")
        regexes = [_compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", cfg_path, "layers_pattern") for p in patterns]
    else:
        regexes = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    wanted = set(indexes)

    def keep(name: str) -> bool:
        for rx in regexes:
            match = rx.match(name)
            if match and match.group("idx") is not None:  # None when a pattern like "x|" adds an alternative
                return int(match.group("idx")) in wanted
        return False

    return keep


def _listed(entries: list[str], names: dict, cfg: dict, cfg_path: Path, dims: ModelDims) -> list[str]:
    """Names a list-form target_modules selects; an entry for a layer the base lacks is a base mismatch."""
    matched = []
    for entry in entries:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits:
            # ASCII digits, at most 9: int() of a 5000-digit number is a ValueError
            deeper = re.fullmatch(r"(?:.*\.)?layers\.([0-9]{1,9})\.(?:self_attn|mlp)\.(\w+)", entry)
            if deeper and deeper.group(2) in PARENT and int(deeper.group(1)) >= dims.num_hidden_layers:
                raise BaseModelMismatchError(
                    f"{cfg_path.name} targets {show(entry)}, but the base model has only {dims.num_hidden_layers} "
                    f"layers (num_hidden_layers): the adapter was trained for a different base model"
                    + base_name_hint(cfg)
                )
        matched.extend(hits)
    keep = _layer_filter(cfg, cfg_path)
    if keep is not None:
        matched = [n for n in matched if names[n] is None or keep(n)]
    return matched


def resolve_targets(cfg: dict, cfg_path: Path, dims: ModelDims) -> set[Projection] | None:
    """The (layer, module) pairs `target_modules` selects on this base, as PEFT would; None if unset."""
    target = cfg.get("target_modules")
    if target is None:
        return None
    names = _module_names(dims)
    if isinstance(target, str) and target.lower() == "all-linear":
        matched = [n for n, v in names.items() if v is not None]  # PEFT excludes the output layer
    elif isinstance(target, str):
        rx = _compile(target, cfg_path, "target_modules")
        matched = [n for n in names if rx.fullmatch(n)]
    else:
        matched = _listed(_as_name_list(target, cfg_path, "target_modules"), names, cfg, cfg_path, dims)

    excluded = cfg.get("exclude_modules")
    if is_set(excluded):
        if isinstance(excluded, str):
            ex = _compile(excluded, cfg_path, "exclude_modules")
            matched = [n for n in matched if not ex.fullmatch(n)]
        else:
            ex_list = _as_name_list(excluded, cfg_path, "exclude_modules")
            matched = [n for n in matched if not (n in ex_list or any(n.endswith("." + e) for e in ex_list))]

    special = sorted({n.rpartition(".")[2] for n in matched if names[n] is None})
    if special:
        raise UnsupportedAdapterError(
            f"{cfg_path.name} targets {' and '.join(special)} (target_modules {show(target)}): LoRA on the "
            "embedding or "
            f"output layer is not supported; hotswap applies LoRA to {', '.join(SUPPORTED_MODULES)} only. "
            "Retrain without it, or " + MERGE_HINT
        )
    resolved = {names[n] for n in matched}
    if not resolved:
        raise UnsupportedAdapterError(
            f"{cfg_path.name} has target_modules {show(target)}, which matches none of the projections hotswap "
            "supports "
            f"({', '.join(SUPPORTED_MODULES)}, named like model.layers.0.self_attn.q_proj) on this base model"
        )
    return resolved  # type: ignore[return-value]


def check_patterns(cfg: dict, cfg_path: Path, pairs: set[Projection], r: int, alpha: float) -> None:
    """Refuse rank_pattern / alpha_pattern entries that give a targeted module a different rank/alpha."""
    for key, default, what in (("rank_pattern", r, "rank"), ("alpha_pattern", alpha, "alpha")):
        pattern = cfg.get(key)
        if not is_set(pattern):
            continue
        if not isinstance(pattern, dict):
            raise InvalidConfigError(f"{cfg_path.name} has {key} = {show(pattern)}; expected an object")
        compiled = [(_compile(rf"(.*\.)?({k})$", cfg_path, key), k, v) for k, v in pattern.items()]
        for layer, module in sorted(pairs):
            name = module_path(layer, module)
            for rx, k, value in compiled:  # PEFT's get_pattern_key: first matching key wins
                if rx.match(name):
                    if value != default:
                        raise UnsupportedAdapterError(
                            f"{cfg_path.name} has {key} {{{show(k)}: {show(value)}}}, giving {name} {what} "
                            f"{show(value)} instead of "
                            f"{default:g}: per-module ranks/alphas are not supported (one scaling per adapter); "
                            "retrain with uniform r / lora_alpha, or " + MERGE_HINT
                        )
                    break
