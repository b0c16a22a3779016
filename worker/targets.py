"""From a request's `ModelTarget` to files on local disk: registry record -> disk cache (content-keyed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters.names import parse_ref
from hotswap.protocol import ModelTarget


@dataclass(frozen=True)
class LocalModel:
    kind: str  # "base" | "lora" | "full"
    key: str  # the engine name: the target's key ("lora:acme/bot@2"), unique per immutable version
    path: Path | None


class TargetError(Exception):
    """The request's adapter or fine-tune cannot be had (deleted and purged, unreadable ...)."""


def fetch_target(target: ModelTarget, registry, cache) -> LocalModel:
    if target.kind == "base":
        return LocalModel("base", "base", None)
    tenant, _, ref = (target.ref or "").partition("/")
    try:
        name, version = parse_ref(ref)
        record = registry.get(tenant, name, version)
        path = cache.fetch(record)
    except Exception as exc:  # NotFound, storage errors, checksum mismatch after retries
        raise TargetError(f"cannot load {target.kind} model {target.ref!r}: {exc}") from exc
    return LocalModel(target.kind, target.key, Path(path))
