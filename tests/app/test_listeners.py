"""The listening sockets of `--frontends N` (app.listeners), bound as uvicorn alone binds them."""

from __future__ import annotations

import socket

import pytest

from app.listeners import bind_listeners


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")


def test_one_address_gives_one_inheritable_socket_that_listens_only_when_told() -> None:
    [sock] = bind_listeners("127.0.0.1", 0)
    with sock:
        port = sock.getsockname()[1]
        assert sock.family == socket.AF_INET and sock.get_inheritable() and port > 0
        with pytest.raises(ConnectionRefusedError):  # bound, not listening: refused, not left waiting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        sock.listen()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@needs_ipv6
def test_every_interface_gets_a_socket_per_family_on_one_port() -> None:
    listeners = bind_listeners("", 0)
    try:
        families = {sock.family: sock for sock in listeners}
        assert sorted(families) == [socket.AF_INET, socket.AF_INET6] and len(listeners) == 2
        assert families[socket.AF_INET].getsockname()[:2] == ("0.0.0.0", families[socket.AF_INET6].getsockname()[1])
        assert families[socket.AF_INET6].getsockname()[0] == "::"
        # IPv6 only, as asyncio sets it: the IPv4 socket has the IPv4 addresses to itself.
        assert families[socket.AF_INET6].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in listeners:
            sock.close()


@needs_ipv6
def test_a_taken_port_raises_and_leaves_nothing_bound() -> None:
    # Every interface binds 0.0.0.0 first, then ::, which ::1 already holds: the first is let go.
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            bind_listeners("", port)
        [again] = bind_listeners("127.0.0.1", port)  # the IPv4 side was closed, so it is free
        again.close()
