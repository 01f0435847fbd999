"""What the simulation knows about each connection and each published event.

The model is built only from what clients sent and observed and from what the
simulation itself did (publishes, faults): never from the gateway's internal state.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from domain.model import ChannelId, InstanceId, ServerId, UserId

if TYPE_CHECKING:
    import asyncio

    from simulation.clients import VirtualClient
    from simulation.transport import MemoryTransport

# Subscription state of one (connection, server), from the client's side.
NONE = 0
PENDING_SUB = 1  # SUBSCRIBE sent, SUBSCRIBED not yet seen: events may arrive
SUBSCRIBED = 2  # SUBSCRIBED seen: every event for the server must arrive
PENDING_UNSUB = 3  # UNSUBSCRIBE sent: events may still arrive until UNSUBSCRIBED

# Connection states, from the client's side.
CONNECTING = "connecting"  # waiting for HELLO
IDENTIFYING = "identifying"  # IDENTIFY sent
READY = "ready"  # READY seen
CLOSED = "closed"


class Record:
    """One message that reached the broker, with what it should look like to a client.

    ``head`` is the dispatch frame up to its ``s`` (``{"op":..,"d":..,"s":``); the
    frame a connection receives is ``head + str(s) + "}"``. ``horizon`` is the latest
    time it may reach a client (publish time + the declared link latency)."""

    __slots__ = ("channel", "head", "horizon", "no", "op", "p", "presence", "server", "typing")

    def __init__(
        self,
        no: int,
        op: str,
        head: str,
        p: float,
        latency: float,
        server: ServerId | None,
        channel: ChannelId | None,
    ) -> None:
        self.no = no
        self.op = op
        self.head = head
        self.p = p
        self.horizon = p + latency
        self.server = server
        self.channel = channel
        #: (user, status) of a PRESENCE_UPDATE
        self.presence: tuple[UserId, str] | None = None
        #: (channel, user, timestamp) of a TYPING_START
        self.typing: tuple[str, str, int] | None = None

    def describe(self) -> str:
        return f"#{self.no} {self.head}… published at t={self.p:.6f}"


class Conn:
    """One client connection (a tab), as its client sees it."""

    __slots__ = (
        "cid",
        "close_code",
        "closed_at",
        "expected",
        "flagged",
        "hb_timer",
        "identify_at",
        "instance_id",
        "key",
        "last_hb",
        "next_s",
        "opened_at",
        "owner",
        "recent",
        "replies",
        "session_id",
        "silent",
        "skipped",
        "slow_at",
        "slow_last",
        "slow_musts",
        "state",
        "subs",
        "transport",
        "user",
    )

    def __init__(
        self, cid: str, owner: VirtualClient, user: UserId, instance_id: InstanceId, now: float
    ) -> None:
        self.cid = cid
        #: a number for the checker process (simulation.offload), unique in a run
        self.key = 0
        self.owner = owner
        self.user = user
        self.instance_id = instance_id
        self.transport: MemoryTransport | None = None
        self.state = CONNECTING
        self.opened_at = now
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.session_id: str | None = None
        self.identify_at: float | None = None
        self.last_hb = now  # the heartbeat timeout runs from connect until the first one
        self.next_s = 1
        self.subs: dict[ServerId, int] = {}
        #: events this connection should (True) or may (False) still receive, in order;
        #: None: may only if the directory failed before its horizon (checked on arrival)
        self.expected: deque[tuple[Record, bool | None]] = deque()
        self.recent: deque[tuple[str, int]] = deque(maxlen=16)  # (head, record) received
        self.skipped: deque[str] = deque(maxlen=16)  # heads given up on lately
        #: replies owed, in order: (expected reply, optional, time the command was sent)
        self.replies: deque[tuple[str, bool, float]] = deque()
        self.silent = False
        self.slow_at: float | None = None
        self.slow_musts = 0
        self.slow_last = 0.0
        self.hb_timer: asyncio.TimerHandle | None = None
        self.flagged: set[str] = set()  # invariants already reported for this connection

    @property
    def open(self) -> bool:
        return self.state is not CLOSED

    # Peer (simulation.transport): frames go to the client that owns the connection.
    def on_frame(self, text: str) -> None:
        self.owner.on_frame(self, text)

    def on_server_close(self, code: int) -> None:
        self.owner.on_server_close(self, code)

    def __repr__(self) -> str:
        return f"<Conn {self.cid} {self.user}@{self.instance_id} {self.state}>"
