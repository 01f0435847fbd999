"""Publishing (PROTOCOL section 8): every event goes through the broker, so that it
reaches every instance, this one included."""

from __future__ import annotations

import logging
from typing import Any

from adapters.deadline import fail_after
from adapters.shell.metrics import Metrics
from domain import keys
from domain.codec import encode_envelope
from domain.model import ChannelId, ServerId, UserId
from domain.ports import BackendUnavailable, Broker

log = logging.getLogger("gateway")

BACKEND_ERRORS = (BackendUnavailable, TimeoutError, OSError)


class Publisher:
    def __init__(self, broker: Broker, metrics: Metrics, backend_timeout: float) -> None:
        self._broker = broker
        self._metrics = metrics
        self._timeout = backend_timeout

    async def publish_to_server(
        self, server_id: ServerId, event: dict[str, Any], exclude_user_id: UserId | None = None
    ) -> bool:
        return await self._publish(
            keys.server_channel(server_id), encode_envelope(event, None, exclude_user_id)
        )

    async def publish_to_channel(
        self,
        channel_id: ChannelId,
        server_id: ServerId,
        event: dict[str, Any],
        exclude_user_id: UserId | None = None,
    ) -> bool:
        return await self._publish(
            keys.server_channel(server_id), encode_envelope(event, channel_id, exclude_user_id)
        )

    async def publish_to_user(self, user_id: UserId, event: dict[str, Any]) -> bool:
        return await self._publish(keys.user_channel(user_id), encode_envelope(event))

    async def _publish(self, channel: str, payload: bytes) -> bool:
        """Publish; during a broker outage log, count and return False (never block)."""
        try:
            with fail_after(self._timeout):
                await self._broker.publish(channel, payload)
        except BACKEND_ERRORS as exc:
            self._metrics.publish_failures.inc()
            log.error("publish to %s failed: %r", channel, exc)
            return False
        return True
