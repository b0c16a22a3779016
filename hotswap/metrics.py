"""Metrics shared by every hotswap process, aggregated in Redis so any API replica's `/metrics`
shows the whole system (vLLM-style names with a `hotswap:` prefix; `api/metrics.py` exports them).

A process keeps a `MetricsBuffer` (thread-safe, in memory) and calls `flush(redis)` now and then
(the worker from its heartbeat loop, the dispatcher every tick): one pipeline of HINCRBY /
HINCRBYFLOAT, nothing when nothing happened. Torch-free and no I/O at import.

Redis layout (one HASH per metric; `{labels}` is the JSON object of the label values with sorted
keys, e.g. `{"model":"base","priority":"realtime"}`, `{}` without labels):

    hotswap:metrics:{name}    counter     field `{labels}`            -> running total
                              histogram   field `{labels}|le={bound}`  -> observations in that bucket
                                                                          only (NOT cumulative; the bound
                                                                          is the bucket's upper edge,
                                                                          `+Inf` for the overflow bucket)
                                          field `{labels}|sum`         -> sum of observed values
                                          field `{labels}|count`       -> number of observations

Per-bucket counts (rather than cumulative ones) make one observation one HINCRBY, and keep the
hash readable whatever the bucket set was when it was written: the reader sorts the bounds it
finds and accumulates. Counters and bucket counts are integers (HINCRBY), sums floats
(HINCRBYFLOAT). Counters only ever grow; delete the hashes to reset (`DEL hotswap:metrics:*`).

The `model` label is the queue's model key ("base", "lora:acme/bot@1", "full:acme/big@2"): it
contains the tenant name, so whoever can scrape `/metrics` sees which tenants have which models,
and its cardinality grows with the number of adapters called.
"""

from __future__ import annotations

import json
import threading
from bisect import bisect_left
from dataclasses import dataclass

from hotswap import keys

PREFIX = keys.METRICS

# Bucket bounds (seconds, or requests for batch_size), as in vLLM's metrics.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_REQ = ("model", "priority")


@dataclass(frozen=True)
class MetricDef:
    name: str  # without the "hotswap:" prefix; counters end in _total
    kind: str  # "counter" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        return PREFIX + self.name


METRICS: dict[str, MetricDef] = {m.name: m for m in (
    MetricDef("time_to_first_token_seconds", "histogram",
              "Time from a request's arrival in the API to its first generated token.", _REQ, TTFT_BUCKETS),
    MetricDef("e2e_request_latency_seconds", "histogram",
              "Time from a request's arrival in the API to its completed result.", _REQ, LATENCY_BUCKETS),
    MetricDef("request_queue_time_seconds", "histogram",
              "Time a request waited (queue, dispatch, adapter fetch) before its engine took it.", _REQ,
              LATENCY_BUCKETS),
    MetricDef("inter_token_latency_seconds", "histogram",
              "Time between two consecutive engine outputs of one request.", _REQ, ITL_BUCKETS),
    MetricDef("batch_size", "histogram",
              "Requests of one model sent to a worker in one dispatch.", _REQ, BATCH_SIZE_BUCKETS),
    MetricDef("prompt_tokens_total", "counter", "Prompt tokens of the requests the workers ran.", _REQ),
    MetricDef("generation_tokens_total", "counter", "Tokens the workers generated.", _REQ),
    MetricDef("prefix_cache_queries_total", "counter",
              "Prompt tokens the engines looked up in their prefix caches, per base model.", ("base",)),
    MetricDef("prefix_cache_hits_total", "counter",
              "Of the prompt tokens looked up, those whose KV the prefix cache held (not computed).", ("base",)),
    MetricDef("request_success_total", "counter",
              "Requests finished by a worker (stop, length, or abort when cancelled).", _REQ + ("finished_reason",)),
    MetricDef("request_errors_total", "counter",
              "Requests that failed, by error code (model_unavailable, invalid_request, ...).", _REQ + ("type",)),
    MetricDef("adapter_loads_total", "counter", "LoRA adapters loaded into a worker's engine.", ("model",)),
    MetricDef("full_swaps_total", "counter", "Full fine-tune weight swaps on a worker (to `model`).", ("model",)),
)}


def labels_field(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def bucket_bound(metric: MetricDef, value: float) -> str:
    """The upper edge of the bucket `value` falls in (bounds are inclusive, as `le` says)."""
    i = bisect_left(metric.buckets, value)
    return repr(float(metric.buckets[i])) if i < len(metric.buckets) else "+Inf"


class MetricsBuffer:
    """Counter increments and histogram observations of one process, until the next `flush`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], float] = {}  # (redis key, field) -> increment (int but for |sum)

    def _metric(self, name: str, kind: str, labels: dict) -> tuple[MetricDef, str]:
        metric = METRICS.get(name)
        if metric is None or metric.kind != kind:
            raise ValueError(f"{name!r} is not a hotswap {kind} (see hotswap.metrics.METRICS)")
        if set(labels) != set(metric.labels):
            raise ValueError(f"{name} takes labels {sorted(metric.labels)}, got {sorted(labels)}")
        return metric, labels_field({k: str(v) for k, v in labels.items()})

    def _add(self, key: str, field: str, amount: float) -> None:
        self._pending[(key, field)] = self._pending.get((key, field), 0) + amount

    def inc(self, name: str, amount: int = 1, **labels) -> None:
        metric, field = self._metric(name, "counter", labels)
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ValueError(f"{name} is a counter of whole things: it cannot grow by {amount!r}")
        with self._lock:
            self._add(metric.key, field, amount)

    def observe(self, name: str, value: float, **labels) -> None:
        metric, field = self._metric(name, "histogram", labels)
        bound = bucket_bound(metric, value)
        with self._lock:
            self._add(metric.key, f"{field}|le={bound}", 1)
            self._add(metric.key, f"{field}|sum", value)
            self._add(metric.key, f"{field}|count", 1)

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self, redis_client) -> int:
        """Write everything accumulated since the last flush in one pipeline; returns how many
        fields it changed. On a Redis error the increments are kept for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            with redis_client.pipeline(transaction=False) as pipe:
                for (key, field), amount in pending.items():
                    if field.endswith("|sum"):  # the only float fields: never HINCRBY them
                        pipe.hincrbyfloat(key, field, amount)
                    else:
                        pipe.hincrby(key, field, amount)
                pipe.execute()
        except Exception:
            with self._lock:  # put them back under whatever arrived meanwhile
                for item, amount in pending.items():
                    self._pending[item] = self._pending.get(item, 0) + amount
            raise
        return len(pending)


def record_finished(buf: MetricsBuffer, result, model: str, priority: str, itl_s: list[float] | None = None,
                    base: str | None = None) -> None:
    """Observe one finished request (a `hotswap.protocol.GenerationResult`).

    Latencies count from `queued_at` (when the API accepted the request): queue time to
    `started_at`, TTFT to `first_token_at`, end-to-end to `finished_at` (completed requests only, so
    a fast failure does not look like a fast answer). Prompt tokens count only when an engine took
    the request (`started_at` set); generated tokens always. Each value of `itl_s` (seconds between two
    consecutive engine outputs of the request) is one inter-token observation. A cancelled request
    counts as a success with finished_reason "abort" (as in vLLM); a failed one as an error of its
    code. With `base` (the worker's base model), the prompt also counts as a prefix-cache query
    and its `cached_tokens` as hits.
    """
    labels = {"model": model, "priority": priority}
    if result.started_at is not None:
        buf.observe("request_queue_time_seconds", max(0.0, result.started_at - result.queued_at), **labels)
    if result.first_token_at is not None:
        buf.observe("time_to_first_token_seconds", max(0.0, result.first_token_at - result.queued_at), **labels)
    if result.status == "completed":
        buf.observe("e2e_request_latency_seconds", max(0.0, result.finished_at - result.queued_at), **labels)
    for gap in itl_s or ():
        buf.observe("inter_token_latency_seconds", max(0.0, gap), **labels)
    if result.prompt_tokens and result.started_at is not None:  # only prompts an engine took
        buf.inc("prompt_tokens_total", result.prompt_tokens, **labels)
        if base is not None:
            buf.inc("prefix_cache_queries_total", result.prompt_tokens, base=base)
            buf.inc("prefix_cache_hits_total", result.cached_tokens, base=base)
    if result.completion_tokens:
        buf.inc("generation_tokens_total", result.completion_tokens, **labels)
    if result.status == "failed":
        code = (result.error or {}).get("code") or "unknown"
        buf.inc("request_errors_total", type=code, **labels)
    else:
        reason = result.finish_reason or ("abort" if result.status == "cancelled" else "unknown")
        buf.inc("request_success_total", finished_reason=reason, **labels)
