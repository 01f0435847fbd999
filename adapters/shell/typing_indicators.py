"""Typing indicators (PROTOCOL section 7, "Typing").

TYPING_START needs READ_MESSAGES on the channel; the key ``typing:{channel}:{user}``
is claimed with NX and the typing TTL, and only a new claim is dispatched,
channel-scoped, to the channel's readers, excluding the typing user. Typing is best
effort: a backend hiccup drops the indicator, never the session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from adapters.deadline import fail_after
from adapters.shell.live import LiveSession, Work
from adapters.shell.metrics import Metrics
from adapters.shell.permissions import PermissionCache
from adapters.shell.publisher import BACKEND_ERRORS, Publisher
from domain import keys
from domain.codec import ErrorCode
from domain.effects import StartTyping
from domain.ports import Clock, TypingGate

log = logging.getLogger("gateway")


class TypingIndicators:
    def __init__(
        self,
        *,
        gate: TypingGate,
        permissions: PermissionCache,
        publisher: Publisher,
        clock: Clock,
        ttl_ms: int,
        backend_timeout: float,
        metrics: Metrics,
    ) -> None:
        self._gate = gate
        self._permissions = permissions
        self._publisher = publisher
        self._clock = clock
        self._ttl_ms = ttl_ms
        self._timeout = backend_timeout
        self._metrics = metrics

    async def start(self, live: LiveSession, effect: StartTyping) -> Sequence[Work]:
        session = live.session
        user = live.user
        assert user is not None
        channel_id = effect.channel_id
        try:
            with fail_after(self._timeout):
                channel = await self._permissions.channel(channel_id)
                if channel is None:
                    return session.refuse(ErrorCode.NOT_FOUND, "unknown channel", "TYPING_START")
                readers = await self._permissions.readers(channel.server_id, channel_id, (user.id,))
                if user.id not in readers:
                    return session.refuse(
                        ErrorCode.FORBIDDEN,
                        "missing READ_MESSAGES on this channel",
                        "TYPING_START",
                    )
                claimed = await self._gate.claim(keys.typing_key(channel_id, user.id), self._ttl_ms)
        except BACKEND_ERRORS as exc:
            self._metrics.backend_failures.labels("typing").inc()
            log.warning("typing failed, backend unavailable: %r", exc)
            # PROTOCOL 15: answered, never a close and never silent; the client may retry.
            return session.refuse(
                ErrorCode.UNAVAILABLE, "typing unavailable, retry", "TYPING_START"
            )
        if not claimed:
            return ()
        self._metrics.typing_dispatched.inc()
        event = {
            "op": "TYPING_START",
            "d": {
                "channelId": channel_id,
                "serverId": channel.server_id,
                "userId": user.id,
                "username": user.username,
                "timestamp": self._clock.wall_ms(),
            },
        }
        await self._publisher.publish_to_channel(
            channel_id, channel.server_id, event, exclude_user_id=user.id
        )
        return ()
