"""The worker service: one engine, fed by Celery batches, reporting through Redis.

Threads:
- Celery's (solo pool) calls `accept(ids)` for each dispatched batch: it claims the requests in
  Redis (a redelivered message claims nothing), fetches adapters to the disk cache, and hands them
  to the engine thread. It returns at once, so batches overlap in the engine.
- The engine thread (a TorchThread, the one thread of the process that calls torch) owns the
  engine: admits requests, runs steps, streams tokens into each request's Redis stream, records
  each result once (`Queues.complete` checks ownership).
- The heartbeat thread renews the lease and the registration (which models it holds, its room).

Nothing is lost on the way: a request is in Redis until its result is; if this process dies the
reaper requeues what it held, and `drain()` (SIGTERM) finishes or requeues everything first.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

from hotswap import keys
from hotswap.metrics import MetricsBuffer, record_finished
from hotswap.protocol import GenerationRequest, GenerationResult, LogprobEntry, SamplingSpec, TokenEvent
from hotswap.structured import GuidedSpec
from scheduler.queues import Queues
from scheduler.workers import WorkerInfo, deregister, heartbeat, rejoin
from worker.engine.errors import RequestRejected
from worker.targets import LocalModel, TargetError, fetch_target
from worker.torch_thread import TorchThread

log = logging.getLogger("hotswap.worker")

# SamplingSpec fields handed to the engine's SamplingParams under the same names.
_OUTPUT_CONTROLS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "stop_token_ids",
                    "guided", "logprobs", "prompt_logprobs")
_LOWEST_LOGPROB = -9999.0  # what -inf (and NaN) is reported as: JSON has no infinities (vLLM and OpenAI do the same)


def new_worker_id() -> str:
    host = socket.gethostname().split(".")[0].lower()
    safe = "".join(c if c.isalnum() or c == "-" else "-" for c in host)[:24]
    return f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Live:
    """A request running in the engine, and what it produced so far."""

    req: GenerationRequest
    attempt: int
    started_at: float
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_output_at: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive outputs (metrics)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held at admission
    logprobs: list[LogprobEntry] | None = None  # one per token of token_ids when the request asked
    prompt_logprobs: list[LogprobEntry | None] | None = None

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0: the engine makes one token that nobody sees (only the prompt is scored)."""
        return self.req.sampling.max_tokens == 0


def _finite(value: float) -> float:
    return value if value >= _LOWEST_LOGPROB else _LOWEST_LOGPROB  # NaN compares False too


def compact_logprob(entry) -> LogprobEntry | None:
    """An engine TokenLogprob (or None, the first prompt token's) as the protocol carries it."""
    if entry is None:
        return None
    return entry.token_id, _finite(entry.logprob), [(t, _finite(v)) for t, v in entry.top]


class WorkerService:
    def __init__(self, engine, redis_client, registry, cache, settings, worker_id: str | None = None,
                 torch_thread: TorchThread | None = None,
                 admit_hook: Callable[[GenerationRequest], None] | None = None):
        self.engine = engine
        self.admit_hook = admit_hook  # called with each request as it is admitted (fault tests: worker/faults.py)
        self._torch = torch_thread or TorchThread()  # best: the thread that built the engine
        self.redis = redis_client
        self.registry, self.cache = registry, cache
        self.settings = settings
        self.id = worker_id or settings.worker_id or new_worker_id()
        self.queues = Queues(redis_client, result_ttl_s=settings.result_ttl_s)
        self.info = WorkerInfo(
            id=self.id, base_model=settings.base_model, queue=keys.celery_queue(settings.base_model, self.id),
            max_inflight=settings.worker_max_inflight or engine.config.max_num_seqs,
            max_model_len=engine.max_model_len,
            hostname=socket.gethostname(), pid=os.getpid(), device=str(engine.device),
        )
        self._inbox: queue.Queue[tuple[GenerationRequest, int, LocalModel]] = queue.Queue()
        self._live: dict[str, Live] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lease_lost = threading.Event()
        self.accepting = True
        self._threads: list[threading.Thread] = []
        self._engine_done = None  # Future of the engine loop on the torch thread
        self._weights = "base"
        self.metrics = MetricsBuffer()  # flushed into Redis by the heartbeat thread

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._refresh_info()
        heartbeat(self.redis, self.info, self.settings.lease_s, first=True)
        self._engine_done = self._torch.submit(self._engine_loop)
        t = threading.Thread(target=self._heartbeat_loop, name="hotswap-heartbeat", daemon=True)
        t.start()
        self._threads.append(t)
        log.info("worker %s ready (queue %s, room for %d requests)", self.id, self.info.queue, self.info.max_inflight)

    def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking work, let running requests finish for up to `timeout_s`, requeue the rest
        (not counted as a crash), and leave. Returns how many were requeued."""
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        self.accepting = False
        self.info.draining = True
        heartbeat(self.redis, self.info, self.settings.lease_s)
        deadline = time.monotonic() + timeout_s
        while (self._live or not self._inbox.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._engine_done is not None:
            futures.wait([self._engine_done], timeout=10)
        for t in self._threads:
            t.join(timeout=10)
        requeued = 0
        for rid in self.queues.inflight(self.id):
            requeued += self.queues.requeue(rid, self.id, crashed=False) == "requeued"
        try:
            self.metrics.flush(self.redis)  # what the last requests observed
        except Exception:
            log.warning("could not flush the last metrics", exc_info=True)
        deregister(self.redis, self.id)
        self.redis.delete(self.info.queue, keys.worker_inflight(self.id), keys.worker_models(self.id),
                          keys.worker_cancels(self.id))
        log.info("worker %s drained: %d request(s) requeued", self.id, requeued)
        return requeued

    # -- Celery side ------------------------------------------------------------------------------

    def accept(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if not self.accepting:  # draining: hand it straight back, it never ran here
                self.queues.requeue(rid, self.id, crashed=False)
                continue
            claimed = self.queues.claim(rid, self.id)
            if claimed is None:
                continue  # finished, cancelled, or given to another worker: a stale message
            req, attempt = claimed
            try:
                model = fetch_target(req.target, self.registry, self.cache)
            except TargetError as exc:
                self._fail(req, attempt, "model_unavailable", str(exc))
                continue
            self._inbox.put((req, attempt, model))
        self._wake.set()

    # -- engine thread ----------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._lease_lost.is_set():
                    self._drop_everything()
                self._admit()
                self._apply_cancels()
                if self.engine.has_unfinished():
                    self._publish(self.engine.step())
                    self._note_weights()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception:
                # The engine is in an unknown state: exit so the reaper requeues our requests, and
                # a request that keeps doing this ends in dead-letter after max_attempts.
                log.exception("engine step failed; exiting so our requests are retried elsewhere")
                os._exit(70)

    def _admit(self) -> None:
        while True:
            try:
                req, attempt, model = self._inbox.get_nowait()
            except queue.Empty:
                return
            if self.admit_hook is not None:
                self.admit_hook(req)
            try:
                adapter, finetune = self._ensure_registered(model)
            except Exception as exc:  # a broken checkpoint fails its requests, not the worker
                self._fail(req, attempt, "model_unavailable", f"cannot load {model.key}: {exc}")
                continue
            try:
                params = self._sampling(req)
                self.engine.add_request(req.prompt_token_ids, params, request_id=req.id, adapter=adapter,
                                        finetune=finetune)
            except (RequestRejected, ValueError) as exc:  # SamplingParams' own checks are ValueErrors
                self._fail(req, attempt, "invalid_request", str(exc))
                continue
            self._live[req.id] = Live(req, attempt, started_at=time.time(), prompt_tokens=len(req.prompt_token_ids),
                                      logprobs=None if req.sampling.logprobs is None else [])

    def _ensure_registered(self, model: LocalModel) -> tuple[str | None, str | None]:
        if model.kind == "base":
            return None, None
        if model.kind == "lora":
            if model.key not in self.engine.adapters:
                self.engine.register_adapter(model.key, model.path)
                self.metrics.inc("adapter_loads_total", model=model.key)
            return model.key, None
        if model.key not in self.engine.finetunes:
            self.engine.register_finetune(model.key, model.path)
        return None, model.key

    @staticmethod
    def _sampling(req: GenerationRequest):
        from dataclasses import fields

        from worker.engine.sampling_params import SamplingParams

        s = req.sampling
        # The output controls are passed only when asked for: a request that uses none runs on any
        # engine, and one that asks for a control this engine lacks fails with a clear 400.
        asked = {name: getattr(s, name) for name in _OUTPUT_CONTROLS
                 if getattr(s, name) != SamplingSpec.model_fields[name].get_default(call_default_factory=True)}
        missing = sorted(set(asked) - {f.name for f in fields(SamplingParams)})
        if missing:
            raise ValueError(f"this worker's engine does not support {', '.join(missing)}")
        if "guided" in asked:
            asked["guided"] = GuidedSpec(**asked["guided"])
        return SamplingParams(max_tokens=max(1, s.max_tokens), temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, seed=s.seed, stop=list(s.stop), ignore_eos=s.ignore_eos, **asked)

    def _publish(self, outputs) -> None:
        now = time.time()
        finished = []
        with self.redis.pipeline(transaction=False) as pipe:
            for out in outputs:
                live = self._live.get(out.request_id)
                if live is None:
                    continue
                live.cached_tokens = out.num_cached_tokens
                if out.new_token_ids:
                    if live.first_token_at is None:
                        live.first_token_at = now
                    else:
                        live.itl_s.append(now - live.last_output_at)
                    live.last_output_at = now
                text, token_ids = ("", []) if live.prompt_only else (out.text, out.new_token_ids)
                logprobs = None
                if live.logprobs is not None and not live.prompt_only:
                    logprobs = [compact_logprob(e) for e in out.logprobs or []]
                prompt_logprobs = None
                if out.prompt_logprobs is not None:
                    prompt_logprobs = live.prompt_logprobs = [compact_logprob(e) for e in out.prompt_logprobs]
                if live.req.stream and (text or token_ids or prompt_logprobs):
                    event = TokenEvent(attempt=live.attempt, offset=len(live.text), text=text, token_ids=token_ids,
                                       logprobs=logprobs, token_offset=len(live.token_ids) if logprobs else 0,
                                       prompt_logprobs=prompt_logprobs)
                    # exclude_defaults: a request without logprobs streams the events it always did
                    pipe.xadd(keys.output(live.req.id), {"event": event.model_dump_json(exclude_defaults=True)})
                live.text += text
                live.token_ids += token_ids
                if logprobs:
                    live.logprobs += logprobs
                if out.finished:  # prompt only: whatever ended the hidden token, the answer ends by its length (0)
                    finished.append((live, "length" if live.prompt_only else out.finish_reason))
            pipe.execute()
        for live, reason in finished:
            self._record(live, "completed", reason)

    def _record(self, live: Live, status: str, finish_reason: str | None) -> None:
        self._live.pop(live.req.id, None)
        result = GenerationResult(
            id=live.req.id, status=status, text=live.text, token_ids=live.token_ids, finish_reason=finish_reason,
            prompt_tokens=live.prompt_tokens, cached_tokens=live.cached_tokens, completion_tokens=len(live.token_ids),
            logprobs=live.logprobs, prompt_logprobs=live.prompt_logprobs, worker=self.id,
            attempts=live.attempt, queued_at=live.req.created_at, started_at=live.started_at,
            first_token_at=live.first_token_at,
        )
        if self.queues.complete(result, self.id, live.attempt):
            record_finished(self.metrics, result, live.req.target.key, live.req.priority, live.itl_s,
                            base=self.settings.base_model)
        else:
            log.warning("result of %s not recorded: this worker no longer owns it", live.req.id)

    def _fail(self, req: GenerationRequest, attempt: int, code: str, message: str) -> None:
        result = GenerationResult(id=req.id, status="failed", error={"code": code, "message": message},
                                  prompt_tokens=len(req.prompt_token_ids), worker=self.id, attempts=attempt,
                                  queued_at=req.created_at)
        if self.queues.complete(result, self.id, attempt):
            record_finished(self.metrics, result, req.target.key, req.priority)

    def _apply_cancels(self) -> None:
        for rid in self.queues.pop_cancels(self.id):
            live = self._live.get(rid)
            if live is not None and self.engine.abort(rid):
                self._record(live, "cancelled", "abort")

    def _drop_everything(self) -> None:
        """Our lease lapsed and the reaper gave our requests to others: drop them all here."""
        log.warning("worker %s lost its lease: dropping %d running requests", self.id, len(self._live))
        for rid in list(self._live):
            self.engine.abort(rid)
        self._live.clear()
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._lease_lost.clear()
        rejoin(self.redis, self.queues, self.info, self.settings.lease_s)  # back, with a clean slate

    def _note_weights(self) -> None:
        current = self.engine.resident_finetune or "base"
        if current != self._weights:
            self._weights = current
            self.metrics.inc("full_swaps_total", model=current)

    # -- heartbeat thread -------------------------------------------------------------------------

    def _refresh_info(self) -> None:
        self.info.holds = self.engine.held_adapters()
        self.info.weights = self._weights

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self._refresh_info()
                self.metrics.flush(self.redis)
                if not self._lease_lost.is_set() and not heartbeat(self.redis, self.info, self.settings.lease_s):
                    self._lease_lost.set()  # the engine thread drops our work, then re-registers
                    self._wake.set()
            except Exception:
                log.exception("heartbeat failed (Redis unreachable?); retrying")
