"""A RESUME on another instance carries the session's presence interest (PROTOCOL 13
with 14): in a large server the resumed session keeps getting the PRESENCE_UPDATEs of
the users it asked for, and only those, without a new SUBSCRIBE_PRESENCE; the old
instance keeps nothing of it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adapters.shell import GatewaySettings
from domain.session import SessionConfig
from tests.shell.fakes import FakeTransport
from tests.shell.test_handoff import Pair, read_until_resumed, resume, run_pair, sid_of

#: s1 has 3 members (u1, u2, u3): large.
LARGE = GatewaySettings(session=replace(SessionConfig(), large_server_members=2))


async def status(client: FakeTransport, value: str) -> None:
    await client.send_op("PRESENCE_UPDATE", {"status": value})
    await client.send_op("HEARTBEAT")
    while (await client.recv())["op"] != "HEARTBEAT_ACK":
        pass


async def presences(client: FakeTransport, pair: Pair, log: list[Any]) -> list[Any]:
    """The PRESENCE_UPDATEs ``client`` got before a MARK published to s1 (every frame
    read goes to ``log``: the last ``s`` seen is what a RESUME names)."""
    await pair.a.publish_to_server("s1", {"op": "MARK", "d": None})
    got = []
    while (frame := await client.recv())["op"] != "MARK":
        log.append(frame)
        if frame["op"] == "PRESENCE_UPDATE":
            got.append((frame["d"]["userId"], frame["d"]["status"]))
    log.append(frame)
    return got


def test_the_presence_interest_moves_with_a_resume_on_the_other_instance() -> None:
    async def test(pair: Pair) -> None:
        alice = await pair.login(pair.a, "u1")
        bob = await pair.login(pair.b, "u2")
        carol = await pair.login(pair.b, "u3")
        await alice.send_op("SUBSCRIBE_PRESENCE", {"serverId": "s1", "userIds": ["u2"]})
        while (await alice.recv())["op"] != "PRESENCE_SNAPSHOT":
            pass
        assert pair.a.interest.size() == (1, 1)
        sid = sid_of(pair.a, "u1")
        await status(bob, "idle")
        await status(carol, "idle")
        log: list[Any] = []
        assert await presences(alice, pair, log) == [("u2", "idle")]
        alice.drop()
        await pair.until(lambda: sid in pair.a.snapshot().parked)
        # While parked (on A): bob's change is kept for the replay, carol's is not.
        await status(bob, "dnd")
        await status(carol, "dnd")
        last_s = max(f["s"] for f in log if "s" in f)
        again = await resume(pair, pair.b, sid, last_s)
        replay, resumed = await read_until_resumed(again)
        assert resumed["d"]["sessionId"] == sid
        assert [(f["d"]["userId"], f["d"]["status"]) for f in replay
                if f["op"] == "PRESENCE_UPDATE"] == [("u2", "dnd")]
        # On B, with no SUBSCRIBE_PRESENCE sent again: bob's changes come, carol's not.
        assert pair.a.interest.size() == (0, 0)
        assert pair.b.interest.size() == (1, 1)
        await status(bob, "online")
        await status(carol, "online")
        assert await presences(again, pair, log) == [("u2", "online")]
        again.drop(1000)  # the session ends on B: its interest with it
        await pair.until(lambda: pair.b.interest.size() == (0, 0))

    run_pair(test, LARGE)


def test_a_handoffs_interest_is_checked_before_it_is_installed() -> None:
    """Another instance's offer is internal but still parsed defensively: only servers
    the session is subscribed to, only string ids, at most 100 per server."""
    from adapters.shell.live import LiveSession
    from adapters.shell.presence_interest import PresenceInterest
    from domain.session import Session

    index = PresenceInterest()
    live = LiveSession(Session("sid", SessionConfig(), 0.0))
    garbled: list[object] = [None, [], "s1", 7, {"s1": "u2"}, {"s1": None}, {"s9": ["u2"]}]
    for garbage in garbled:
        index.install(live, garbage, ["s1"])
        assert index.size() == (0, 0), garbage
    many = [f"u{i}" for i in range(150)]
    offer = {"s1": [*many, 3, None], "s2": ["u1", {"x": 1}], "s3": ["u1"]}
    index.install(live, offer, ["s1", "s2"])
    assert index.of(live) == {"s1": sorted(many[:100]), "s2": ["u1"]}
    index.drop_all(live)
    assert index.size() == (0, 0)
