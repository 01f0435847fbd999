"""The heartbeat sweep does not count the instance's own stalls against clients
(PROTOCOL 15: never closed because the gateway is busy), and still closes a client
that went silent."""

from __future__ import annotations

import asyncio

import anyio

from adapters.shell import GatewaySettings
from adapters.shell.lag import LoopLag
from domain.codec import CloseCode
from domain.table import SessionConfig
from simulation.clock import VirtualClock
from simulation.world import new_virtual_loop
from tests.shell.fakes import World, running_world

SETTINGS = GatewaySettings(
    session=SessionConfig(heartbeat_timeout=3.0, heartbeat_interval_ms=1_000),
    heartbeat_sweep_ms=250,
)


class StallingClock(VirtualClock):
    """The loop's clock plus ``stalled``: seconds that passed while no task ran (what
    a saturated loop looks like to a task that wakes up late)."""

    stalled = 0.0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        super().bind(loop)
        loop_time = loop.time
        self.monotonic = lambda: loop_time() + self.stalled  # type: ignore[method-assign]


def run(test: object) -> None:
    loop = new_virtual_loop()
    clock = StallingClock()
    clock.bind(loop)

    async def main() -> None:
        async with running_world(clock, SETTINGS) as world:
            await test(world, clock)  # type: ignore[operator]

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_stall_longer_than_the_heartbeat_timeout_closes_nobody() -> None:
    async def scenario(world: World, clock: StallingClock) -> None:
        client = await world.login("u1")
        await client.send_op("HEARTBEAT")
        await client.expect("HEARTBEAT_ACK")
        before = world.gateway.clock.monotonic()
        clock.stalled += 5.0  # the loop was stuck for 5 s: over the 3 s timeout
        assert world.gateway.clock.monotonic() - before >= 5.0  # the gateway sees it
        await anyio.sleep(0.6)  # two sweeps
        assert client.close_code is None
        await client.send_op("HEARTBEAT")  # what the client sent during the stall
        await client.expect("HEARTBEAT_ACK")
        assert world.gateway.loop_lag.total >= 5.0

    run(scenario)


def test_a_client_silent_after_a_stall_is_still_closed() -> None:
    async def scenario(world: World, clock: StallingClock) -> None:
        client = await world.login("u1")
        clock.stalled += 5.0
        await anyio.sleep(0.6)
        assert client.close_code is None
        # Silent on: once the stall is older than the timeout window, 4009.
        await world.until(lambda: client.close_code is not None, "closed")
        assert client.close_code == CloseCode.SESSION_TIMED_OUT

    run(scenario)


def test_the_lag_meter_ignores_noise_and_forgets_old_stalls() -> None:
    lag = LoopLag(window=3.0)
    lag.observe(10.0, 0.01)
    assert lag.recent(10.0) == 0.0
    lag.observe(11.0, 2.0)
    lag.observe(12.0, 0.5)
    assert lag.recent(12.0) == 2.5
    assert lag.recent(14.5) == 0.5
    assert lag.recent(15.5) == 0.0
    assert lag.total == 2.5
