"""``gateway connect`` and ``gateway publish`` (PROTOCOL section 12).

Both reach the gateway that ``gateway serve`` would run with the same environment
(``GATEWAY_HOST``/``GATEWAY_PORT``) unless ``--url`` says otherwise. ``connect`` mints
its own tokens when it knows the signing key (the development secret, or
``GATEWAY_JWT_SECRET``), else takes ``--token``; ``publish`` uses ``GATEWAY_API_KEY``
(the development key in development mode), or writes straight into Redis with
``--redis URL``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import anyio

from adapters.jwt import JwtIssuer
from domain import keys
from domain.codec import encode_envelope
from entrypoints.bootstrap import open_directory
from entrypoints.client.terminal import run_terminal
from entrypoints.config import Config

ConfigFrom = Callable[[argparse.Namespace], Config]


def _local_host(config: Config) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    return f"[{host}]" if ":" in host else host


def default_ws_url(config: Config) -> str:
    return f"ws://{_local_host(config)}:{config.port}/ws/gateway"


def default_http_url(config: Config) -> str:
    return f"http://{_local_host(config)}:{config.port}"


async def _find_user_id(config: Config, who: str) -> str | None:
    async with open_directory(config) as directory:
        user = await directory.find_user(who)
        return user.id if user is not None else None


# --- gateway connect -------------------------------------------------------------------


def cmd_connect(args: argparse.Namespace, config: Config) -> int:
    url = args.url or default_ws_url(config)

    async def main() -> int:
        if args.token:
            return await run_terminal(url, args.token, subscribe=args.subscribe, as_json=args.json)
        secret = config.effective_jwt_secret()
        if secret is None:
            print(
                "gateway connect: no signing key here to mint a token (GATEWAY_JWT_SECRET "
                "unset); pass --token JWT",
                file=sys.stderr,
            )
            return 2
        user_id = await _find_user_id(config, args.user)
        if user_id is None:
            print(f"gateway connect: no user with id or username {args.user!r}", file=sys.stderr)
            return 1
        algorithm = next((a for a in config.jwt_algorithms if a.startswith("HS")), "HS256")
        issuer = JwtIssuer(key=secret, algorithm=algorithm)

        async def fresh_token() -> str:  # a new token for every IDENTIFY and RESUME
            return issuer.issue(user_id, now=time.time(), ttl=3600.0)

        return await run_terminal(url, fresh_token, subscribe=args.subscribe, as_json=args.json)

    return anyio.run(main)


# --- gateway publish -------------------------------------------------------------------


def _publish_http(base: str, key: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        base.rstrip("/") + "/api/publish",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


async def _publish_redis(url: str, channel: str, payload: bytes, cluster: bool) -> int:
    """PUBLISH, or SPUBLISH into a Redis Cluster (GATEWAY_REDIS_MODE=cluster, PROTOCOL
    16: the receivers are then the instances listening on the channel's shard)."""
    import redis.asyncio as aioredis

    if cluster:
        cluster_client = aioredis.RedisCluster.from_url(url)
        try:
            shard_receivers: int = await cluster_client.spublish(channel, payload)
            return shard_receivers
        finally:
            await cluster_client.aclose()
    client = aioredis.Redis.from_url(url)
    try:
        receivers: int = await client.publish(channel, payload)
        return receivers
    finally:
        await client.aclose()


def cmd_publish(args: argparse.Namespace, config: Config) -> int:
    words: list[str] = args.words
    want = 2 if args.user else 3
    if len(words) != want:
        usage = "--user USER OP JSON" if args.user else "SERVER OP JSON (or --user USER OP JSON)"
        print(f"gateway publish: expected {usage}", file=sys.stderr)
        return 2
    if args.user and (args.channel or args.exclude):
        print("gateway publish: --channel and --exclude go with a SERVER", file=sys.stderr)
        return 2
    op, raw = words[-2], words[-1]
    try:
        d = json.loads(raw)
    except ValueError as exc:
        print(f"gateway publish: JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    event = {"op": op, "d": d}
    target: str
    if args.user:
        target = args.user
        try:  # a username is fine too, when the directory here knows it
            target = anyio.run(_find_user_id, config, args.user) or args.user
        except Exception:
            target = args.user
        body: dict[str, Any] = {"userId": target, "event": event}
        where = f"user {target}"
    else:
        target = words[0]
        body = {"serverId": target, "event": event}
        if args.channel:
            body["channelId"] = args.channel
        if args.exclude:
            body["excludeUserId"] = args.exclude
        where = f"server {target}" + (f" channel {args.channel}" if args.channel else "")

    if args.redis:
        channel = keys.user_channel(target) if args.user else keys.server_channel(target)
        payload = (
            encode_envelope(event)
            if args.user
            else encode_envelope(event, args.channel, args.exclude)
        )
        try:
            receivers = anyio.run(
                _publish_redis, args.redis, channel, payload, config.redis_mode == "cluster"
            )
        except Exception as exc:
            print(f"gateway publish: Redis at {args.redis}: {exc}", file=sys.stderr)
            return 1
        print(f"published {op} to {where} on {channel} ({receivers} gateway instances listening)")
        return 0

    key = config.effective_api_key()
    if key is None:
        print(
            "gateway publish: set GATEWAY_API_KEY (the gateway's key), or use --redis URL",
            file=sys.stderr,
        )
        return 2
    base = args.url or default_http_url(config)
    try:
        status, text = _publish_http(base, key, body)
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway publish: cannot reach the gateway at {base}: {exc}", file=sys.stderr)
        return 1
    if status == 202:
        print(f"published {op} to {where}")
        return 0
    try:
        message = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        message = text
    print(f"gateway publish: HTTP {status}: {message}", file=sys.stderr)
    return 1


def add_commands(sub: Any, config_from: ConfigFrom) -> None:
    """Register ``connect`` and ``publish`` on the ``gateway`` parser."""
    connect = sub.add_parser(
        "connect",
        help="a terminal client: prints events, reads commands (typing C, status S, "
        "subscribe S, quit)",
    )
    connect.add_argument("user", help="user id or username (tokens are minted for it)")
    connect.add_argument(
        "--subscribe", action="append", default=[], metavar="SERVER", help="repeatable"
    )
    connect.add_argument("--token", help="a JWT to use instead of minting one")
    connect.add_argument("--json", action="store_true", help="raw frames on stdout")
    connect.add_argument("--url", help="ws://HOST:PORT/ws/gateway (default from GATEWAY_HOST/PORT)")
    connect.set_defaults(func=lambda args: cmd_connect(args, config_from(args)))

    publish = sub.add_parser(
        "publish",
        help="publish an event through the gateway's HTTP API (or straight into Redis)",
        usage="gateway publish [options] SERVER OP JSON\n"
        "       gateway publish [options] --user USER OP JSON",
        description="OP is the event name, JSON its d (any JSON value).",
    )
    publish.add_argument("words", nargs="+", metavar="SERVER OP JSON", help=argparse.SUPPRESS)
    publish.add_argument("--user", help="publish to every connection of this user instead")
    publish.add_argument("--channel", help="channel-scoped: only readers of this channel")
    publish.add_argument("--exclude", metavar="USER", help="skip this user's connections")
    publish.add_argument("--url", help="http://HOST:PORT (default from GATEWAY_HOST/PORT)")
    publish.add_argument("--redis", metavar="URL", help="PUBLISH the envelope into this Redis")
    publish.set_defaults(func=lambda args: cmd_publish(args, config_from(args)))
