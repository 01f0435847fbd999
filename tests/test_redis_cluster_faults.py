"""RedisClusterBroker and the cluster presence store under faults (PROTOCOL 16), on a
3-master cluster of this module's own (``scripts/redis-cluster``: the suite's shared
cluster is never killed or resharded).

* One master killed (no replica): its channels stop, every other channel keeps
  delivering and the instance is unready; the master restarted: delivery on its
  channels resumes by itself, with nothing asked of the broker.
* A slot moved (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE) while
  events flow on a channel of it: the subscriber follows the slot to its new master.
  What is lost is exactly what the new master received before the subscriber's
  SSUBSCRIBE reached it (at most once); nothing after that, nothing out of order,
  never a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from adapters.redis import RedisClusterBroker, RedisClusterPresenceStore, RedisTypingGate
from adapters.redis.cluster_shard import channel_slot
from domain.ports import BackendUnavailable

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "redis-cluster"
WAIT = 10.0


async def command(node: aioredis.Redis, *args: object) -> Any:
    """One command on one node (redis-py leaves ``execute_command`` untyped)."""
    return await node.execute_command(*args)  # type: ignore[no-untyped-call]


@dataclass
class OwnCluster:
    dir: Path
    url: str
    ports: list[int]

    def address(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def kill(self, port: int) -> None:
        pid = int((self.dir / str(port) / "pid").read_text())
        os.kill(pid, 9)

    def restart(self, port: int) -> None:
        subprocess.run([SCRIPT, "restart-node", str(self.dir), str(port)], check=True)

    def node(self, port: int) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=port)

    async def wait_ok(self) -> None:
        """Every node says cluster_state:ok (a restarted one takes a moment)."""
        with anyio.fail_after(WAIT * 2):
            for port in self.ports:
                node = self.node(port)
                try:
                    while True:
                        with contextlib.suppress(aioredis.ConnectionError):
                            info = await command(node, "CLUSTER INFO")
                            if info.get("cluster_state") == "ok":
                                break
                        await anyio.sleep(0.05)
                finally:
                    await node.aclose()


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    directory = tmp_path_factory.mktemp("cluster")
    started = subprocess.run(
        [SCRIPT, "start", str(directory), "18379", "3"],
        check=False,
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        pytest.fail(f"scripts/redis-cluster could not start a cluster: {started.stderr}")
    ports = [int(p) for p in (directory / "ports").read_text().split()]
    try:
        yield OwnCluster(directory, started.stdout.strip(), ports)
    finally:
        subprocess.run([SCRIPT, "stop", str(directory)], check=False)


@dataclass
class Recorder:
    received: list[tuple[str, bytes]] = field(default_factory=list)
    _arrival: anyio.Event = field(default_factory=anyio.Event)

    async def handler(self, channel: str, payload: bytes) -> None:
        self.received.append((channel, payload))
        self._arrival.set()
        self._arrival = anyio.Event()

    def payloads(self, channel: str) -> list[bytes]:
        return [p for c, p in self.received if c == channel]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not predicate():
                await self._arrival.wait()


async def eventually(predicate: Callable[[], bool], within: float = WAIT) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - state with no event to wait on
            await anyio.sleep(0.01)


@pytest.fixture
async def pair(
    own_cluster: OwnCluster,
) -> AsyncIterator[tuple[RedisClusterBroker, Recorder, RedisClusterBroker]]:
    """A subscriber (with what it received) and a publisher, both running."""
    await own_cluster.wait_ok()
    recorder = Recorder()

    def broker() -> RedisClusterBroker:
        return RedisClusterBroker(
            own_cluster.url, ping_interval=0.2, ping_timeout=1.0, reconnect_max=0.5
        )

    async def ignore(_channel: str, _payload: bytes) -> None:
        pass

    subscriber, publisher = broker(), broker()
    tasks = [
        asyncio.create_task(subscriber.run(recorder.handler)),
        asyncio.create_task(publisher.run(ignore)),
    ]
    try:
        await eventually(lambda: subscriber.is_healthy() and publisher.is_healthy())
        yield subscriber, recorder, publisher
    finally:
        await subscriber.close()
        await publisher.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def channels_by_master(broker: RedisClusterBroker, per_master: int = 2) -> dict[str, list[str]]:
    """Fresh server channels, ``per_master`` on each master of the broker's map."""
    slot_map = broker.slot_map
    assert slot_map is not None
    found: dict[str, list[str]] = {address: [] for address in slot_map.masters()}
    while any(len(v) < per_master for v in found.values()):
        channel = f"ws:server:cf-{uuid.uuid4().hex[:12]}"
        owner = slot_map.owner(channel_slot(channel))
        assert owner is not None
        if len(found[owner]) < per_master:
            found[owner].append(channel)
    return found


async def test_a_dead_master_stops_only_its_channels_and_resumes_by_itself(
    own_cluster: OwnCluster,
    pair: tuple[RedisClusterBroker, Recorder, RedisClusterBroker],
) -> None:
    subscriber, recorder, publisher = pair
    by_master = channels_by_master(subscriber)
    for channels in by_master.values():
        for channel in channels:
            await subscriber.subscribe(channel)
    victim_port = own_cluster.ports[1]
    victim = own_cluster.address(victim_port)
    survivors = [c for address, cs in by_master.items() if address != victim for c in cs]
    lost = by_master[victim]

    own_cluster.kill(victim_port)
    await eventually(lambda: not subscriber.is_healthy())  # unready (docs/OPERATIONS.md)
    for i in range(3):
        for channel in survivors:
            await publisher.publish(channel, f"during {i}".encode())
        for channel in lost:
            with pytest.raises(BackendUnavailable):
                await publisher.publish(channel, f"during {i}".encode())
    await recorder.wait_until(
        lambda: all(recorder.payloads(c)[-1:] == [b"during 2"] for c in survivors)
    )
    for channel in survivors:
        assert recorder.payloads(channel) == [b"during 0", b"during 1", b"during 2"]
    for channel in lost:
        assert recorder.payloads(channel) == []
    # Presence and typing keys of the other masters still answer.
    async with RedisTypingGate.from_url(own_cluster.url, cluster=True) as gate:
        survivor_key = next(
            f"typing:c-{i}:u"
            for i in range(10_000)
            if subscriber.slot_map is not None
            and subscriber.slot_map.owner(channel_slot(f"typing:c-{i}:u")) != victim
        )
        assert await gate.claim(survivor_key, 1000) is True

    own_cluster.restart(victim_port)
    await eventually(subscriber.is_healthy, within=20.0)
    await eventually(publisher.is_healthy, within=20.0)
    # Nothing was asked of the subscriber: its shard reconnected and resubscribed.
    for channel in lost + survivors:
        await publisher.publish(channel, b"after")
    await recorder.wait_until(
        lambda: all(recorder.payloads(c)[-1:] == [b"after"] for c in lost + survivors)
    )
    for channel in lost:
        assert recorder.payloads(channel) == [b"after"]
    assert subscriber.stats.reconnects >= 1


async def _cluster_id(node: aioredis.Redis) -> str:
    value = await command(node, "CLUSTER MYID")
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_a_slot_moved_while_events_flow_is_followed(
    own_cluster: OwnCluster,
    pair: tuple[RedisClusterBroker, Recorder, RedisClusterBroker],
) -> None:
    subscriber, recorder, publisher = pair
    slot_map = subscriber.slot_map
    assert slot_map is not None
    by_master = channels_by_master(subscriber, per_master=1)
    source_address = own_cluster.address(own_cluster.ports[0])
    target_port = own_cluster.ports[2]
    target_address = own_cluster.address(target_port)
    channel = by_master[source_address][0]
    other = by_master[target_address][0]  # never moves: the control channel
    slot = channel_slot(channel)
    await subscriber.subscribe(channel)
    await subscriber.subscribe(other)

    sent: list[int] = []
    routed_at: list[int] = []  # the first index published once the subscriber followed
    stop = anyio.Event()

    async def flow() -> None:
        i = 0
        while not stop.is_set():
            await publisher.publish(channel, str(i).encode())
            await publisher.publish(other, str(i).encode())
            sent.append(i)
            i += 1
            if not routed_at and subscriber.is_live_on(channel, target_address):
                routed_at.append(i)
            await anyio.sleep(0.002)

    source = own_cluster.node(own_cluster.ports[0])
    target = own_cluster.node(target_port)
    third = own_cluster.node(own_cluster.ports[1])
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(flow)
            await eventually(lambda: len(sent) >= 50)
            before_move = len(sent)
            source_id, target_id = await _cluster_id(source), await _cluster_id(target)
            await command(target, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
            await command(source, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
            while keys := await command(source, "CLUSTER GETKEYSINSLOT", slot, 100):
                await command(
                    source, "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys
                )
            await eventually(lambda: len(sent) >= before_move + 20)  # events while migrating
            for node in (target, source, third):
                await command(node, "CLUSTER SETSLOT", slot, "NODE", target_id)
            await eventually(lambda: bool(routed_at))
            last_routed = routed_at[0]
            await eventually(lambda: len(sent) >= last_routed + 100)
            stop.set()
    finally:
        for node in (source, target, third):
            await node.aclose()
    final = sent[-1]
    await recorder.wait_until(lambda: recorder.payloads(channel)[-1:] == [str(final).encode()])
    await recorder.wait_until(lambda: recorder.payloads(other)[-1:] == [str(final).encode()])
    got = [int(p) for p in recorder.payloads(channel)]
    assert got == sorted(set(got)), "out of order or duplicated"
    assert [int(p) for p in recorder.payloads(other)] == sent  # the control channel: all
    missing = sorted(set(sent) - set(got))
    # Everything before the move and everything once the subscriber followed arrived.
    assert all(before_move <= i < routed_at[0] for i in missing), (missing, before_move, routed_at)
    print(f"slot move: {len(missing)} of {len(sent)} events lost, indexes {missing}")
    assert subscriber.slot_map is not None
    assert subscriber.slot_map.owner(slot) == target_address


async def test_presence_of_users_on_other_masters_while_one_is_down(
    own_cluster: OwnCluster,
) -> None:
    """A user whose keys live on a dead master cannot change; the others can, and the
    dead master's users are right again once it is back."""
    await own_cluster.wait_ok()
    prefix = f"test-{uuid.uuid4().hex}:presence:"
    async with RedisClusterPresenceStore.from_url(
        own_cluster.url, registry_prefix=prefix, timeout=0.5
    ) as store:
        victim_port = own_cluster.ports[0]
        victim = own_cluster.address(victim_port)
        probe = RedisClusterBroker(own_cluster.url)
        await probe.publish("ws:server:cf-probe", b"")  # reads the slot map
        slot_map = probe.slot_map
        await probe.close()
        assert slot_map is not None
        # The instance's own keys live elsewhere (they are one slot: see
        # cluster_presence; with them on the dead master, its opens fail too).
        instance = next(
            i
            for i in (f"i-{n}" for n in range(1000))
            if slot_map.owner(channel_slot(store.instance_users_key(i))) != victim
        )
        users = [f"cf-user-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
        for i, user in enumerate(users):
            await store.session_opened(instance, user, f"s{i}")
        on_victim = [u for u in users if slot_map.owner(channel_slot(f"presence:{u}")) == victim]
        elsewhere = [u for u in users if u not in on_victim]
        assert on_victim and elsewhere
        own_cluster.kill(victim_port)
        try:
            for user in elsewhere:
                change = await store.session_closed(instance, user, f"s{users.index(user)}")
                assert change.after.value == "offline"
            with pytest.raises(BackendUnavailable):
                await store.session_closed(instance, on_victim[0], f"s{users.index(on_victim[0])}")
            with pytest.raises(BackendUnavailable):
                await store.ping()
        finally:
            own_cluster.restart(victim_port)
        # Back: each call may fail once more on a connection the restart broke (a
        # caller retries an UNAVAILABLE, PROTOCOL 15); then everything answers. The
        # restarted master kept no data (no persistence here): its users read offline.
        failures = 0
        reasons: set[str] = set()
        for user in on_victim:
            with anyio.fail_after(20):
                while True:
                    try:
                        change = await store.session_closed(instance, user, f"s{users.index(user)}")
                        break
                    except BackendUnavailable as exc:
                        failures += 1
                        reasons.add(str(exc).split(":")[1].strip())
                        await anyio.sleep(0.1)
            assert change.after.value == "offline"
        await store.ping()
        print(f"presence after the restart: {failures} failed call(s) ({reasons}) first")


async def test_a_gateway_on_the_cluster_keeps_serving_the_other_masters(
    own_cluster: OwnCluster,
) -> None:
    """Black box: one master down, the instance is unready (503) and its clients keep
    getting the events of servers whose channel lives elsewhere, from another service's
    SPUBLISH; the master back, /readyz is 200 again by itself."""
    from adapters.memory import MemoryDirectory
    from tests.multi.conftest import World, config_from, redis_gateway_factory, serve_instance

    await own_cluster.wait_ok()
    probe = RedisClusterBroker(own_cluster.url)
    await probe.publish("ws:server:cf-probe", b"")
    slot_map = probe.slot_map
    await probe.close()
    assert slot_map is not None

    def owner(key: str) -> str | None:
        return slot_map.owner(channel_slot(key))

    # A world whose user and server s1 live off one master (the victim).
    while True:
        world = World()
        used = {
            owner(k)
            for k in (
                f"ws:server:{world.s1}",
                f"ws:user:{world.u1}",
                f"presence:{world.u1}",
            )
        }
        victims = [p for p in own_cluster.ports if own_cluster.address(p) not in used]
        if victims:
            break
    victim = victims[0]
    channel_owner = owner(f"ws:server:{world.s1}")
    assert channel_owner is not None
    config = config_from({"GATEWAY_REDIS_MODE": "cluster"})
    factory = redis_gateway_factory(
        own_cluster.url, MemoryDirectory(world.data()), config, "cluster"
    )
    publisher = own_cluster.node(int(channel_owner.rpartition(":")[2]))
    try:
        async with serve_instance("A", config, factory) as a:
            await eventually(a.gateway.broker.is_healthy)
            client = await a.login(world.u1)
            await client.subscribe(world.s1)
            own_cluster.kill(victim)
            await a.wait_readyz(503)
            envelope = b'{"event": {"op": "DURING", "d": 1}}'
            assert await command(publisher, "SPUBLISH", f"ws:server:{world.s1}", envelope) == 1
            await client.expect_event("DURING", 1)
            own_cluster.restart(victim)
            await a.wait_readyz(200, within=20.0)
            envelope = b'{"event": {"op": "AFTER", "d": 2}}'
            assert await command(publisher, "SPUBLISH", f"ws:server:{world.s1}", envelope) == 1
            await client.expect_event("AFTER", 2)
            await client.close()
    finally:
        await publisher.aclose()


async def test_subscribes_of_one_tick_share_one_command_per_slot(
    own_cluster: OwnCluster,
    pair: tuple[RedisClusterBroker, Recorder, RedisClusterBroker],
) -> None:
    """As the standalone broker coalesces a tick's SUBSCRIBEs, the cluster broker sends
    one SSUBSCRIBE per slot (a sharded command may not span slots): 60 channels in 3
    slots of one master, subscribed at once, are 3 commands there."""
    subscriber, recorder, publisher = pair
    slot_map = subscriber.slot_map
    assert slot_map is not None
    address = own_cluster.address(own_cluster.ports[0])
    tags: list[str] = []
    while len(tags) < 3:  # hash tags whose slots this master serves
        tag = uuid.uuid4().hex[:8]
        if slot_map.owner(channel_slot("{" + tag + "}")) == address:
            tags.append(tag)
    channels = [f"ws:server:{{{tag}}}-{i}" for tag in tags for i in range(20)]
    node = own_cluster.node(own_cluster.ports[0])
    try:
        await command(node, "CONFIG", "RESETSTAT")
        async with anyio.create_task_group() as tg:
            for channel in channels:
                tg.start_soon(subscriber.subscribe, channel)
        stats = await command(node, "INFO", "commandstats")
        assert stats["cmdstat_ssubscribe"]["calls"] == 3
    finally:
        await node.aclose()
    for channel in channels:
        await publisher.publish(channel, b"x")
    await recorder.wait_until(lambda: len(recorder.received) >= len(channels))
    assert sorted(c for c, _ in recorder.received) == sorted(channels)


async def test_cluster_backends_start_while_no_node_answers() -> None:
    """Cluster mode starts with every node down (as standalone does): nothing is
    contacted at open; the broker is not live, and each call fails BackendUnavailable
    within its bound instead of hanging or raising a library error."""
    from adapters.redis import open_redis_backends

    async with open_redis_backends("redis://127.0.0.1:1/0", call_timeout=0.5, mode="cluster") as (
        broker,
        typing_gate,
        presence,
    ):
        received: list[bytes] = []

        async def handler(_channel: str, payload: bytes) -> None:
            received.append(payload)

        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.run, handler)
            await anyio.sleep(0.3)
            assert not broker.is_healthy()
            with anyio.fail_after(5):
                for call in (
                    broker.publish("ws:server:x", b"x"),
                    typing_gate.claim("typing:c:u", 1000),
                    presence.ping(),
                    presence.session_opened("i", "u", "s"),
                ):
                    with pytest.raises(BackendUnavailable):
                        await call
            await broker.close()
            tg.cancel_scope.cancel()
    assert received == []
