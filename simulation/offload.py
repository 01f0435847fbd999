"""The checker in a second process: the run's own checking on the machine's other core.

The main process runs the instances and the clients; what the :class:`Checker` and
the :class:`Trace` would be told is appended, with the virtual time, to a list that
goes down a pipe in batches (marshalled). A forked process applies the records, in
order, to the same ``Checker`` and ``Trace`` code, so its verdicts, counters and
digest are those of a run that checks in line (``SimConfig.checker_process`` off).

Nothing the checker decides flows back into the run except a stop, and what the
clients read of their connections (state, subscriptions, whether they stopped
reading) the main process keeps itself (:class:`CheckerLink`, the same transitions
as the checker's). A stop arrives late (the checker is behind by up to a batch), so
a run whose checker process reports any violation, or fails, is run again in line
(:func:`simulation.world.run_simulation`): every failing report is the in-line one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import marshal
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from adapters.shell import Gateway
from domain.model import InstanceId, PresenceChange, SessionId, Status, UserId
from simulation.clock import EPOCH_MS
from simulation.faults import FaultLog
from simulation.invariants import (
    Checker,
    Intent,
    PresenceView,
    Violation,
    outlet_problems,
)
from simulation.loop import TICKS
from simulation.model import (
    CLOSED,
    IDENTIFYING,
    NONE,
    PENDING_SUB,
    PENDING_UNSUB,
    READY,
    SUBSCRIBED,
    Conn,
)
from simulation.trace import SEQ_MARK, Ticks, Trace

#: Records per batch (a few hundred kB marshalled: the pipe holds a batch or more).
BATCH = 4096
#: Pipe buffer asked for (Linux; the default is 64 kB).
PIPE_BYTES = 1 << 20
#: Records are marshalled (plain tuples of str, bytes, int, float, None: about twice
#: as fast as pickle); version 2 keeps no references between objects, faster still.
MARSHAL_VERSION = 2

# Record kinds: (kind, ticks, *arguments).
OPEN = 0
FRAME = 1
IDENTIFY = 2
HEARTBEAT = 3
SUBSCRIBE = 4
UNSUBSCRIBE = 5
TYPING = 6
PRESENCE = 7
SILENT = 8
SLOW = 9
CLOSE = 10
CRASH = 11
PUBLISHED = 12
PUBLISH_FAILED = 13
TRANSITION = 14
INTEND = 15
INTENT_DONE = 16
VIOLATION = 17
OUTLETS = 18
PERIODIC = 19
PRESENCE_PASS = 20
LEAKS = 21
TRACE = 22
FAULTS = 23

#: Frames whose op the client acts on (HELLO, READY) or that change what the main
#: process keeps of a connection (READY, SUBSCRIBED, UNSUBSCRIBED): their beginnings.
_MIRRORED = ('{"op":"HELLO"', '{"op":"READY"', '{"op":"SUBSCRIBED"', '{"op":"UNSUBSCRIBED"')

PresenceSnapshot = tuple[dict[UserId, dict[SessionId, InstanceId]], dict[UserId, Status]]


class CheckerFailed(RuntimeError):
    """The checker process raised or went away (its traceback, when it had one)."""


class _Zero:
    ticks = 0


class TraceLink:
    """The trace as the main process sees it: lines go to the checker process."""

    def __init__(self, link: CheckerLink) -> None:
        self._link = link
        self.lines = 0
        self._digest = ""

    def bind(self, clock: Ticks) -> None:
        self._link.bind(clock)

    def event(self, subject: str, text: str) -> None:
        self._link.record((TRACE, self._link.clock.ticks, subject, text))

    def digest(self) -> str:
        return self._digest


class CheckerLink:
    """The main process's side: the checker's interface, recorded for the checker
    process, plus what the clients read of their connections."""

    def __init__(
        self,
        checker: Checker,
        store: PresenceView,
        writer: Connection,
        results: Connection,
        process: BaseProcess,
    ) -> None:
        self._store = store
        self.member_of = checker.member_of
        self.on_stop: Callable[[], None] | None = None
        self.open_conns: dict[Conn, None] = {}
        self.trace = TraceLink(self)
        self.clock: Ticks = _Zero()
        self._buf: list[tuple[Any, ...]] = []
        self._writer = writer
        self._results = results
        self._process = process
        self._keys = 0
        self._stopped = False
        #: why the results cannot be the in-line ones (None: they are)
        self.failure: str | None = None
        # Filled by finish(), as the Checker's own attributes.
        self.violations: list[Violation] = []
        self.checks: dict[str, int] = {}
        self.published_by_op: dict[str, int] = {}
        self.failed_publishes = 0
        self.deliveries = 0
        self.frames = 0
        self.closes: dict[str, int] = {}
        self.remote_cpu = 0.0

    @classmethod
    def start(cls, checker: Checker, trace: Trace, store: PresenceView) -> CheckerLink:
        """Fork the checker process (it takes ``checker`` and ``trace`` with it)."""
        context = multiprocessing.get_context("fork")
        reader, writer = context.Pipe(duplex=False)
        results_in, results_out = context.Pipe(duplex=False)
        with contextlib.suppress(OSError):  # a smaller pipe only costs more waits
            fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        process = context.Process(
            target=_serve,
            args=(checker, trace, reader, writer, results_in, results_out),
            name="simulation-checker",
            daemon=True,
        )
        process.start()
        reader.close()
        results_out.close()
        return cls(checker, store, writer, results_in, process)

    def bind(self, clock: Ticks) -> None:
        self.clock = clock

    # --- the pipe -------------------------------------------------------------------

    def record(self, item: tuple[Any, ...]) -> None:
        buf = self._buf
        buf.append(item)
        if len(buf) >= BATCH:
            self._send()

    def _send(self) -> None:
        batch, self._buf = self._buf, []
        if self.failure is None:
            try:
                data = marshal.dumps(batch, MARSHAL_VERSION)
            except ValueError as exc:  # a record the checker process cannot get
                self._fail(f"record not marshallable: {exc!r}")
                return
            try:
                self._writer.send_bytes(data)
            except OSError as exc:  # the checker process is gone
                self._gone(exc)
        while self.failure is None and self._results.poll():
            self._note(self._results.recv())

    def _note(self, message: tuple[Any, ...]) -> None:
        if message[0] == "violation":
            self._fail("a violation (reported as the in-line run reports it)")
        elif message[0] == "error":
            self._fail(f"checker process failed:\n{message[1]}")
        else:
            raise CheckerFailed(f"unexpected message from the checker process: {message[0]}")

    def _gone(self, exc: BaseException) -> None:
        """The pipe broke: the checker process's last word, if it said one, is why."""
        with contextlib.suppress(OSError, EOFError):
            if self._results.poll(5.0):
                self._note(self._results.recv())
        self._fail(f"checker process unreachable: {exc!r}")

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        if not self._stopped and self.on_stop is not None:
            self._stopped = True
            self.on_stop()

    def finish(self) -> None:
        """Send the rest, wait for the checker process's results."""
        if self._buf:
            self._send()
        done: dict[str, Any] | None = None
        if self.failure is None:
            try:
                self._writer.send_bytes(marshal.dumps(None, MARSHAL_VERSION))
                while done is None and self.failure is None:
                    message = self._results.recv()
                    if message[0] == "done":
                        done = message[1]
                    else:
                        self._note(message)
            except (OSError, EOFError) as exc:
                self._gone(exc)
        self._writer.close()
        self._results.close()
        if done is None:
            self._process.kill()
        self._process.join()
        if done is None:
            return
        self.violations = done["violations"]
        self.checks = done["checks"]
        self.published_by_op = done["published_by_op"]
        self.failed_publishes = done["failed_publishes"]
        self.deliveries = done["deliveries"]
        self.frames = done["frames"]
        self.closes = done["closes"]
        self.remote_cpu = done["cpu"]
        self.trace.lines = done["lines"]
        self.trace._digest = done["digest"]
        if self.violations:
            self._fail("a violation (reported as the in-line run reports it)")

    # --- the checker's interface: connections -----------------------------------------

    def conn_opened(self, conn: Conn) -> None:
        self._keys += 1
        conn.key = self._keys
        self.open_conns[conn] = None
        self.record((OPEN, self.clock.ticks, conn.key, conn.cid, conn.user, conn.instance_id))

    # A command record ends with what the client saw of its connection when it decided
    # (state, subscriptions, stopped reading): the checker process compares it with its
    # own view, so that a difference in those transitions cannot go unnoticed.

    def sent_identify(self, conn: Conn, text: str) -> None:
        conn.state = IDENTIFYING
        self.record((IDENTIFY, self.clock.ticks, conn.key, text, *_view(conn)))

    def sent_heartbeat(self, conn: Conn, text: str) -> None:
        buf = self._buf
        buf.append((HEARTBEAT, self.clock.ticks, conn.key, text, *_view(conn)))
        if len(buf) >= BATCH:
            self._send()

    def sent_subscribe(self, conn: Conn, server: str, text: str) -> None:
        if server in self.member_of[conn.user] and conn.subs.get(server, NONE) == NONE:
            conn.subs[server] = PENDING_SUB
        self.record((SUBSCRIBE, self.clock.ticks, conn.key, server, text, *_view(conn)))

    def sent_unsubscribe(self, conn: Conn, server: str, text: str) -> None:
        if conn.subs.get(server, NONE) == SUBSCRIBED:
            conn.subs[server] = PENDING_UNSUB
        self.record((UNSUBSCRIBE, self.clock.ticks, conn.key, server, text, *_view(conn)))

    def sent_typing(self, conn: Conn, channel: str, text: str) -> None:
        self.record((TYPING, self.clock.ticks, conn.key, channel, text, *_view(conn)))

    def sent_presence(self, conn: Conn, text: str) -> None:
        self.record((PRESENCE, self.clock.ticks, conn.key, text, *_view(conn)))

    def went_silent(self, conn: Conn) -> None:
        self.record((SILENT, self.clock.ticks, conn.key))

    def stopped_reading(self, conn: Conn) -> None:
        conn.slow_at = self.clock.ticks / TICKS
        self.record((SLOW, self.clock.ticks, conn.key))

    def closed(self, conn: Conn, code: int, *, by_server: bool, how: str = "") -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        self.open_conns.pop(conn, None)
        self.record((CLOSE, self.clock.ticks, conn.key, code, by_server, how))

    def instance_crashed(self, instance_id: str, conns: list[Conn]) -> None:
        for conn in conns:
            if conn.state != CLOSED:
                conn.state = CLOSED
                self.open_conns.pop(conn, None)
        self.record((CRASH, self.clock.ticks, instance_id, [c.key for c in conns]))

    def frame(self, conn: Conn, text: str) -> str:
        """Record the frame. Returns its op as ``Checker.frame`` does for the ops a
        client acts on (HELLO, READY), with the checker's transitions of the
        connection; "" for any other frame (the client does nothing with those)."""
        buf = self._buf
        buf.append((FRAME, self.clock.ticks, conn.key, text))
        if len(buf) >= BATCH:
            self._send()
        if not text.startswith(_MIRRORED):
            return ""
        op = text[7 : text.index('"', 7)]
        if op == "HELLO":
            try:
                json.loads(text)
            except ValueError:
                return ""
            return op
        i = text.rfind(SEQ_MARK)
        if i < 0 or not text.endswith("}"):
            return ""
        try:
            int(text[i + 5 : -1])
        except ValueError:
            return ""
        if op == "READY":
            conn.state = READY
            return op
        d = json.loads(text)["d"]
        server = d.get("serverId") if isinstance(d, dict) else None
        if isinstance(server, str):
            state = conn.subs.get(server, NONE)
            if op == "SUBSCRIBED" and state == PENDING_SUB:
                conn.subs[server] = SUBSCRIBED
            elif op == "UNSUBSCRIBED" and state == PENDING_UNSUB:
                del conn.subs[server]
        return op

    # --- publishes and presence ---------------------------------------------------------

    def published(self, channel: str, payload: bytes) -> None:
        self.record((PUBLISHED, self.clock.ticks, channel, payload))

    def publish_failed(self, channel: str, payload: bytes) -> None:
        self.record((PUBLISH_FAILED, self.clock.ticks, channel, payload))

    def presence_changed(self, change: PresenceChange) -> None:
        if change.visible_changed:
            self.record((TRANSITION, self.clock.ticks, change.user_id))

    # --- the world's own reports -------------------------------------------------------

    def intend(self, eid: str, intent: Intent) -> None:
        self.record((INTEND, self.clock.ticks, eid, intent))

    def intent_done(self, eid: str) -> None:
        self.record((INTENT_DONE, self.clock.ticks, eid))

    def faults_changed(self, faults: FaultLog) -> None:
        self.record((FAULTS, self.clock.ticks, faults.windows()))

    def violation(self, invariant: str, message: str, *subjects: str) -> None:
        self.record((VIOLATION, self.clock.ticks, invariant, message, subjects))

    def leaks(self, checks: int, problems: list[str]) -> None:
        self.record((LEAKS, self.clock.ticks, checks, problems))

    def outlets(self, instance_id: str, gateway: Gateway, conns: dict[object, Conn]) -> None:
        count, problems = outlet_problems(instance_id, gateway, conns)
        keyed = [(None if c is None else c.key, message) for c, message in problems]
        self.record((OUTLETS, self.clock.ticks, count, keyed))

    def periodic(self, *, presence: bool = True) -> None:
        snapshot = self._presence_snapshot() if presence else None
        self.record((PERIODIC, self.clock.ticks, presence, snapshot))

    def presence_pass(self, now: float, *, everyone: bool = False) -> None:
        snapshot = self._presence_snapshot()
        self.record((PRESENCE_PASS, self.clock.ticks, now, everyone, snapshot))

    def _presence_snapshot(self) -> bytes:
        """The store's sessions and statuses, pickled (statuses are enums)."""
        snapshot: PresenceSnapshot = (self._store.live_sessions(), self._store.stored_statuses())
        return pickle.dumps(snapshot, pickle.HIGHEST_PROTOCOL)


def _view(conn: Conn) -> tuple[str, dict[str, int], float | None]:
    """What a client reads of its connection (a copy: the record travels later)."""
    return conn.state, dict(conn.subs), conn.slow_at


class MirrorDiverged(RuntimeError):
    """The main process's view of a connection differs from the checker's."""


def _same_view(conn: Conn, item: tuple[Any, ...]) -> None:
    state, subs, slow_at = item[-3:]
    if (conn.state, conn.subs, conn.slow_at) != (state, subs, slow_at):
        raise MirrorDiverged(
            f"{conn.cid}: the main process saw {(state, subs, slow_at)}, the checker "
            f"{(conn.state, conn.subs, conn.slow_at)}"
        )


# --- the checker process ---------------------------------------------------------------


class _Clock:
    """Virtual time as the records carry it: the same floats as the loop's."""

    def __init__(self) -> None:
        self.ticks = 0

    def now(self) -> float:
        return self.ticks / TICKS

    def wall_ms(self) -> int:
        # simulation.clock.VirtualClock.wall_ms, on the same time
        return EPOCH_MS + round(self.now() * 1000)


class _Snapshot:
    """The presence store as it was when a check was recorded."""

    def __init__(self) -> None:
        self.sessions: dict[UserId, dict[SessionId, InstanceId]] = {}
        self.statuses: dict[UserId, Status] = {}

    def live_sessions(self) -> dict[UserId, dict[SessionId, InstanceId]]:
        return self.sessions

    def stored_statuses(self) -> dict[UserId, Status]:
        return self.statuses


def _serve(
    checker: Checker,
    trace: Trace,
    reader: Connection,
    writer: Connection,
    results: Connection,
    results_out: Connection,
) -> None:
    """The checker process: apply every record, then send the results."""
    writer.close()
    results.close()
    cpu = time.process_time()
    try:
        done = _apply_all(checker, trace, reader, results_out)
        done["cpu"] = time.process_time() - cpu
        results_out.send(("done", done))
    except BaseException:  # reported to the main process, which runs again in line
        with contextlib.suppress(OSError):
            results_out.send(("error", traceback.format_exc()))
    finally:
        reader.close()
        results_out.close()


def _apply_all(
    checker: Checker, trace: Trace, reader: Connection, results: Connection
) -> dict[str, Any]:
    clock = _Clock()
    checker.now = clock.now
    checker.wall_ms = clock.wall_ms
    snapshot = _Snapshot()
    checker.presence = snapshot
    trace.bind(clock)
    told = False

    def stop() -> None:
        nonlocal told
        if not told:
            told = True
            results.send(("violation",))

    checker.on_stop = stop
    conns: dict[int, Conn] = {}
    faults = checker.faults
    commands: dict[int, Callable[..., None]] = {
        HEARTBEAT: checker.sent_heartbeat,
        IDENTIFY: checker.sent_identify,
        SUBSCRIBE: checker.sent_subscribe,
        UNSUBSCRIBE: checker.sent_unsubscribe,
        TYPING: checker.sent_typing,
        PRESENCE: checker.sent_presence,
    }
    while True:
        batch = marshal.loads(reader.recv_bytes())
        if batch is None:
            break
        for item in batch:
            kind = item[0]
            clock.ticks = item[1]
            if kind == FRAME:
                checker.frame(conns[item[2]], item[3])
            elif kind == PUBLISHED:
                checker.published(item[2], item[3])
            elif kind == OPEN:
                _, _, key, cid, user, instance_id = item
                conn = conns[key] = Conn(cid, None, user, instance_id, clock.now())  # type: ignore[arg-type]
                conn.key = key
                checker.conn_opened(conn)
            elif kind == CLOSE:
                _, _, key, code, by_server, how = item
                checker.closed(conns[key], code, by_server=by_server, how=how)
            elif (sent := commands.get(kind)) is not None:
                # A command the client sent: its arguments, then the client's view.
                conn = conns[item[2]]
                sent(conn, *item[3:-3])
                _same_view(conn, item)
            elif kind == TRANSITION:
                checker.transition(item[2])
            elif kind == INTEND:
                checker.intend(item[2], item[3])
            elif kind == INTENT_DONE:
                checker.intent_done(item[2])
            elif kind == SILENT:
                conn = conns[item[2]]
                conn.silent = True
                checker.went_silent(conn)
            elif kind == SLOW:
                checker.stopped_reading(conns[item[2]])
            elif kind == CRASH:
                checker.instance_crashed(item[2], [conns[key] for key in item[3]])
            elif kind == PUBLISH_FAILED:
                checker.publish_failed(item[2], item[3])
            elif kind == TRACE:
                trace.event(item[2], item[3])
            elif kind == FAULTS:
                faults.restore(item[2])
            elif kind == OUTLETS:
                problems = [(None if k is None else conns[k], m) for k, m in item[3]]
                checker.outlet_report(item[2], problems)
            elif kind == PERIODIC:
                if item[3] is not None:
                    snapshot.sessions, snapshot.statuses = pickle.loads(item[3])
                checker.periodic(presence=item[2])
            elif kind == PRESENCE_PASS:
                snapshot.sessions, snapshot.statuses = pickle.loads(item[4])
                checker.presence_pass(item[2], everyone=item[3])
            elif kind == VIOLATION:
                checker.violation(item[2], item[3], *item[4])
            elif kind == LEAKS:
                checker.leaks(item[2], item[3])
            else:
                raise ValueError(f"unknown record {kind}")
    return {
        "violations": checker.violations,
        "checks": checker.checks,
        "published_by_op": checker.published_by_op,
        "failed_publishes": checker.failed_publishes,
        "deliveries": checker.deliveries,
        "frames": checker.frames,
        "closes": checker.closes,
        "digest": trace.digest(),
        "lines": trace.lines,
    }


def usable() -> bool:
    """Whether a second process can run beside this one (fork and a second core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores >= 2 and "fork" in multiprocessing.get_all_start_methods()
