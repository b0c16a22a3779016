"""Which model's requests go next, to which worker, and how many: pure functions, no I/O.

The dispatcher calls `plan` with a snapshot of the queues and the live workers. Rules, in order:
1. Urgency. Queues are served most urgent first: the age of their oldest request, plus a head start
   for real-time ones (`realtime_boost_s`). A batch request that has waited that much longer ranks
   with a fresh real-time one, so batch work never starves.
2. Batching. A queue is dispatched once it can fill a batch (`max_batch`) or its oldest request has
   waited its class's batching window; a worker with too little room for the whole batch gets it
   only after the window too, so batches are not cut into dribbles.
3. Affinity. A request goes to a worker that already has its weights: for a LoRA adapter, one
   that holds it (GPU slot or host memory) or runs requests for it; for a full fine-tune, one that
   has it resident. If such workers exist but are full, the request waits for them up to
   `affinity_wait_s`, then takes any worker with room. A worker on other full weights is swapped
   only when it has nothing left to do for them or the request waited past that bound: swaps are
   the expensive thing, and the policy keeps them rare.
4. Real-time room. Batch work leaves `realtime_reserve` of each worker free for real-time arrivals.
5. Suspects (requests that crashed a worker more than once) run alone on an idle worker; while one
   waits, the least busy worker gets no new work, so it empties even under steady load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence


@dataclass(frozen=True)
class QueueView:
    name: str
    model_key: str  # "base" | "lora:tenant/name@v" | "full:tenant/name@v"
    qclass: str  # "realtime" | "batch" | "suspect"
    length: int
    oldest_age_s: float

    @property
    def weights(self) -> str:
        return self.model_key if self.model_key.startswith("full:") else "base"


@dataclass(frozen=True)
class WorkerView:
    id: str
    max_inflight: int
    inflight: int = 0
    weights: str = "base"
    holds: frozenset[str] = frozenset()
    inflight_models: Mapping[str, int] = field(default_factory=dict)
    isolated: bool = False
    draining: bool = False

    @property
    def free(self) -> int:
        return 0 if self.isolated or self.draining else max(0, self.max_inflight - self.inflight)

    @property
    def future_weights(self) -> str:
        """The weights it will have once its queued work starts: a full fine-tune it was sent wins."""
        fulls = [m for m, n in self.inflight_models.items() if n > 0 and m.startswith("full:")]
        return fulls[0] if fulls else self.weights

    def has(self, model_key: str) -> bool:
        return model_key in self.holds or self.inflight_models.get(model_key, 0) > 0


@dataclass(frozen=True)
class PolicyConfig:
    max_batch: int = 32
    realtime_window_s: float = 0.0
    batch_window_s: float = 0.05
    realtime_boost_s: float = 30.0
    affinity_wait_s: float = 2.0
    realtime_reserve: float = 0.1  # share of each worker that batch work leaves free

    def window(self, qclass: str) -> float:
        return self.realtime_window_s if qclass in ("realtime", "suspect") else self.batch_window_s


@dataclass(frozen=True)
class Assignment:
    queue: str
    worker_id: str
    count: int
    isolate: bool = False


def urgency(q: QueueView, cfg: PolicyConfig) -> float:
    if q.qclass == "suspect":
        return float("inf")  # rare, and each one blocks its own retries: settle it first
    return q.oldest_age_s + (cfg.realtime_boost_s if q.qclass == "realtime" else 0.0)


def room_for(w: WorkerView, qclass: str, cfg: PolicyConfig) -> int:
    if qclass != "batch":
        return w.free
    reserve = int(w.max_inflight * cfg.realtime_reserve)
    return max(0, w.free - reserve)


def affinity(w: WorkerView, model_key: str, weights: str) -> int:
    """2: has the model itself; 1: has the right full weights (a LoRA loads in ms); 0: needs a swap."""
    if w.future_weights != weights:
        return 0
    if model_key == "base" or weights != "base":
        return 2
    return 2 if w.has(model_key) else 1


def swap_allowed(w: WorkerView, q: QueueView, queued_weights: set[str], cfg: PolicyConfig) -> bool:
    """Swap a worker's full weights only when nothing waits for its current ones, or `q` has
    waited past the affinity bound."""
    idle = not any(n > 0 for n in w.inflight_models.values()) and w.inflight == 0
    return (idle and w.future_weights not in queued_weights) or q.oldest_age_s >= cfg.affinity_wait_s


def choose_worker(q: QueueView, workers: Sequence[WorkerView], queued_weights: set[str],
                  cfg: PolicyConfig) -> WorkerView | None:
    want = q.weights
    with_room = [w for w in workers if room_for(w, q.qclass, cfg) > 0]
    if not with_room:
        return None
    best = max(with_room, key=lambda w: (affinity(w, q.model_key, want), room_for(w, q.qclass, cfg)))
    level = affinity(best, q.model_key, want)
    if level == 2:
        return best
    waited = q.oldest_age_s >= cfg.affinity_wait_s
    staying = [w for w in workers if not w.draining]  # a draining worker will never have room again
    holders_busy = any(affinity(w, q.model_key, want) == 2 for w in staying)
    if level == 1:
        # A worker that holds the adapter exists but is full: wait for it a little.
        return best if not holders_busy or waited else None
    if any(affinity(w, q.model_key, want) > 0 for w in staying) and not waited:
        return None  # a worker with the right weights will have room soon; a swap is dearer
    swappable = [w for w in with_room if swap_allowed(w, q, queued_weights, cfg)]
    if not swappable:
        return None
    return max(swappable, key=lambda w: (w.inflight == 0, room_for(w, q.qclass, cfg)))


def plan(queues: Sequence[QueueView], workers: Sequence[WorkerView], cfg: PolicyConfig) -> list[Assignment]:
    """The batches to dispatch now: at most one per queue (the dispatcher asks again right away)."""
    workers = {w.id: w for w in workers}
    queued_weights = {q.weights for q in queues if q.length > 0}
    out: list[Assignment] = []
    for q in sorted(queues, key=lambda q: urgency(q, cfg), reverse=True):
        if q.length <= 0:
            continue
        if q.qclass == "suspect":
            idle = [w for w in workers.values() if w.inflight == 0 and w.free > 0]
            if idle:
                w = idle[0]
                out.append(Assignment(q.name, w.id, 1, isolate=True))
                workers[w.id] = replace(w, inflight=1, isolated=True)
            else:  # under steady load no worker would ever empty: let the least busy one drain for it
                open_ = [w for w in workers.values() if w.free > 0]
                if open_:
                    w = min(open_, key=lambda w: (w.inflight, w.id))
                    workers[w.id] = replace(w, isolated=True)
            continue
        want = min(q.length, cfg.max_batch)
        if want < cfg.max_batch and q.oldest_age_s < cfg.window(q.qclass):
            continue  # let the batch fill a little longer
        w = choose_worker(q, list(workers.values()), queued_weights, cfg)
        if w is None:
            continue
        count = min(want, room_for(w, q.qclass, cfg))
        if count < want and q.oldest_age_s < cfg.window(q.qclass):
            continue  # only part of a batch fits: wait for more room within the window
        out.append(Assignment(q.name, w.id, count))
        models = dict(w.inflight_models)
        models[q.model_key] = models.get(q.model_key, 0) + count
        workers[w.id] = replace(w, inflight=w.inflight + count, inflight_models=models)
    return out


def next_check_s(queues: Sequence[QueueView], cfg: PolicyConfig, idle_s: float = 0.5) -> float:
    """How long the dispatcher may sleep before some queue's batching window or affinity bound ends."""
    waits = [idle_s]
    for q in queues:
        for bound in (cfg.window(q.qclass), cfg.affinity_wait_s):
            if q.oldest_age_s < bound:
                waits.append(bound - q.oldest_age_s)
    return max(0.001, min(waits))
