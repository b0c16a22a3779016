"""hotswap.processes on real child processes: start order and reverse stop order, a grace before
SIGKILL, restart, kill, a child that died before the stop, waiting for readiness, and the ends of logs;
hotswap.localhost.start_redis on a real redis-server."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
import redis

from hotswap.localhost import free_port, start_redis
from hotswap.processes import ChildExited, ProcessGroup, how_it_ended, pid_alive, tail, wait_http, wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def logs_when_stopped(name: str) -> list[str]:
    """A child that prints 'up' and, on SIGTERM, writes its name and the time to STOPPED and exits 0."""
    return [sys.executable, "-c",
            "import os, signal, sys, time\n"
            "def bye(*_):\n"
            f"    with open(os.environ['STOPPED'], 'a') as f: f.write({name!r} + ' ' + repr(time.monotonic()) + '\\n')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n"]


def wait_for_line(path, text: str, timeout: float = 20) -> None:
    wait_until(lambda: text in path.read_text(), timeout, None, f"{text!r} in {path}")


def test_children_stop_in_reverse_start_order(tmp_path):
    stopped = tmp_path / "stopped"
    env = dict(os.environ, STOPPED=str(stopped))
    group = ProcessGroup(tmp_path / "logs")
    names = ["redis", "scheduler", "worker0", "api"]
    for name in names:
        group.start(name, logs_when_stopped(name), env)
    for name in names:
        wait_for_line(group[name].log, "up")  # its SIGTERM handler is in place
    assert list(group.pids()) == names and all(pid_alive(pid) for pid in group.pids().values())
    group.stop_all()
    assert [line.split()[0] for line in stopped.read_text().splitlines()] == names[::-1]
    assert group.pids() == {} and all(c.proc.returncode == 0 for c in group)


def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path):
    group = ProcessGroup(tmp_path)
    stubborn = group.start("stubborn", [sys.executable, "-c",
                                        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                        "print('up', flush=True)\ntime.sleep(60)\n"], stop_timeout_s=0.5)
    wait_for_line(stubborn.log, "up")
    began = time.monotonic()
    assert group.stop("stubborn") is False
    assert 0.5 <= time.monotonic() - began < 10
    assert stubborn.proc.returncode == -signal.SIGKILL
    # hurry() cuts the grace short (a second Ctrl-C in `hotswap up`)
    slow = group.start("slow", [sys.executable, "-c", "import signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                                "time.sleep(60)\n"], stop_timeout_s=60)
    wait_for_line(slow.log, "up")
    began = time.monotonic()
    assert group.stop("slow", hurry=lambda: True) is False and time.monotonic() - began < 10


def test_stop_after_a_child_died_and_a_custom_ask(tmp_path):
    group = ProcessGroup(tmp_path)
    dead = group.start("dead", [sys.executable, "-c", "raise SystemExit(3)"])
    dead.proc.wait(timeout=20)
    # SIGINT's default handler set explicitly: a child of a non-interactive shell's background job
    # (as CI runs) inherits SIGINT ignored, and Python then installs none.
    live = group.start("live", [sys.executable, "-c", "import signal, time; "
                                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                                "print('ready', flush=True); time.sleep(60)"])
    assert group.first_dead() is dead and group.pids() == {"live": live.pid}
    wait_for_line(live.log, "ready")  # a signal sent between fork and exec is lost with the parent's handler
    asked = []
    assert group.stop("live", ask=lambda c: (asked.append(c.name), c.proc.send_signal(signal.SIGINT)))
    assert asked == ["live"] and live.proc.returncode != 0
    group.stop_all()  # both already ended: nothing to do, no error
    assert dead.proc.returncode == 3 and how_it_ended(dead.proc.returncode) == "exited with code 3"


def test_kill_and_restart_keep_the_command_and_the_log(tmp_path):
    with ProcessGroup(tmp_path) as group:
        child = group.start("worker0", [sys.executable, "-c", "import os, time; print('pid', os.getpid(), flush=True); "
                                                              "time.sleep(60)"])
        first = child.pid
        wait_for_line(child.log, f"pid {first}")
        with pytest.raises(ValueError, match="worker0 still runs"):
            group.restart("worker0")
        with pytest.raises(ValueError, match="worker0 already runs"):
            group.start("worker0", SLEEPER)
        assert group.kill("worker0") == first and not pid_alive(first)
        assert how_it_ended(child.proc.returncode).startswith("was killed by SIGKILL")
        assert group.restart("worker0") is child and child.restarts == 1 and child.pid != first
        wait_for_line(child.log, f"pid {child.pid}")
        assert f"pid {first}" in child.log.read_text()  # appended to, not replaced
        started_again = group.start("other", SLEEPER)
    assert not started_again.alive and not child.alive  # the with block stopped both


def test_waiting_for_a_child_that_exits_says_how_and_shows_its_log(tmp_path):
    group = ProcessGroup(tmp_path)
    child = group.start("api", [sys.executable, "-c", "print('bad config'); raise SystemExit(2)"])
    with pytest.raises(ChildExited, match="api exited with code 2 before http://127.0.0.1:1/healthz answered") as exc:
        wait_http("http://127.0.0.1:1/healthz", 20, child)
    assert "bad config" in str(exc.value)
    with pytest.raises(TimeoutError, match="nothing did not answer in 0 s"):
        wait_until(lambda: False, 0.1, None, "nothing")


def test_tail_is_the_end_of_a_log(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert tail(log, 3) == "line 27\nline 28\nline 29"
    assert tail(log).splitlines()[0] == "line 10"
    assert tail(tmp_path / "missing.log") == "(no log)" and tail(None) == "(no log)"
    (tmp_path / "empty.log").write_text("")
    assert tail(tmp_path / "empty.log") == "(empty log)"


def test_start_redis_answers_and_stops_with_its_group(tmp_path):
    group = ProcessGroup(tmp_path / "logs")
    port = free_port()
    url = start_redis(group, port, tmp_path / "data")
    client = redis.Redis.from_url(url)
    assert url == f"redis://127.0.0.1:{port}/0" and client.ping()
    group.stop_all()
    assert group["redis"].proc.returncode == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_start_redis_on_a_busy_port_fails_with_its_log(tmp_path):
    with socket.socket() as taken:  # bound, not listening: redis-server cannot bind, a client is refused
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        group = ProcessGroup(tmp_path / "logs")
        with pytest.raises(ChildExited, match=f"redis exited with code 1 before redis-server on port {port} answered"):
            start_redis(group, port, tmp_path / "data")
    assert "(no log)" not in tail(group["redis"].log) and group.pids() == {}
