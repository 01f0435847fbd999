"""Reference-counted broker subscriptions of one instance.

The broker subscribes a channel when the first local connection needs it and
unsubscribes when the last one leaves. Operations on one channel are serialised by a
lock, so an interleaving of acquire and release always ends with the broker
subscribed exactly when the count is positive; every ``acquire`` returns only once
the subscription is confirmed live.
"""

from __future__ import annotations

import contextlib

import anyio

from domain.ports import Broker


class _Channel:
    __slots__ = ("live", "lock", "refs")

    def __init__(self) -> None:
        self.refs = 0
        self.live = False
        self.lock = anyio.Lock()


class ChannelInterest:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[str, _Channel] = {}

    async def acquire(self, channel: str) -> None:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        state.refs += 1
        try:
            async with state.lock:
                if not state.live:
                    await self._broker.subscribe(channel)
                    state.live = True
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(channel)
            raise

    async def release(self, channel: str) -> None:
        state = self._channels.get(channel)
        if state is None or state.refs <= 0:
            return
        state.refs -= 1
        if state.refs:
            return
        async with state.lock:
            if state.refs == 0 and state.live:
                state.live = False
                # The broker resubscribes only live channels after an outage.
                with contextlib.suppress(Exception):
                    await self._broker.unsubscribe(channel)
            if state.refs == 0 and self._channels.get(channel) is state:
                del self._channels[channel]

    def channels(self) -> dict[str, int]:
        """Channel -> local reference count (leak checks and metrics)."""
        return {c: s.refs for c, s in self._channels.items() if s.refs}
