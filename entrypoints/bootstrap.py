"""The composition root: the one place that picks adapters for the ports."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from adapters.clock import SystemClock
from adapters.jwt import JwtVerifier
from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, Gateway, make_gateway
from domain.ports import Broker, Directory, PresenceStore, TypingGate
from entrypoints.config import Config, ConfigError, demo_data, load_fixture_file

log = logging.getLogger("gateway.bootstrap")


def make_verifier(config: Config) -> JwtVerifier:
    """The token verifier; a key or algorithm it refuses is a configuration error."""
    try:
        return JwtVerifier(
            secret=config.effective_jwt_secret(),
            public_key=config.jwt_public_key,
            algorithms=config.jwt_algorithms,
        )
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"JWT: {exc}") from None


@asynccontextmanager
async def open_directory(config: Config) -> AsyncIterator[Directory]:
    if config.database_url:
        from adapters.postgres import PostgresDirectory

        directory = PostgresDirectory(
            config.database_url,
            max_size=config.database_pool_size,
            command_timeout=config.gateway.backend_timeout_ms / 1000,
        )
        async with directory:
            yield directory
        return
    data = load_fixture_file(config.fixtures) if config.fixtures else demo_data()
    yield MemoryDirectory(data)


@asynccontextmanager
async def build_gateway(config: Config) -> AsyncIterator[Gateway]:
    """Build one gateway instance from configuration, and close its backends after."""
    clock = SystemClock()
    tokens = make_verifier(config)
    if config.using_dev_secret:
        log.warning(
            "GATEWAY_JWT_SECRET is not set: using the DEVELOPMENT secret. Anyone can mint "
            "tokens for this gateway. Never run it like this in production."
        )
    async with AsyncExitStack() as stack:
        directory = await stack.enter_async_context(open_directory(config))
        broker: Broker
        typing_gate: TypingGate
        presence: PresenceStore
        if config.redis_url:
            from adapters.redis import open_redis_backends

            broker, typing_gate, presence = await stack.enter_async_context(
                open_redis_backends(
                    config.redis_url,
                    mode="cluster" if config.redis_mode == "cluster" else "standalone",
                )
            )
        else:
            broker = MemoryBrokerNetwork().client()
            typing_gate = MemoryTypingGate(clock)
            presence = MemoryPresenceStore(clock)
        yield make_gateway(
            Backends(broker, typing_gate, presence, directory, tokens, clock), config.gateway
        )
