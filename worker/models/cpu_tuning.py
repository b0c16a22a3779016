"""Measure the CPU matmul paths on the model's own weights and give every weight its fastest plan.

At engine load (CPU only) every distinct projection shape of the model ([out, in] of q/k/v, o,
gate/up, down and the logits head) is timed on the decode row counts up to max_num_seqs
(cpu_plan.buckets_for) through each candidate path: plain F.linear, MKL's packed GEMM for
fp32, and oneDNN's GEMM on its reordered weight (fp32 and bf16). Padded runs need no timing of their own: padding r rows to c costs what c rows cost.
Calls are interleaved (every cell once per pass, so a noisy neighbour slows all candidates
alike), cycle through the layers' weights of a shape (cold caches, as in a real step, not one
weight hot in L2), and the median of at least MIN_REPEATS passes after a warm-up counts; passes
stop once BUDGET_S is spent (at CAP_FACTOR x BUDGET_S even short of MIN_REPEATS). The timings are stored per machine kind
(cpu_tuning_store.py), so later loads only read them; timings too noisy to trust again (a busy
machine) serve this load only. `cpu_tuning="remeasure"` measures again;
`"off"` keeps the fixed rule of cpu_linear.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from worker.models import cpu_tuning_store as store
from worker.models.cpu_linear import ONEDNN_DTYPES, PackedWeight, mkl_packing_available, onednn_available
from worker.models.cpu_plan import DEFAULT, Choice, buckets_for, choose, describe, fixed_plan, row_table

log = logging.getLogger("hotswap.worker.cpu_tuning")

MODES = ("auto", "remeasure", "off")
BUDGET_S = 2.0  # measuring stops after this once MIN_REPEATS passes are done
MIN_REPEATS, MAX_REPEATS = 3, 9
CAP_FACTOR = 3  # ... and after CAP_FACTOR x BUDGET_S even with fewer passes (a very busy machine)
MAX_NOISE = 0.5  # timings noisier than this (see measure) serve this process but are not stored

Site = tuple[str, torch.Tensor, PackedWeight]  # (module name, weight [out, in], its PackedWeight)


def group_sites(sites: list[Site]) -> dict[tuple[int, int], list[Site]]:
    """The model's projections by weight shape [out, in]."""
    groups: dict[tuple[int, int], list[Site]] = {}
    for site in sites:
        groups.setdefault(tuple(site[1].shape), []).append(site)
    return groups


def candidate_paths(dtype: torch.dtype) -> tuple[str, ...]:
    paths = [DEFAULT]
    if dtype == torch.float32 and mkl_packing_available():
        paths.append("packed")
    if dtype in ONEDNN_DTYPES and onednn_available():
        paths.append("onednn")
    return tuple(paths)


@torch.inference_mode()
def measure(groups: dict[tuple[int, int], list[Site]], buckets: tuple[int, ...], paths: tuple[str, ...],
            budget_s: float | None = None) -> tuple[dict[str, store.ShapeTimings], float]:
    """Median seconds per (shape, path, row count) from interleaved passes over every cell, and the
    noise: the median over cells of (slowest - fastest) / median. budget_s: default BUDGET_S."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    dtype = next(iter(groups.values()))[0][1].dtype
    gen = torch.Generator().manual_seed(0)
    inputs = {(in_dim, rows): torch.randn(rows, in_dim, generator=gen).to(dtype)  # [rows, in]
              for (_, in_dim) in groups for rows in buckets}
    cells = [(shape, path, rows) for shape in groups for rows in buckets for path in paths]
    turn = {shape: 0 for shape in groups}  # next layer's weight of each shape
    samples: dict[tuple, list[float]] = {cell: [] for cell in cells}

    def run(cell) -> float:
        shape, path, rows = cell
        _, weight, packed = groups[shape][turn[shape] % len(groups[shape])]
        turn[shape] += 1
        x = inputs[(shape[1], rows)]
        start = time.perf_counter()
        packed.run(Choice(path), x, weight)
        return time.perf_counter() - start

    for cell in cells:  # warm-up: packs, allocator, OpenMP team, and oneDNN's bf16 kernels, JIT-built per shape
        run(cell)
    start = time.perf_counter()
    for repeat in range(MAX_REPEATS):
        for cell in cells:
            samples[cell].append(run(cell))
        spent = time.perf_counter() - start
        if (repeat + 1 >= MIN_REPEATS and spent >= budget_s) or spent >= CAP_FACTOR * budget_s:
            break
    out: dict[str, store.ShapeTimings] = {}
    spreads = []
    for (shape, path, rows), times in samples.items():
        median = sorted(times)[len(times) // 2]
        out.setdefault(store.shape_name(shape), {}).setdefault(path, {})[rows] = median
        spreads.append((max(times) - min(times)) / median if len(times) > 1 else float("inf"))
    return out, sorted(spreads)[len(spreads) // 2]


def _complete(timings: store.ShapeTimings | None, paths: tuple[str, ...], buckets: tuple[int, ...]) -> bool:
    return timings is not None and all(set(buckets) <= set(timings.get(p, {})) for p in paths)


@torch.inference_mode()
def warm(site: Site, rows_limit: int) -> None:
    """Run one weight of a shape once at every row count its table routes, so oneDNN builds its
    per-shape kernels (~50 MB for a small model) at load, not as first-seen batch sizes arrive
    while serving (a latency spike, and memory that grows under load)."""
    _, weight, packed = site
    x = torch.zeros(max(rows_limit - 1, 1), weight.shape[1], dtype=weight.dtype)  # [rows, in]
    for rows in range(1, rows_limit):
        packed.linear(x[:rows], weight)


def _restrict(timings: store.ShapeTimings, paths: tuple[str, ...], buckets: tuple[int, ...]) -> store.ShapeTimings:
    return {p: {r: timings[p][r] for r in buckets} for p in paths}


def tune_model(sites: list[Site], max_rows: int, mode: str = "auto", cache_dir: Path | None = None) -> dict:
    """Give every site's PackedWeight its table (or none: mode "off"); returns what was chosen,
    JSON-ready: {"source", "dtype", "threads", "cache", "shapes": {"960x576 (qkv_proj)": {"1-3": "plain", ...}}}."""
    if mode not in MODES:
        raise ValueError(f"cpu_tuning must be one of {', '.join(MODES)}; got {mode!r}")
    groups = group_sites(sites)
    dtype = sites[0][1].dtype
    dtype_name = str(dtype).removeprefix("torch.")
    buckets, paths, threads = buckets_for(max_rows), candidate_paths(dtype), torch.get_num_threads()
    key = store.tuning_key(dtype_name, threads)
    cache_file = None
    if mode == "off":
        plans = {shape: fixed_plan(buckets, packed="packed" in paths) for shape in groups}
        source = "fixed rule (tuning off)"
    else:
        stored = {} if mode == "remeasure" else store.load(cache_dir, key)
        missing = {shape: group for shape, group in groups.items()
                   if not _complete(stored.get(store.shape_name(shape)), paths, buckets)}
        source = "cached"
        if missing:
            t0 = time.perf_counter()
            timings, noise = measure(missing, buckets, paths)
            stored.update(timings)
            source = f"measured in {time.perf_counter() - t0:.1f} s, noise {noise:.2f}"
            if noise <= MAX_NOISE:
                cache_file = store.save(cache_dir, key, stored)
            else:
                source += " (too noisy to store: other load on this CPU?)"
                log.warning("CPU matmul timings vary by %.0f%% between passes (other load on this CPU?): "
                            "using them for this engine only, not storing them", 100 * noise)
        elif cache_dir is not None:
            cache_file = Path(cache_dir) / f"{store.key_id(key)}.json"
        plans = {shape: choose(_restrict(stored[store.shape_name(shape)], paths, buckets)) for shape in groups}
    shapes = {}
    for shape, group in groups.items():
        table = row_table(plans[shape])
        for _, weight, packed in group:
            packed.table = None if mode == "off" else table
            packed.prepare(weight)  # the copies its paths use, now; the measured-only ones dropped
        if mode != "off":
            warm(group[0], len(table))
        labels = sorted({name.rsplit(".", 1)[-1] for name, _, _ in group})
        label = f"{store.shape_name(shape)} ({', '.join(labels)})"
        shapes[label] = describe(table, max_rows)
        log.info("cpu paths %s, %s, %d threads, %s: %s", label, dtype_name, threads, source,
                 ", ".join(f"{rows} {choice}" for rows, choice in shapes[label].items()))
    return {"source": source, "dtype": dtype_name, "threads": threads,
            "cache": str(cache_file) if cache_file else None, "shapes": shapes}
