"""The listening sockets of a replica of several processes (`--frontends N`), bound before it serves.

Bound the way uvicorn binds when it runs alone (asyncio's `create_server`), so that `--host`
means the same with front-ends as without: one socket per address the host resolves to
(`localhost` is often both 127.0.0.1 and ::1), IPv6 sockets for IPv6 only (`::` is not also
0.0.0.0), the same port on each (with `--port 0`, the one the first socket got). Every process of
the replica inherits them all, and the kernel hands each new connection to whichever accepts first.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import Any, Final

PORT_ZERO_TRIES: Final = 5  # with --port 0, the first address's port may be taken on another


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound TCP sockets for every address of `host`, inheritable; OSError if one cannot bind. Not
    yet listening: uvicorn listens once the lifespan has started, so that until then a connection
    is refused rather than left waiting in the backlog."""
    # "" is every interface, as for asyncio: 0.0.0.0 and ::, each with its own socket.
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in infos))
    attempt = 1
    while True:
        try:
            return _bind_all(addresses, port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt >= PORT_ZERO_TRIES:
                raise
            attempt += 1


def _bind_all(addresses: Sequence[tuple[int, tuple[Any, ...]]], port: int) -> list[socket.socket]:
    bound: list[socket.socket] = []
    try:
        for family, address in addresses:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            except OSError:
                continue  # a family this kernel does not have (IPv6 disabled): asyncio skips it too
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:  # the port the first address got, on every address
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise OSError(errno.EAFNOSUPPORT, "no address family of this host can be bound here")
    return bound
