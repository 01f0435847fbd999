"""PROTOCOL section 14 in the pure core: the session's SUBSCRIBE_PRESENCE rows, READY's
memberCount and large, and the recipient rule for PRESENCE_UPDATE in large servers."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from domain import recipients
from domain.codec import Envelope, ErrorCode
from domain.effects import PresenceSnapshot, Send, WatchPresence
from domain.model import Server, Status, User
from domain.session import Session, SessionConfig, State

ALICE = User("u1", "alice")


def ready_session(threshold: int = 250) -> Session:
    s = Session("sid", SessionConfig(large_server_members=threshold), 0.0)
    s.receive(json.dumps({"op": "IDENTIFY", "d": {"token": "t"}}), 0.0)
    s.identified(ALICE, [], Status.ONLINE)
    assert s.state is State.READY
    return s


def frame(op: str, d: Any) -> str:
    return json.dumps({"op": op, "d": d})


def test_ready_says_member_count_and_large_against_the_threshold() -> None:
    s = Session("sid", SessionConfig(large_server_members=250), 0.0)
    s.receive(frame("IDENTIFY", {"token": "t"}), 0.0)
    servers = [Server("a", "A", "u1", member_count=250), Server("b", "B", "u1", member_count=251)]
    (ready,) = s.identified(ALICE, servers, Status.ONLINE)
    assert isinstance(ready, Send)
    wire = json.loads(ready.text)["d"]["servers"]
    assert [(w["id"], w["memberCount"], w["large"]) for w in wire] == [
        ("a", 250, False),
        ("b", 251, True),
    ]


def test_subscribe_presence_carries_the_subscription_verdict() -> None:
    s = ready_session()
    d = {"serverId": "s1", "userIds": ["u2", "u3"]}
    assert s.receive(frame("SUBSCRIBE_PRESENCE", d), 1.0) == [
        WatchPresence("s1", ("u2", "u3"), False)
    ]
    s.subscribe_confirmed("s1")
    assert s.receive(frame("SUBSCRIBE_PRESENCE", d), 1.0) == [
        WatchPresence("s1", ("u2", "u3"), True)
    ]


def test_snapshot_is_a_dispatch_of_visible_statuses_in_order() -> None:
    s = ready_session()
    s.subscribe_confirmed("s1")  # s = 2
    presences = (("u3", Status.INVISIBLE), ("u2", Status.DND), ("u4", Status.OFFLINE))
    (effect,) = s.report(PresenceSnapshot("s1", presences))
    assert isinstance(effect, Send)
    assert json.loads(effect.text) == {
        "op": "PRESENCE_SNAPSHOT",
        "s": 3,
        "d": {
            "serverId": "s1",
            "presences": [
                {"userId": "u3", "status": "offline"},
                {"userId": "u2", "status": "dnd"},
                {"userId": "u4", "status": "offline"},
            ],
        },
    }


def test_no_snapshot_once_the_session_left_the_server() -> None:
    s = ready_session()
    s.subscribe_confirmed("s1")
    s.unsubscribe("s1")
    seq = s.seq
    assert s.report(PresenceSnapshot("s1", (("u2", Status.ONLINE),))) == []
    assert s.seq == seq  # no s was used


def test_subscribe_presence_before_ready_is_not_authenticated() -> None:
    s = Session("sid", SessionConfig(), 0.0)
    (effect,) = s.receive(frame("SUBSCRIBE_PRESENCE", {"serverId": "s1", "userIds": []}), 0.0)
    assert isinstance(effect, Send) and effect.error == ErrorCode.NOT_AUTHENTICATED.value


def test_presence_subject() -> None:
    d = {"userId": "u2", "serverId": "s1", "status": "online"}
    assert recipients.presence_subject(Envelope("PRESENCE_UPDATE", d)) == "u2"
    assert recipients.presence_subject(Envelope("TYPING_START", d)) is None
    assert recipients.presence_subject(Envelope("PRESENCE_UPDATE", None)) is None
    assert recipients.presence_subject(Envelope("PRESENCE_UPDATE", {"userId": 3})) is None


@given(
    routed=st.sets(st.integers(0, 20)),
    interested=st.lists(st.integers(0, 25)),
    own=st.lists(st.integers(0, 25)),
)
def test_presence_recipients_are_the_routed_interested_and_own_each_once(
    routed: set[int], interested: list[int], own: list[int]
) -> None:
    got = recipients.presence_recipients(routed, interested, own)
    assert len(got) == len(set(got))
    assert set(got) == (set(interested) | set(own)) & routed
