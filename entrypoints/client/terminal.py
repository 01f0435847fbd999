"""``gateway connect``: a terminal client on top of :mod:`entrypoints.client`.

It prints every event on one line (readable, or with ``as_json`` the raw frames on
stdout and the client's own state lines on stderr) and reads commands from stdin, one
per line::

    typing CHANNEL          TYPING_START
    status STATUS           PRESENCE_UPDATE (online, idle, dnd, invisible)
    subscribe SERVER        SUBSCRIBE_SERVER
    unsubscribe SERVER      UNSUBSCRIBE_SERVER
    presence SERVER [USER...]  SUBSCRIBE_PRESENCE (no user: end the interest)
    quit                    close (1000) and exit; so does end of input
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO

import anyio

from entrypoints.client.client import STATUSES, Backoff, GatewayClient, TokenSource, connect
from entrypoints.client.events import (
    ClientError,
    ClientEvent,
    Connected,
    Disconnected,
    Dispatch,
    NotConnected,
    ProtocolFault,
    ServerError,
    SessionLost,
)

HELP = """commands:
  typing CHANNEL            show others that you are typing in CHANNEL
  status STATUS             online, idle, dnd or invisible
  subscribe SERVER          receive SERVER's events
  unsubscribe SERVER        stop receiving them
  presence SERVER [USER..]  presence interest in a large server (none: end it)
  quit                      leave (end of input too)"""


class Terminal:
    """Renders events and runs commands; the streams are parameters (tests)."""

    def __init__(self, *, as_json: bool, out: TextIO, err: TextIO) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err
        #: userId -> username, learned from READY and TYPING_START.
        self.names: dict[str, str] = {}

    def _print(self, line: str, *, state: bool = False) -> None:
        stream = self.err if state and self.as_json else self.out
        print(line, file=stream, flush=True)

    def _name(self, user_id: Any) -> str:
        return self.names.get(str(user_id), str(user_id))

    def render(self, event: ClientEvent) -> None:
        if isinstance(event, Dispatch):
            self._dispatch(event)
        elif isinstance(event, Connected):
            user = event.user or {}
            if event.resumed:
                self._print(
                    f"* resumed session {event.session_id} on {event.url} "
                    f"({event.replayed} replayed)",
                    state=True,
                )
            else:
                servers = ", ".join(f"{s.get('id')} {s.get('name')!r}" for s in event.servers)
                self._print(
                    f"* connected to {event.url} as {user.get('username')} ({user.get('id')}), "
                    f"status {user.get('status')}; servers: {servers or 'none'}",
                    state=True,
                )
        elif isinstance(event, Disconnected):
            code = f"close {event.code}" if event.code is not None else "no connection"
            then = (
                f"reconnecting in {event.reconnect_in:.2f}s"
                if event.reconnect_in is not None
                else "stopped"
            )
            self._print(f"* disconnected ({code}: {event.reason}); {then}", state=True)
        elif isinstance(event, SessionLost):
            self._print(f"* session not resumed ({event.reason}); identifying again", state=True)
        elif isinstance(event, ServerError):
            if self.as_json:
                d = {"code": event.code, "message": event.message, "op": event.op}
                self._print(json.dumps({"op": "ERROR", "d": d}))
            else:
                self._print(f"! error {event.code} ({event.op}): {event.message}")
        else:
            assert isinstance(event, ProtocolFault)
            self._print(f"! protocol fault: {event.message}; reconnecting", state=True)

    def _dispatch(self, event: Dispatch) -> None:
        d = event.d if isinstance(event.d, dict) else {}
        if event.op == "READY":
            user = d.get("user")
            if isinstance(user, dict):
                self.names[str(user.get("id"))] = str(user.get("username"))
        elif event.op == "TYPING_START":
            self.names[str(d.get("userId"))] = str(d.get("username"))
        if self.as_json:
            self._print(json.dumps({"op": event.op, "d": event.d, "s": event.s}))
            return
        if event.op in ("READY", "RESUMED"):
            return  # said by the Connected line
        if event.op == "SUBSCRIBED":
            self._print(f"subscribed to {d.get('serverId')}")
        elif event.op == "UNSUBSCRIBED":
            self._print(f"unsubscribed from {d.get('serverId')}")
        elif event.op == "TYPING_START":
            self._print(
                f"[{d.get('serverId')} #{d.get('channelId')}] {d.get('username')} is typing"
            )
        elif event.op == "PRESENCE_UPDATE":
            self._print(
                f"[{d.get('serverId')}] {self._name(d.get('userId'))} is now {d.get('status')}"
            )
        elif event.op == "PRESENCE_SNAPSHOT":
            presences = d.get("presences") if isinstance(d.get("presences"), list) else []
            listed = ", ".join(
                f"{self._name(p.get('userId'))} {p.get('status')}"
                for p in presences or []
                if isinstance(p, dict)
            )
            self._print(f"[{d.get('serverId')}] presence: {listed or 'nobody'}")
        else:
            self._print(f"{event.op} {json.dumps(event.d)}")

    async def command(self, client: GatewayClient, line: str) -> bool:
        """Run one command line; False means quit."""
        words = line.split()
        if not words:
            return True
        name, args = words[0].lower(), words[1:]
        try:
            if name in ("quit", "exit") and not args:
                return False
            if name == "typing" and len(args) == 1:
                await client.typing_start(args[0])
            elif name == "status" and len(args) == 1 and args[0] in STATUSES:
                await client.set_status(args[0])  # type: ignore[arg-type]
            elif name == "subscribe" and len(args) == 1:
                await client.subscribe(args[0])
            elif name == "unsubscribe" and len(args) == 1:
                await client.unsubscribe(args[0])
            elif name == "presence" and args:
                await client.subscribe_presence(args[0], args[1:])
            else:
                print(HELP, file=self.err, flush=True)
        except NotConnected:
            print("! not connected right now; try again in a moment", file=self.err, flush=True)
        except ValueError as exc:
            print(f"! {exc}", file=self.err, flush=True)
        return True


async def input_lines(source: TextIO) -> AsyncIterator[str]:
    """Lines of ``source`` without a thread blocked in ``readline`` (which would keep
    the process alive after a fatal error until the user pressed Enter): the file
    descriptor is awaited readable, then read. Regular files, which cannot be awaited,
    and sources without a descriptor are read in a worker thread."""
    try:
        fd: int | None = source.fileno()
    except (OSError, ValueError, AttributeError):
        fd = None
    if fd is None or sys.platform == "win32":
        while text := await anyio.to_thread.run_sync(source.readline, abandon_on_cancel=True):
            yield text
        return
    buffer = b""
    pollable = True
    while True:
        if pollable:
            try:
                await anyio.wait_readable(fd)
            except OSError:  # a regular file (or /dev/null): reads never block
                pollable = False
        chunk = (
            os.read(fd, 65536) if pollable else await anyio.to_thread.run_sync(os.read, fd, 65536)
        )
        if not chunk:
            if buffer:
                yield buffer.decode("utf-8", "replace")
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode("utf-8", "replace") + "\n"


async def run_terminal(
    url: str | Sequence[str],
    token: TokenSource,
    *,
    subscribe: Sequence[str] = (),
    as_json: bool = False,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run until ``quit``, end of input, or a fatal error (exit status 1)."""
    terminal = Terminal(as_json=as_json, out=out or sys.stdout, err=err or sys.stderr)
    source = stdin or sys.stdin
    status = 0
    # One operator's terminal: retry more eagerly than the library's default (30 s cap).
    async with (
        connect(url, token, subscribe=subscribe, backoff=Backoff(base=0.5, cap=5.0)) as client,
        anyio.create_task_group() as group,
    ):

        async def read_commands() -> None:
            try:
                await client.wait_connected()  # commands apply to a READY session
            except ClientError:
                return  # reported by the event loop below
            async for line in input_lines(source):
                if not await terminal.command(client, line):
                    break
            await client.aclose()  # quit, or end of input

        group.start_soon(read_commands)
        try:
            async for event in client:
                terminal.render(event)
        except ClientError as exc:
            print(f"gateway connect: {exc}", file=terminal.err, flush=True)
            status = 1
        group.cancel_scope.cancel()
    return status
