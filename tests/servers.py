"""Real servers for tests: a Redis server (hotswap.localhost's) and moto's S3 server over HTTP."""

from __future__ import annotations

from contextlib import contextmanager

from hotswap.localhost import free_port, redis_server  # noqa: F401 (tests import both from here)


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
