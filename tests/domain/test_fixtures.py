"""The fixture format (PROTOCOL section 11): the demo file, round trips, and every
validation error."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.fixtures import FixtureError, dump_directory, parse_directory
from domain.model import Channel, DirectoryData, Member, Overwrite, Role, Server, User

DEMO_PATH = Path(__file__).resolve().parents[2] / "entrypoints" / "demo.json"

#: The example of PROTOCOL section 11, verbatim.
PROTOCOL_EXAMPLE: dict[str, Any] = {
    "users": [{"id": "u1", "username": "alice", "displayName": "Alice", "avatarUrl": None}],
    "servers": [{"id": "s1", "name": "Home", "ownerId": "u1", "iconUrl": None}],
    "roles": [{"id": "s1", "serverId": "s1", "name": "@everyone", "permissions": 3072}],
    "members": [{"serverId": "s1", "userId": "u1", "roleIds": []}],
    "channels": [{"id": "c1", "serverId": "s1", "name": "general", "type": "text",
                  "overwrites": [{"id": "s1", "type": "role", "allow": 0, "deny": 1024}]}],
}


def demo() -> dict[str, Any]:
    doc = json.loads(DEMO_PATH.read_text())
    assert isinstance(doc, dict)
    return doc


# --- the demo file ---------------------------------------------------------------------


def test_parse_the_demo_file() -> None:
    data = parse_directory(demo())
    assert [u.id for u in data.users] == ["u1", "u2", "u3", "u4"]
    assert data.users[0] == User("u1", "alice", "Alice", None)
    assert data.servers == (
        Server("s1", "Home", "u1", None),
        Server("s2", "Gaming", "u2", None),
    )
    assert Role("r-mods", "s1", "mods", 3072) in data.roles
    assert Member("s1", "u2", ("r-mods",)) in data.members
    assert len(data.members) == 6
    mods_only = next(c for c in data.channels if c.id == "c3")
    assert mods_only == Channel(
        "c3", "s1", "mods-only", "text",
        (Overwrite("s1", "role", 0, 1024), Overwrite("r-mods", "role", 1024, 0)),
    )


@pytest.mark.parametrize("doc", [pytest.param(PROTOCOL_EXAMPLE, id="protocol"),
                                 pytest.param(None, id="demo")])
def test_dump_parse_round_trip(doc: dict[str, Any] | None) -> None:
    doc = demo() if doc is None else doc
    data = parse_directory(doc)
    assert dump_directory(data) == doc
    assert parse_directory(dump_directory(data)) == data
    # and through JSON text, as `gateway db load` reads it
    assert parse_directory(json.loads(json.dumps(dump_directory(data)))) == data


def test_defaults_for_optional_fields() -> None:
    data = parse_directory({
        "users": [{"id": "u1", "username": "alice"}],
        "servers": [{"id": "s1", "name": "Home", "ownerId": "u1"}],
        "members": [{"serverId": "s1", "userId": "u1"}],
        "channels": [{"id": "c1", "serverId": "s1", "name": "general",
                      "overwrites": [{"id": "u1", "type": "member"}]}],
        "comment": "unknown keys are ignored",
    })
    assert data == DirectoryData(
        users=(User("u1", "alice", None, None),),
        servers=(Server("s1", "Home", "u1", None),),
        roles=(),
        members=(Member("s1", "u1", ()),),
        channels=(Channel("c1", "s1", "general", "text", (Overwrite("u1", "member", 0, 0),)),),
    )
    assert parse_directory({}) == DirectoryData()


# --- round trips of random valid directories --------------------------------------------

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=6)
names = st.text(min_size=1, max_size=8)
optional_text = st.none() | st.text(max_size=8)
perms = st.integers(0, 2**53 - 1)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid fixture in canonical form (every key present, as dump writes it)."""
    user_ids = draw(st.lists(ids.map("u".__add__), min_size=1, max_size=5, unique=True))
    usernames = draw(st.lists(names, min_size=len(user_ids), max_size=len(user_ids),
                              unique=True))
    users = [{"id": u, "username": n, "displayName": draw(optional_text),
              "avatarUrl": draw(optional_text)} for u, n in zip(user_ids, usernames, strict=True)]
    server_ids = draw(st.lists(ids.map("s".__add__), max_size=3, unique=True))
    servers = [{"id": s, "name": draw(names), "ownerId": draw(st.sampled_from(user_ids)),
                "iconUrl": draw(optional_text)} for s in server_ids]
    roles: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    channels: list[dict[str, Any]] = []
    if server_ids:
        role_ids = [s for s in server_ids if draw(st.booleans())]  # @everyone roles
        role_ids += draw(st.lists(ids.map("r".__add__), max_size=4, unique=True))
        role_server = {r: (r if r in server_ids else draw(st.sampled_from(server_ids)))
                       for r in role_ids}
        roles = [{"id": r, "serverId": role_server[r], "name": draw(names),
                  "permissions": draw(perms)} for r in role_ids]
        pairs = draw(st.lists(st.tuples(st.sampled_from(server_ids), st.sampled_from(user_ids)),
                              unique=True, max_size=6))
        for sid, uid in pairs:
            own = [r for r in role_ids if role_server[r] == sid]
            role_list = draw(st.lists(st.sampled_from(own), unique=True)) if own else []
            members.append({"serverId": sid, "userId": uid, "roleIds": role_list})
        for cid in draw(st.lists(ids.map("c".__add__), max_size=4, unique=True)):
            sid = draw(st.sampled_from(server_ids))
            targets = [(r, "role") for r in role_ids if role_server[r] == sid]
            targets += [(u, "member") for u in user_ids]
            chosen = draw(st.lists(st.sampled_from(targets), unique=True, max_size=4))
            channels.append({
                "id": cid, "serverId": sid, "name": draw(names),
                "type": draw(st.sampled_from(["text", "voice"])),
                "overwrites": [{"id": i, "type": t, "allow": draw(perms), "deny": draw(perms)}
                               for i, t in chosen],
            })
    return {"users": users, "servers": servers, "roles": roles, "members": members,
            "channels": channels}


@given(documents())
def test_random_directories_round_trip(doc: dict[str, Any]) -> None:
    data = parse_directory(doc)
    assert dump_directory(data) == doc
    assert parse_directory(dump_directory(data)) == data


# --- validation errors -------------------------------------------------------------------

Edit = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Edit:
    """Set ``doc[a][i][b]...`` (dotted path, integers are list indexes)."""

    def edit(doc: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _delete(path: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return edit


def _append(kind: str, item: dict[str, Any]) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc[kind].append(item)

    return edit


WRONG_TYPES: list[tuple[str, Edit, list[str]]] = [
    ("users not a list", _set("users", {"u1": {}}), ["'users'", "list"]),
    ("servers not a list", _set("servers", "s1"), ["'servers'", "list"]),
    ("user not an object", _set("users.0", "u1"), ["users[0]", "object"]),
    ("id not a string", _set("users.0.id", 1), ["users[0]", "'id'", "string"]),
    ("id empty", _set("users.0.id", ""), ["users[0]", "'id'", "non-empty"]),
    ("username missing", _delete("users.1.username"), ["users[1]", "'username'"]),
    ("displayName not a string", _set("users.0.displayName", 3),
     ["users[0]", "'displayName'", "string or null"]),
    ("avatarUrl not a string", _set("users.2.avatarUrl", {}), ["users[2]", "'avatarUrl'"]),
    ("ownerId null", _set("servers.0.ownerId", None), ["servers[0]", "'ownerId'"]),
    ("server name missing", _delete("servers.1.name"), ["servers[1]", "'name'"]),
    ("iconUrl not a string", _set("servers.0.iconUrl", []), ["servers[0]", "'iconUrl'"]),
    ("permissions a string", _set("roles.0.permissions", "3072"),
     ["roles[0]", "'permissions'", "integer"]),
    ("permissions a bool", _set("roles.0.permissions", True), ["roles[0]", "'permissions'"]),
    ("permissions negative", _set("roles.1.permissions", -1),
     ["roles[1]", "'permissions'", "non-negative"]),
    ("permissions a float", _set("roles.0.permissions", 3072.0), ["roles[0]", "'permissions'"]),
    ("permissions missing", _delete("roles.2.permissions"), ["roles[2]", "'permissions'"]),
    ("role serverId missing", _delete("roles.1.serverId"), ["roles[1]", "'serverId'"]),
    ("roleIds a string", _set("members.1.roleIds", "r-mods"), ["members[1]", "'roleIds'"]),
    ("roleIds of ints", _set("members.1.roleIds", [1]), ["members[1]", "'roleIds'"]),
    ("member userId int", _set("members.0.userId", 1), ["members[0]", "'userId'"]),
    ("channel type int", _set("channels.0.type", 5), ["channels[0]", "'type'"]),
    ("overwrites an object", _set("channels.2.overwrites", {}),
     ["channels[2]", "'overwrites'", "list"]),
    ("overwrite not an object", _set("channels.2.overwrites.0", "s1"),
     ["channels[2].overwrites[0]", "object"]),
    ("overwrite type unknown", _set("channels.2.overwrites.0.type", "user"),
     ["channels[2].overwrites[0]", "'type'", "'role' or 'member'"]),
    ("overwrite type missing", _delete("channels.2.overwrites.1.type"),
     ["channels[2].overwrites[1]", "'type'"]),
    ("overwrite allow negative", _set("channels.2.overwrites.1.allow", -5),
     ["channels[2].overwrites[1]", "'allow'"]),
    ("overwrite deny a string", _set("channels.2.overwrites.0.deny", "1024"),
     ["channels[2].overwrites[0]", "'deny'"]),
    ("overwrite id missing", _delete("channels.2.overwrites.0.id"),
     ["channels[2].overwrites[0]", "'id'"]),
]

UNKNOWN_REFERENCES: list[tuple[str, Edit, list[str]]] = [
    ("owner", _set("servers.0.ownerId", "nobody"), ["server s1", "owner", "nobody"]),
    ("role's server", _set("roles.1.serverId", "s9"), ["role r-mods", "server", "s9"]),
    ("member's server", _set("members.0.serverId", "s9"), ["u1", "server", "s9"]),
    ("member's user", _set("members.0.userId", "u9"), ["u9", "user"]),
    ("member's role", _set("members.1.roleIds", ["r-nope"]), ["u2", "role", "r-nope"]),
    ("role of another server", _set("members.3.roleIds", ["r-mods"]), ["u2@s2", "r-mods"]),
    ("channel's server", _set("channels.0.serverId", "s9"), ["channel c1", "server", "s9"]),
]

DUPLICATES: list[tuple[str, Edit, list[str]]] = [
    ("user id", _append("users", {"id": "u1", "username": "alice2"}), ["duplicate", "'u1'"]),
    ("username", _append("users", {"id": "u9", "username": "bob"}),
     ["duplicate", "username", "'bob'"]),
    ("server id", _append("servers", {"id": "s2", "name": "Other", "ownerId": "u1"}),
     ["duplicate", "server", "'s2'"]),
    ("role id", _append("roles", {"id": "r-mods", "serverId": "s2", "name": "m",
                                  "permissions": 0}), ["duplicate", "role", "'r-mods'"]),
    ("channel id", _append("channels", {"id": "c4", "serverId": "s2", "name": "lobby2"}),
     ["duplicate", "channel", "'c4'"]),
    ("member", _append("members", {"serverId": "s2", "userId": "u3", "roleIds": []}),
     ["duplicate", "member", "'u3'", "'s2'"]),
    ("overwrite", _set("channels.2.overwrites.1.id", "s1"), ["channel c3", "role", "'s1'"]),
]


@pytest.mark.parametrize(
    ("edit", "words"),
    [pytest.param(edit, words, id=name)
     for name, edit, words in WRONG_TYPES + UNKNOWN_REFERENCES + DUPLICATES],
)
def test_each_validation_error_is_a_fixture_error_saying_where(
    edit: Edit, words: list[str]
) -> None:
    doc = demo()
    edit(doc)
    with pytest.raises(FixtureError) as info:
        parse_directory(doc)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("document", [None, [], "fixture", 3, [PROTOCOL_EXAMPLE]])
def test_a_document_that_is_not_an_object(document: object) -> None:
    with pytest.raises(FixtureError, match="fixture: expected an object"):
        parse_directory(document)


def test_the_same_overwrite_target_as_role_and_as_member_is_not_a_duplicate() -> None:
    doc = copy.deepcopy(PROTOCOL_EXAMPLE)
    doc["channels"][0]["overwrites"].append({"id": "s1", "type": "member", "allow": 0,
                                             "deny": 0})
    assert len(parse_directory(doc).channels[0].overwrites) == 2


def test_fixture_error_is_a_value_error() -> None:
    assert issubclass(FixtureError, ValueError)
