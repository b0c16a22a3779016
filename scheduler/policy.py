"""Which model's requests go next, to which worker, and how many: pure functions, no I/O.

The dispatcher calls `plan` with a snapshot of the queues and the live workers. Rules:
1. Order. Suspects first (rare; each blocks its own retries), then real-time queues (oldest first),
   then batch queues, biggest first (fewest, fullest dispatches). A batch queue that has not been
   served for `realtime_boost_s` (it is "starving") ranks with the real-time ones: batch work
   never starves, however busy the real-time side is.
2. Batches, not dribbles. A queue waits its class's batching window for arrivals to fill a batch
   (`max_batch`). A batch-priority batch goes only when the whole of it fits the worker's room
   (room frees a seat at a time as requests finish; sending each seat's worth alone would cut the
   backlog into batches of one); a starving queue takes what fits. Real-time requests go at once.
3. Affinity. A request goes to a worker that already has its weights: for a LoRA adapter, one
   that holds it (GPU slot or host memory) or runs requests for it; for a full fine-tune, one that
   has it resident or was sent requests for it. When such a worker exists but is full, the queue
   waits for it until it has gone unserved `affinity_wait_s` (LoRA: another worker loads it in
   milliseconds) or `swap_wait_s` (full weights: another worker would have to swap), then goes on.
4. Swaps are the expensive thing. A worker's full weights change only if no worker has (or is
   committed to) the wanted ones. Batch work swaps only a worker with nothing queued for its
   current weights (a starving queue: or whose weights another worker has too), so a backlog never
   pulls workers back and forth, and only an idle one while another worker has the wanted weights. Real-time work swaps a spareable worker
   (nothing queued for its weights, or another worker has them too); once it has waited
   `swap_wait_s`, the worker whose weights the fewest queued requests need, if fewer than need its
   own (or the only worker there is), so it does not strand the last worker of busier weights; past
   `realtime_boost_s` that worker in any case (a real-time wait stays bounded).
5. Real-time room. Batch work leaves `realtime_reserve` of each worker free for real-time arrivals.

Ages: `oldest_age_s` is how long the queue's oldest request has waited (batching windows);
`idle_s` how long since the queue was last served (affinity bound, starvation), so a large
backlog, whose requests are all old, is still batched and kept on its worker.
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
    idle_s: float | None = None  # since requests were last taken from it (None: never, use oldest_age_s)

    @property
    def weights(self) -> str:
        return self.model_key if self.model_key.startswith("full:") else "base"

    @property
    def since_served(self) -> float:
        return self.oldest_age_s if self.idle_s is None else min(self.idle_s, self.oldest_age_s)


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
        """The weights it will have once its work starts: a full fine-tune it was sent wins."""
        fulls = {m: n for m, n in self.inflight_models.items() if n > 0 and m.startswith("full:")}
        return max(fulls, key=lambda m: (fulls[m], m)) if fulls else self.weights

    def has(self, model_key: str) -> bool:
        return model_key in self.holds or self.inflight_models.get(model_key, 0) > 0


@dataclass(frozen=True)
class PolicyConfig:
    max_batch: int = 32
    realtime_window_s: float = 0.0
    batch_window_s: float = 0.05
    realtime_boost_s: float = 30.0  # a batch queue unserved this long ranks with real-time ones
    affinity_wait_s: float = 0.5  # waiting for a full worker that holds the LoRA (a load costs ms)
    swap_wait_s: float = 10.0  # waiting for a full worker that has the full weights (a swap costs s)
    realtime_reserve: float = 0.25  # share of each worker that batch work leaves free

    def window(self, qclass: str) -> float:
        return self.realtime_window_s if qclass in ("realtime", "suspect") else self.batch_window_s


@dataclass(frozen=True)
class Assignment:
    queue: str
    worker_id: str
    count: int
    isolate: bool = False


def starving(q: QueueView, cfg: PolicyConfig) -> bool:
    return q.qclass == "batch" and q.since_served >= cfg.realtime_boost_s


def urgency(q: QueueView, cfg: PolicyConfig) -> tuple[int, float]:
    """Sort key, most urgent first when sorted in reverse."""
    if q.qclass == "suspect":
        return (3, q.oldest_age_s)
    if q.qclass == "realtime":
        return (2, cfg.realtime_boost_s + q.oldest_age_s)
    if starving(q, cfg):
        return (2, q.since_served)
    return (1, float(q.length))


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


def spareable(w: WorkerView, workers: Sequence[WorkerView], queued_weights: Mapping[str, int]) -> bool:
    """Whether swapping `w` away from its weights leaves no queued work without a worker."""
    mine = w.future_weights
    return mine not in queued_weights or any(o.id != w.id and o.future_weights == mine for o in workers)


def choose_worker(q: QueueView, workers: Sequence[WorkerView], queued_weights: Mapping[str, int],
                  cfg: PolicyConfig) -> WorkerView | None:
    """`queued_weights`: requests queued per full weights ("base" or a fine-tune's key)."""
    want = q.weights
    staying = [w for w in workers if not w.draining]  # a draining worker will never have room again
    with_room = [w for w in staying if room_for(w, q.qclass, cfg) > 0]
    if not with_room:
        return None
    best = max(with_room, key=lambda w: (affinity(w, q.model_key, want), room_for(w, q.qclass, cfg)))
    level = affinity(best, q.model_key, want)
    if level == 2:
        return best
    if level == 1:
        holders = any(affinity(w, q.model_key, want) == 2 for w in staying)
        waited = q.since_served >= cfg.affinity_wait_s
        return best if not holders or waited else None  # a holder will have room soon
    # Needs a swap.
    waited = q.since_served >= cfg.swap_wait_s
    holders = any(affinity(w, q.model_key, want) > 0 for w in staying)
    if q.qclass == "batch":
        # A backlog swaps only a worker with nothing queued for its weights (a starving one: or
        # whose weights another worker has too), so it never pulls workers back and forth between
        # fine-tunes; and only an idle one while another worker has the wanted weights.
        hunger = starving(q, cfg)
        pool = [w for w in with_room if (spareable(w, staying, queued_weights) if hunger
                                         else w.future_weights not in queued_weights)
                and (not holders or w.inflight == 0)]
        if not pool and hunger and waited and not holders:
            pool = _least_needed(q, with_room, staying, queued_weights)
    else:
        if holders and not waited:
            return None  # a worker with these weights will have room soon: cheaper than a swap
        pool = [w for w in with_room if spareable(w, staying, queued_weights)]
        if not pool and waited:
            # bounded: past realtime_boost_s a real-time request takes the least-needed worker anyway
            pool = _least_needed(q, with_room, staying, queued_weights,
                                 force=q.since_served >= cfg.realtime_boost_s)
    if not pool:
        return None
    return max(pool, key=lambda w: (w.inflight == 0, room_for(w, q.qclass, cfg)))


def _least_needed(q: QueueView, with_room: Sequence[WorkerView], staying: Sequence[WorkerView],
                  queued_weights: Mapping[str, int], force: bool = False) -> list[WorkerView]:
    """After the swap wait: the worker whose weights the fewest queued requests need, if fewer need
    them than need ours (a swap must not strand more work than it serves), or the only worker there
    is (real-time comes before a backlog), or in any case with `force`; else none (wait for another
    to become spareable)."""
    ours = queued_weights.get(q.weights, 0)
    fewer = [w for w in with_room
             if force or len(staying) == 1 or queued_weights.get(w.future_weights, 0) < ours]
    return [min(fewer, key=lambda w: (queued_weights.get(w.future_weights, 0), -w.free))] if fewer else []


def plan(queues: Sequence[QueueView], workers: Sequence[WorkerView], cfg: PolicyConfig) -> list[Assignment]:
    """The batches to dispatch now: at most one per queue (the dispatcher asks again right away)."""
    workers = {w.id: w for w in workers}
    queued_weights: dict[str, int] = {}
    for q in queues:
        if q.length > 0:
            queued_weights[q.weights] = queued_weights.get(q.weights, 0) + q.length
    out: list[Assignment] = []
    for q in sorted(queues, key=lambda q: urgency(q, cfg), reverse=True):
        if q.length <= 0:
            continue
        if q.qclass == "suspect":
            _place_suspect(q, workers, out)
            continue
        want = min(q.length, cfg.max_batch)
        if want < cfg.max_batch and q.oldest_age_s < cfg.window(q.qclass):
            continue  # let the batch fill a little longer
        w = choose_worker(q, list(workers.values()), queued_weights, cfg)
        if w is None:
            continue
        count = min(want, room_for(w, q.qclass, cfg))
        if q.qclass == "batch" and count < want and not starving(q, cfg):
            continue  # wait until the whole batch fits
        out.append(Assignment(q.name, w.id, count))
        models = dict(w.inflight_models)
        models[q.model_key] = models.get(q.model_key, 0) + count
        workers[w.id] = replace(w, inflight=w.inflight + count, inflight_models=models)
    return out


def _place_suspect(q: QueueView, workers: dict[str, WorkerView], out: list[Assignment]) -> None:
    idle = [w for w in workers.values() if w.inflight == 0 and w.free > 0]
    if idle:
        w = idle[0]
        out.append(Assignment(q.name, w.id, 1, isolate=True))
        workers[w.id] = replace(w, inflight=1, isolated=True)
        return
    # Under steady load no worker would ever empty: let the least busy one drain for it.
    open_ = [w for w in workers.values() if w.free > 0]
    if open_:
        w = min(open_, key=lambda w: (w.inflight, w.id))
        workers[w.id] = replace(w, isolated=True)


def next_check_s(queues: Sequence[QueueView], cfg: PolicyConfig, idle_s: float = 0.5) -> float:
    """How long the dispatcher may sleep before some queue's batching window or affinity bound ends."""
    waits = [idle_s]
    for q in queues:
        if q.oldest_age_s < cfg.window(q.qclass):
            waits.append(cfg.window(q.qclass) - q.oldest_age_s)
        for bound in (cfg.affinity_wait_s, cfg.swap_wait_s, cfg.realtime_boost_s):
            if q.since_served < bound:
                waits.append(bound - q.since_served)
    return max(0.001, min(waits))
