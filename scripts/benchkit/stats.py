"""vLLM's serving metrics over finished RequestRecords (pure functions).

numpy 'linear' percentiles in ms; TPOT = (E2EL - TTFT) / (output tokens - 1), only for outputs of 2+
tokens (0 in goodput); throughput over the point's duration; goodput = requests meeting every SLO."""

from __future__ import annotations

import numpy as np

from benchkit.client import RequestRecord


def percentiles(values: list[float], qs=(50, 90, 99), scale: float = 1e3) -> dict:
    """mean, std and the percentiles (numpy 'linear', as vLLM), in ms by default; zeros when empty."""
    arr = np.asarray(values, dtype=float) * scale
    out = {"mean": float(arr.mean()) if arr.size else 0.0, "std": float(arr.std()) if arr.size else 0.0}
    for q in qs:
        out[f"p{q:g}"] = float(np.percentile(arr, q)) if arr.size else 0.0
    return out


def tpot(e2el: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None for outputs of fewer than 2 tokens."""
    return (e2el - ttft) / (output_tokens - 1) if output_tokens > 1 else None


def tpots_of(records: list[RequestRecord]) -> list[float]:
    """The TPOTs (s) of the records whose output had 2+ tokens."""
    return [t for r in records if (t := tpot(r.e2el, r.ttft, r.output_tokens)) is not None]


def is_good(record: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Meets every SLO given (ttft / tpot / e2el in ms); a 1-token output's TPOT counts as 0 (vLLM)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": tpot(record.e2el, record.ttft, record.output_tokens) or 0.0,
              "e2el": record.e2el}
    return all(values[k] * 1e3 <= limit for k, limit in slo_ms.items())


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            key = str(r.status) if r.status and r.status != 200 else (r.error.split(":")[0] or "unknown")
            counts[key] = counts.get(key, 0) + 1
    return counts


def compute_metrics(records: list[RequestRecord], duration_s: float, slo_ms: dict[str, float] | None = None,
                    gpu_hour_usd: float | None = None, qs=(50, 90, 99)) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = tpots_of(ok)
    duration_s = max(duration_s, 1e-9)
    m = {
        "completed": len(ok), "failed": len(records) - len(ok), "errors": error_counts(records),
        "duration_s": duration_s, "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s, "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "ttft_ms": percentiles([r.ttft for r in ok], qs), "tpot_ms": percentiles(tpots, qs),
        "itl_ms": percentiles([g for r in ok for g in r.itl], qs), "e2el_ms": percentiles([r.e2el for r in ok], qs),
        "mean_output_tokens": total_out / len(ok) if ok else 0.0,
        "early_stops": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        "requests_per_model": {m: sum(1 for r in records if r.model == m) for m in sorted({r.model for r in records})},
    }
    if slo_ms:
        good = sum(1 for r in records if is_good(r, slo_ms))
        m.update(slo_ms=dict(slo_ms), good_requests=good, request_goodput=good / duration_s,
                 goodput_fraction=good / len(records) if records else 0.0)
    if gpu_hour_usd:
        per_s = gpu_hour_usd / 3600
        m.update(gpu_hour_usd=gpu_hour_usd,
                 usd_per_1m_output_tokens=per_s / m["output_throughput"] * 1e6 if total_out else None,
                 usd_per_1m_total_tokens=per_s / m["total_token_throughput"] * 1e6 if total_in + total_out else None)
    return m
