"""Where measured CPU matmul timings are kept: one JSON file per machine kind under the cache dir.

A file is keyed by what decides the timings: CPU model name, the ISA flags that matter, torch's
version, torch's thread count and the dtype. It holds, per weight shape ("960x576"), the median
seconds per path and row count; the plan is derived from them at every load (cpu_plan.choose),
so a better chooser needs no re-measuring. Without a cache dir the timings live in this process
only (so a test session or a benchmark measures once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger("hotswap.worker.cpu_tuning")

ShapeTimings = dict[str, dict[int, float]]  # path -> row count -> seconds

_MEMORY: dict[str, dict[str, ShapeTimings]] = {}  # key id -> shape -> timings, when there is no cache dir


def tuning_key(dtype: str, threads: int) -> dict:
    from worker.models.cpu_facts import cpu_model_name, isa_flags

    import torch

    return {"cpu": cpu_model_name(), "flags": sorted(f for f, on in isa_flags().items() if on),
            "torch": torch.__version__, "threads": threads, "dtype": dtype}


def key_id(key: dict) -> str:
    """A file name for the key: readable (CPU slug, threads, dtype) plus a hash of all of it."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", key["cpu"].lower()).strip("-")[:40] or "cpu"
    return f"{slug}-t{key['threads']}-{key['dtype']}-{digest}"


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def load(cache_dir: Path | None, key: dict) -> dict[str, ShapeTimings]:
    """The timings stored for this key ({} if none, or if the file is unreadable or for another key)."""
    if cache_dir is None:
        return {k: dict(v) for k, v in _MEMORY.get(key_id(key), {}).items()}
    path = Path(cache_dir) / f"{key_id(key)}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable CPU tuning cache %s: %s", path, exc)
        return {}
    if data.get("key") != key:
        return {}
    return {shape: {path_: {int(r): float(s) for r, s in rows.items()} for path_, rows in paths.items()}
            for shape, paths in data.get("timings", {}).items()}


def save(cache_dir: Path | None, key: dict, timings: dict[str, ShapeTimings]) -> Path | None:
    """Store the timings for this key (atomically: concurrent workers never read half a file)."""
    if cache_dir is None:
        _MEMORY[key_id(key)] = {k: dict(v) for k, v in timings.items()}
        return None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key_id(key)}.json"
    body = {"key": key, "timings": {shape: {p: {str(r): s for r, s in rows.items()} for p, rows in paths.items()}
                                    for shape, paths in timings.items()}}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=1)
    os.replace(tmp, path)
    return path
