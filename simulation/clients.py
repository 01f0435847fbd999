"""Virtual clients: one per user, with one or more tabs (connections).

Clients act only on timers and on frames of their own connections (HELLO ->
IDENTIFY, READY -> SUBSCRIBE_SERVER), never on events fanned out to them, so that the
order in which the loop wakes connections within one instant cannot change what
anybody does. Each client draws from its own ``random.Random``, seeded from the run's
root generator, for the same reason.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from simulation.faults import DROP, SILENT, SLOW
from simulation.model import CLOSED, NONE, READY, SUBSCRIBED, Conn
from simulation.population import UNKNOWN_SERVER
from simulation.transport import ABNORMAL, NORMAL, MemoryTransport

if TYPE_CHECKING:
    from simulation.world import World

HEARTBEAT_FRAME = '{"op":"HEARTBEAT","d":null}'
STATUSES = ("online", "idle", "dnd", "invisible")
MAX_TABS = 3


def _frame(op: str, d: object) -> str:
    return json.dumps({"op": op, "d": d}, separators=(",", ":"))


_FRAMES: dict[tuple[str, str, str], str] = {}


def _frame1(op: str, key: str, value: str) -> str:
    """``{"op":op,"d":{key:value}}``, encoded once per distinct frame."""
    text = _FRAMES.get((op, key, value))
    if text is None:
        text = _FRAMES[op, key, value] = _frame(op, {key: value})
    return text


class VirtualClient:
    def __init__(self, world: World, index: int, user: str, rng: random.Random) -> None:
        self.world = world
        self.index = index
        self.user = user
        self.rng = rng
        self.tabs: dict[Conn, None] = {}
        self.active = False
        self.gone = False
        self.opened = 0
        self.epoch = 0
        kind = rng.random()
        #: mean seconds between actions: lurkers, regulars, chatty users
        mean = 120.0 if kind < 0.35 else (60.0 if kind < 0.9 else 25.0)
        self.action_mean = mean / world.config.activity
        active = world.config.active_seconds
        self.arrive_at = rng.uniform(0.5, min(45.0, 0.25 * active))
        self.leave_at = active - rng.uniform(0.0, 20.0)
        faults = world.config.faults
        self.weights: list[tuple[str, float]] = [
            ("typing", 2.0),
            ("presence", 1.0),
            ("toggle", 1.5),
            ("tab", 0.4),
            ("close-tab", 0.4),
            ("away", 0.25),
            ("odd", 0.4),
        ]
        if DROP in faults:
            self.weights.append(("drop", 0.35))
        if SILENT in faults:
            self.weights.append(("silent", 0.08))
        if SLOW in faults:
            self.weights.append(("slow", 0.05))
        self._total_weight = sum(w for _, w in self.weights)

    # --- scheduling -------------------------------------------------------------------

    def start(self) -> None:
        loop = self.world.loop
        loop.call_at(self.arrive_at, self._arrive)
        loop.call_at(self.leave_at, self._leave)

    def _later(self, delay: float, callback: object, *args: object) -> None:
        self.world.loop.call_later(delay, callback, *args)  # type: ignore[arg-type]

    def _arrive(self) -> None:
        if self.gone or self.active:
            return
        self.active = True
        self.epoch += 1
        self._open_tab()
        self._later(self.rng.expovariate(1.0 / self.action_mean), self._act, self.epoch)

    def _leave(self) -> None:
        """Leave for good: every tab closes normally."""
        self.gone = True
        self.active = False
        for conn in list(self.tabs):
            self._close(conn, NORMAL)

    # --- connections ------------------------------------------------------------------

    def _open_tab(self) -> None:
        if not self.active or len(self.tabs) >= MAX_TABS:
            return
        world = self.world
        instance = world.pick_instance(self.rng)
        if instance is None:
            self._later(self.rng.uniform(1.0, 3.0), self._open_tab)
            return
        self.opened += 1
        conn = Conn(f"c{self.index}.{self.opened}", self, self.user, instance.id, world.now())
        conn.transport = MemoryTransport(world.loop, conn, world.config.transport_capacity)
        self.tabs[conn] = None
        world.checker.conn_opened(conn)
        world.accept(instance, conn)

    def _send(self, conn: Conn, text: str) -> None:
        assert conn.transport is not None
        conn.transport.client_send(text)

    def _close(self, conn: Conn, code: int) -> None:
        """This client ends the connection: a close (1000) or a drop (1006)."""
        self.world.checker.closed(conn, code, by_server=False)
        self._forget(conn)
        assert conn.transport is not None
        conn.transport.client_close(code)

    def _forget(self, conn: Conn) -> None:
        self.tabs.pop(conn, None)
        if conn.hb_timer is not None:
            conn.hb_timer.cancel()
            conn.hb_timer = None
        self.world.detach(conn)

    def on_frame(self, conn: Conn, text: str) -> None:
        op = self.world.checker.frame(conn, text)
        if op == "HELLO":
            self._identify(conn)
        elif op == "READY":
            for server in self.world.population.servers_of[self.user]:
                if self.rng.random() < 0.75:
                    self._subscribe(conn, server)

    def on_server_close(self, conn: Conn, code: int) -> None:
        self.world.checker.closed(conn, code, by_server=True)
        self._forget(conn)
        if self.active:
            backoff = self.rng.uniform(2.0, 10.0) if code == 4000 else self.rng.uniform(1.0, 6.0)
            self._later(backoff, self._reopen)

    def on_crash(self, conn: Conn) -> None:
        """The instance serving ``conn`` died (the checker already saw the close)."""
        self._forget(conn)
        if self.active:
            self._later(self.rng.uniform(0.5, 8.0), self._reopen)

    def _reopen(self) -> None:
        if (self.active and not self.tabs) or (self.active and self.rng.random() < 0.5):
            self._open_tab()

    # --- protocol ---------------------------------------------------------------------

    def _identify(self, conn: Conn) -> None:
        text = _frame1("IDENTIFY", "token", self.world.token(self.user))
        self.world.checker.sent_identify(conn, text)
        self._send(conn, text)
        interval = self.world.heartbeat_interval
        conn.hb_timer = self.world.loop.call_later(
            interval * self.rng.uniform(0.05, 0.9), self._heartbeat, conn
        )

    def _heartbeat(self, conn: Conn) -> None:
        conn.hb_timer = None
        if conn.state == CLOSED or conn.silent:
            return
        self.world.checker.sent_heartbeat(conn, HEARTBEAT_FRAME)
        self._send(conn, HEARTBEAT_FRAME)
        interval = self.world.heartbeat_interval
        conn.hb_timer = self.world.loop.call_later(
            interval * self.rng.uniform(0.8, 0.97), self._heartbeat, conn
        )

    def _subscribe(self, conn: Conn, server: str) -> None:
        text = _frame1("SUBSCRIBE_SERVER", "serverId", server)
        self.world.checker.sent_subscribe(conn, server, text)
        self._send(conn, text)

    def _unsubscribe(self, conn: Conn, server: str) -> None:
        text = _frame1("UNSUBSCRIBE_SERVER", "serverId", server)
        self.world.checker.sent_unsubscribe(conn, server, text)
        self._send(conn, text)

    def _typing(self, conn: Conn, channel: str) -> None:
        if conn.state != READY or conn.silent or conn.slow_at is not None:
            return
        text = _frame1("TYPING_START", "channelId", channel)
        self.world.checker.sent_typing(conn, channel, text)
        self._send(conn, text)

    # --- behaviour --------------------------------------------------------------------

    def _act(self, epoch: int) -> None:
        if not self.active or epoch != self.epoch:
            return
        rng = self.rng
        self._later(rng.expovariate(1.0 / self.action_mean), self._act, epoch)
        usable = [c for c in self.tabs if c.state == READY and not c.silent and c.slow_at is None]
        if not usable:
            if not self.tabs:
                self._open_tab()
            return
        conn = rng.choice(usable)
        pick = rng.random() * self._total_weight
        action = self.weights[-1][0]
        for name, weight in self.weights:
            pick -= weight
            if pick < 0:
                action = name
                break
        getattr(self, "_do_" + action.replace("-", "_"))(conn)

    def _do_typing(self, conn: Conn) -> None:
        rng, pop = self.rng, self.world.population
        subscribed = [s for s, st in conn.subs.items() if st == SUBSCRIBED]
        server = rng.choice(subscribed or pop.servers_of[self.user])
        readable = pop.readable(self.user, server)
        if readable and rng.random() < 0.85:
            channel = rng.choice(readable)
        else:
            channel = rng.choice(pop.channels_of[server])
        self._typing(conn, channel)
        at = 0.0
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # a client resends while typing
            at += rng.uniform(2.0, 7.0)
            self._later(at, self._typing, conn, channel)

    def _do_presence(self, conn: Conn) -> None:
        text = _frame1("PRESENCE_UPDATE", "status", self.rng.choice(STATUSES))
        self.world.checker.sent_presence(conn, text)
        self._send(conn, text)

    def _do_toggle(self, conn: Conn) -> None:
        server = self.rng.choice(self.world.population.servers_of[self.user])
        state = conn.subs.get(server, NONE)
        if state == NONE:
            self._subscribe(conn, server)
        elif state == SUBSCRIBED:
            self._unsubscribe(conn, server)

    def _do_odd(self, conn: Conn) -> None:
        """Requests with a defined refusal or a no-op answer (PROTOCOL 6, 7a)."""
        rng, pop = self.rng, self.world.population
        mine = self.world.checker.member_of[self.user]
        others = [s for s in rng.sample(pop.servers, min(8, len(pop.servers))) if s not in mine]
        choice = rng.randrange(6)
        if choice == 0 and others:
            self._subscribe(conn, others[0])  # FORBIDDEN
        elif choice == 1:
            self._subscribe(conn, UNKNOWN_SERVER)  # NOT_FOUND
        elif choice == 2:
            subscribed = [s for s, st in conn.subs.items() if st == SUBSCRIBED]
            if subscribed:
                self._subscribe(conn, rng.choice(subscribed))  # idempotent
        elif choice == 3:
            idle = [s for s in pop.servers_of[self.user] if conn.subs.get(s, NONE) == NONE]
            if idle:
                self._unsubscribe(conn, rng.choice(idle))  # UNSUBSCRIBED anyway
        elif choice == 4 and others:
            self._typing(conn, rng.choice(pop.channels_of[others[0]]))  # FORBIDDEN
        else:
            self._typing(conn, "c-unknown")  # NOT_FOUND

    def _do_tab(self, conn: Conn) -> None:
        self._open_tab()

    def _do_close_tab(self, conn: Conn) -> None:
        if len(self.tabs) >= 2:
            self._close(conn, NORMAL)

    def _do_away(self, conn: Conn) -> None:
        """Close every tab, come back later (if before leaving for good)."""
        back = self.rng.uniform(20.0, 120.0)
        self.active = False
        for tab in list(self.tabs):
            self._close(tab, NORMAL)
        if self.world.now() + back < self.leave_at - 5.0:
            self._later(back, self._arrive)

    def _do_drop(self, conn: Conn) -> None:
        self.world.faults.count(DROP)
        self.world.trace.event(conn.cid, "FAULT drop")
        self._close(conn, ABNORMAL)
        self._later(self.rng.uniform(1.0, 15.0), self._reopen)

    def _do_silent(self, conn: Conn) -> None:
        self.world.faults.count(SILENT)
        conn.silent = True
        self.world.checker.went_silent(conn)

    def _do_slow(self, conn: Conn) -> None:
        self.world.faults.count(SLOW)
        assert conn.transport is not None
        conn.transport.reading = False
        self.world.checker.stopped_reading(conn)
