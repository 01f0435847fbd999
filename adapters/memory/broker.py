"""Pub/sub in memory with Redis semantics: at most once, per-channel fan-out, and a
switchable outage during which publishes fail and messages are lost."""

from __future__ import annotations

import math

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from domain.ports import BackendUnavailable, MessageHandler


class MemoryBrokerNetwork:
    """The shared "Redis server": every instance's :class:`MemoryBroker` connects here."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[MemoryBroker]] = {}
        self.down = False
        self.published = 0
        self.dropped_during_outage = 0

    def client(self) -> MemoryBroker:
        return MemoryBroker(self)

    def publish(self, channel: str, payload: bytes) -> int:
        if self.down:
            raise BackendUnavailable("broker unavailable")
        self.published += 1
        receivers = self._subscribers.get(channel, ())
        for broker in receivers:
            broker._deliver(channel, payload)
        return len(receivers)

    def channels(self) -> dict[str, int]:
        """Channels with at least one subscribed instance (leak checks)."""
        return {c: len(s) for c, s in self._subscribers.items() if s}

    def _add(self, channel: str, broker: MemoryBroker) -> None:
        self._subscribers.setdefault(channel, set()).add(broker)

    def _remove(self, channel: str, broker: MemoryBroker) -> None:
        subs = self._subscribers.get(channel)
        if subs is not None:
            subs.discard(broker)
            if not subs:
                del self._subscribers[channel]


class MemoryBroker:
    """One instance's connection to a :class:`MemoryBrokerNetwork`."""

    def __init__(self, network: MemoryBrokerNetwork) -> None:
        self._network = network
        self._channels: set[str] = set()
        self._send: MemoryObjectSendStream[tuple[str, bytes]]
        self._receive: MemoryObjectReceiveStream[tuple[str, bytes]]
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, bytes]](math.inf)
        self.closed = False

    def _deliver(self, channel: str, payload: bytes) -> None:
        if not self.closed:
            self._send.send_nowait((channel, payload))

    async def publish(self, channel: str, payload: bytes) -> None:
        self._network.publish(channel, payload)

    async def subscribe(self, channel: str) -> None:
        if self._network.down:
            raise BackendUnavailable("broker unavailable")
        self._channels.add(channel)
        self._network._add(channel, self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        self._network._remove(channel, self)

    async def run(self, handler: MessageHandler) -> None:
        async for channel, payload in self._receive:
            await handler(channel, payload)

    def is_healthy(self) -> bool:
        return not self._network.down and not self.closed

    def close(self) -> None:
        """Drop off the network as a crashed instance would (no unsubscribes sent)."""
        self.closed = True
        for channel in list(self._channels):
            self._network._remove(channel, self)
        self._channels.clear()
        self._send.close()

    @property
    def subscribed_channels(self) -> frozenset[str]:
        return frozenset(self._channels)
