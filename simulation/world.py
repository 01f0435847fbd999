"""The simulated world: N real gateway instances, M virtual clients, one seed.

Every instance is the real :class:`adapters.shell.Gateway` over the real memory
adapters, sharing one broker network, presence store, typing gate and directory (each
seen through a crash switch, :mod:`simulation.faults`). Clients talk to instances
through :class:`simulation.transport.MemoryTransport`. Everything runs on one asyncio
loop on virtual time (:mod:`simulation.loop`): its clock jumps to the next timer
whenever all tasks wait, so ten virtual minutes take as long as the work done in them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from adapters.jwt import JwtIssuer, JwtVerifier
from adapters.memory import (
    MemoryBrokerNetwork,
    MemoryDirectory,
    MemoryPresenceStore,
    MemoryTypingGate,
)
from adapters.shell import Backends, GatewaySettings, make_gateway
from domain.session import SessionConfig
from simulation.clients import VirtualClient
from simulation.clock import VirtualClock
from simulation.faults import (
    ALL_FAULTS,
    BROKER_OUTAGE,
    CRASH,
    DELAY,
    DIRECTORY,
    MAX_DELAY,
    STORM,
    STORM_LOOKUP_S,
    FaultLog,
    InstanceDirectory,
    InstancePresence,
    InstanceTypingGate,
    Life,
    PlannedFault,
    SimBroker,
    plan,
)
from simulation.invariants import NO_CRASH, Checker, Violation
from simulation.loop import VirtualTimeLoop
from simulation.model import Conn
from simulation.offload import CheckerLink, TraceLink
from simulation.population import Population, generate, random_text
from simulation.trace import Trace

JWT_SECRET = "simulation-secret-of-at-least-32-bytes"


@dataclass(frozen=True)
class SimConfig:
    seed: int = 1
    instances: int = 3
    clients: int = 60
    minutes: float = 3.0
    faults: frozenset[str] = frozenset(ALL_FAULTS)
    #: stop at the first violation (the CLI and the tests); else collect up to 200
    stop_on_violation: bool = True
    #: frames a client that stopped reading buffers before the server's send blocks
    transport_capacity: int = 8
    #: GatewaySettings.outbound_max_frames for the simulated instances
    outbound_max_frames: int = 24
    #: events other services publish per virtual second (default: clients / 200)
    publish_rate: float | None = None
    #: multiplies how often clients act (type, change presence, subscribe, open tabs...)
    activity: float = 1.0
    #: an explicit schedule of infrastructure faults instead of the seeded plan
    fault_plan: tuple[PlannedFault, ...] | None = None
    #: seconds between continuous checks; presence is checked every other time
    check_interval: float = 10.0
    #: PROTOCOL 14's threshold for the simulated instances. Generated servers have 2 to
    #: 48 members: at 20 the biggest are *large* (presence only to the user's own).
    large_server_members: int = 20
    #: check in a second process (simulation.offload): the same verdicts and digest,
    #: on another core; a run with a violation is then run again in line
    checker_process: bool = False

    @property
    def active_seconds(self) -> float:
        return self.minutes * 60.0

    #: GATEWAY_RESUME_TTL_MS of the simulated instances. 0: the simulated clients do
    #: not RESUME yet (they IDENTIFY after every drop), and a dropped session must end
    #: at once for the presence and leak invariants as they are written today.
    resume_ttl_ms: int = 0

    def settings(self) -> GatewaySettings:
        session = SessionConfig(
            resume_ttl=self.resume_ttl_ms / 1000.0,
            large_server_members=self.large_server_members,
        )
        return GatewaySettings(outbound_max_frames=self.outbound_max_frames, session=session)

    @property
    def tail_seconds(self) -> float:
        """After the clients left: two heartbeat timeouts and a sweep, for the last
        crashed sessions to be reaped and every timer to run out."""
        s = self.settings()
        return 2 * s.session.heartbeat_timeout + s.heartbeat_sweep_ms / 1000 + 10.0

    def command(self) -> str:
        faults = ",".join(f for f in ALL_FAULTS if f in self.faults) or "none"
        extra = "" if self.activity == 1.0 else f" --activity {self.activity:g}"
        if self.publish_rate is not None:
            extra += f" --publish-rate {self.publish_rate:g}"
        return (
            f"gateway simulate --instances {self.instances} --clients {self.clients} "
            f"--minutes {self.minutes:g} --seed {self.seed} --faults {faults}{extra}"
        )


@dataclass
class SimReport:
    config: SimConfig
    digest: str
    violations: list[Violation]
    virtual_seconds: float
    wall_seconds: float
    published_by_op: dict[str, int]
    external: dict[str, int]
    failed_publishes: int
    deliveries: int
    frames: int
    faults: dict[str, int]
    checks: dict[str, int]
    connections: int
    closes: dict[str, int]
    trace_lines: int
    broker_dropped: int = 0
    gateway_deliveries: int = 0
    cpu_seconds: float = 0.0
    #: the virtual-time loop's iterations, callbacks run and clock jumps
    loop_iterations: int = 0
    loop_callbacks: int = 0
    clock_jumps: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    #: why the run was made again in line (SimConfig.checker_process), or ""
    rerun_reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def events_published(self) -> int:
        return sum(self.published_by_op.values())


class SimInstance:
    def __init__(self, world: World, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self.id = f"i{slot}" if generation == 0 else f"i{slot}r{generation}"
        self.life = Life()
        self.broker = SimBroker(world.network, world.checker, world.loop)
        self._sessions = random.Random(f"{world.session_seed}:{self.id}")
        backends = Backends(
            broker=self.broker,
            typing_gate=InstanceTypingGate(world.typing, self.life),
            presence=InstancePresence(world.presence, self.life, world.checker.presence_changed),
            directory=InstanceDirectory(world.directory, self.life),
            tokens=world.verifier,
            clock=world.clock,
        )
        self.gateway = make_gateway(
            backends,
            world.settings,
            instance_id=self.id,
            new_session_id=self._new_session_id,
        )
        self.conns: dict[Conn, None] = {}
        self.alive = True
        self.group: TaskGroup | None = None

    def _new_session_id(self) -> str:
        return str(uuid.UUID(int=self._sessions.getrandbits(128), version=4))

    @property
    def serving(self) -> bool:
        return self.alive and self.group is not None


class World:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        root = random.Random(config.seed)  # the one generator every choice derives from
        self.population: Population = generate(random.Random(root.getrandbits(64)), config.clients)
        self._client_seeds = [root.getrandbits(64) for _ in range(config.clients)]
        self.fault_rng = random.Random(root.getrandbits(64))
        self.publisher_rng = random.Random(root.getrandbits(64))
        self.session_seed = root.getrandbits(64)
        self.settings = config.settings()
        self.heartbeat_interval = self.settings.session.heartbeat_interval_ms / 1000.0
        self.clock = VirtualClock()
        self.network = MemoryBrokerNetwork()
        self.presence = MemoryPresenceStore(self.clock)
        self.typing = MemoryTypingGate(self.clock)
        self.directory = MemoryDirectory(self.population.data)
        self.issuer = JwtIssuer(key=JWT_SECRET)
        self.verifier = JwtVerifier(secret=JWT_SECRET)
        self._tokens: dict[str, str] = {}
        self.faults = FaultLog()
        self.trace: Trace | TraceLink = Trace()
        self.checker: Checker | CheckerLink = Checker(
            population=self.population,
            settings=self.settings,
            faults=self.faults,
            trace=self.trace,
            now=self.now,
            wall_ms=self.clock.wall_ms,
            presence=self.presence,
            transport_capacity=config.transport_capacity,
            stop_on_violation=config.stop_on_violation,
        )
        self.instances: list[SimInstance] = []
        self._by_id: dict[str, SimInstance] = {}
        self.clients: list[VirtualClient] = []
        self.external: dict[str, int] = {}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._root: TaskGroup | None = None

    # --- small services for clients -----------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def token(self, user: str) -> str:
        token = self._tokens.get(user)
        if token is None:
            ttl = self.config.active_seconds + self.config.tail_seconds + 3600.0
            token = self._tokens[user] = self.issuer.issue(
                user, now=self.clock.wall_ms() / 1000.0, ttl=ttl
            )
        return token

    def pick_instance(self, rng: random.Random) -> SimInstance | None:
        serving = [i for i in self.instances if i.serving]
        return rng.choice(serving) if serving else None

    def accept(self, instance: SimInstance, conn: Conn) -> None:
        assert instance.group is not None
        instance.conns[conn] = None
        instance.group.start_soon(self._serve, instance, conn)

    def detach(self, conn: Conn) -> None:
        instance = self._by_id.get(conn.instance_id)
        if instance is not None:
            instance.conns.pop(conn, None)

    async def _serve(self, instance: SimInstance, conn: Conn) -> None:
        assert conn.transport is not None
        try:
            await instance.gateway.serve(conn.transport)
        except Exception as exc:
            self.checker.violation(
                NO_CRASH, f"{instance.id} serving {conn.cid} raised {exc!r}", conn.cid
            )

    # --- instances ------------------------------------------------------------------------

    def _start_instance(self, slot: int, generation: int) -> SimInstance:
        instance = SimInstance(self, slot, generation)
        self.instances.append(instance)
        self._by_id[instance.id] = instance
        assert self._root is not None
        self._root.start_soon(self._run_instance, instance)
        return instance

    async def _run_instance(self, instance: SimInstance) -> None:
        try:
            async with anyio.create_task_group() as group:
                instance.group = group
                group.start_soon(instance.gateway.run)
        except Exception as exc:
            self.checker.violation(NO_CRASH, f"instance {instance.id} raised {exc!r}")

    def crash(self, instance: SimInstance) -> None:
        """Kill an instance: no unsubscribe, no presence cleanup, no close frames."""
        self.faults.count(CRASH)
        self.trace.event("FAULT", f"crash {instance.id}")
        instance.alive = False
        instance.life.dead = True
        instance.broker.close()
        conns = list(instance.conns)
        instance.conns.clear()
        for conn in conns:
            assert conn.transport is not None
            conn.transport.sever()
        self.checker.instance_crashed(instance.id, conns)
        for conn in conns:
            conn.owner.on_crash(conn)
        if instance.group is not None:
            instance.group.cancel_scope.cancel()

    # --- faults ---------------------------------------------------------------------------

    def _schedule_faults(self) -> None:
        planned = self.config.fault_plan
        if planned is None:
            planned = tuple(
                plan(
                    self.fault_rng,
                    self.config.faults,
                    self.config.active_seconds,
                    self.config.instances,
                )
            )
        for fault in planned:
            self.loop.call_at(fault.at, self._fault, fault)

    def _fault(self, fault: PlannedFault) -> None:
        now = self.now()
        end = now + fault.duration
        if fault.kind == CRASH:
            serving = [i for i in self.instances if i.serving]
            if len(serving) < 2:
                return
            victim = self.fault_rng.choice(serving)
            self.crash(victim)
            self.loop.call_at(end, self._restart, victim)
        elif fault.kind == STORM:
            serving = [i for i in self.instances if i.serving]
            if len(serving) < 2:
                return
            load = {i.id: 0 for i in serving}
            for conn in self.checker.open_conns:
                if conn.instance_id in load:
                    load[conn.instance_id] += 1
            serving.sort(key=lambda i: (-load[i.id], i.slot))
            victims = serving[: max(1, len(serving) // 4)]
            self.faults.count(STORM)
            held = sum(load[v.id] for v in victims)
            self.trace.event("FAULT", f"storm: crash {[v.id for v in victims]} ({held} clients)")
            for victim in victims:
                self.crash(victim)
                self.loop.call_at(end, self._restart, victim)
            # The survivors' directory is loaded too: their handshakes queue (15).
            window = [now, end]
            self.faults.storms.append(window)
            self.checker.faults_changed(self.faults)
            for instance in serving[len(victims) :]:
                instance.life.slow = STORM_LOOKUP_S
            self.loop.call_at(end, self._storm_over)
        elif fault.kind == BROKER_OUTAGE:
            self.faults.count(BROKER_OUTAGE)
            self.trace.event("FAULT", f"broker-outage for {fault.duration:.3f} s")
            self.network.down = True
            window = [now, float("inf")]
            self.faults.outages.append(window)
            self.checker.faults_changed(self.faults)
            self.loop.call_at(end, self._broker_back, window)
        elif fault.kind == DELAY:
            self.faults.count(DELAY)
            latencies = {
                i.id: round(self.fault_rng.uniform(0.05, MAX_DELAY), 6)
                for i in self.instances
                if i.serving
            }
            for instance in self.instances:
                instance.broker.latency = latencies.get(instance.id, 0.0)
            self.faults.delay_started(now, max(latencies.values(), default=0.0))
            self.checker.faults_changed(self.faults)
            self.trace.event("FAULT", f"delay {latencies} for {fault.duration:.3f} s")
            self.loop.call_at(end, self._delay_over)
        elif fault.kind == DIRECTORY:
            self.faults.count(DIRECTORY)
            self.trace.event("FAULT", f"directory failing for {fault.duration:.3f} s")
            self.directory.failing = True
            window = [now, float("inf")]
            self.faults.directory.append(window)
            self.checker.faults_changed(self.faults)
            self.loop.call_at(end, self._directory_back, window)

    def _restart(self, victim: SimInstance) -> None:
        instance = self._start_instance(victim.slot, victim.generation + 1)
        self.trace.event("FAULT", f"restart {victim.id} as {instance.id}")

    def _broker_back(self, window: list[float]) -> None:
        self.network.down = False
        window[1] = self.now()
        self.checker.faults_changed(self.faults)
        self.trace.event("FAULT", "broker back")

    def _storm_over(self) -> None:
        for instance in self.instances:
            instance.life.slow = 0.0

    def _delay_over(self) -> None:
        for instance in self.instances:
            instance.broker.latency = 0.0
        self.faults.delay_ended(self.now())
        self.checker.faults_changed(self.faults)
        self.trace.event("FAULT", "delay over")

    def _directory_back(self, window: list[float]) -> None:
        self.directory.failing = False
        window[1] = self.now()
        self.checker.faults_changed(self.faults)
        self.trace.event("FAULT", "directory back")

    # --- other services publishing ----------------------------------------------------

    async def _publisher(self) -> None:
        rng, pop = self.publisher_rng, self.population
        rate = self.config.publish_rate or max(0.2, self.config.clients / 200.0)
        connecting = pop.users[: self.config.clients]
        count = 0
        while True:
            await anyio.sleep(rng.expovariate(rate))
            if self.now() >= self.config.active_seconds:
                return
            instance = self.pick_instance(rng)
            if instance is None:
                continue
            count += 1
            eid = f"e{count}"
            gateway = instance.gateway
            pick = rng.random()
            if pick < 0.8:
                server = rng.choice(pop.servers)
                exclude = rng.choice(pop.members[server]) if rng.random() < 0.2 else None
                if pick < 0.4:
                    channel = rng.choice(pop.channels_of[server])
                    kind, op = "channel", "MESSAGE_CREATE"
                else:
                    channel = None
                    kind, op = "server", "CHANNEL_UPDATE" if rng.random() < 0.1 else "SERVER_EVENT"
                event = {"op": op, "d": {"eid": eid, "text": random_text(rng)}}
                self.checker.intend(eid, (kind, server, channel, exclude))
                if channel is None:
                    ok = await gateway.publish_to_server(server, event, exclude)
                else:
                    ok = await gateway.publish_to_channel(channel, server, event, exclude)
            else:
                kind = "user"
                user = rng.choice(connecting)
                event = {"op": "NOTIFICATION", "d": {"eid": eid, "n": count}}
                self.checker.intend(eid, (kind, user, None, None))
                ok = await gateway.publish_to_user(user, event)
            self.checker.intent_done(eid)
            key = f"{kind} {'ok' if ok else 'failed'}"
            self.external[key] = self.external.get(key, 0) + 1

    async def _checker_loop(self) -> None:
        tick = 0
        while True:
            await anyio.sleep(self.config.check_interval)
            tick += 1
            self._check_outlets()
            self.checker.periodic(presence=tick % 2 == 0)

    def _check_outlets(self) -> None:
        for instance in self.instances:
            if instance.alive:
                by_transport: dict[object, Conn] = {c.transport: c for c in instance.conns}
                self.checker.outlets(instance.id, instance.gateway, by_transport)

    # --- the run ----------------------------------------------------------------------

    async def main(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        if not isinstance(loop, VirtualTimeLoop):
            raise RuntimeError("the simulation runs on simulation.loop.VirtualTimeLoop")
        self.clock.bind(loop)
        self.trace.bind(loop)
        self._stop = asyncio.Event()
        stop = self._stop
        self.checker.on_stop = stop.set
        config = self.config
        async with anyio.create_task_group() as root:
            self._root = root
            for slot in range(config.instances):
                self._start_instance(slot, 0)
            await anyio.sleep(0.1)
            for index, seed in enumerate(self._client_seeds):
                client = VirtualClient(
                    self, index, self.population.users[index], random.Random(seed)
                )
                self.clients.append(client)
                client.start()
            root.start_soon(self._publisher)
            root.start_soon(self._checker_loop)
            self._schedule_faults()
            with anyio.move_on_after(config.active_seconds + config.tail_seconds - self.now()):
                await stop.wait()
            if not stop.is_set():
                self.final_checks()
            root.cancel_scope.cancel()

    def final_checks(self) -> None:
        checker = self.checker
        self._check_outlets()
        checker.periodic()
        checker.presence_pass(self.now(), everyone=True)
        problems: list[str] = []
        checks = 0
        for instance in self.instances:
            snapshot = instance.gateway.snapshot()
            for what, left in (
                ("connections", len(snapshot.connections)),
                ("by_server routes", sum(map(len, snapshot.servers.values()))),
                ("by_user routes", sum(map(len, snapshot.users.values()))),
                ("interest channels", len(snapshot.interest)),
                ("broker subscriptions", len(instance.broker.subscribed_channels)),
            ):
                checks += 1
                if left:
                    problems.append(f"{instance.id}: {left} {what}")
        for what, count in (
            ("broker network channels", len(self.network.channels())),
            ("presence sessions", len(self.presence.live_sessions())),
            ("presence statuses", len(self.presence.stored_statuses())),
            ("typing keys", len(self.typing.live_keys())),
            ("open client connections", len(checker.open_conns)),
        ):
            checks += 1
            if count:
                problems.append(f"{count} {what}")
        checker.leaks(checks, problems)

    def check_elsewhere(self) -> None:
        """Hand the checker and the trace to a second process (simulation.offload)."""
        checker, trace = self.checker, self.trace
        assert isinstance(checker, Checker) and isinstance(trace, Trace)
        link = CheckerLink.start(checker, trace, self.presence)
        self.checker, self.trace = link, link.trace

    def report(self, wall: float, cpu: float, loop: VirtualTimeLoop) -> SimReport:
        checker = self.checker
        gateway_deliveries = sum(i.gateway.metrics.hot.deliveries for i in self.instances)
        return SimReport(
            config=self.config,
            digest=self.trace.digest(),
            violations=list(checker.violations),
            virtual_seconds=self.now(),
            wall_seconds=wall,
            published_by_op=dict(sorted(checker.published_by_op.items())),
            external=dict(sorted(self.external.items())),
            failed_publishes=checker.failed_publishes,
            deliveries=checker.deliveries,
            frames=checker.frames,
            faults=dict(sorted(self.faults.counts.items())),
            checks=dict(checker.checks),
            connections=sum(c.opened for c in self.clients),
            closes=dict(sorted(checker.closes.items())),
            trace_lines=self.trace.lines,
            broker_dropped=sum(i.broker.dropped for i in self.instances),
            gateway_deliveries=gateway_deliveries,
            cpu_seconds=cpu,
            loop_iterations=loop.iterations,
            loop_callbacks=loop.callbacks,
            clock_jumps=loop.jumps,
        )


def run_simulation(config: SimConfig) -> SimReport:
    """Run one seeded simulation to its end (or its first violation).

    With ``config.checker_process`` the checks run in a second process; when it finds
    a violation (or fails) the run is made again in line, so that a failing report
    (first violation, its trace, the digest of a stopped run) is exactly the in-line
    one. Wall and CPU time then add up both runs."""
    if not config.checker_process:
        return _run(config)
    report = _run(config)
    link = report.extra.pop("checker_failed", 0.0)
    if not link:
        return report
    again = _run(dataclasses.replace(config, checker_process=False))
    again.config = config
    again.wall_seconds += report.wall_seconds
    again.cpu_seconds += report.cpu_seconds
    again.extra["reran_in_line"] = 1.0
    again.rerun_reason = report.rerun_reason
    return again


def _run(config: SimConfig) -> SimReport:
    started = time.perf_counter()
    cpu_started = time.process_time()
    logger = logging.getLogger("gateway")
    was_disabled = logger.disabled
    logger.disabled = True
    gc_thresholds = gc.get_threshold()
    loop = new_virtual_loop()
    world = World(config)
    try:
        # Fewer young collections: a run allocates millions of short-lived handles and
        # futures; the default thresholds spend ~15% of the CPU in the collector.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        if config.checker_process:
            world.check_elsewhere()
        loop.run_until_complete(world.main())
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            gc.unfreeze()
            gc.set_threshold(*gc_thresholds)
            logger.disabled = was_disabled
            world.checker.finish()
    checker = world.checker
    cpu = time.process_time() - cpu_started
    report = world.report(time.perf_counter() - started, cpu, loop)
    if isinstance(checker, CheckerLink):
        report.cpu_seconds += checker.remote_cpu
        report.extra["checker_process_cpu"] = checker.remote_cpu
        if checker.failure is not None:
            report.extra["checker_failed"] = 1.0
            report.rerun_reason = checker.failure
    return report


def new_virtual_loop() -> VirtualTimeLoop:
    """An asyncio loop on virtual time that starts at 0 (:mod:`simulation.loop`)."""
    return VirtualTimeLoop(start=0.0)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
