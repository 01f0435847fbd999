"""A load-generator process: many picows WebSocket connections, driven over stdin.

The orchestrator (``bench.main``) starts one or more of these with
``python -m bench.loadgen`` and talks to each through JSON lines: one command per
line on stdin, one or more replies per command on stdout. Commands:

``connect``  open connections (``urls``, ``users``, ``tokens``, ``rooms``, per
             connection) and take each through its protocol's handshake:
             gateway HELLO -> IDENTIFY -> READY -> SUBSCRIBE_SERVER -> SUBSCRIBED;
             socket.io ``0{..}`` -> ``40{"room": ..}`` -> ``40{sid}`` (joined);
             ceiling: the WebSocket upgrade. Replies with the time window and counts.
``subscribe`` gateway connections opened with ``subscribe: false`` (handshake ended
             at READY) send SUBSCRIBE_SERVER now and wait for SUBSCRIBED.
``quiesce``  wait until no frame arrived for ``idle_ms`` (bounded by ``timeout``).
``collect``  arm a fan-out measurement: replies ``armed`` at once, then ``done`` once
             every connection got ``expect`` BENCH events (or ``timeout``/``idle_s``);
             one publish-to-receive latency (ns) per delivery goes to ``lat_file``.
``storm``    send each connection's ``frames`` (typing and presence ops) at once and
             count the dispatches that come back until ``expect`` arrived.
``close``    close every connection (bounded) and reply; ``exit`` ends the process.

The client is written to stay out of the way: frames are recognised by their first
bytes, and the only parsing is the integer after ``"t":`` (and ``"s":`` for the
gateway's sequence check). Everything is bounded in time; the process also exits on
its own when stdin closes or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from picows import (  # type: ignore[import-not-found, unused-ignore]
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

GATEWAY = "gateway"
CEILING = "ceiling"
SOCKETIO = "socketio"

_TEXT = WSMsgType.TEXT
_CLOSE = WSMsgType.CLOSE
_CONTROL_OPS = frozenset({b"HELLO", b"HEARTBEAT_ACK", b"ERROR", b"RECONNECT"})


def _int_after(payload: bytes, key: bytes, start: int = 0) -> int:
    """The non-negative integer right after ``key`` in ``payload`` (-1 if absent)."""
    i = payload.find(key, start)
    if i < 0:
        return -1
    i += len(key)
    j = i
    n = len(payload)
    while j < n and 48 <= payload[j] <= 57:
        j += 1
    return int(payload[i:j]) if j > i else -1


class Stats:
    """What one load-generator process observed since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bench = 0
        self.latencies = array.array("q")
        self.first_ns = 0
        self.last_ns = 0
        self.last_frame_ns = time.time_ns()
        self.ops: dict[str, int] = {}
        self.seq_gaps = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.watch_target = -1
        self.watch_count = 0
        #: HEARTBEAT -> HEARTBEAT_ACK round trips of the storm's watchers (ns).
        self.hb_rtts = array.array("q")


class LoadGen:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conns: list[BaseConn] = []
        #: Connections asked for so far (``BaseConn.index`` numbers them in that order).
        self.specs = 0
        self.stats = Stats()
        self.dropped: dict[str, int] = {}
        self.closing = False
        self.done: asyncio.Future[None] | None = None
        #: The op names the storm counts (gateway dispatches), as bytes.
        self.watch_ops: frozenset[bytes] = frozenset()

    # --- called by connections (hot path) ------------------------------------------

    def on_bench(self, payload: bytes) -> None:
        now = time.time_ns()
        st = self.stats
        st.last_frame_ns = now
        t = _int_after(payload, b'"t":')
        st.latencies.append(now - t)
        if not st.bench:
            st.first_ns = now
        st.last_ns = now
        st.bench += 1
        if st.bench == st.watch_target and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def on_other(self, op: bytes) -> None:
        now = time.time_ns()
        st = self.stats
        st.last_frame_ns = now
        key = op.decode()
        st.ops[key] = st.ops.get(key, 0) + 1
        if op in self.watch_ops:
            st.last_ns = now
            st.watch_count += 1
            if st.watch_count == st.watch_target and self.done is not None \
                    and not self.done.done():
                self.done.set_result(None)

    def on_error(self, payload: bytes) -> None:
        st = self.stats
        st.errors += 1
        if len(st.error_samples) < 3:
            st.error_samples.append(payload[:300].decode(errors="replace"))

    def on_disconnected(self, conn: BaseConn) -> None:
        if not self.closing:
            code = "none"
            handshake = conn.transport.close_handshake if conn.transport is not None else None
            if handshake is not None and handshake.recv is not None:
                code = str(handshake.recv.code.value)
            self.dropped[code] = self.dropped.get(code, 0) + 1
        if conn.ready_fut is not None and not conn.ready_fut.done():
            conn.ready_fut.set_exception(ConnectionError("disconnected during handshake"))


class BaseConn(WSListener):  # type: ignore[misc, unused-ignore]
    """One connection; subclasses speak one protocol."""

    def __init__(self, lg: LoadGen, token: str, room: str) -> None:
        super().__init__()
        self.lg = lg
        self.token = token
        self.room = room
        self.transport: WSTransport | None = None
        self.ready_fut: asyncio.Future[None] | None = lg.loop.create_future()
        #: Position among every connection this process was asked to open.
        self.index = -1

    def mark_ready(self) -> None:
        fut = self.ready_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.send(_TEXT, payload)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.lg.on_disconnected(self)


class GatewayConn(BaseConn):
    def __init__(self, lg: LoadGen, token: str, room: str) -> None:
        super().__init__(lg, token, room)
        self.seq = 0
        #: False: the handshake ends at READY and ``subscribe`` sends SUBSCRIBE_SERVER.
        self.auto_subscribe = True
        #: Send times (ns) of HEARTBEATs not yet ACKed (storm watchers only).
        self.hb_sent: list[int] = []

    def heartbeat(self) -> None:
        self.hb_sent.append(time.time_ns())
        self.send(b'{"op":"HEARTBEAT","d":null}')

    def subscribe(self) -> None:
        self.send(b'{"op":"SUBSCRIBE_SERVER","d":{"serverId":"' + self.room.encode() + b'"}}')

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not _TEXT:
            return
        p = frame.get_payload_as_bytes()
        if p.startswith(b'{"op":"BENCH"'):
            self.lg.on_bench(p)
            op = b"BENCH"
        else:
            op = p[7:p.index(b'"', 7)]
            if op in _CONTROL_OPS:
                if op == b"HELLO":
                    self.send(b'{"op":"IDENTIFY","d":{"token":"' + self.token.encode() + b'"}}')
                elif op == b"ERROR":
                    self.lg.on_error(p)
                elif op == b"HEARTBEAT_ACK" and self.hb_sent:
                    self.lg.stats.hb_rtts.append(time.time_ns() - self.hb_sent.pop(0))
                self.lg.on_other(op)
                return
            if op == b"READY":
                if self.auto_subscribe:
                    self.subscribe()
                else:
                    self.mark_ready()
            elif op == b"SUBSCRIBED":
                self.mark_ready()
            self.lg.on_other(op)
        s = _int_after(p, b'"s":', p.rfind(b'"s":'))
        if s != self.seq + 1:
            self.lg.stats.seq_gaps += 1
        self.seq = s


class CeilingConn(BaseConn):
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.mark_ready()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is _TEXT:
            self.lg.on_bench(frame.get_payload_as_bytes())


class SocketIOConn(BaseConn):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not _TEXT:
            return
        p = frame.get_payload_as_bytes()
        if p.startswith(b"42["):
            self.lg.on_bench(p)
        elif p == b"2":  # engine.io ping
            self.send(b"3")
        elif p.startswith(b"0{"):  # engine.io open: connect to the default namespace
            self.send(b"40" + json.dumps({"room": self.room}).encode())
        elif p.startswith(b"40"):
            self.mark_ready()
            self.lg.on_other(b"CONNECT")
        elif p.startswith(b"44"):
            self.lg.on_error(p)
            fut = self.ready_fut
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(p.decode(errors="replace")))
        else:
            self.lg.on_other(p[:2])


_CONN_CLASSES: dict[str, type[BaseConn]] = {
    GATEWAY: GatewayConn,
    CEILING: CeilingConn,
    SOCKETIO: SocketIOConn,
}


# --- commands -----------------------------------------------------------------------


async def cmd_connect(lg: LoadGen, cmd: dict[str, Any]) -> dict[str, Any]:
    protocol: str = cmd["protocol"]
    cls = _CONN_CLASSES[protocol]
    urls: list[str] = cmd["urls"]
    tokens: list[str] = cmd["tokens"]
    rooms: list[str] = cmd["rooms"]
    timeout = float(cmd.get("timeout", 30.0))
    sem = asyncio.Semaphore(int(cmd.get("concurrency", 64)))
    failures: dict[str, int] = {}
    before = len(lg.conns)
    cpu0 = time.process_time()
    t0 = time.time_ns()

    auto_subscribe = bool(cmd.get("subscribe", True))
    base = lg.specs
    lg.specs += len(urls)
    opened: list[BaseConn | None] = [None] * len(urls)

    async def one(i: int) -> None:
        conn = cls(lg, tokens[i], rooms[i])
        conn.index = base + i
        if isinstance(conn, GatewayConn):
            conn.auto_subscribe = auto_subscribe
        factory: Callable[[], BaseConn] = lambda: conn  # noqa: E731
        async with sem:
            try:
                await asyncio.wait_for(ws_connect(factory, urls[i]), timeout)
                assert conn.ready_fut is not None
                await asyncio.wait_for(conn.ready_fut, timeout)
            except (OSError, TimeoutError, ConnectionError) as exc:
                key = type(exc).__name__
                failures[key] = failures.get(key, 0) + 1
                if conn.transport is not None:
                    conn.transport.disconnect()
                return
            except Exception as exc:  # picows handshake errors and the like
                key = type(exc).__name__
                failures[key] = failures.get(key, 0) + 1
                return
        conn.ready_fut = None
        opened[i] = conn

    await asyncio.gather(*(one(i) for i in range(len(urls))))
    lg.conns.extend(c for c in opened if c is not None)  # in the order asked for
    t1 = time.time_ns()
    return {"ok": True, "connected": len(lg.conns) - before, "failures": failures,
            "t0": t0, "t1": t1, "cpu": time.process_time() - cpu0}


async def cmd_subscribe(lg: LoadGen, cmd: dict[str, Any]) -> dict[str, Any]:
    """Gateway connections connected with ``subscribe: false``: SUBSCRIBE_SERVER now."""
    limit_s = float(cmd.get("timeout", 30.0))
    sem = asyncio.Semaphore(int(cmd.get("concurrency", 64)))
    failures = 0
    t0 = time.time_ns()

    async def one(conn: GatewayConn) -> None:
        nonlocal failures
        async with sem:
            fut = conn.ready_fut = lg.loop.create_future()
            conn.subscribe()
            try:
                await asyncio.wait_for(fut, limit_s)
            except (TimeoutError, ConnectionError):
                failures += 1
            conn.ready_fut = None

    await asyncio.gather(*(one(c) for c in lg.conns if isinstance(c, GatewayConn)))
    return {"ok": True, "failures": failures, "t0": t0, "t1": time.time_ns()}


async def cmd_quiesce(lg: LoadGen, cmd: dict[str, Any]) -> dict[str, Any]:
    idle_ns = int(float(cmd.get("idle_ms", 300)) * 1e6)
    deadline = time.monotonic() + float(cmd.get("timeout", 30.0))
    while time.monotonic() < deadline:
        if time.time_ns() - lg.stats.last_frame_ns >= idle_ns:
            break
        await asyncio.sleep(0.05)
    ops = dict(lg.stats.ops)
    result = {"ok": True, "ops": ops, "errors": lg.stats.errors,
              "error_samples": lg.stats.error_samples, "seq_gaps": lg.stats.seq_gaps,
              "dropped": dict(lg.dropped), "conns": len(lg.conns)}
    lg.stats.reset()
    return result


async def _wait_done(lg: LoadGen, limit_s: float, idle_s: float) -> bool:
    """Wait for ``lg.done``; give up after ``limit_s`` or ``idle_s`` without frames."""
    assert lg.done is not None
    deadline = time.monotonic() + limit_s
    while not lg.done.done() and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(asyncio.shield(lg.done), 0.25)
        except TimeoutError:
            if time.time_ns() - lg.stats.last_frame_ns > idle_s * 1e9:
                break
    return lg.done.done()


def _write_latencies(path: str, latencies: array.array[int]) -> None:
    with open(path, "wb") as fh:
        latencies.tofile(fh)


async def cmd_collect(lg: LoadGen, cmd: dict[str, Any], reply: Callable[[dict[str, Any]], None]
                      ) -> dict[str, Any]:
    expect = int(cmd["expect"]) * len(lg.conns)
    lg.stats.reset()
    lg.stats.watch_target = expect
    lg.done = lg.loop.create_future()
    if expect == 0:
        lg.done.set_result(None)
    cpu0 = time.process_time()
    reply({"armed": True})
    complete = await _wait_done(lg, float(cmd.get("timeout", 60.0)), float(cmd.get("idle_s", 5.0)))
    st = lg.stats
    path = cmd.get("lat_file")
    if path:
        _write_latencies(path, st.latencies)
    result = {"ok": True, "complete": complete, "deliveries": st.bench, "expected": expect,
              "first_ns": st.first_ns, "last_ns": st.last_ns, "seq_gaps": st.seq_gaps,
              "errors": st.errors, "error_samples": st.error_samples, "ops": dict(st.ops),
              "dropped": dict(lg.dropped),
              "cpu": time.process_time() - cpu0}
    lg.done = None
    st.reset()
    return result


async def _watch(lg: LoadGen, every_s: float, watchers: int) -> None:
    """The storm's watchers: ``watchers`` connections spread over this process each
    send a HEARTBEAT every ``every_s`` (staggered; within PROTOCOL's 120 frames a
    minute beside the storm's own frames); their ACKs' round trips are recorded."""
    conns = [c for c in lg.conns if isinstance(c, GatewayConn)]
    chosen = conns[:: max(1, len(conns) // max(1, watchers))][:watchers]
    if not chosen:
        return
    gap = every_s / len(chosen)
    while True:
        for conn in chosen:
            if conn.transport is not None and not conn.transport.is_disconnected:
                conn.heartbeat()
            await asyncio.sleep(gap)


async def cmd_storm(lg: LoadGen, cmd: dict[str, Any]) -> dict[str, Any]:
    frames: list[list[str]] = cmd["frames"]  # by connection index
    if len(frames) != lg.specs:
        return {"ok": False, "error": f"{len(frames)} frame lists for {lg.specs} connections"}
    lg.stats.reset()
    lg.watch_ops = frozenset(op.encode() for op in cmd["watch_ops"])
    lg.stats.watch_target = int(cmd["expect"])
    lg.done = lg.loop.create_future()
    spread = float(cmd.get("spread_s", 0.0))
    cpu0 = time.process_time()
    t0 = time.time_ns()
    # Frame j of connection c goes out at (j * n + c) / (n * width) * spread: the
    # storm's offered load is even over ``spread`` seconds (0: everything at once).
    conns = lg.conns
    n = len(conns)
    width = max((len(frames[c.index]) for c in conns), default=0)
    slot = spread / max(1, n * width)
    start = time.monotonic()
    beat = asyncio.ensure_future(_watch(lg, float(cmd.get("hb_every_s", 1.0)),
                                        int(cmd.get("hb_watchers", 20))))
    k = 0
    for j in range(width):
        for conn in conns:
            mine = frames[conn.index]
            if j < len(mine) and conn.transport is not None and not conn.transport.is_disconnected:
                conn.send(mine[j].encode())
            k += 1
            if slot and k % 16 == 0:
                delay = start + k * slot - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    t_sent = time.time_ns()
    complete = await _wait_done(lg, float(cmd.get("timeout", 60.0)), float(cmd.get("idle_s", 5.0)))
    beat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beat
    # The last HEARTBEATs' ACKs are still on their way: wait for them (bounded).
    for _ in range(500):
        if not any(c.hb_sent for c in conns if isinstance(c, GatewayConn)):
            break
        await asyncio.sleep(0.01)
    st = lg.stats
    rtts = sorted(st.hb_rtts)
    result = {"ok": True, "complete": complete, "received": st.watch_count,
              "expected": st.watch_target, "t0": t0, "t_sent": t_sent, "last_ns": st.last_ns,
              "ops": dict(st.ops), "errors": st.errors, "error_samples": st.error_samples,
              "seq_gaps": st.seq_gaps, "dropped": dict(lg.dropped),
              "hb_rtts_ms": [rtts[int(q * (len(rtts) - 1))] / 1e6 for q in (0.5, 0.99, 1.0)]
              if rtts else [], "hb_count": len(rtts), "hb_unanswered": sum(
                  len(c.hb_sent) for c in conns if isinstance(c, GatewayConn)),
              "cpu": time.process_time() - cpu0}
    for conn in conns:
        if isinstance(conn, GatewayConn):
            conn.hb_sent.clear()
    lg.done = None
    lg.watch_ops = frozenset()
    st.reset()
    return result


async def cmd_close(lg: LoadGen, cmd: dict[str, Any]) -> dict[str, Any]:
    lg.closing = True
    timeout = float(cmd.get("timeout", 10.0))
    transports = [c.transport for c in lg.conns if c.transport is not None]
    for tr in transports:
        if not tr.is_disconnected:
            tr.send_close(WSCloseCode.OK)
    waits = [tr.wait_disconnected() for tr in transports if not tr.is_disconnected]
    if waits:
        _, pending = await asyncio.wait([asyncio.ensure_future(w) for w in waits],
                                        timeout=timeout)
        for fut in pending:
            fut.cancel()
    lingering = 0
    for tr in transports:
        if not tr.is_disconnected:
            lingering += 1
            tr.disconnect(graceful=False)
    closed = len(lg.conns)
    lg.conns.clear()
    lg.specs = 0
    lg.closing = False
    return {"ok": True, "closed": closed, "forced": lingering}


async def main_async(max_seconds: float) -> int:
    loop = asyncio.get_running_loop()
    lg = LoadGen(loop)
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    deadline = time.monotonic() + max_seconds

    def reply(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    reply({"started": True})
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print("loadgen: --max-seconds reached, exiting", file=sys.stderr)
            return 3
        try:
            line = await asyncio.wait_for(reader.readline(), remaining)
        except TimeoutError:
            continue
        if not line:
            return 0  # the orchestrator went away
        cmd = json.loads(line)
        name = cmd.get("cmd")
        if name == "exit":
            return 0
        try:
            if name == "connect":
                reply(await cmd_connect(lg, cmd))
            elif name == "subscribe":
                reply(await cmd_subscribe(lg, cmd))
            elif name == "quiesce":
                reply(await cmd_quiesce(lg, cmd))
            elif name == "collect":
                reply(await cmd_collect(lg, cmd, reply))
            elif name == "storm":
                reply(await cmd_storm(lg, cmd))
            elif name == "close":
                reply(await cmd_close(lg, cmd))
            else:
                reply({"ok": False, "error": f"unknown command {name!r}"})
        except Exception as exc:
            reply({"ok": False, "error": repr(exc)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main_async(args.max_seconds))
    code: int = uvloop.run(main_async(args.max_seconds))
    return code


if __name__ == "__main__":
    sys.exit(main())
