"""TorchThread: every call runs on the one daemon thread, in order, with results and errors handed back."""

import threading

import pytest

from worker.torch_thread import TorchThread


def test_calls_run_in_order_on_one_daemon_thread():
    runner = TorchThread(name="test-torch")
    seen = []
    futures = [runner.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(5)]
    for f in futures:
        f.result(timeout=5)
    assert [i for i, _ in seen] == list(range(5))
    assert {ident for _, ident in seen} == {runner.ident} != {threading.get_ident()}
    assert runner._thread.daemon and runner._thread.name == "test-torch"


def test_results_and_exceptions_reach_the_caller_and_the_thread_goes_on():
    runner = TorchThread()
    assert runner.call(pow, 2, 10) == 1024
    with pytest.raises(ZeroDivisionError):
        runner.call(lambda: 1 / 0)
    assert runner.call(str.upper, "still here") == "STILL HERE"


def test_a_cancelled_job_is_skipped():
    runner = TorchThread()
    gate = threading.Event()
    runner.submit(gate.wait, 5)  # keeps the thread busy
    skipped = runner.submit(lambda: pytest.fail("a cancelled job ran"))
    assert skipped.cancel()
    gate.set()
    assert runner.call(lambda: "after") == "after"
