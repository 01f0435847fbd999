"""Redis Cluster's side of sharded pub/sub, without the broker: the slot map, and
what one shard's subscriber connection is known to have applied
(see :mod:`adapters.redis.cluster` for the theory of operation).

Replies on a shard connection
-----------------------------
Redis answers a command on one connection in order: an ``SSUBSCRIBE a b`` with one
``ssubscribe`` confirmation per channel, or with one error (``MOVED``: the slot is
not this node's; ``CLUSTERDOWN``) for the whole command; a ``PING`` with a ``pong``.
:class:`ShardSession` keeps the commands awaiting their replies in order
(``expect``), so an error names the channels it refused. One reply comes unasked:
when a slot leaves the node (``CLUSTER SETSLOT ... NODE``, a failover), the server
sends ``sunsubscribe`` for each of its channels; the broker subscribes them again
where the slot now lives.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from redis.crc import key_slot

from adapters.redis.subscriber import SubscriberSession

SLOTS = 16384

SUBSCRIBE = b"ssubscribe"
UNSUBSCRIBE = b"sunsubscribe"
PING = b"pong"


def channel_slot(channel: str) -> int:
    """The hash slot of a channel (hash tags included, as for keys)."""
    return key_slot(channel.encode())


def node_url(url: str, address: str) -> str:
    """``url`` (credentials, options) pointed at ``address`` (``host:port``), db 0."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{address}" if auth else address
    return urlunsplit((parts.scheme, netloc, "/0", parts.query, ""))


def url_address(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"


@dataclass(frozen=True)
class SlotMap:
    """Which master serves each slot: sorted ranges (first, last, ``host:port``)."""

    ranges: tuple[tuple[int, int, str], ...]

    @classmethod
    def parse(cls, reply: object) -> SlotMap:
        """From a ``CLUSTER SLOTS`` reply (each entry: first, last, master, replicas)."""
        if not isinstance(reply, list):
            raise TypeError(f"unexpected CLUSTER SLOTS reply {reply!r}")
        ranges = []
        for entry in reply:
            first, last, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            ranges.append((int(first), int(last), f"{host}:{int(master[1])}"))
        return cls(tuple(sorted(ranges)))

    def owner(self, slot: int) -> str | None:
        i = bisect.bisect_right(self.ranges, (slot, SLOTS, "\uffff")) - 1
        if i >= 0:
            first, last, address = self.ranges[i]
            if first <= slot <= last:
                return address
        return None

    def masters(self) -> frozenset[str]:
        return frozenset(address for _, _, address in self.ranges)

    def moved(self, slot: int, address: str) -> SlotMap:
        """This map with ``slot`` served by ``address`` (what a MOVED reply says)."""
        ranges: list[tuple[int, int, str]] = []
        for first, last, owner in self.ranges:
            if first <= slot <= last:
                if first < slot:
                    ranges.append((first, slot - 1, owner))
                if slot < last:
                    ranges.append((slot + 1, last, owner))
            else:
                ranges.append((first, last, owner))
        ranges.append((slot, slot, address))
        return SlotMap(tuple(sorted(ranges)))


@dataclass
class Pending:
    """One command awaiting its replies: ``left`` confirmations (or one error)."""

    kind: bytes
    channels: list[str]
    left: int


@dataclass(eq=False)
class ShardSession(SubscriberSession):
    """One master's subscriber connection; ``sent``/``pending``/``live`` as in
    :class:`SubscriberSession`, plus the commands awaiting replies, in order."""

    address: str = ""
    expect: deque[Pending] = field(default_factory=deque)

    def sent_command(self, kind: bytes, channels: list[str]) -> None:
        self.expect.append(Pending(kind, channels, max(1, len(channels))))

    def on_confirmation(self, kind: bytes, channel: str) -> str:
        """A confirmation of ``kind`` for ``channel``: "live" when it made the channel
        live, "dropped" when the server unsubscribed it unasked (the slot left this
        node), "" otherwise."""
        head = self.expect[0] if self.expect else None
        if head is not None and head.kind == kind and channel in head.channels:
            head.left -= 1
            if head.left <= 0:
                self.expect.popleft()
            return "live" if self.confirmed(channel) else ""
        if kind == UNSUBSCRIBE:
            self.sent.pop(channel, None)
            self.live.discard(channel)
            return "dropped"
        return ""

    def on_pong(self) -> None:
        if self.expect and self.expect[0].kind == PING:
            self.expect.popleft()

    def on_error(self) -> list[str]:
        """The oldest command awaiting a reply was refused: its channels (none of it
        applied; a channel with no later command in flight is not subscribed)."""
        if not self.expect or self.expect[0].kind == PING:
            return []
        head = self.expect.popleft()
        for channel in head.channels:
            left = self.pending[channel] - 1
            if left > 0:
                self.pending[channel] = left
                continue
            del self.pending[channel]
            self.sent.pop(channel, None)
            self.live.discard(channel)
        return head.channels
