"""Test support shared by every suite: one free-port helper and one TCP proxy for
faults that never touch the real backend."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import urlsplit, urlunsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def via_port(url: str, port: int) -> str:
    """``url`` pointed at ``127.0.0.1:port``, credentials, path and query kept."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{port}"))


class TcpProxy:
    """A TCP proxy to one backend, for faults that never touch the real server.

    * :meth:`drop`: close every proxied connection (both sides), as a server restart
      would; new connections are still accepted.
    * :meth:`refuse`: drop, and reset every new connection at once (a server that is
      down); :meth:`accept` ends that.
    * :meth:`hang`: stop forwarding in both directions, sockets kept open (a hung
      server or a silent partition), new connections included; :meth:`resume` ends it.
    * :meth:`down` / :meth:`up`: stop listening (every connection cut) and listen again
      on the same port (an outage of a shared server without touching it).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_port: int = 0,
        target_url: str | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.target_url = target_url
        self.port = listen_port
        self.accepted = 0
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: Seconds each chunk waits before it is forwarded (a slow link or server):
        #: per connection and direction, so that it also bounds throughput.
        self.latency = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @classmethod
    def for_url(cls, url: str, default_port: int, listen_port: int = 0) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or default_port, listen_port, url)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def up(self) -> None:
        """Listen (again, on the same port after :meth:`down`)."""
        if self._server is None:
            self._refusing = False
            await self.start()

    async def down(self) -> None:
        """A backend that went away: every connection cut, the port closed."""
        await self.close()
        self._server = None

    def url(self, target_url: str | None = None) -> str:
        """``target_url`` (by default the proxied one) pointed at this proxy."""
        url = target_url if target_url is not None else self.target_url
        assert url is not None, "no URL to point at the proxy"
        return via_port(url, self.port)

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def drop(self) -> None:
        for client_side, upstream in list(self._pairs):
            client_side.close()
            upstream.close()

    def refuse(self) -> None:
        self._refusing = True
        self.drop()

    def accept(self) -> None:
        self._refusing = False

    def hang(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def restore(self) -> None:
        """End every fault: :meth:`accept`, :meth:`resume` and no latency."""
        self.accept()
        self.resume()
        self.latency = 0.0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._refusing = True
        self._flowing.set()
        self.drop()
        # Dropped pairs end on their own; cancel only what is still stuck after that.
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            if self._refusing:
                sock = writer.get_extra_info("socket")
                if sock is not None:  # close with RST, like a closed port
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.transport.abort()
                return
            pair = (writer, up_writer)
            self._pairs.add(pair)
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # Closing the proxy: end quietly (asyncio's stream callback would log
                # the cancellation of its handler task as an error).
                pass
            finally:
                self._pairs.discard(pair)
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                for w in pair:
                    w.close()
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if self.latency:
                    await asyncio.sleep(self.latency)
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
