"""Fan-out: one broker message to the queues of every local recipient.

The broker's reader runs :meth:`FanOut.on_message` for each message, in broker
order. The indexes of :mod:`adapters.shell.routing` say who is routed; the pure
rules of :mod:`domain.recipients` say who of them receives it; the dispatch is
encoded once and each session only stamps its own ``s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from adapters.deadline import fail_after
from adapters.shell.live import LiveSession
from adapters.shell.metrics import Metrics
from adapters.shell.permissions import MISS, PermissionCache
from adapters.shell.presence_interest import PresenceInterest
from adapters.shell.publisher import BACKEND_ERRORS
from adapters.shell.routing import Routes
from domain import keys, recipients
from domain.codec import Envelope, InvalidEnvelope, decode_envelope, dispatch_template
from domain.model import ServerId, UserId

log = logging.getLogger("gateway")


def _user_of(live: LiveSession) -> UserId | None:
    return live.session.user_id


class FanOut:
    def __init__(
        self,
        routes: Routes,
        permissions: PermissionCache,
        metrics: Metrics,
        backend_timeout: float,
        *,
        interest: PresenceInterest | None = None,
        large_server_members: int = 250,
    ) -> None:
        self._routes = routes
        self._interest = interest or PresenceInterest()
        self._large = large_server_members
        self._permissions = permissions
        self._metrics = metrics
        self._timeout = backend_timeout
        #: Internal messages (the RESUME handoff's) are taken out before the fan-out.
        self.intercept: Callable[[str, bytes], bool] | None = None

    async def on_message(self, channel: str, payload: bytes) -> None:
        metrics = self._metrics
        if self.intercept is not None and self.intercept(channel, payload):
            return
        metrics.hot.broker_messages += 1
        started = time.perf_counter()
        try:
            envelope = decode_envelope(payload)
        except InvalidEnvelope as exc:
            metrics.invalid_envelopes.inc()
            log.warning("dropped invalid envelope on %s: %s", channel, exc)
            return
        try:
            if channel.startswith(keys.SERVER_CHANNEL_PREFIX):
                await self._to_server(channel[len(keys.SERVER_CHANNEL_PREFIX) :], envelope)
            elif channel.startswith(keys.USER_CHANNEL_PREFIX):
                routed = self._routes.by_user.get(channel[len(keys.USER_CHANNEL_PREFIX) :])
                if routed:
                    self._deliver(routed, envelope)
        except BACKEND_ERRORS as exc:
            metrics.backend_failures.labels("fanout").inc()
            log.error("fan-out on %s failed: %r", channel, exc)
        metrics.hot.observe_fanout(time.perf_counter() - started)

    def _deliver(self, targets: Collection[LiveSession], envelope: Envelope) -> None:
        template = dispatch_template(envelope.op, envelope.d)
        delivered = 0
        for live in targets:
            if live.deliver(template):
                delivered += 1
        self._metrics.hot.deliveries += delivered

    async def _is_large(self, server_id: ServerId) -> bool:
        """A large server (PROTOCOL 14), from the cached context; when the directory
        cannot say, the event goes to every subscriber (more, never fewer)."""
        context = self._permissions.cached_server(server_id)
        if context is MISS:  # the directory is asked (no deadline without a call)
            try:
                with fail_after(self._timeout):
                    context = await self._permissions.server(server_id)
            except BACKEND_ERRORS as exc:
                self._metrics.backend_failures.labels("fanout").inc()
                log.warning("fan-out: size of %s unknown, presence to all: %r", server_id, exc)
                return False
        return context is not None and context.server.is_large(self._large)

    async def _to_server(self, server_id: ServerId, envelope: Envelope) -> None:
        if recipients.invalidates_permissions(envelope):
            self._permissions.invalidate_server(server_id)
        removed = recipients.removed_member(envelope)
        if removed is not None:
            self._permissions.invalidate_member(server_id, removed)
        routed = self._routes.by_server.get(server_id)
        if routed:
            readers = None
            exclude = envelope.exclude_user_id
            if envelope.channel_id is not None:
                candidates = recipients.reader_candidates(map(_user_of, routed), exclude)
                readers = self._permissions.cached_readers(
                    server_id, envelope.channel_id, candidates
                )
                if readers is None:
                    with fail_after(self._timeout):
                        readers = await self._permissions.readers(
                            server_id, envelope.channel_id, candidates
                        )
            targets = recipients.recipients(routed, _user_of, exclude, readers)
            subject = recipients.presence_subject(envelope)
            if subject is not None and await self._is_large(server_id):
                targets = recipients.presence_recipients(
                    targets,
                    self._interest.interested(server_id, subject),
                    self._routes.by_user.get(subject, ()),
                )
            self._deliver(targets, envelope)
        if removed is not None:
            # Delivered first, then UNSUBSCRIBED, then nothing more from the server (7a).
            for live in list(self._routes.by_user.get(removed, ())):
                outlet = live.outlet
                if outlet is not None and server_id in live.session.subscriptions:
                    await outlet.perform(live.session.unsubscribe(server_id))
