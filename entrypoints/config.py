"""Configuration from the environment (PROTOCOL section 12 names the variables)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources

from adapters.shell.settings import GatewaySettings
from domain.fixtures import parse_directory
from domain.model import DirectoryData
from domain.session import SessionConfig

#: Used only by the memory-backed server when GATEWAY_JWT_SECRET is unset (loudly).
DEV_JWT_SECRET = "dev-secret-do-not-use-in-production"
#: The HTTP publish API key of a development gateway (same condition as the secret).
DEV_API_KEY = "dev-api-key-do-not-use-in-production"


REDIS_MODES = ("standalone", "cluster")


class ConfigError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    #: The listening socket's accept queue: a reconnect storm arrives all at once, and
    #: every connection the queue cannot hold waits for a SYN retransmit (1 s, 3 s, ...).
    listen_backlog: int = 2048
    redis_url: str | None = None
    #: "standalone" or "cluster" (GATEWAY_REDIS_MODE, PROTOCOL 16).
    redis_mode: str = "standalone"
    database_url: str | None = None
    fixtures: str | None = None
    jwt_secret: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_public_key: str | None = None
    database_pool_size: int = 10
    log_format: str = "text"
    api_key: str | None = field(default=None, repr=False)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

    @property
    def uses_external_backends(self) -> bool:
        return bool(self.redis_url or self.database_url)

    def effective_jwt_secret(self) -> str | None:
        """The HS* secret, or the development secret for an all-memory gateway."""
        if self.jwt_secret:
            return self.jwt_secret
        if self.uses_external_backends:
            if any(a.startswith("HS") for a in self.jwt_algorithms):
                raise ConfigError(
                    "GATEWAY_JWT_SECRET is required when Redis or Postgres is configured"
                )
            return None
        return DEV_JWT_SECRET

    @property
    def using_dev_secret(self) -> bool:
        return not self.jwt_secret and not self.uses_external_backends

    def effective_api_key(self) -> str | None:
        """GATEWAY_API_KEY, the development key in development mode, else None (the
        HTTP publish API is off)."""
        if self.api_key:
            return self.api_key
        return DEV_API_KEY if self.using_dev_secret else None

    def with_port(self, port: int) -> Config:
        return replace(self, port=port)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        ms = 1000.0
        heartbeat_timeout_ms = _int(env, "GATEWAY_HEARTBEAT_TIMEOUT_MS", 60_000, 1)
        session = SessionConfig(
            identify_timeout=_int(env, "GATEWAY_IDENTIFY_TIMEOUT_MS", 5_000, 1) / ms,
            heartbeat_interval_ms=_int(env, "GATEWAY_HEARTBEAT_INTERVAL_MS", 30_000, 1),
            heartbeat_timeout=heartbeat_timeout_ms / ms,
            rate_limit_count=_int(env, "GATEWAY_RATE_LIMIT_COUNT", 120, 1),
            rate_limit_window=_int(env, "GATEWAY_RATE_LIMIT_WINDOW_MS", 60_000, 1) / ms,
            max_subscriptions=_int(env, "GATEWAY_MAX_SUBSCRIPTIONS", 200, 0),
            resume_ttl=_int(env, "GATEWAY_RESUME_TTL_MS", 120_000, 0) / ms,
            resume_buffer_frames=_int(env, "GATEWAY_RESUME_BUFFER_FRAMES", 1_024, 0),
            replay_max_frames=_int(env, "GATEWAY_OUTBOUND_MAX_FRAMES", 2_048, 1),
            replay_max_bytes=_int(env, "GATEWAY_OUTBOUND_MAX_BYTES", 1 << 20, 1),
            large_server_members=_int(env, "GATEWAY_LARGE_SERVER_MEMBERS", 250, 0),
        )
        settings = GatewaySettings(
            session=session,
            heartbeat_sweep_ms=_int(env, "GATEWAY_HEARTBEAT_SWEEP_MS", 45_000, 1),
            typing_ttl_ms=_int(env, "GATEWAY_TYPING_TTL_MS", 10_000, 1),
            max_payload_bytes=_int(env, "GATEWAY_MAX_PAYLOAD_BYTES", 65_536, 1),
            outbound_max_frames=_int(env, "GATEWAY_OUTBOUND_MAX_FRAMES", 2_048, 1),
            outbound_max_bytes=_int(env, "GATEWAY_OUTBOUND_MAX_BYTES", 1 << 20, 1),
            max_connections=_int(env, "GATEWAY_MAX_CONNECTIONS", 0),
            max_connections_per_user=_int(env, "GATEWAY_MAX_CONNECTIONS_PER_USER", 0),
            permission_cache_ttl_ms=_int(env, "GATEWAY_PERMISSION_CACHE_TTL_MS", 30_000, 0),
            backend_timeout_ms=_int(env, "GATEWAY_BACKEND_TIMEOUT_MS", 5_000, 1),
            identify_concurrency=_int(env, "GATEWAY_IDENTIFY_CONCURRENCY", 16, 1),
            backend_concurrency=_int(env, "GATEWAY_BACKEND_CONCURRENCY", 48, 1),
            presence_grace_ms=_int(env, "GATEWAY_PRESENCE_GRACE_MS", 15_000, 1),
            drain_timeout_ms=_int(env, "GATEWAY_DRAIN_TIMEOUT_MS", 10_000, 0),
            close_timeout_ms=_int(env, "GATEWAY_CLOSE_TIMEOUT_MS", 2_000, 1),
            # Memory backends: no other instance to hand parked sessions to on a drain.
            drain_keeps_parked=bool(env.get("GATEWAY_REDIS_URL")),
        )
        algorithms = tuple(
            a.strip() for a in env.get("GATEWAY_JWT_ALGORITHMS", "HS256").split(",") if a.strip()
        )
        redis_mode = env.get("GATEWAY_REDIS_MODE", "").strip().lower() or "standalone"
        if redis_mode not in REDIS_MODES:
            raise ConfigError(
                f"GATEWAY_REDIS_MODE must be one of {', '.join(REDIS_MODES)}, "
                f"got {env.get('GATEWAY_REDIS_MODE')!r}"
            )
        if any(a.lower() == "none" for a in algorithms):
            raise ConfigError("GATEWAY_JWT_ALGORITHMS may not contain 'none'")
        return cls(
            host=env.get("GATEWAY_HOST", "127.0.0.1"),
            port=_int(env, "GATEWAY_PORT", 8000, 0),
            workers=_int(env, "GATEWAY_WORKERS", 1, 1),
            listen_backlog=_int(env, "GATEWAY_LISTEN_BACKLOG", 2048, 1),
            redis_url=env.get("GATEWAY_REDIS_URL") or None,
            redis_mode=redis_mode,
            database_url=env.get("GATEWAY_DATABASE_URL") or None,
            fixtures=env.get("GATEWAY_FIXTURES") or None,
            jwt_secret=env.get("GATEWAY_JWT_SECRET") or None,
            jwt_algorithms=algorithms or ("HS256",),
            jwt_public_key=env.get("GATEWAY_JWT_PUBLIC_KEY") or None,
            database_pool_size=_int(env, "GATEWAY_DATABASE_POOL_SIZE", 10, 1),
            log_format=env.get("GATEWAY_LOG_FORMAT", "text"),
            api_key=env.get("GATEWAY_API_KEY") or None,
            gateway=settings,
        )


def load_fixture_file(path: str) -> DirectoryData:
    with open(path, encoding="utf-8") as fh:
        return parse_directory(json.load(fh))


def demo_data() -> DirectoryData:
    text = resources.files("entrypoints").joinpath("demo.json").read_text(encoding="utf-8")
    return parse_directory(json.loads(text))
