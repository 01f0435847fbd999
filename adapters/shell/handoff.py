"""Handoff: a RESUME on this instance of a session held by another (PROTOCOL 13).

Internal broker channels: ``gw:resume`` (every instance listens; a request names
the session) and ``gw:instance:{id}`` (one instance's answers). The seam, for a
session S owned by A and resumed on B:

1. B publishes ``ask`` {sid, user, seq} on ``gw:resume``. A, if it holds S for that
   user, can replay from ``seq`` and no other RESUME of S is under way, claims S (a
   zombie's connection is closed 4014 and S parks) and answers ``offer`` with S's
   subscriptions and its presence interest (PROTOCOL 14; B installs it before any
   marker, so the client need not SUBSCRIBE_PRESENCE again); every other live
   instance answers ``absent`` (``Peers``: who is alive, from their ``here``
   announcements). Every live instance absent (unknown session), or no answer within
   the backend timeout: INVALID_SESSION.
2. B makes its own parked copy of S, opens its presence session (the session id moves
   to B in the store: no flap), subscribes the broker to S's channels (``ws:user:``,
   each ``ws:server:``) and, once live, publishes a ``marker`` on each of them.
3. A channel's messages reach every subscriber in publish order, so a marker cuts
   that channel at the same point on both sides: on A, everything before it was kept
   by S and its route is dropped there; on B, the route starts there and S keeps
   what follows (numbered from 1 until A's count is known).
4. Once A saw every marker it ships ``frames`` {next s, kept frames} and lets S go
   (no presence close: B holds the presence session now). B puts A's frames first,
   renumbers its own after them, and the RESUME proceeds as a local one: replay
   ``s > seq``, RESUMED, live. Nothing is both replayed and delivered, nothing lost.
   If the frames do not come in time B releases its copy and answers
   INVALID_SESSION (never a partial replay).

The rate-limit window goes along as the ages of its stamps (clocks differ between
processes; ages do not), so a RESUME elsewhere never resets it (PROTOCOL 13).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.abc

from adapters.shell.live import LiveSession
from adapters.shell.peers import ANNOUNCE_S, Peers
from adapters.shell.presence import PresenceKeeper
from adapters.shell.presence_interest import PresenceInterest
from adapters.shell.publisher import BACKEND_ERRORS
from adapters.shell.resume import Resumer
from adapters.shell.routing import Routes
from domain import keys
from domain.codec import DispatchTemplate
from domain.model import InstanceId, Server, SessionId, User
from domain.ports import Broker, Clock
from domain.resume import arrive, hand_in
from domain.session import Session, SessionConfig, State

log = logging.getLogger("gateway")

RESUME_CHANNEL = "gw:resume"
_MARKER = b'{"gw":"marker"'


def instance_channel(instance_id: InstanceId) -> str:
    return "gw:instance:" + instance_id


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


async def _at_once(*calls: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Run the calls concurrently; a failure is raised as itself, not as a group (the
    callers catch backend errors by type)."""
    try:
        async with anyio.create_task_group() as tasks:
            for call in calls:
                tasks.start_soon(call)
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from group


def _channels(live: LiveSession) -> set[str]:
    user_id = live.session.user_id
    assert user_id is not None
    return {keys.user_channel(user_id), *map(keys.server_channel, live.session.subscriptions)}


@dataclass
class _Outgoing:
    """A: S is being handed to ``reply``; ``waiting``: channels whose marker is due."""

    live: LiveSession
    reply: str
    waiting: set[str]


@dataclass
class _Incoming:
    """B: what it waits for from the owner."""

    offer: anyio.Event = field(default_factory=anyio.Event)
    accepted: bool = False
    frames: anyio.Event = field(default_factory=anyio.Event)
    subscriptions: list[str] = field(default_factory=list)
    interest: object = None  # the offer's presence interest (PROTOCOL 14), unchecked
    shipped: dict[str, Any] = field(default_factory=dict)
    live: LiveSession | None = None
    waiting: set[str] = field(default_factory=set)
    #: The instances that answered they do not hold the session, and a wake-up for
    #: every answer.
    absent: set[str] = field(default_factory=set)
    news: anyio.Event = field(default_factory=anyio.Event)


class Handoff:
    def __init__(
        self,
        *,
        broker: Broker,
        routes: Routes,
        resumer: Resumer,
        keeper: PresenceKeeper,
        interest: PresenceInterest,
        instance_id: InstanceId,
        clock: Clock,
        config: SessionConfig,
        timeout: float,
        ask_timeout: float,
    ) -> None:
        self._broker = broker
        self._routes = routes
        self._resumer = resumer
        self._keeper = keeper
        self._me = instance_id
        self._interest = interest
        self._mine = instance_channel(instance_id)
        self.peers = Peers(instance_id)
        self._clock = clock
        self._config = config
        self._timeout = timeout
        self._ask_timeout = ask_timeout
        self._tasks: anyio.abc.TaskGroup | None = None
        self._outgoing: dict[str, _Outgoing] = {}
        self._incoming: dict[str, _Incoming] = {}

    async def start(self, tasks: anyio.abc.TaskGroup) -> None:
        """Listen, then say ``here`` every ANNOUNCE_S until cancelled, then ``gone``."""
        self._tasks = tasks
        for channel in (RESUME_CHANNEL, self._mine):
            try:
                await self._routes.interest.acquire(channel)
            except BACKEND_ERRORS as exc:
                log.warning("handoff: could not subscribe %s: %r", channel, exc)
        try:
            while True:
                await self._publish(RESUME_CHANNEL, _dumps({"gw": "here", "id": self._me}))
                await anyio.sleep(ANNOUNCE_S)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(0.5):
                await self._publish(RESUME_CHANNEL, _dumps({"gw": "gone", "id": self._me}))

    def _publish_soon(self, channel: str, doc: dict[str, Any]) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(self._publish, channel, _dumps(doc))

    async def _publish(self, channel: str, payload: bytes) -> None:
        try:
            await self._broker.publish(channel, payload)
        except BACKEND_ERRORS as exc:
            log.warning("handoff: publish on %s failed: %r", channel, exc)

    # --- the broker's messages (run by the reader, in broker order) -----------------

    def intercept(self, channel: str, payload: bytes) -> bool:
        """True when the message is the handoff's (the fan-out then ignores it)."""
        if channel in (RESUME_CHANNEL, self._mine):
            try:
                doc = json.loads(payload)
                kind = doc["gw"]
                if kind == "here":
                    peer, now = str(doc["id"]), self._clock.monotonic()
                    if peer != self._me and not self.peers.is_alive(peer, now):
                        # A newcomer (or one back): let it know us now, not in a second.
                        self._publish_soon(RESUME_CHANNEL, {"gw": "here", "id": self._me})
                    self.peers.heard(peer, now)
                elif kind == "gone":
                    self.peers.gone(str(doc["id"]))
                elif kind == "ask":
                    self._asked(doc)
                elif doc.get("nonce") in self._incoming:
                    self._answered(kind, doc)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("handoff: bad message on %s: %r", channel, exc)
            return True
        if not payload.startswith(_MARKER):
            return False
        try:
            nonce = json.loads(payload)["nonce"]
        except (ValueError, KeyError, TypeError):
            return True
        if nonce in self._outgoing:
            self._marker_at_owner(nonce, channel)
        incoming = self._incoming.get(nonce)
        if incoming is not None and incoming.live is not None:
            self._marker_here(incoming, channel)
        return True

    def _asked(self, doc: dict[str, Any]) -> None:
        sid, user_id, seq = str(doc["sid"]), str(doc["user"]), int(doc["seq"])
        live = self._resumer.sessions.get(sid)
        reply = str(doc["reply"])
        if live is None:  # not ours: say so, the asker need not wait for us
            self._publish_soon(reply, {"gw": "absent", "nonce": doc["nonce"], "id": self._me})
            return
        if not self._resumer.claim_for_handoff(live, user_id, seq):
            self._publish_soon(reply, {"gw": "refuse", "nonce": doc["nonce"]})
            return
        self._outgoing[doc["nonce"]] = _Outgoing(live, reply, _channels(live))
        subs = sorted(live.session.subscriptions)
        offer = {"gw": "offer", "nonce": doc["nonce"], "subs": subs}
        self._publish_soon(reply, {**offer, "interest": self._interest.of(live)})  # S claimed

    def _marker_at_owner(self, nonce: str, channel: str) -> None:
        out = self._outgoing[nonce]
        live = out.live
        if channel not in out.waiting:
            return
        out.waiting.discard(channel)
        if channel.startswith(keys.SERVER_CHANNEL_PREFIX):
            self._routes.unroute(live, channel[len(keys.SERVER_CHANNEL_PREFIX) :])
        elif self._tasks is not None:  # the user channel: its route goes now
            user_id = live.session.user_id or ""
            routed = self._routes.by_user.get(user_id)
            if routed is not None:
                routed.discard(live)
                if not routed:
                    del self._routes.by_user[user_id]
            if live.user_routed:
                live.user_routed = False
                self._tasks.start_soon(self._routes.interest.release, channel)
        if out.waiting:
            return
        # Every channel is cut: ship what S kept and let it go (B holds its presence).
        del self._outgoing[nonce]
        if live not in self._resumer.parked:  # it ended meanwhile (TTL): B times out
            return
        session = live.session
        now = self._clock.monotonic()
        frames = [[s, t.op, t.head] for s, t in session.replay.items()]
        shipped = {
            "gw": "frames",
            "nonce": nonce,
            "next": session.seq + 1,
            "parkedFrom": session.replay.parked_from,
            "frames": frames,
            "rateAges": [now - stamp for stamp in session.rate.stamps],
        }
        live.presence_open = False
        session.state = State.CLOSED
        self._resumer.handed_off(live)
        self._publish_soon(out.reply, shipped)

    def _answered(self, kind: str, doc: dict[str, Any]) -> None:
        incoming = self._incoming[doc["nonce"]]
        incoming.news.set()
        if kind == "absent":
            incoming.absent.add(str(doc["id"]))
        elif kind == "offer":
            incoming.subscriptions = [str(s) for s in doc["subs"]]
            incoming.interest = doc.get("interest")
            incoming.accepted = True
            incoming.offer.set()
        elif kind == "refuse":
            incoming.offer.set()
        elif kind == "frames":
            incoming.shipped = doc
            incoming.frames.set()

    def _marker_here(self, incoming: _Incoming, channel: str) -> None:
        live = incoming.live
        assert live is not None
        if channel not in incoming.waiting:
            return
        incoming.waiting.discard(channel)
        if channel.startswith(keys.SERVER_CHANNEL_PREFIX):
            self._routes.add_route(live, channel[len(keys.SERVER_CHANNEL_PREFIX) :])
        else:
            user_id = live.session.user_id or ""
            self._routes.by_user.setdefault(user_id, set()).add(live)

    # --- B: take a session over from its owner -------------------------------------

    async def take(
        self, sid: SessionId, user: User, servers: list[Server], seq: int
    ) -> LiveSession | None:
        """The session, parked here with everything its owner kept; None: refused."""
        nonce = uuid.uuid4().hex
        incoming = self._incoming[nonce] = _Incoming()
        try:
            ask = {
                "gw": "ask",
                "nonce": nonce,
                "sid": sid,
                "user": user.id,
                "seq": seq,
                "reply": self._mine,
            }
            # Known peers: wait for each live one's answer (a slow owner is waited for,
            # up to the backend timeout). None known yet: the owner's answer, briefly.
            expected = self.peers.alive(self._clock.monotonic())
            with anyio.move_on_after(self._timeout if expected else self._ask_timeout):
                await self._broker.publish(RESUME_CHANNEL, _dumps(ask))
                while not incoming.offer.is_set():
                    if expected and not self._unanswered(expected, incoming):
                        break  # every live instance said it does not hold the session
                    with anyio.move_on_after(ANNOUNCE_S / 2):  # and re-check who lives
                        await incoming.news.wait()
                    incoming.news = anyio.Event()
            if not incoming.accepted:
                return None  # refused, or no owner answered (unknown, dead instance)
            return await self._arrive(nonce, incoming, sid, user, servers)
        except BACKEND_ERRORS as exc:
            log.warning("handoff of %s failed: %r", sid, exc)
            return None
        finally:
            del self._incoming[nonce]

    def _unanswered(self, expected: set[str], incoming: _Incoming) -> set[str]:
        now = self._clock.monotonic()
        return {p for p in expected - incoming.absent if self.peers.is_alive(p, now)}

    async def _arrive(
        self, nonce: str, incoming: _Incoming, sid: SessionId, user: User, servers: list[Server]
    ) -> LiveSession | None:
        live = LiveSession(Session(sid, self._config, self._clock.monotonic()))
        arrive(live.session, user.id, incoming.subscriptions, self._clock.monotonic())
        live.user, live.servers = user, tuple(servers)
        held: list[str] = []  # the channels this copy holds interest in, to release
        self._interest.install(live, incoming.interest, incoming.subscriptions)  # pre-marker
        ok = False

        async def hold(channel: str) -> None:
            await self._routes.interest.acquire(channel)  # releases itself on failure
            held.append(channel)

        try:
            with anyio.move_on_after(self._timeout):
                # Independent round trips, at once: the SUBSCRIBEs of one tick go as
                # one command, and a storm of RESUMEs is not paced by their sum.
                await _at_once(
                    partial(self._keeper.open, live, user.id),
                    *(partial(hold, channel) for channel in sorted(_channels(live))),
                )
                live.user_routed = True
                incoming.live = live
                incoming.waiting = _channels(live)
                marker = _dumps({"gw": "marker", "nonce": nonce})
                await _at_once(
                    *(partial(self._broker.publish, c, marker) for c in sorted(incoming.waiting))
                )
                await incoming.frames.wait()
                ok = True
        finally:
            if not ok:
                with anyio.CancelScope(shield=True):
                    await self._abandon(live, incoming, held)
        if not ok:
            return None
        shipped = incoming.shipped
        earlier = [
            (int(s), DispatchTemplate(str(op), str(head))) for s, op, head in shipped["frames"]
        ]
        now = self._clock.monotonic()
        rate = tuple(now - float(age) for age in shipped.get("rateAges", ()))
        hand_in(live.session, earlier, int(shipped["next"]), shipped.get("parkedFrom"), rate)
        return live

    async def _abandon(self, live: LiveSession, incoming: _Incoming, held: list[str]) -> None:
        """The owner did not ship in time: release what this copy took, and only that
        (releasing a channel it never held would take another session's interest)."""
        self._interest.drop_all(live)
        for server_id in incoming.subscriptions:
            self._routes.drop_route(live, server_id)
        user_id = live.session.user_id or ""
        routed = self._routes.by_user.get(user_id)
        if routed is not None:
            routed.discard(live)
            if not routed:
                del self._routes.by_user[user_id]
        live.user_routed = False
        for channel in held:
            await self._routes.interest.release(channel)
        await self._keeper.close(live, user_id)
        live.session.state = State.CLOSED
