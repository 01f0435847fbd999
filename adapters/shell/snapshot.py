"""What an instance reports about itself (:meth:`adapters.shell.gateway.Gateway.snapshot`)."""

from __future__ import annotations

from dataclasses import dataclass

from domain.model import ServerId, SessionId, UserId
from domain.session import State


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    """What an instance holds right now, for ``/metrics``, ``/readyz``, the simulation
    and tests (nothing reads the gateway's internals)."""

    running: bool
    draining: bool
    broker_healthy: bool
    #: Session ids of the open connections, and of those the gateway decided to close.
    connections: frozenset[SessionId]
    closing: frozenset[SessionId]
    states: dict[State, int]
    outbound_queued: int
    #: Routing indexes (server or user -> session ids) and broker interest refcounts.
    servers: dict[ServerId, frozenset[SessionId]]
    users: dict[UserId, frozenset[SessionId]]
    interest: dict[str, int]
    #: Sessions parked for RESUME (section 13): no connection, routes and presence kept.
    parked: frozenset[SessionId] = frozenset()
