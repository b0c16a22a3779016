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

from hotswap.up import Up, UpError, pid_alive, port_free
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


@pytest.mark.slow
def test_up_serves_and_stops_cleanly_on_ctrl_c(demo_model_dir, tmp_path):
    data_dir = tmp_path / "data"
    port, redis_port = free_port(), free_port()
    env = dict(os.environ, HOTSWAP_DATA_DIR=str(data_dir), HOTSWAP_BASE_MODEL_DIR=str(demo_model_dir),
               HOTSWAP_CACHE_DIR=str(tmp_path / "cache"), HOTSWAP_DEVICE="cpu", HOTSWAP_KV_CACHE_GB="0.1",
               HOTSWAP_MAX_NUM_SEQS="8", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="60")
    env.pop("HOTSWAP_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "hotswap.cli", "up", "--port", str(port), "--redis-port",
                             str(redis_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = Output(proc.stdout), Output(proc.stderr)
    children: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 300
        key = None
        while key is None:
            assert proc.poll() is None, f"hotswap up exited with {proc.returncode}:\n{stderr.text}"
            assert time.monotonic() < deadline, f"no key printed:\n{stdout.text}\n{stderr.text}"
            found = re.search(r"^(hs-[A-Za-z0-9_-]+)$", stdout.text, re.M)
            key = found.group(1) if found else None
            time.sleep(0.2)
        # It printed the key only once everything was ready: check that independently.
        state = json.loads((data_dir / "up.json").read_text())
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
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=auth, timeout=120, json={
            "model": BASE, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0})
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
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children.values():  # never leave a stray process behind, even on failure
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    stdout.join()
    stderr.join()
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
                    "from hotswap.cli import main\n"
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
