"""A TCP relay between the platform and a server (NATS, Redis) that can reset every
connection through it at once, both ends, as a restart of the server does to its clients.
NATS 2.9 has no way to kick a client, and the machine's Redis and NATS are shared: a relay
resets the platform's connections and no one else's. (A network split, where nothing is
sent and each end finds out by its own timeouts, is not what it makes.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Self
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536
# Linger on, for no time: closing the socket then sends a reset (RST), not an orderly end.
_RESET = struct.pack("ii", 1, 0)


class Relay:
    """While entered, listens on a free port of 127.0.0.1 (`url`: the server's URL with that
    address) and relays each connection to the server."""

    def __init__(self, server_url: str) -> None:
        self._parts = urlsplit(server_url)
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._relaying: set[asyncio.Task[None]] = set()
        self._closing = False

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._closing = True
        self._server.close()
        self.cut()
        # Each connection's task ends once its ends are reset; one left running would be
        # cancelled when the loop closes, and asyncio's streams log that as an error.
        await asyncio.gather(*self._relaying, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = f"127.0.0.1:{port}"
        if self._parts.username or self._parts.password:
            netloc = f"{self._parts.netloc.rpartition('@')[0]}@{netloc}"
        return urlunsplit(self._parts._replace(netloc=netloc))

    def cut(self) -> int:
        """Reset every connection through the relay now, both ends; says how many."""
        ends = list(self._open)
        for pair in ends:
            for writer in pair:
                _reset(writer)
        self._open.clear()
        return len(ends)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        this = asyncio.current_task()
        assert this is not None
        self._relaying.add(this)
        this.add_done_callback(self._relaying.discard)
        host, port = self._parts.hostname or "127.0.0.1", self._parts.port
        try:
            server_reader, server = await asyncio.open_connection(host, port)
        except OSError:
            _reset(client)
            return
        if self._closing:  # the relay closed while this connection was being made
            _reset(client)
            _reset(server)
            return
        pair = (client, server)
        self._open.add(pair)
        pumps = [
            asyncio.create_task(_pump(client_reader, server)),
            asyncio.create_task(_pump(server_reader, client)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in pair:
                _reset(writer)
            self._open.discard(pair)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pumps, return_exceptions=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Until either side ends: a connection ended on one side is ended on the other."""
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
