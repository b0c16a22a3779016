"""A live hotswap stack for end-to-end tests: real `hotswap worker` and `hotswap scheduler`
subprocesses (Celery, the demo model on CPU) on a real Redis and real object storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from hotswap.processes import ProcessGroup

HOTSWAP = [sys.executable, "-c", "from cli.main import main; main()"]


def stack_env(redis_url: str, storage_env: dict[str, str], model_dir: Path, cache_dir: Path, **overrides) -> dict:
    env = dict(os.environ)
    env.update(storage_env)
    env.update({
        "HOTSWAP_REDIS_URL": redis_url,
        "HOTSWAP_BASE_MODEL_DIR": str(model_dir),
        "HOTSWAP_CACHE_DIR": str(cache_dir),
        "HOTSWAP_DEVICE": "cpu",
        "HOTSWAP_KV_CACHE_GB": "0.1",
        "HOTSWAP_MAX_NUM_SEQS": "16",
        "HOTSWAP_MAX_LORAS": "4",
        "HOTSWAP_LEASE_S": "2",
        "HOTSWAP_HEARTBEAT_S": "0.4",
        "OMP_NUM_THREADS": "1",  # two workers on a 2-core machine: do not oversubscribe
        # Fixed matmul paths, as the reference engines in tests use: measured ones may differ per
        # process (noise, thread count), and oneDNN's fp32 GEMM rounds differently from MKL's, which
        # flips greedy near-ties. The service must reproduce the engine; tuning has its own tests.
        "HOTSWAP_CPU_TUNING": "off",
        "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Stack:
    """A scheduler and workers as subprocesses (a hotswap.processes group: stopped in reverse
    order). `supervise=True` restarts a worker that exits, as systemd or Kubernetes would."""

    def __init__(self, env: dict, log_dir: Path, workers: int = 1, supervise: bool = False):
        self.env, self.log_dir, self.num_workers, self.supervise = env, Path(log_dir), workers, supervise
        self.redis = redis.Redis.from_url(env["HOTSWAP_REDIS_URL"])
        self.group = ProcessGroup(self.log_dir)
        self.scheduler: subprocess.Popen | None = None  # a test may replace it with one it spawned
        self.restarts = 0
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    @property
    def workers(self) -> list[subprocess.Popen | None]:
        return [c.proc if c is not None else None for c in map(self.group.get, self._worker_names())]

    def _worker_names(self) -> list[str]:
        return [f"worker{i}" for i in range(self.num_workers)]

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        return self.group.start(name, HOTSWAP + args, self.env).proc

    def start_worker(self, i: int) -> subprocess.Popen:
        return self._spawn(["worker"], f"worker{i}")

    def __enter__(self) -> "Stack":
        self.scheduler = self._spawn(["scheduler"], "scheduler")
        for i in range(self.num_workers):
            self.start_worker(i)
        try:
            self.wait_workers(self.num_workers)
        except BaseException:
            self.group.stop_all()  # `with` calls no __exit__ when __enter__ fails
            raise
        if self.supervise:
            self._watch = threading.Thread(target=self._supervise, daemon=True)
            self._watch.start()
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for name in self._worker_names():
                if not self.group[name].alive:
                    self.restarts += 1
                    self.group.restart(name)

    def live_workers(self):
        from scheduler.workers import live_workers

        return live_workers(self.redis)

    def wait_workers(self, n: int, timeout: float = 120) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = self.live_workers()
            if len(live) >= n:
                return live
            for i, proc in enumerate(self.workers):
                if proc is not None and proc.poll() is not None and not self.supervise:
                    raise RuntimeError(f"worker {i} exited with {proc.returncode}: see {self.log_dir}/worker{i}.log")
            time.sleep(0.2)
        raise TimeoutError(f"{n} workers did not come up in {timeout} s: see {self.log_dir}")

    def worker_index(self, worker_id: str) -> int:
        pid = next(w.pid for w in self.live_workers() if w.id == worker_id)
        return next(i for i, p in enumerate(self.workers) if p is not None and p.pid == pid)

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.workers[i].send_signal(sig)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._watch:
            self._watch.join(timeout=5)
        self.group.stop_all()


def wait_results(queues, ids: list[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    results = {}
    while time.monotonic() < deadline and len(results) < len(ids):
        for rid in ids:
            if rid not in results:
                res = queues.result(rid)
                if res is not None:
                    results[rid] = res
        time.sleep(0.1)
    missing = [rid for rid in ids if rid not in results]
    if missing:
        raise TimeoutError(f"{len(missing)} of {len(ids)} requests unfinished, e.g. {queues.state(missing[0])}")
    return results
