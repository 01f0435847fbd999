"""``subscribe``/``unsubscribe`` of the Broker port, shared by the standalone and the
cluster broker: what the caller asked for (``_wanted``) survives reconnects, and
``subscribe`` returns once the channel is live on its connection.

A broker mixes this in and provides ``_sync(channel)`` (make its connection's last
command for the channel match ``_wanted``), ``_is_live(channel)`` and
``_check_open()``; the confirmation of a channel sets ``_events[channel]``.
"""

from __future__ import annotations

from collections import defaultdict

import anyio

from adapters.deadline import fail_after
from adapters.redis.subscriber import BrokerStats
from domain.ports import BackendUnavailable


class WantedChannels:
    #: Named in the timeout's message: what was not live ("broker", "shard").
    _live_what = "broker"

    _wanted: set[str]
    _events: dict[str, anyio.Event]
    _subscribing: defaultdict[str, int]
    _subscribe_timeout: float
    _write_timeout: float
    _closed: bool
    stats: BrokerStats

    async def _sync(self, channel: str) -> None:
        raise NotImplementedError

    def _is_live(self, channel: str) -> bool:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    async def subscribe(self, channel: str) -> None:
        self._check_open()
        if channel in self._wanted and self._is_live(channel):
            return
        added = channel not in self._wanted
        self._wanted.add(channel)
        event = self._events.get(channel)
        if event is None:
            event = self._events[channel] = anyio.Event()
        self._subscribing[channel] += 1
        done = False
        try:
            with fail_after(self._subscribe_timeout):
                await self._sync(channel)
                await event.wait()
            done = True
        except TimeoutError:
            self.stats.subscribe_timeouts += 1
            raise BackendUnavailable(
                f"subscribe {channel}: {self._live_what} not live within "
                f"{self._subscribe_timeout}s"
            ) from None
        finally:
            self._subscribing[channel] -= 1
            if not self._subscribing[channel]:
                del self._subscribing[channel]
                if not done:
                    self._events.pop(channel, None)  # nobody waits on it any more
                if not done and added and not self._closed:
                    # A subscribe that failed or was cancelled has no effect.
                    self._wanted.discard(channel)
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self._write_timeout):
                        await self._sync(channel)
        self._check_open()

    def _release_waiters(self) -> None:
        """Closing: every ``subscribe`` still waiting returns (and finds it closed)."""
        for event in self._events.values():
            event.set()
        self._events.clear()

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        event = self._events.pop(channel, None)
        if event is not None:
            event.set()  # a subscribe still waiting was superseded
        await self._sync(channel)
