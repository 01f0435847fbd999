"""The one way to build a gateway instance: its backends (one adapter per port) and
its settings. Used by the composition root (``entrypoints.bootstrap``), the
simulation and the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapters.shell.gateway import Gateway
from adapters.shell.metrics import Metrics
from adapters.shell.settings import GatewaySettings
from domain.model import InstanceId, SessionId
from domain.ports import Broker, Clock, Directory, PresenceStore, TokenVerifier, TypingGate


@dataclass(frozen=True, slots=True)
class Backends:
    broker: Broker
    typing_gate: TypingGate
    presence: PresenceStore
    directory: Directory
    tokens: TokenVerifier
    clock: Clock


def make_gateway(
    backends: Backends,
    settings: GatewaySettings | None = None,
    *,
    metrics: Metrics | None = None,
    instance_id: InstanceId | None = None,
    new_session_id: Callable[[], SessionId] | None = None,
) -> Gateway:
    return Gateway(
        broker=backends.broker,
        typing_gate=backends.typing_gate,
        presence=backends.presence,
        directory=backends.directory,
        tokens=backends.tokens,
        clock=backends.clock,
        settings=settings,
        metrics=metrics,
        instance_id=instance_id,
        new_session_id=new_session_id,
    )
