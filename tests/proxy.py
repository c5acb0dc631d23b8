"""A PostgreSQL connection proxy for tests that take the database away from a worker.

``DatabaseProxy`` listens on a Unix socket of its own and forwards every connection to the test
server. It can then make the server look *stopped* (every connection cut, new ones refused)
or merely *unreachable* (nothing forwarded any more, sockets left open: every read hangs, as
behind a dead network path), and bring it back; or hold every reply for a while
(``reply_delay_s``: a slow way back). It runs in the test's event loop and is
closed by the test that opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any

from psycopg import conninfo

PROXY_PORT = 5432


class Cut(Enum):
    """What the proxy does to the connections it carries."""

    PASS = "pass"
    STOPPED = "stopped"
    UNREACHABLE = "unreachable"


class DatabaseProxy:
    """Forwards connections to ``url``'s server; ``url_through`` is the URL that goes through it."""

    def __init__(self, url: str) -> None:
        self.target = conninfo.conninfo_to_dict(url)
        self.url = url
        self.state = Cut.PASS
        #: Seconds each chunk the server sends is held before it goes on to the client (a
        #: slow way back: a claim whose reply comes late). 0: forwarded at once.
        self.reply_delay_s = 0.0
        #: When set, only the chunks that contain these bytes are held (one kind of reply late,
        #: the others on time).
        self.delay_replies_with: bytes | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="tasker-proxy-")
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url_through(self) -> str:
        """``url`` with its host and port replaced by the proxy's socket."""
        return conninfo.make_conninfo(self.url, host=self._dir.name, port=str(PROXY_PORT))

    async def __aenter__(self) -> DatabaseProxy:
        path = Path(self._dir.name) / f".s.PGSQL.{PROXY_PORT}"
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        self._dir.cleanup()

    def cut(self, how: Cut) -> None:
        """Stop (close everything) or blackhole (forward nothing) the connections; PASS restores."""
        self.state = how
        if how is Cut.STOPPED:
            self._drop_all()

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = str(self.target.get("host") or "/tmp")
        port = int(self.target.get("port") or 5432)
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state is Cut.STOPPED:
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            if self.state is Cut.UNREACHABLE:
                await _hold(reader)
                return
            up_reader, up_writer = await self._open_upstream()
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, replies=True))
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool = False) -> None:
        try:
            while True:
                data = await source.read(65536)
                if not data:
                    break
                if self.state is Cut.UNREACHABLE:
                    await _hold(source)  # swallow everything from now on: nothing gets through
                    break
                if (
                    replies
                    and self.reply_delay_s > 0
                    and (self.delay_replies_with is None or self.delay_replies_with in data)
                ):
                    await asyncio.sleep(self.reply_delay_s)  # the fault injected, not a wait for something
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(sink)
            with contextlib.suppress(Exception):
                sink.transport.abort()


async def _hold(reader: asyncio.StreamReader) -> None:
    """Read and drop until the peer goes away (a connection that never answers)."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass
