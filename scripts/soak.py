"""Soak test: steady load at ~80% of measured capacity, a worker SIGKILLed and restarted midway.

    python scripts/soak.py --quick --json soak-quick.json      # ~90 s of load (+ startup and capacity)
    python scripts/soak.py --json soak.json                    # the record: 600 s of load
    python scripts/soak.py --url http://host:8000 --api-key KEY --model smollm2-135m-instruct \\
        --redis-url redis://host:6379/0 --restart-cmd "systemctl restart hotswap-worker@0"

Phases: (1) a local stack (scripts/_stack.py: redis-server, scheduler, --workers workers, API) with
--adapters random LoRAs; one warm-up request per model. (2) Capacity, unless --rate is given: a
closed loop of --capacity-concurrency streams for --capacity-s seconds; capacity = requests finished
per second over the last two thirds of that window. (3) Load: Poisson arrivals at --load x capacity
for --duration seconds over the model mix (base + adapters, greedy, fixed prompt/output lengths),
every request streamed. At each --kill-at share of the duration (0.5; 0.33,0.66 for two kills) a
worker gets SIGKILL, worker 0 first, then 1, ... (its in-flight requests are noted from Redis);
--restart-after seconds later a replacement starts, as a supervisor would.
(4) Drain: every request sent gets its answer (or --timeout).

Checks (exit code 1 when one fails):
- nothing lost: every request sent ended with a complete 200 stream, or with a documented refusal
  (429 queue full; 503 only inside the kill window: kill -> replacement live + lease);
- nothing duplicated: every answered request's id has exactly one result entry in its Redis output
  stream (hotswap/keys.py), its streamed text equals the recorded result's text (a rerun after the
  kill is not repeated to the client), response ids are unique, and Redis holds no request that no
  client saw;
- no 5xx other than that 503;
- memory flat: RSS of every process (API, scheduler, each worker, redis-server) from /proc every
  --sample-s; growth over the load phase per process (a replaced worker and its replacement are
  separate series); flat = growth <= max(--rss-tolerance-mb, --rss-tolerance-pct of the start).
  redis-server is reported but not judged: it keeps every result for HOTSWAP_RESULT_TTL_S (a day by
  default), so it grows with the requests served by design; its bytes per retained request are shown.
Latency percentiles (TTFT, TPOT, E2EL) per minute of the load phase, by send time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchkit.client import RequestRecord, auth_headers, endpoint_url, http_client, request_body, send_one
from benchkit.stats import percentiles, tpots_of
from benchkit.workload import PromptMaker, arrival_offsets, assign_models

DOCUMENTED_REFUSALS = {429, 503}  # queue full; no live worker (Retry-After)


# -- accounting (pure functions) ------------------------------------------------------------------


def request_id(response_id: str) -> str:
    """The hotswap request id behind an OpenAI response id: "cmpl-abc" / "chatcmpl-abc" -> "req_abc"."""
    return "req_" + response_id.split("-", 1)[1] if "-" in response_id else response_id


def in_windows(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def classify(records: list[RequestRecord], t_end: list[float], windows: list[tuple[float, float]]) -> dict:
    """Outcome of every request sent. t_end[i]: when request i's answer came (s, load-phase clock).

    ok: a complete 200 stream. refused: 429, or 503 inside a kill window. Everything else is a
    problem: `lost` (no complete answer: transport error, broken stream, timeout) or `bad_status`
    (a 5xx outside the rules, or a 4xx that a valid request should never get)."""
    out = {"sent": len(records), "ok": 0, "refused": {}, "lost": [], "bad_status": [], "status_counts": {}}
    for i, r in enumerate(records):
        key = str(r.status) if r.status else "none"
        out["status_counts"][key] = out["status_counts"].get(key, 0) + 1
        if r.success:
            out["ok"] += 1
        elif r.status == 429 or (r.status == 503 and in_windows(t_end[i], windows)):
            out["refused"][str(r.status)] = out["refused"].get(str(r.status), 0) + 1
        elif r.status in (0, 200):
            out["lost"].append({"index": i, "status": r.status, "error": r.error})
        else:
            out["bad_status"].append({"index": i, "status": r.status, "error": r.error, "t": round(t_end[i], 2)})
    return out


@dataclass
class StoredResult:
    """What Redis holds for one request id."""
    state: str | None
    result_entries: int         # entries carrying `result` in its output stream
    text: str | None            # the recorded result's text
    completion_tokens: int | None
    attempts: int = 0           # runs cut short by a worker crash
    requeued: bool = False      # given back to the queue at least once (crash, drain, unclaimed)


def audit(records: list[RequestRecord], stored: dict[str, StoredResult], stored_ids: set[str],
          known_ids: set[str]) -> dict:
    """Exactly-once checks of the answered requests against Redis. `stored` maps each answered id
    to what Redis holds; `stored_ids` is every request id in Redis; `known_ids` every id a client
    of this run saw (warm-up and capacity included)."""
    problems: list[dict] = []
    ids = [request_id(r.response_id) for r in records if r.success]
    dup_ids = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    for i in dup_ids:
        problems.append({"id": i, "problem": "two answers carry the same id"})
    rerun = 0
    for r in records:
        if not r.success:
            continue
        rid = request_id(r.response_id)
        s = stored.get(rid)
        if s is None or s.state is None:
            problems.append({"id": rid, "problem": "answered but not in Redis"})
            continue
        if s.result_entries != 1:
            problems.append({"id": rid, "problem": f"{s.result_entries} result entries in its output stream"})
        if s.state != "done":
            problems.append({"id": rid, "problem": f"state {s.state!r}, answered 200"})
        if s.text is not None and s.text != r.text:
            problems.append({"id": rid, "problem": "streamed text differs from the recorded result"})
        if s.completion_tokens is not None and r.usage_reported and s.completion_tokens != r.output_tokens:
            problems.append({"id": rid, "problem": f"usage {r.output_tokens} tokens, result {s.completion_tokens}"})
        rerun += s.attempts > 0 or s.requeued
    unknown = sorted(stored_ids - known_ids)
    for rid in unknown[:20]:
        problems.append({"id": rid, "problem": "in Redis but no client saw it (an answer was lost)"})
    return {"checked": len(ids), "duplicate_ids": dup_ids, "unknown_in_redis": len(unknown), "rerun_after_crash": rerun,
            "problems": problems}


def per_minute(records: list[RequestRecord], qs=(50, 90, 99)) -> list[dict]:
    """Latency percentiles (ms) of the requests sent in each minute of the load phase."""
    if not records:
        return []
    rows = []
    last = int(max(r.send_s for r in records) // 60)
    for minute in range(last + 1):
        rs = [r for r in records if int(r.send_s // 60) == minute]
        ok = [r for r in rs if r.success]
        rows.append({"minute": minute, "sent": len(rs), "ok": len(ok), "errors": len(rs) - len(ok),
                     "ttft_ms": percentiles([r.ttft for r in ok], qs), "tpot_ms": percentiles(tpots_of(ok), qs),
                     "e2el_ms": percentiles([r.e2el for r in ok], qs)})
    return rows


def memory_growth(samples: list[tuple[float, int]], tolerance_mb: float, tolerance_pct: float) -> dict:
    """RSS series [(t s, bytes)] -> start/end/max, growth, slope (least squares, MB/min) and flat."""
    if not samples:
        return {}
    t = np.array([s[0] for s in samples], dtype=float)
    mb = np.array([s[1] for s in samples], dtype=float) / 2**20
    slope = float(np.polyfit(t, mb, 1)[0] * 60) if len(samples) >= 3 and np.ptp(t) > 0 else 0.0
    growth = float(mb[-1] - mb[0])
    limit = max(tolerance_mb, tolerance_pct / 100 * mb[0])
    return {"samples": len(samples), "start_mb": float(mb[0]), "end_mb": float(mb[-1]), "max_mb": float(mb.max()),
            "growth_mb": growth, "growth_pct": 100 * growth / mb[0] if mb[0] else 0.0, "slope_mb_per_min": slope,
            "limit_mb": limit, "flat": growth <= limit}


def capacity_from(finish_times: list[float], window_s: float) -> float:
    """Requests per second finished over the last two thirds of a closed-loop window (the first
    third is ramp-up)."""
    start = window_s / 3
    done = [t for t in finish_times if start <= t <= window_s]
    return len(done) / (window_s - start)


# -- the stack under test -------------------------------------------------------------------------


class LocalHarness:
    """A LocalStack: kills and restarts its own workers."""

    def __init__(self, args):
        from _stack import LocalStack

        self.stack = LocalStack(workers=args.workers, env=dict(args.stack_env))
        self.lease_s = float(dict(args.stack_env).get("HOTSWAP_LEASE_S", 5.0))

    def __enter__(self):
        self.stack.__enter__()
        self.url, self.key, self.base_model, self.redis = (self.stack.url, self.stack.key, self.stack.base_model,
                                                          self.stack.redis)
        return self

    def __exit__(self, *exc):
        self.stack.__exit__(*exc)

    def add_adapters(self, n: int, seed: int) -> list[str]:
        return [self.stack.add_lora(f"lora-{i}", rank=(8, 16)[i % 2], seed=seed + i) for i in range(n)]

    def pids(self) -> dict[str, int]:
        return self.stack.pids()

    def kill_worker(self, i: int) -> tuple[int, str | None]:
        pid = self.stack.worker_pid(i)
        wid = next((w.id for w in self.stack.live_workers() if w.pid == pid), None)
        self.stack.kill_worker(i, signal.SIGKILL)
        return pid, wid

    def restart_worker(self, i: int) -> int | None:
        return self.stack.start_worker(i)

    def server_tracebacks(self) -> dict[str, str]:
        from _stack import last_tracebacks

        return last_tracebacks(self.stack.procs.log_dir)

    def wait_workers(self, n: int, timeout: float, exclude: set[str] = frozenset()) -> None:
        self.stack.wait_workers(n, timeout, exclude)


class RemoteHarness:
    """A running stack: workers found in Redis, killed by pid when on this host; the replacement
    comes from --restart-cmd or the deployment's own supervisor."""

    def __init__(self, args):
        import redis

        self.url, self.key, self.base_model = args.url, args.api_key, args.model
        self.redis = redis.Redis.from_url(args.redis_url, socket_timeout=30)
        self.restart_cmd, self.extra_pids = args.restart_cmd, dict(args.pid)
        self.lease_s = args.lease_s

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.redis.close()

    def add_adapters(self, n: int, seed: int) -> list[str]:
        return []

    def server_tracebacks(self) -> dict[str, str]:
        return {}  # its logs are the deployment's

    def _local_workers(self) -> list:
        from scheduler.workers import live_workers

        host = socket.gethostname()
        return sorted((w for w in live_workers(self.redis) if w.hostname == host and w.pid), key=lambda w: w.started_at)

    def pids(self) -> dict[str, int]:
        out = {f"worker {w.id}": w.pid for w in self._local_workers()}
        out.update({k: int(v) for k, v in self.extra_pids.items()})
        return out

    def kill_worker(self, i: int) -> tuple[int, str | None]:  # the oldest local worker, whatever i
        workers = self._local_workers()
        if not workers:
            raise RuntimeError("no live worker on this host to kill (workers register their hostname and pid)")
        os.kill(workers[0].pid, signal.SIGKILL)
        return workers[0].pid, workers[0].id

    def restart_worker(self, i: int) -> int | None:
        if self.restart_cmd:
            subprocess.Popen(self.restart_cmd, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return None

    def wait_workers(self, n: int, timeout: float, exclude: set[str] = frozenset()) -> None:
        from scheduler.workers import live_workers

        deadline = time.monotonic() + timeout
        while len([w for w in live_workers(self.redis) if w.id not in exclude]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers not live after {timeout:.0f} s")
            time.sleep(0.5)


# -- phases ---------------------------------------------------------------------------------------


class Client:
    """Builds and streams this run's requests; remembers every response id it saw."""

    def __init__(self, harness, models: list[str], args, tokenizer):
        self.h, self.models, self.args, self.tok = harness, models, args, tokenizer
        self.maker = PromptMaker(tokenizer)
        self.url, self.headers = endpoint_url(harness.url, chat=False), auth_headers(harness.key)
        self.known_ids: set[str] = set()
        self._prompts: dict[int, str] = {}

    def prompt(self, i: int) -> str:
        slot = i % 64  # 64 distinct prompts are plenty; building them costs tokenizer time
        if slot not in self._prompts:
            self._prompts[slot] = self.maker.make(self.args.input_len, slot, self.args.seed)
        return self._prompts[slot]

    async def send(self, http, i: int, model: str) -> RequestRecord:
        prompt = self.prompt(i)
        record = RequestRecord(model, self.args.input_len, self.args.output_len)
        body = request_body(model, prompt, self.args.output_len, False, 0.0, {})
        await send_one(http, self.url, self.headers, body, record, False, self.tok)
        if record.response_id:
            self.known_ids.add(request_id(record.response_id))
        return record


async def warm_up(client: Client) -> None:
    async with http_client(client.args.timeout) as http:
        for j, model in enumerate(client.models):
            r = await client.send(http, j, model)
            if not r.success:
                raise RuntimeError(f"warm-up request for {model} failed: {r.status} {r.error}")


async def measure_capacity(client: Client, concurrency: int, window_s: float, console) -> dict:
    """Closed loop: `concurrency` streams, each sending its next request when the last is answered."""
    finish: list[float] = []
    tokens: list[tuple[float, int]] = []
    errors = 0
    rng = random.Random(client.args.seed + 99)
    start = time.perf_counter()

    async def stream(k: int, http) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() - start < window_s:
            r = await client.send(http, 1000 + k * 1000 + n, rng.choice(client.models))
            n += 1
            t = time.perf_counter() - start
            if r.success:
                finish.append(t)
                tokens.append((t, r.output_tokens))
            else:
                errors += 1

    with console.status(f"measuring capacity: {concurrency} streams for {window_s:.0f} s ..."):
        async with http_client(client.args.timeout) as http:
            await asyncio.gather(*(stream(k, http) for k in range(concurrency)))
    rps = capacity_from(finish, window_s)
    lo = window_s / 3
    tok_s = sum(n for t, n in tokens if lo <= t <= window_s) / (window_s - lo)
    return {"concurrency": concurrency, "window_s": window_s, "requests": len(finish), "errors": errors,
            "requests_per_s": rps, "output_tokens_per_s": tok_s}


class MemorySampler:
    """RSS of every process of the stack every `every_s` seconds (and Redis' own used_memory)."""

    def __init__(self, harness, every_s: float):
        self.h, self.every_s = harness, every_s
        self.series: dict[str, list[tuple[float, int]]] = {}
        self.pid_of: dict[str, int] = {}
        self.redis_used: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        from _stack import rss_bytes

        t = time.perf_counter() - self.t0
        for name, pid in self.h.pids().items():
            rss = rss_bytes(pid)
            if rss is not None:
                key = f"{name} (pid {pid})"
                self.series.setdefault(key, []).append((t, rss))
                self.pid_of[key] = pid
        try:
            self.redis_used.append((t, int(self.h.redis.info("memory")["used_memory"])))
        except Exception:  # noqa: BLE001 - a sample lost is not a reason to stop the soak
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> "MemorySampler":
        self.t0 = time.perf_counter()
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


async def load_phase(client: Client, rate: float, args, console) -> dict:
    """Poisson arrivals at `rate` for args.duration s; the kill and restart happen meanwhile."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n = max(1, int(rate * args.duration * 1.5) + 10)
    offsets = [t for t in arrival_offsets(n, rate, 1.0, args.seed + 1) if t < args.duration]
    models = assign_models(len(offsets), [(m, 1.0) for m in client.models], args.seed + 1)
    records: list[RequestRecord] = [RequestRecord(m, args.input_len, args.output_len) for m in models]
    t_end = [0.0] * len(records)
    kills: list[dict] = []
    counts = {"errors": 0}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("errors {task.fields[errors]}  {task.fields[phase]}"), TimeElapsedColumn()]
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    async def chaos() -> None:
        for n, share in enumerate(args.kill_at):  # worker 0, then 1, ...: each kill a different process
            await asyncio.sleep(max(0.0, share * args.duration - clock()))
            events: dict = {}
            kills.append(events)
            inflight_before = []
            pid, wid = await asyncio.to_thread(client.h.kill_worker, n % args.workers)
            events["kill_t"] = clock()
            if wid is not None:
                from hotswap import keys

                inflight_before = [x.decode() for x in client.h.redis.smembers(keys.worker_inflight(wid))]
            events.update(killed_pid=pid, killed_worker=wid, inflight_on_killed=inflight_before)
            progress.update(task, phase=f"killed worker pid {pid} at {events['kill_t']:.0f} s")
            await asyncio.sleep(args.restart_after)
            events["restart_t"] = clock()
            events["replacement_pid"] = await asyncio.to_thread(client.h.restart_worker, n % args.workers)
            progress.update(task, phase="replacement starting")
            # the killed worker still counts as live until its lease lapses: count the others
            await asyncio.to_thread(client.h.wait_workers, args.workers, args.timeout, {wid} - {None})
            events["replacement_live_t"] = clock()
            progress.update(task, phase=f"replacement live at {events['replacement_live_t']:.0f} s")

    async with http_client(args.timeout) as http:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"load {rate:.2f} req/s for {args.duration:.0f} s", total=len(records),
                                     errors=0, phase="")

            async def one(i: int) -> None:
                delay = offsets[i] - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                send_s = clock()
                rec = await client.send(http, i, records[i].model)
                rec.send_s, records[i], t_end[i] = send_s, rec, clock()
                counts["errors"] += not rec.success
                progress.update(task, advance=1, errors=counts["errors"])

            chaos_task = asyncio.create_task(chaos()) if args.kill else None
            await asyncio.gather(*(one(i) for i in range(len(records))))
            if chaos_task is not None:
                await chaos_task
    return {"records": records, "t_end": t_end, "kills": kills, "offsets": offsets, "wall_s": clock()}


def read_stored(redis_client, ids: list[str]) -> dict[str, StoredResult]:
    """What Redis holds for each id (state, result entries in the output stream, the result)."""
    from hotswap import keys

    out = {}
    for chunk in range(0, len(ids), 200):
        part = ids[chunk:chunk + 200]
        with redis_client.pipeline(transaction=False) as pipe:
            for rid in part:
                pipe.hmget(keys.request(rid), "state", "attempts", "requeued_at")
                pipe.xrange(keys.output(rid))
            replies = pipe.execute()
        for rid, (fields, entries) in zip(part, zip(replies[::2], replies[1::2])):
            state, attempts, requeued_at = (v.decode() if v is not None else None for v in fields)
            results = [json.loads(f[b"result"]) for _, f in entries if b"result" in f]
            last = results[-1] if results else {}
            out[rid] = StoredResult(state, len(results), last.get("text"), last.get("completion_tokens"),
                                    int(attempts or 0), requeued_at is not None)
    return out


def stored_request_ids(redis_client) -> set[str]:
    from hotswap import keys

    prefix = keys.request("")
    return {k.decode()[len(prefix):] for k in redis_client.scan_iter(match=prefix + "*", count=1000)}


# -- report ---------------------------------------------------------------------------------------


def build_report(args, capacity, rate, load, memory: MemorySampler, stored, stored_ids, known_ids, lease_s) -> dict:
    records, t_end, kills = load["records"], load["t_end"], load["kills"]
    windows = [(ev["kill_t"], ev.get("replacement_live_t", load["wall_s"]) + lease_s + 5) for ev in kills]
    outcome = classify(records, t_end, windows)
    exactly_once = audit(records, stored, stored_ids, known_ids)
    answered = {request_id(r.response_id): r for r in records if r.response_id}
    for ev in kills:
        inflight = ev.pop("inflight_on_killed", [])
        ev["inflight_on_killed"] = len(inflight)
        ev["inflight_on_killed_answered_200"] = sum(1 for rid in inflight if rid in answered and answered[rid].success)
    live_at = {ev["replacement_pid"]: ev.get("replacement_live_t", math.inf) for ev in kills
               if ev.get("replacement_pid") is not None}
    mem = {}
    for name, samples in memory.series.items():  # clock: the load phase's start
        if memory.pid_of[name] in live_at:
            # a replacement loads the model first: judge it from --warm-s after it went live
            samples = [x for x in samples if x[0] >= live_at[memory.pid_of[name]] + args.warm_s]
        growth = memory_growth(samples, args.rss_tolerance_mb, args.rss_tolerance_pct)
        # redis keeps results by design (see the docstring); two samples are too few to judge
        mem[name] = {**growth, "judged": not name.startswith("redis") and len(samples) >= 3} if growth else {}
    used = memory.redis_used
    retained = len(stored_ids)
    redis_used = {"start_mb": used[0][1] / 2**20, "end_mb": used[-1][1] / 2**20,
                  "growth_mb": (used[-1][1] - used[0][1]) / 2**20,
                  "retained_requests": retained} if used else {}
    ok = [r for r in records if r.success]
    overall = {"ttft_ms": percentiles([r.ttft for r in ok]), "e2el_ms": percentiles([r.e2el for r in ok]),
               "tpot_ms": percentiles(tpots_of(ok)),
               "output_tokens_per_s": sum(r.output_tokens for r in ok) / load["wall_s"],
               "requests_per_s": len(ok) / load["wall_s"]}
    checks = {
        "no_lost": not outcome["lost"],
        "no_unexpected_status": not outcome["bad_status"],
        "exactly_once": not exactly_once["problems"],
        "memory_flat": all(v.get("flat", True) for v in mem.values() if v.get("judged")),
        "worker_replaced": not args.kill or (len(kills) == len(args.kill_at)
                                             and all("replacement_live_t" in ev for ev in kills)),
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("api_key", "stack_env", "pid")} | {"stack_env": dict(args.stack_env),
                                                                    "cpu_count": os.cpu_count()},
        "capacity": capacity, "rate": rate, "kills": kills,
        "kill_windows": windows, "outcome": outcome, "exactly_once": exactly_once, "overall": overall,
        "per_minute": per_minute(records), "memory": mem, "redis_used_memory": redis_used,
        "checks": checks, "passed": all(checks.values()),
    }


def render(report: dict, console) -> None:
    from rich.table import Table

    cap, o, x = report["capacity"], report["outcome"], report["exactly_once"]
    if cap:
        console.print(f"capacity: {cap['requests_per_s']:.2f} req/s ({cap['output_tokens_per_s']:.1f} output tok/s) "
                      f"with {cap['concurrency']} streams over {cap['window_s']:.0f} s")
    console.print(f"load: {report['rate']:.2f} req/s Poisson for {report['config']['duration']:.0f} s; "
                  f"sent {o['sent']}, ok {o['ok']}, refused {o['refused'] or 0}, lost {len(o['lost'])}, "
                  f"unexpected status {len(o['bad_status'])}; statuses {o['status_counts']}")
    for ev in report["kills"]:
        console.print(f"kill: worker pid {ev['killed_pid']} SIGKILL at {ev['kill_t']:.1f} s with "
                      f"{ev['inflight_on_killed']} requests in flight ({ev['inflight_on_killed_answered_200']} of them "
                      f"answered 200); replacement started at {ev.get('restart_t', float('nan')):.1f} s, live at "
                      f"{ev.get('replacement_live_t', float('nan')):.1f} s")
    console.print(f"exactly once: {x['checked']} answers checked in Redis, {x['rerun_after_crash']} reran after the "
                  f"crash, {len(x['duplicate_ids'])} duplicate ids, {x['unknown_in_redis']} unknown requests in "
                  f"Redis, {len(x['problems'])} problems")
    t = Table(title="latency per minute of load (by send time), ms")
    for col in ("minute", "sent", "ok", "err", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p99",
                "E2EL p50", "E2EL p90", "E2EL p99"):
        t.add_column(col, justify="right")
    for row in report["per_minute"]:
        t.add_row(str(row["minute"]), str(row["sent"]), str(row["ok"]), str(row["errors"]),
                  *(f"{row[m][q]:.0f}" for m, q in (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"),
                                                    ("tpot_ms", "p50"), ("tpot_ms", "p99"), ("e2el_ms", "p50"),
                                                    ("e2el_ms", "p90"), ("e2el_ms", "p99"))))
    console.print(t)
    t = Table(title="memory (RSS) over the load phase")
    for col in ("process", "samples", "start MB", "end MB", "max MB", "growth MB", "growth %", "MB/min", "flat"):
        t.add_column(col, justify="left" if col == "process" else "right")
    for name, m in report["memory"].items():
        if not m:
            t.add_row(name, "0", *["-"] * 6, "(too few samples)")
            continue
        verdict = ("yes" if m["flat"] else "[red]NO[/red]") if m["judged"] else \
            ("(retention)" if name.startswith("redis") else "(too few samples)")
        t.add_row(name, str(m["samples"]), f"{m['start_mb']:.1f}", f"{m['end_mb']:.1f}", f"{m['max_mb']:.1f}",
                  f"{m['growth_mb']:+.1f}", f"{m['growth_pct']:+.1f}", f"{m['slope_mb_per_min']:+.2f}", verdict)
    console.print(t)
    ru = report["redis_used_memory"]
    if ru:
        per = ru["growth_mb"] * 2**20 / max(1, ru["retained_requests"])
        console.print(f"redis used_memory {ru['start_mb']:.1f} -> {ru['end_mb']:.1f} MB with {ru['retained_requests']} "
                      f"requests retained (results kept HOTSWAP_RESULT_TTL_S): ~{per / 1024:.1f} KiB per request")
    if "machine_load_avg" in report:
        la = report["machine_load_avg"]
        console.print(f"machine load average (1/5/15 min) before the load phase {la['before_load']}, after "
                      f"{la['after_load']} on {la['cpus']} CPUs")
    for name, ok in report["checks"].items():
        console.print(f"{'[green]PASS[/green]' if ok else '[red]FAIL[/red]'} {name}")
    for p in (o["lost"] + o["bad_status"])[:10]:
        console.print(f"  {p}")
    for p in x["problems"][:10]:
        console.print(f"  {p}")


# -- CLI ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: --load x measured capacity)")
    p.add_argument("--load", type=float, default=0.8, help="share of measured capacity")
    p.add_argument("--capacity-s", type=float, default=60.0)
    p.add_argument("--capacity-concurrency", type=int, default=None, help="default: 8 per worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--adapters", type=int, default=2, help="random LoRAs in the mix with the base model")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kill-at", default="0.5", help="kill a worker at these shares of the duration, e.g. "
                   "0.33,0.66 (worker 0, then 1, ...)")
    p.add_argument("--restart-after", type=float, default=5.0, help="seconds between the kill and the replacement")
    p.add_argument("--no-kill", dest="kill", action="store_false")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--rss-tolerance-mb", type=float, default=32.0)
    p.add_argument("--warm-s", type=float, default=10.0, help="the replacement worker's memory is judged from "
                   "this long after it went live")
    p.add_argument("--rss-tolerance-pct", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stack-env", action="append", default=[], metavar="HOTSWAP_X=V")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="90 s of load after a 30 s capacity probe")
    r = p.add_argument_group("a running stack instead of a local one")
    r.add_argument("--url", default=None)
    r.add_argument("--api-key", default=os.environ.get("HOTSWAP_API_KEY"))
    r.add_argument("--model", default=None, help="model mix at --url, comma list (first: the base model's name)")
    r.add_argument("--redis-url", default=None, help="its Redis (workers, results)")
    r.add_argument("--restart-cmd", default=None, help="shell command that starts a replacement worker")
    r.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="more processes to sample")
    r.add_argument("--lease-s", type=float, default=5.0, help="its HOTSWAP_LEASE_S")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 90.0 if args.duration == 600.0 else args.duration
        args.capacity_s = 30.0 if args.capacity_s == 60.0 else args.capacity_s
    try:
        args.stack_env = [tuple(kv.split("=", 1)) for kv in args.stack_env]
        args.pid = [tuple(kv.split("=", 1)) for kv in args.pid]
        dict(args.stack_env), dict(args.pid)
    except ValueError:
        p.error("--stack-env and --pid take NAME=VALUE")
    if args.url and not (args.redis_url and args.model):
        p.error("--url needs --redis-url (to audit results and find workers) and --model")
    try:
        args.kill_at = sorted(float(x) for x in str(args.kill_at).split(","))
    except ValueError:
        p.error("--kill-at takes shares of the duration, e.g. 0.5 or 0.33,0.66")
    if not all(0 < k < 1 for k in args.kill_at) or not 0 < args.load <= 1.5 or args.duration <= 0:
        p.error("need 0 < each --kill-at < 1, 0 < --load <= 1.5, --duration > 0")
    args.capacity_concurrency = args.capacity_concurrency or 8 * args.workers
    return args


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    from hotswap.tokenizer import Tokenizer

    args = parse_args(argv)
    console = Console(stderr=True)
    out = Console(width=None if sys.stdout.isatty() else 200)
    harness = RemoteHarness(args) if args.url else LocalHarness(args)
    with harness:
        from _stack import default_model_dir

        tokenizer = Tokenizer(default_model_dir())
        if args.url:
            models = [m.strip() for m in args.model.split(",") if m.strip()]
        else:
            models = [harness.base_model, *harness.add_adapters(args.adapters, args.seed)]
        client = Client(harness, models, args, tokenizer)
        asyncio.run(warm_up(client))
        capacity = None
        rate = args.rate
        if rate is None:
            capacity = asyncio.run(measure_capacity(client, args.capacity_concurrency, args.capacity_s, console))
            if not capacity["requests_per_s"]:
                raise SystemExit("capacity probe finished no request in its window: raise --capacity-s")
            rate = args.load * capacity["requests_per_s"]
        memory = MemorySampler(harness, args.sample_s).start()
        load_avg = [os.getloadavg()]
        load = asyncio.run(load_phase(client, rate, args, console))
        load_avg.append(os.getloadavg())
        memory.stop()
        ids = sorted(client.known_ids)
        stored = read_stored(harness.redis, ids)
        stored_ids = stored_request_ids(harness.redis)
        report = build_report(args, capacity, rate, load, memory, stored, stored_ids, client.known_ids,
                              harness.lease_s)
        if not report["passed"]:  # the local stack's logs go with it: keep what explains the failure
            report["server_tracebacks"] = harness.server_tracebacks()
    report["machine_load_avg"] = {"before_load": list(load_avg[0]), "after_load": list(load_avg[1]),
                                  "cpus": os.cpu_count()}
    render(report, out)
    for log, text in report.get("server_tracebacks", {}).items():
        out.print(f"last traceback in {log}:\n{text}", markup=False, highlight=False)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not report["passed"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
