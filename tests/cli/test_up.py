"""`hotswap up`: the whole stack from one command, answering real requests, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from cli.up import RestartPolicy, Up, UpError, how_it_ended, pid_alive, port_free
from tests.servers import free_port

BASE = "smollm2-135m-instruct"


class Output:
    """Collects a pipe's lines in a thread (so the child never blocks on a full pipe)."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe):
        for raw in iter(pipe.readline, b""):
            self.lines.append(raw.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def join(self):
        self._thread.join(timeout=10)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class UpProcess:
    """`hotswap up` run as a user runs it (CPU, the demo model), its output collected; remembers
    every child pid it saw so that none is left behind, even when a test fails."""

    def __init__(self, tmp_path: Path, demo_model_dir: Path):
        self.data_dir = tmp_path / "data"
        self.port, self.redis_port = free_port(), free_port()
        env = dict(os.environ, HOTSWAP_DATA_DIR=str(self.data_dir), HOTSWAP_BASE_MODEL_DIR=str(demo_model_dir),
                   HOTSWAP_CACHE_DIR=str(tmp_path / "cache"), HOTSWAP_DEVICE="cpu", HOTSWAP_KV_CACHE_GB="0.1",
                   HOTSWAP_MAX_NUM_SEQS="8", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="60")
        env.pop("HOTSWAP_REDIS_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--port", str(self.port),
                                      "--redis-port", str(self.redis_port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout, self.stderr = Output(self.proc.stdout), Output(self.proc.stderr)
        self.pids: set[int] = set()

    def wait_key(self, timeout_s: float = 300) -> str:
        """The API key, printed once everything is ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"hotswap up exited with {self.proc.returncode}:\n{self.stderr.text}"
            assert time.monotonic() < deadline, f"no key printed:\n{self.stdout.text}\n{self.stderr.text}"
            found = re.search(r"^(hs-[A-Za-z0-9_-]+)$", self.stdout.text, re.M)
            if found:
                return found.group(1)
            time.sleep(0.2)

    def state(self) -> dict:
        state = json.loads((self.data_dir / "up.json").read_text())
        self.pids.update(state["children"].values())
        return state

    def complete(self, key: str) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": BASE, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
                                "temperature": 0})

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids:  # never leave a stray process behind, even on failure
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.stdout.join()
        self.stderr.join()


@pytest.mark.slow
def test_up_serves_and_stops_cleanly_on_ctrl_c(demo_model_dir, tmp_path):
    up = UpProcess(tmp_path, demo_model_dir)
    data_dir, port, redis_port, proc, stdout, stderr = \
        up.data_dir, up.port, up.redis_port, up.proc, up.stdout, up.stderr
    try:
        key = up.wait_key()
        # It printed the key only once everything was ready: check that independently.
        state = up.state()
        children = state["children"]
        assert state["pid"] == proc.pid and set(children) == {"redis", "scheduler", "worker0", "api"}
        assert state["redis_url"] == f"redis://127.0.0.1:{redis_port}/0"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        from scheduler.workers import live_workers

        client = redis.Redis(port=redis_port)
        [worker] = live_workers(client)
        assert worker.pid == children["worker0"] and worker.base_model == BASE
        # The key works, and the printed instructions hold what a user needs.
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in stdout.text and BASE in stdout.text
        assert "hotswap adapters upload" in stdout.text and "hotswap batch submit" in stdout.text
        assert "OpenAI(base_url=" in stdout.text
        auth = {"Authorization": f"Bearer {key}"}
        resp = up.complete(key)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/v1/hotswap/base-model", headers=auth).status_code == 200
        assert "hotswap:workers_up" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert (data_dir / "api-key").read_text().strip() == key
        for name in ("redis", "scheduler", "worker0", "api"):
            assert (data_dir / "logs" / f"{name}.log").exists()

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0, stderr.text
    finally:
        up.cleanup()
    for name, pid in children.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) still runs"
    assert not port_open(redis_port) and not port_open(port)
    assert not (data_dir / "up.json").exists()
    assert (data_dir / "redis" / "appendonly.aof").exists()
    err = stderr.text
    assert err.index("stopped api") < err.index("stopped worker0") < err.index("stopped scheduler") \
        < err.index("stopped redis"), err
    assert "stopped cleanly" in err


def test_api_key_is_made_once_and_remade_for_a_new_redis(redis_client, tmp_path):
    up = Up(data_dir=tmp_path)
    key = up._api_key(redis_client)
    assert key.startswith("hs-") and up._api_key(redis_client) == key
    assert oct((tmp_path / "api-key").stat().st_mode & 0o777) == "0o600"
    from api.auth import tenant_for_key

    assert tenant_for_key(redis_client, key) == "local"
    redis_client.flushall()  # the Redis data was wiped: the kept key is worthless, make another
    assert up._api_key(redis_client) != key


def test_refuses_busy_ports_and_a_second_instance(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not port_free("127.0.0.1", busy)
        with pytest.raises(UpError, match=f"port {busy} on 127.0.0.1 is in use"):
            Up(data_dir=tmp_path, port=busy).run()
        with pytest.raises(UpError, match=f"--redis-port {busy} is in use"):
            Up(data_dir=tmp_path, port=free_port(), redis_port=busy)._pick_redis_port()
    (tmp_path / "up.json").write_text(json.dumps({"pid": os.getpid(), "api": "http://127.0.0.1:1"}))
    with pytest.raises(UpError, match="already runs"):
        Up(data_dir=tmp_path).run()
    (tmp_path / "up.json").write_text(json.dumps({"pid": 2**22 + 12345}))  # a stale file: no such process
    Up(data_dir=tmp_path)._check_not_running()


def test_a_child_dying_stops_everything_with_an_error(tmp_path, demo_model_dir, monkeypatch):
    """The scheduler exits on its own right after startup: reported with its log, everything else
    (the real API and Redis) stopped, exit code 1."""
    fake = tmp_path / "fake_hotswap.py"
    fake.write_text("import sys\n"
                    "if sys.argv[1] == 'scheduler':\n"
                    "    print('scheduler: something broke'); sys.exit(3)\n"
                    "from cli.main import main\n"
                    "main()\n")
    monkeypatch.setenv("HOTSWAP_BASE_MODEL_DIR", str(demo_model_dir))
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    up = Up(data_dir=tmp_path / "data", port=free_port(), redis_port=free_port(), workers=0, startup_timeout_s=60,
            hotswap_cmd=[sys.executable, str(fake)])
    assert up.run() == 1
    names = [c.name for c in up.children]
    assert names == ["scheduler", "api"]
    assert up.children[0].proc.returncode == 3
    for child in [up.redis_child, *up.children]:
        assert child.proc.poll() is not None
    assert not port_open(up.redis_port) and not port_open(up.port)
    assert "something broke" in (tmp_path / "data" / "logs" / "scheduler.log").read_text()


# -- restarts ---------------------------------------------------------------------------------------


def test_restart_policy_backs_off_forgets_a_healthy_run_and_gives_up():
    policy = RestartPolicy()  # the defaults `hotswap up` runs with
    assert [policy.next_delay(deaths) for deaths in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.next_delay(10_000) == 30  # no overflow, however long it goes on
    assert policy.deaths_in_a_row(0, uptime_s=0.5) == 1
    assert policy.deaths_in_a_row(3, uptime_s=59) == 4  # died again soon after its restart
    assert policy.deaths_in_a_row(3, uptime_s=60) == 1  # it ran a minute: a fresh start, 1 s again
    # the first death is restarted; 5 failed restarts in a row (6 deaths) are too many
    assert [policy.give_up(deaths) for deaths in range(1, 8)] == [False] * 5 + [True, True]
    quick = RestartPolicy(first_delay_s=0.5, max_delay_s=3, max_failed_restarts=1)
    assert [quick.next_delay(d) for d in (1, 2, 3, 4)] == [0.5, 1, 2, 3]
    assert not quick.give_up(1) and quick.give_up(2)


def test_how_a_child_ended_is_said_in_words():
    assert how_it_ended(3) == "exited with code 3"
    assert how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL (kill -9 or the out-of-memory killer)"
    assert how_it_ended(-signal.SIGSEGV) == "was killed by SIGSEGV"


def _supervisor(tmp_path, **policy) -> Up:
    """An `Up` whose supervisor loop runs on small stand-in children (no Redis, no model)."""
    up = Up(data_dir=tmp_path / "data", redis_port=1, poll_s=0.02,
            restart_policy=RestartPolicy(**{"first_delay_s": 0.02, **policy}))
    up.logs.mkdir(parents=True)
    return up


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_dies_is_restarted_and_the_stack_runs_on(tmp_path, capsys):
    """Killed once (kill -9), the worker is restarted: a new pid in up.json, a line on the terminal
    and in its log; the supervisor goes on until Ctrl-C, which stops it cleanly (exit code 0)."""
    up = _supervisor(tmp_path)
    marker = tmp_path / "died-once"
    worker = up._spawn("worker0", _python(
        "import os, pathlib, signal, sys, time\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "print('worker up again', flush=True); time.sleep(60)\n"), None)
    up.children.append(worker)
    first_pid = worker.proc.pid
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(up._supervise()))
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while "worker up again" not in worker.log.read_text():
            assert thread.is_alive() and time.monotonic() < deadline, capsys.readouterr().err
            time.sleep(0.02)
        assert worker.restarts == 1 and worker.proc.pid != first_pid and worker.proc.poll() is None
        state = json.loads(up.state_file.read_text())
        assert state["children"] == {"worker0": worker.proc.pid} and state["restarts"] == {"worker0": 1}
        log = worker.log.read_text()
        said = f"worker0 (pid {first_pid}) was killed by SIGKILL"
        assert said in log and "restarting it in 0.02 s" in log
        assert f"restarted worker0 (restart 1): pid {worker.proc.pid}" in log
        assert said in capsys.readouterr().err
    finally:
        up.signal_name = "SIGINT"
        up.stopping.set()
        thread.join(timeout=10)
        up._shutdown()
    assert result == [0] and worker.proc.returncode == -signal.SIGTERM


def test_a_child_whose_restarts_keep_failing_stops_everything(tmp_path, capsys):
    up = _supervisor(tmp_path)
    up.children.append(up._spawn("scheduler", _python("print('scheduler: bad config'); raise SystemExit(3)"), None))
    healthy = up._spawn("api", _python("import time; time.sleep(60)"), None)
    up.children.append(healthy)
    try:
        assert up._supervise() == 1
    finally:
        up._shutdown()
    scheduler = up.children[0]
    assert scheduler.restarts == 5 and scheduler.deaths == 6  # restarted 5 times, then given up
    assert healthy.restarts == 0 and healthy.proc.returncode == -signal.SIGTERM  # stopped in order
    log = scheduler.log.read_text()
    assert log.count("scheduler: bad config") == 6 and log.count("exited with code 3") == 6
    assert "6 deaths in a row, each within 60 s of starting: giving up" in log
    err = capsys.readouterr().err
    assert f"error: scheduler exited with code 3, again: its last 5 restarts failed; stopping everything. " \
           f"End of {scheduler.log}" in err
    assert "scheduler: bad config" in err  # the end of its log, on the terminal


def test_redis_dying_is_fatal(tmp_path, capsys):
    """Redis holds every queue and request: without it nothing can go on, so no restart."""
    up = _supervisor(tmp_path)
    up.redis_child = up._spawn("redis", _python("raise SystemExit(1)"), None)
    worker = up._spawn("worker0", _python("import time; time.sleep(60)"), None)
    up.children.append(worker)
    up.redis_child.proc.wait()
    try:
        assert up._supervise() == 1
    finally:
        up._shutdown()
    assert worker.restarts == 0 and worker.proc.returncode == -signal.SIGTERM
    err = capsys.readouterr().err
    assert "error: redis exited with code 1 (it holds every queue and request: run `hotswap up` again" in err


@pytest.mark.slow
def test_up_restarts_a_killed_worker_and_scheduler_and_answers_again(demo_model_dir, tmp_path):
    """kill -9 of the worker and the scheduler of a running `hotswap up`: both come back (new pids
    in up.json, said on the terminal and in their logs) and the stack answers a completion again."""
    from scheduler.workers import live_workers

    up = UpProcess(tmp_path, demo_model_dir)
    restarted = ("worker0", "scheduler")
    try:
        key = up.wait_key()
        old = up.state()["children"]
        for name in restarted:
            os.kill(old[name], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            assert up.proc.poll() is None, f"hotswap up exited with {up.proc.returncode}:\n{up.stderr.text}"
            assert time.monotonic() < deadline, up.stderr.text
            state = up.state()
            if all(state["children"][name] != old[name] for name in restarted):
                break
            time.sleep(0.2)
        new = state["children"]
        assert state["restarts"] == {"scheduler": 1, "worker0": 1, "api": 0}
        assert new["api"] == old["api"] and new["redis"] == old["redis"]
        for name in restarted:
            assert pid_alive(new[name])
            said = f"{name} (pid {old[name]}) was killed by SIGKILL"
            assert said in up.stderr.text
            log = (up.data_dir / "logs" / f"{name}.log").read_text()
            assert said in log and f"restarted {name} (restart 1): pid {new[name]}" in log
        # The new worker loads the model and registers; the dead one's lease lapses.
        client = redis.Redis(port=up.redis_port)
        deadline = time.monotonic() + 300
        while [w.pid for w in live_workers(client)] != [new["worker0"]]:
            assert up.proc.poll() is None and time.monotonic() < deadline, up.stderr.text
            time.sleep(0.5)
        resp = up.complete(key)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=180) == 0, up.stderr.text
    finally:
        up.cleanup()
    for pid in up.pids:
        assert not pid_alive(pid), f"pid {pid} still runs"
    assert "stopped cleanly" in up.stderr.text
