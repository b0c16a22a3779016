"""hotswap.localhost: the port check `hotswap up` makes before it starts Redis and the API."""

from __future__ import annotations

import socket

from hotswap.localhost import port_free


def _listener() -> socket.socket:
    """A listening socket as redis-server and uvicorn make it (SO_REUSEADDR: Linux lets a port be
    bound again over TIME_WAIT only when both the old and the new socket set it)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _leave_time_wait() -> int:
    """A port whose server stopped after closing a connection first: only a TIME_WAIT socket remains."""
    listener = _listener()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: it is the side left in TIME_WAIT, on `port`
    assert client.recv(1) == b""
    client.close()
    listener.close()
    return port


def test_a_port_left_in_time_wait_is_free():
    port = _leave_time_wait()
    assert port_free("127.0.0.1", port)
    # which is what a server (redis-server, uvicorn: SO_REUSEADDR) finds when it listens there
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_a_port_with_a_live_listener_is_busy():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # even one that allows reuse
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # a wildcard listener holds the loopback port too
        s.listen()
        port = s.getsockname()[1]
        assert not port_free("127.0.0.1", port)


def test_a_port_with_an_open_connection_but_no_listener_is_free():
    """The server stopped listening but a connection it accepted is still open (e.g. a client that
    has not noticed yet): a new server can listen there, as redis-server would."""
    listener = _listener()
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        conn, _ = listener.accept()
        listener.close()
        try:
            assert port_free("127.0.0.1", port)
        finally:
            conn.close()
            client.close()
