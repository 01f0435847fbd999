"""``POST /api/publish``: the HTTP publish API of PROTOCOL section 8.

For services with no Redis client and no Python. The body is a publish envelope plus
exactly one target::

    {"serverId": "s1", "event": {"op": "X", "d": {...}}, "channelId": null, "excludeUserId": null}
    {"userId": "u1", "event": {"op": "X", "d": {...}}}

It is published through the gateway's Python API (``publish_to_server``,
``publish_to_channel``, ``publish_to_user``), hence through the configured broker.

Answers: 202 ``{}``; 400 ``{"error"}`` for a body that is not such an object (the
envelope rules of the domain codec, plus exactly one of serverId/userId); 401 without
the right bearer key (compared in constant time); 413 over the size cap (Content-Length
first, then a streamed count: an unbounded body is never read); 404 when the API is off
(no ``GATEWAY_API_KEY`` outside development mode); 503 when the broker refused the
publish. The key and the Authorization header are never logged.
"""

from __future__ import annotations

import hmac
import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters.shell import Gateway
from domain.codec import InvalidEnvelope, decode_publish_request
from entrypoints.config import Config

log = logging.getLogger("gateway.http_api")

#: Bodies larger than this are refused with 413 (PROTOCOL section 8: 64 KiB).
MAX_BODY_BYTES = 65_536


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


def _authorized(request: Request, key: bytes) -> bool:
    header = request.headers.get("authorization")
    if header is None:
        return False
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Starlette decodes header values as latin-1: back to the bytes that were sent.
    given = credentials.strip().encode("latin-1", errors="replace")
    return hmac.compare_digest(given, key)


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ValueError("Content-Length is not a number")
        if int(declared) > limit:
            raise _TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


class PublishEndpoint:
    """The ASGI endpoint; ``api_key`` None turns the API off (404)."""

    def __init__(self, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._key = api_key.encode("utf-8") if api_key else None
        self._max = max_body_bytes

    async def handle(self, request: Request) -> Response:
        if self._key is None:
            return _error(404, "the HTTP publish API is off: set GATEWAY_API_KEY")
        if not _authorized(request, self._key):
            return _error(
                401,
                "missing or wrong API key (Authorization: Bearer <GATEWAY_API_KEY>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = await _read_capped(request, self._max)
        except _TooLarge:
            return _error(413, f"body larger than {self._max} bytes")
        except ValueError as exc:
            return _error(400, str(exc))
        except ClientDisconnect:
            return _error(400, "the client went away before the body ended")
        try:
            publish = decode_publish_request(body)
        except InvalidEnvelope as exc:
            return _error(400, f"invalid body: {exc}")
        gateway: Gateway = request.app.state.gateway
        envelope = publish.envelope
        event = {"op": envelope.op, "d": envelope.d}
        if publish.user_id is not None:
            ok = await gateway.publish_to_user(publish.user_id, event)
        elif envelope.channel_id is not None:
            assert publish.server_id is not None
            ok = await gateway.publish_to_channel(
                envelope.channel_id, publish.server_id, event, envelope.exclude_user_id
            )
        else:
            assert publish.server_id is not None
            ok = await gateway.publish_to_server(publish.server_id, event, envelope.exclude_user_id)
        if not ok:
            return _error(503, "the broker is unavailable; nothing was published")
        return JSONResponse({}, status_code=202)


def publish_route(config: Config) -> Route:
    """The route for ``create_app``; says at start when the development key is used."""
    key = config.effective_api_key()
    if key is not None and not config.api_key:
        log.warning(
            "GATEWAY_API_KEY is not set: POST /api/publish accepts the DEVELOPMENT key "
            "(see README; `gateway publish` uses it). Never run it like this in production."
        )
    return Route("/api/publish", PublishEndpoint(key).handle, methods=["POST"])
