"""Prometheus metrics of one gateway instance (a registry per instance, so several
instances can live in one process, as in tests and the simulation)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

#: Upper bounds of ``gateway_fanout_seconds`` (then +Inf).
FANOUT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class HotCounters(Collector):
    """Counters on the per-frame and per-broker-message paths, kept as plain ints (a
    prometheus Counter or Histogram takes a lock on every increment) and exported when
    scraped."""

    def __init__(self) -> None:
        self.frames_out = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.deliveries = 0
        self.frames_in: Tally[str] = Tally()
        self.broker_messages = 0
        #: ``gateway_fanout_seconds``: per bucket (not cumulative; the last is +Inf).
        self.fanout_buckets = [0] * (len(FANOUT_BUCKETS) + 1)
        self.fanout_sum = 0.0

    def observe_fanout(self, seconds: float) -> None:
        """One broker message routed in ``seconds`` (prometheus' bucket rule: the first
        upper bound at or above the value)."""
        self.fanout_buckets[bisect_left(FANOUT_BUCKETS, seconds)] += 1
        self.fanout_sum += seconds

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "gateway_frames_out", "Frames sent to clients", value=self.frames_out
        )
        yield CounterMetricFamily(
            "gateway_bytes_out", "Bytes (characters) sent to clients", value=self.bytes_out
        )
        yield CounterMetricFamily(
            "gateway_bytes_in", "Bytes (characters) received from clients", value=self.bytes_in
        )
        yield CounterMetricFamily(
            "gateway_deliveries", "Dispatch frames queued for clients", value=self.deliveries
        )
        frames_in = CounterMetricFamily("gateway_frames_in", "Client frames by op", labels=["op"])
        for op, n in sorted(self.frames_in.items()):
            frames_in.add_metric([op], n)
        yield frames_in
        yield CounterMetricFamily(
            "gateway_broker_messages",
            "Messages received from the broker",
            value=self.broker_messages,
        )
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip((*map(str, FANOUT_BUCKETS), "+Inf"), self.fanout_buckets, strict=True):
            cumulative += n
            buckets.append((bound, float(cumulative)))
        yield HistogramMetricFamily(
            "gateway_fanout_seconds",
            "Time to route one broker message to every local recipient's queue",
            buckets=buckets,
            sum_value=self.fanout_sum,
        )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.hot = HotCounters()
        r.register(self.hot)
        self.connections = Gauge(
            "gateway_connections", "Open connections by session state", ["state"], registry=r
        )
        self.connections_opened = Counter(
            "gateway_connections_opened", "Connections accepted", registry=r
        )
        self.closes = Counter(
            "gateway_closes",
            "Connections closed, by close code and by the side that started the close"
            " (the client's own code for a client close; 1006: TCP ended without one)",
            ["code", "side"],
            registry=r,
        )
        self.errors = Counter("gateway_errors", "ERROR frames sent, by code", ["code"], registry=r)
        self.rate_limited = Counter(
            "gateway_rate_limited", "Connections closed 4008 (rate limit)", registry=r
        )
        self.slow_consumers = Counter(
            "gateway_slow_consumers", "Connections closed 4010 (slow consumer)", registry=r
        )
        self.outbound_queued = Gauge(
            "gateway_outbound_queued_frames",
            "Frames queued for clients, all connections",
            registry=r,
        )
        # gateway_broker_messages and gateway_fanout_seconds: in ``hot`` (per message).
        self.invalid_envelopes = Counter(
            "gateway_invalid_envelopes", "Broker messages dropped as invalid", registry=r
        )
        self.publish_failures = Counter(
            "gateway_publish_failures", "Publishes that failed (broker down)", registry=r
        )
        self.broker_outages = Gauge(
            "gateway_broker_outages", "Broker outages seen since start", registry=r
        )
        self.loop_stall = Counter(
            "gateway_loop_stall_seconds",
            "Seconds the heartbeat sweep's timer fired late (the instance too busy to"
            " read its sockets; not counted against clients' heartbeats)",
            registry=r,
        )
        self.broker_up = Gauge("gateway_broker_up", "1 while the broker answers", registry=r)
        self.directory_seconds = Histogram(
            "gateway_directory_seconds", "Directory lookups made for clients", registry=r
        )
        self.backend_failures = Counter(
            "gateway_backend_failures",
            "Backend calls that failed, by backend",
            ["backend"],
            registry=r,
        )
        self.presence_broadcasts = Counter(
            "gateway_presence_broadcasts", "Visible presence changes broadcast", registry=r
        )
        self.typing_dispatched = Counter(
            "gateway_typing_dispatched", "TYPING_START events published", registry=r
        )
        self.resumes = Counter(
            "gateway_resumes",
            "RESUME attempts by outcome (resumed, taken_over, or why INVALID_SESSION)",
            ["outcome"],
            registry=r,
        )
        self.parked_sessions = Gauge(
            "gateway_parked_sessions", "Sessions parked for RESUME on this instance", registry=r
        )
        self.parked_ended = Counter(
            "gateway_parked_ended",
            "Parked sessions that ended without a resume, by reason (ttl, overflow)",
            ["reason"],
            registry=r,
        )
        self.replayed_frames = Counter(
            "gateway_replayed_frames", "Dispatches replayed by successful RESUMEs", registry=r
        )
