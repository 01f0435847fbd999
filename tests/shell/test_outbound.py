"""The flusher (adapters.shell.outbound): an idle connection holds no task beyond its
reader, one wake of the flusher writes a whole fan-out, and a client that does not
read gets a sender task of its own that holds up nobody else."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import anyio
import anyio.lowlevel
import pytest

from adapters.shell import GatewaySettings
from adapters.shell.connection import Connection
from adapters.shell.outbound import Flusher
from tests.shell.fakes import FakeTransport, World, run_virtual

USERS = ("u1", "u2", "u3")  # members of s1 in the demo data


def _connections(world: World) -> list[Connection]:
    return list(world.gateway.admission.connections)


async def _quiet(world: World) -> None:
    """Let presence broadcasts and the like settle (virtual time: no real wait)."""
    await anyio.sleep(1.0)
    await world.until(
        lambda: all(not c.outbound and not c.sending for c in _connections(world)), "quiet"
    )


def test_an_idle_connection_holds_no_task_but_its_reader() -> None:
    async def test(world: World) -> None:
        await _quiet(world)
        before = len(asyncio.all_tasks())
        clients = [await world.login(USERS[i % 3], "s1") for i in range(30)]
        await _quiet(world)
        # World.connect starts one task per connection (gateway.serve: the reader);
        # nothing else is left running for it.
        assert len(asyncio.all_tasks()) - before == len(clients)
        assert not any(c.sending for c in _connections(world))

    run_virtual(test)


def test_one_wake_of_the_flusher_writes_a_whole_fan_out() -> None:
    async def test(world: World) -> None:
        clients = [await world.login(USERS[i % 3], "s1") for i in range(30)]
        await _quiet(world)
        for client in clients:
            client.pending()
        flusher = world.gateway.flusher
        rounds = flusher.rounds
        await world.gateway.publish_to_server("s1", {"op": "BULK", "d": 1})
        for client in clients:
            assert (await client.event())["d"] == 1
        assert flusher.rounds - rounds == 1
        assert not any(c.sending for c in _connections(world))

    run_virtual(test)


def test_a_client_that_does_not_read_gets_a_sender_and_holds_up_no_one() -> None:
    settings = replace(GatewaySettings(), outbound_max_frames=8)

    async def test(world: World) -> None:
        readers = [await world.login(user, "s1") for user in ("u1", "u3")]
        stalled = await world.login("u2", "s1")
        await _quiet(world)
        (stalled_id,) = world.gateway.snapshot().users["u2"]
        (stalled_conn,) = [c for c in _connections(world) if c.live.session_id == stalled_id]
        stalled.stall()
        for i in range(4):
            await world.gateway.publish_to_server("s1", {"op": "BULK", "d": i})
        for reader in readers:
            assert [(await reader.event())["d"] for _ in range(4)] == [0, 1, 2, 3]
        # Its write would block: a task of its own waits on it, nobody else has one.
        assert stalled_conn.sending
        assert [c for c in _connections(world) if c.sending] == [stalled_conn]
        for i in range(4, 16):
            await world.gateway.publish_to_server("s1", {"op": "BULK", "d": i})
        await stalled.closed.wait()
        assert stalled.close_code == 4010
        for reader in readers:
            assert [(await reader.event())["d"] for _ in range(12)] == list(range(4, 16))
        await world.until(lambda: stalled_id not in world.gateway.snapshot().connections, "gone")
        await _quiet(world)
        assert not stalled_conn.sending

    run_virtual(test, settings)


def test_frames_queued_while_a_sender_runs_go_out_after_it_in_order() -> None:
    async def test(world: World) -> None:
        client: FakeTransport = await world.login("u1", "s1")
        await _quiet(world)
        client.stall()
        for i in range(3):
            await world.gateway.publish_to_server("s1", {"op": "BULK", "d": i})
        await anyio.sleep(0.5)
        (conn,) = _connections(world)
        assert conn.sending
        client.resume()
        for i in range(3, 6):
            await world.gateway.publish_to_server("s1", {"op": "BULK", "d": i})
        frames = [await client.event() for _ in range(6)]
        assert [f["d"] for f in frames] == list(range(6))
        assert [f["s"] for f in frames] == list(range(frames[0]["s"], frames[0]["s"] + 6))
        await _quiet(world)
        assert not conn.sending

    run_virtual(test)


def test_on_another_backend_the_rounds_run_in_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher's rounds are loop callbacks on asyncio; where the backend's token has
    no ``call_soon`` (another backend) they run in its task: the tests above, again."""
    real = anyio.lowlevel.current_token

    def token() -> anyio.lowlevel.EventLoopToken:
        return anyio.lowlevel.EventLoopToken(real().backend_class, object())

    monkeypatch.setattr(anyio.lowlevel, "current_token", token)
    rounds_in_a_task: list[bool] = []
    loop = Flusher._task_loop

    async def spy(self: Flusher) -> None:
        rounds_in_a_task.append(True)
        await loop(self)

    monkeypatch.setattr(Flusher, "_task_loop", spy)
    test_an_idle_connection_holds_no_task_but_its_reader()
    test_one_wake_of_the_flusher_writes_a_whole_fan_out()
    test_a_client_that_does_not_read_gets_a_sender_and_holds_up_no_one()
    test_frames_queued_while_a_sender_runs_go_out_after_it_in_order()
    assert len(rounds_in_a_task) == 4


def test_a_stopping_flusher_ends_its_tasks_through_their_scopes() -> None:
    """On asyncio a connection's short-lived tasks are plain tasks the flusher keeps.
    When the flusher stops they are cancelled through their own scopes, as anyio's
    cancellation would: their shielded clean-up runs to its end, and the flusher
    returns only once they have."""

    async def main() -> list[str]:
        flusher = Flusher()
        seen: list[str] = []

        async def task(scope: anyio.CancelScope, name: str) -> None:
            with scope:
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(0.01)  # a clean-up that must not be cut short
                        seen.append(name)

        async with anyio.create_task_group() as group:
            await group.start(flusher.run)
            for name in ("a", "b"):
                flusher.spawn(task, anyio.CancelScope(), name)
            await anyio.lowlevel.checkpoint()
            assert len(flusher._owned) == 2, "plain tasks, kept by the flusher"
            assert all(isinstance(t, asyncio.Task) for t in flusher._owned)
            group.cancel_scope.cancel()
        assert not flusher._owned and not flusher.running
        return seen

    assert sorted(asyncio.run(main())) == ["a", "b"]


def test_a_flusher_task_that_raises_is_reported_not_lost() -> None:
    async def main() -> list[BaseException | None]:
        flusher = Flusher()
        reported: list[BaseException | None] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: reported.append(context.get("exception"))
        )

        async def task(scope: anyio.CancelScope) -> None:
            with scope:
                raise KeyError("a bug")

        async with anyio.create_task_group() as group:
            await group.start(flusher.run)
            flusher.spawn(task, anyio.CancelScope())
            await anyio.sleep(0.01)
            group.cancel_scope.cancel()
        return reported

    reported = asyncio.run(main())
    assert len(reported) == 1 and isinstance(reported[0], KeyError)
