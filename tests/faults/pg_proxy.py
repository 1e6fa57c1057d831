"""A TCP proxy in front of the machine's PostgreSQL that a test can cut and restore.

The PostgreSQL at 127.0.0.1:5432 is shared by everything on the machine, so the fault
tests never restart it. The stack reaches it through this proxy instead, and
:meth:`PgProxy.cut` is, as the services see it, the database going away: every open
connection is reset (RST, like a server that died) and every new one is accepted and
reset at once, until :meth:`PgProxy.restore`. The proxy runs on its own event loop in a
thread and forwards bytes unchanged.
"""

from __future__ import annotations

import asyncio
import threading


class PgProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream_host: str = "127.0.0.1", upstream_port: int = 5432) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self.refused = 0
        """Connections reset while cut."""
        self.port = 0

    def start(self) -> PgProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        """Reset every connection and every new one until :meth:`restore`."""

        def do_cut() -> None:
            self._cut = True
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._call(do_cut)

    def restore(self) -> None:
        """Forward new connections again."""

        def do_restore() -> None:
            self._cut = False

        self._call(do_restore)

    @property
    def is_cut(self) -> bool:
        return self._cut

    def _call(self, function: object) -> None:
        async def run() -> None:
            assert callable(function)
            function()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
