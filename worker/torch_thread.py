"""The one thread that makes every torch call of a worker process.

On CPU, torch parallelises through libgomp, which keeps one OpenMP thread team per thread that
starts parallel work. When the model is loaded on the main thread and steps run on another, two
teams exist, there are more OpenMP threads than cores, and libgomp stops spinning between parallel
regions: every small op then pays a futex wake-up. On 2 cores a 1-sequence decode step of the demo
model took 54 ms that way instead of 36 ms. So a worker builds its engine and runs its steps here.

Not a ThreadPoolExecutor: its threads are joined at interpreter exit, and the engine loop runs
until drained; this one is a daemon thread, like the engine thread it replaces.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class TorchThread:
    def __init__(self, name: str = "hotswap-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on this thread after what was submitted before; its result or exception."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """submit and wait."""
        return self.submit(fn, *args).result()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _serve(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)
