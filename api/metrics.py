"""Prometheus metrics of the whole system, read from Redis on each scrape.

`HotswapCollector` turns the counters and histograms every process accumulates in Redis
(`hotswap/metrics.py` documents the layout) into metric families, and adds gauges computed from
the scheduler's live state:

    hotswap:num_requests_waiting{model, priority}  queued requests per queue (ZCARD of every queue
                                                   named in hotswap:qidx:{base}); priority is the
                                                   queue class: realtime, batch or suspect
    hotswap:num_requests_running{model}            requests assigned to or running on live workers
    hotswap:workers_up{base_model}                 workers whose lease holds
    hotswap:worker_inflight{worker}                requests on each live worker
    hotswap:worker_max_inflight{worker}            the room each live worker announced
    hotswap:scheduler_up                           1 while a dispatcher's heartbeat is fresh
    hotswap:dead_letter_requests                   dead-lettered requests (ZCARD hotswap:dead)

The `model` label is the queue's model key ("base", "lora:acme/bot@1", "full:acme/big@2"): it
contains the tenant name, so treat `/metrics` as operator-only, and expect one series per model
called.

Each app gets its own `CollectorRegistry` (`make_registry`): no global state, so tests and several
apps in one process do not share metrics. The collector is synchronous (redis-py): call it from a
thread, never from the event loop.
"""

from __future__ import annotations

import json
from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from hotswap.metrics import METRICS, MetricDef
from hotswap import keys
from scheduler.workers import live_workers

NS = "hotswap:"



class HotswapCollector(Collector):
    def __init__(self, redis_client, base_models: list[str] | tuple[str, ...] = ()):
        self.redis = redis_client
        self.base_models = tuple(base_models)  # always reported (workers_up 0 when none is up)

    def collect(self):
        with self.redis.pipeline(transaction=False) as pipe:
            for metric in METRICS.values():
                pipe.hgetall(metric.key)
            pipe.zcard(keys.DEAD)
            pipe.exists(keys.SCHEDULER_ALIVE)
            raw = pipe.execute()
        stored = dict(zip(METRICS, raw))
        dead, scheduler_alive = raw[len(METRICS):]
        for name, metric in METRICS.items():
            fields = {keys.text(k): keys.text(v) for k, v in stored[name].items()}
            yield _counter(metric, fields) if metric.kind == "counter" else _histogram(metric, fields)
        yield GaugeMetricFamily(NS + "dead_letter_requests", "Requests dead-lettered after repeated crashes.",
                                value=int(dead))
        yield GaugeMetricFamily(NS + "scheduler_up", "1 while a dispatcher's heartbeat is fresh.",
                                value=int(bool(scheduler_alive)))
        yield from self._live_gauges()

    def _live_gauges(self):
        workers = live_workers(self.redis)
        bases = sorted(set(self.base_models) | {w.base_model for w in workers})

        waiting = GaugeMetricFamily(NS + "num_requests_waiting", "Requests waiting in a queue, per model and "
                                    "queue class (realtime, batch, suspect).", labels=["model", "priority"])
        with self.redis.pipeline(transaction=False) as pipe:
            for base in bases:
                pipe.smembers(keys.queue_index(base))
            names = sorted({keys.text(n) for members in pipe.execute() for n in members})
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.zcard(name)
            lengths = pipe.execute()
        per_queue: dict[tuple[str, str], int] = defaultdict(int)
        for name, length in zip(names, lengths):
            _base, qclass, model_key = keys.parse_queue(name)
            per_queue[(model_key, qclass)] += int(length)
        for (model_key, qclass), length in sorted(per_queue.items()):
            waiting.add_metric([model_key, qclass], length)
        yield waiting

        running = GaugeMetricFamily(NS + "num_requests_running", "Requests assigned to or running on live "
                                    "workers, per model.", labels=["model"])
        per_model: dict[str, int] = defaultdict(int)
        for w in workers:
            for model_key, n in w.inflight_models.items():
                per_model[model_key] += n
        for model_key, n in sorted(per_model.items()):
            running.add_metric([model_key], n)
        yield running

        up = GaugeMetricFamily(NS + "workers_up", "Workers whose lease holds.", labels=["base_model"])
        for base in bases:
            up.add_metric([base], sum(1 for w in workers if w.base_model == base))
        yield up
        inflight = GaugeMetricFamily(NS + "worker_inflight", "Requests assigned to or running on a worker.",
                                     labels=["worker"])
        room = GaugeMetricFamily(NS + "worker_max_inflight", "Requests a worker takes at once.", labels=["worker"])
        for w in sorted(workers, key=lambda w: w.id):
            inflight.add_metric([w.id], w.inflight)
            room.add_metric([w.id], w.max_inflight)
        yield inflight
        yield room


def _series(fields: dict[str, str]) -> dict[str, dict[str, str]]:
    """Histogram fields grouped by label set: {labels JSON: {"le=0.5": n, "sum": x, "count": n}}."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for field, value in fields.items():
        labels, _, part = field.rpartition("|")
        out[labels][part] = value
    return out


def _label_values(metric: MetricDef, labels_json: str) -> list[str] | None:
    try:
        labels = json.loads(labels_json)
        return [str(labels[name]) for name in metric.labels]
    except (ValueError, KeyError, TypeError):  # written under another label set: skip, do not fail
        return None


def _counter(metric: MetricDef, fields: dict[str, str]) -> CounterMetricFamily:
    family = CounterMetricFamily(NS + metric.name, metric.help, labels=list(metric.labels))
    for labels_json, value in sorted(fields.items()):
        values = _label_values(metric, labels_json)
        if values is not None:
            family.add_metric(values, float(value))
    return family


def _histogram(metric: MetricDef, fields: dict[str, str]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(NS + metric.name, metric.help, labels=list(metric.labels))
    for labels_json, parts in sorted(_series(fields).items()):
        values = _label_values(metric, labels_json)
        if values is None:
            continue
        per_bucket = {float(p[3:]): int(v) for p, v in parts.items() if p.startswith("le=")}
        bounds = sorted(set(per_bucket) | set(metric.buckets) | {float("inf")})
        buckets, total = [], 0
        for bound in bounds:
            total += per_bucket.get(bound, 0)
            buckets.append((floatToGoString(bound), total))
        family.add_metric(values, buckets, float(parts.get("sum", 0)))
    return family


def make_registry(redis_client, base_models: list[str] | tuple[str, ...] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HotswapCollector(redis_client, base_models))
    return registry
