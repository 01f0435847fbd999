"""Tunables of one gateway instance (parsed from the environment by entrypoints.config).

One unit rule: every duration here is an integer number of milliseconds (``_ms``), as
in the environment; the shell converts to seconds where it sleeps or sets a deadline,
and the domain (``SessionConfig``) speaks seconds, like ``Clock.monotonic``. The one
exception is what goes on the wire in milliseconds (HELLO's heartbeat interval).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.session import SessionConfig


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    session: SessionConfig = field(default_factory=SessionConfig)
    heartbeat_sweep_ms: int = 45_000
    typing_ttl_ms: int = 10_000
    max_payload_bytes: int = 65_536
    #: A connection whose queued outbound frames exceed either bound is closed 4010.
    outbound_max_frames: int = 2_048
    outbound_max_bytes: int = 1 << 20
    #: Connection caps (0 = unlimited); over them a new connection is closed 4013.
    max_connections: int = 0
    max_connections_per_user: int = 0
    #: Directory lookups for permissions are cached this long (invalidated by events).
    permission_cache_ttl_ms: int = 30_000
    #: Bound on any one backend call made for a client (from admission, not queueing).
    backend_timeout_ms: int = 5_000
    #: PROTOCOL 15: handshakes (IDENTIFY) doing backend work at once; the rest queue.
    identify_concurrency: int = 16
    #: PROTOCOL 15: client operations doing backend work at once (SUBSCRIBE_SERVER,
    #: TYPING_START, PRESENCE_UPDATE, SUBSCRIBE_PRESENCE, READY's announce); the rest
    #: wait in their sockets (the connection's reader takes no frame meanwhile), with
    #: no timer running. With IDENTIFY_CONCURRENCY (16) within the Redis pools (64).
    backend_concurrency: int = 48
    #: From the decision to close, how long the queued frames, the close frame and the
    #: peer's answer may take before the transport is aborted (PROTOCOL section 6).
    close_timeout_ms: int = 2_000
    #: On drain, sessions of this instance stay in the presence registry this long, so
    #: users who reconnect elsewhere do not flap offline (PROTOCOL 7: presence grace).
    presence_grace_ms: int = 15_000
    #: Bounded wait for connections to go during a drain.
    drain_timeout_ms: int = 10_000
    #: A RESUME of a session not held here: how long the instance that holds it has to
    #: answer (no answer: unknown session or dead owner, INVALID_SESSION).
    handoff_ask_ms: int = 1_000
    #: On a drain, keep the parked sessions until resumed elsewhere (bounded by the
    #: drain timeout); off when no other instance can take them (memory backends).
    drain_keeps_parked: bool = True

    @property
    def presence_ttl_ms(self) -> int:
        """An instance's liveness TTL in the presence registry: one heartbeat timeout,
        refreshed every third of it, reaped every half: a dead instance's users go
        offline within 1.5 heartbeat timeouts (PROTOCOL asks for 2)."""
        return int(self.session.heartbeat_timeout * 1000)


def seconds(ms: int) -> float:
    """A duration of the settings, in the seconds anyio sleeps and deadlines take."""
    return ms / 1000.0
