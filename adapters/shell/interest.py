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
    # The lock exists only while an operation on the channel is under way (``users``
    # counts its holder and waiters): an idle channel costs three small fields.
    __slots__ = ("live", "lock", "refs", "users")

    def __init__(self) -> None:
        self.refs = 0
        self.live = False
        self.lock: anyio.Lock | None = None
        self.users = 0


class _Serialised:
    """Holds the channel's lock (made on first use; dropped when nobody needs it). A
    class, not a generator context manager: it is entered twice per handshake."""

    __slots__ = ("_lock", "_state")

    def __init__(self, state: _Channel) -> None:
        self._state = state
        if state.lock is None:
            state.lock = anyio.Lock(fast_acquire=True)  # uncontended: no loop trip
        self._lock = state.lock

    async def __aenter__(self) -> None:
        state = self._state
        state.users += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self._done()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
        self._done()

    def _done(self) -> None:
        state = self._state
        state.users -= 1
        if state.users == 0:
            state.lock = None


class ChannelInterest:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[str, _Channel] = {}

    def _serialised(self, state: _Channel) -> _Serialised:
        return _Serialised(state)

    async def acquire(self, channel: str) -> None:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        state.refs += 1
        if state.live and state.lock is None:
            return  # subscribed, and nothing under way: nothing to wait for
        try:
            async with self._serialised(state):
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
        async with self._serialised(state):
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
