"""Permissions (PROTOCOL section 9, Discord's algorithm): properties, a comparison with
a straightforward reference implementation, and hand-written cases."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from hypothesis import given
from hypothesis import strategies as st

from domain.fixtures import parse_directory
from domain.model import Channel, Member, Overwrite, Role, Server
from domain.permissions import (
    ADMINISTRATOR,
    ALL,
    DEFAULT_EVERYONE,
    MANAGE_CHANNELS,
    MANAGE_SERVER,
    READ_MESSAGES,
    SEND_MESSAGES,
    base_permissions,
    can_read,
    channel_permissions,
)

SERVER_ID = "s1"
OWNER = "owner"
USER = "u1"
OTHER_USER = "u2"
ROLE_POOL = ("r1", "r2", "r3", "r4")
NAMED = (ADMINISTRATOR, MANAGE_CHANNELS, MANAGE_SERVER, READ_MESSAGES, SEND_MESSAGES)
NON_ADMIN_BITS = (1 << 0, MANAGE_CHANNELS, MANAGE_SERVER, READ_MESSAGES, SEND_MESSAGES, 1 << 20)


def test_bits_are_the_protocol_values() -> None:
    assert (ADMINISTRATOR, MANAGE_CHANNELS, MANAGE_SERVER) == (8, 16, 32)
    assert (READ_MESSAGES, SEND_MESSAGES) == (1024, 2048)
    assert DEFAULT_EVERYONE == 3072
    for bit in NAMED:
        assert ALL & bit


# --- the reference ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One member of one server, and one channel of that server."""

    owner_id: str
    everyone: int | None  # the @everyone role's permissions, None when it is absent
    roles: dict[str, int]  # the server's other roles
    member_roles: tuple[str, ...]  # may name roles that do not exist
    overwrites: tuple[Overwrite, ...]

    def server(self) -> Server:
        return Server(id=SERVER_ID, name="S", owner_id=self.owner_id)

    def member(self) -> Member:
        return Member(server_id=SERVER_ID, user_id=USER, role_ids=self.member_roles)

    def role_map(self) -> dict[str, Role]:
        roles = {rid: Role(rid, SERVER_ID, rid, p) for rid, p in self.roles.items()}
        if self.everyone is not None:
            roles[SERVER_ID] = Role(SERVER_ID, SERVER_ID, "@everyone", self.everyone)
        return roles

    def channel(self) -> Channel:
        return Channel(id="c1", server_id=SERVER_ID, name="general", overwrites=self.overwrites)

    def compute(self) -> int:
        return channel_permissions(self.server(), self.member(), self.role_map(), self.channel())


def reference(case: Case) -> int:
    """Section 9, read literally."""
    if case.owner_id == USER:
        return ALL
    base = DEFAULT_EVERYONE if case.everyone is None else case.everyone
    for rid in case.member_roles:
        base |= case.roles.get(rid, 0)
    if base & ADMINISTRATOR:
        return ALL
    perms = base
    # 1. the @everyone overwrite: deny, then allow
    for ow in case.overwrites:
        if ow.type == "role" and ow.id == SERVER_ID:
            perms = (perms & ~ow.deny) | ow.allow
    # 2. the member's role overwrites, as one: every deny, then every allow
    deny = allow = 0
    for ow in case.overwrites:
        if ow.type == "role" and ow.id != SERVER_ID and ow.id in case.member_roles:
            deny |= ow.deny
            allow |= ow.allow
    perms = (perms & ~deny) | allow
    # 3. the member's own overwrite
    for ow in case.overwrites:
        if ow.type == "member" and ow.id == USER:
            perms = (perms & ~ow.deny) | ow.allow
    return perms


# --- strategies ------------------------------------------------------------------------



def _bits(mask: int) -> int:
    """Bit i of ``mask`` selects NON_ADMIN_BITS[i]: one draw instead of a set."""
    return sum(bit for i, bit in enumerate(NON_ADMIN_BITS) if mask >> i & 1)


plain_bits = st.integers(0, 2 ** len(NON_ADMIN_BITS) - 1).map(_bits)
with_admin = plain_bits.map(lambda p: p | ADMINISTRATOR)
role_bits = st.one_of(plain_bits, plain_bits, plain_bits, with_admin)
OW_TARGETS: tuple[tuple[str, Literal["role", "member"]], ...] = (
    (SERVER_ID, "role"),
    *((rid, "role") for rid in ROLE_POOL),
    (USER, "member"),
    (OTHER_USER, "member"),
    (USER, "role"),  # a role overwrite whose id happens to be the user's: not the member's
)


@st.composite
def overwrites(draw: st.DrawFn, bits: st.SearchStrategy[int] = plain_bits) -> tuple[Overwrite, ...]:
    chosen = draw(st.lists(st.sampled_from(OW_TARGETS), unique=True, max_size=len(OW_TARGETS)))
    return tuple(Overwrite(id=i, type=t, allow=draw(bits), deny=draw(bits)) for i, t in chosen)


@st.composite
def cases(
    draw: st.DrawFn, owner: bool | None = None, bits: st.SearchStrategy[int] = role_bits
) -> Case:
    is_owner = draw(st.booleans()) if owner is None else owner
    return Case(
        owner_id=USER if is_owner else OWNER,
        everyone=draw(st.none() | bits),
        roles=draw(st.dictionaries(st.sampled_from(ROLE_POOL), bits, max_size=3)),
        member_roles=tuple(draw(st.lists(st.sampled_from(ROLE_POOL), unique=True, max_size=3))),
        overwrites=draw(overwrites()),
    )


non_admin_cases = cases(owner=False, bits=plain_bits)

# --- properties ------------------------------------------------------------------------


@given(cases())
def test_matches_the_reference(case: Case) -> None:
    assert case.compute() == reference(case)


@given(cases(), st.randoms(use_true_random=False))
def test_the_order_of_overwrites_does_not_matter(case: Case, rnd: random.Random) -> None:
    shuffled = list(case.overwrites)
    rnd.shuffle(shuffled)
    assert replace(case, overwrites=tuple(shuffled)).compute() == case.compute()


@given(cases(owner=True), overwrites(st.sampled_from([ALL, READ_MESSAGES, 0])))
def test_the_owner_gets_everything_whatever_the_overwrites(
    case: Case, ows: tuple[Overwrite, ...]
) -> None:
    case = replace(case, overwrites=ows)
    assert case.compute() == ALL
    assert base_permissions(case.server(), case.member(), case.role_map()) == ALL
    assert can_read(case.server(), case.member(), case.role_map(), case.channel())


@given(non_admin_cases, st.sampled_from([None, *ROLE_POOL]), overwrites(st.just(ALL)))
def test_administrator_in_any_role_gets_everything(
    case: Case, admin_role: str | None, ows: tuple[Overwrite, ...]
) -> None:
    """ADMINISTRATOR on @everyone or on any of the member's roles: every bit, and the
    channel's overwrites (here: deny everything) do not apply."""
    if admin_role is None:
        case = replace(case, everyone=(case.everyone or 0) | ADMINISTRATOR)
    else:
        roles = {**case.roles, admin_role: case.roles.get(admin_role, 0) | ADMINISTRATOR}
        member_roles = tuple(sorted({*case.member_roles, admin_role}))
        case = replace(case, roles=roles, member_roles=member_roles)
    case = replace(case, overwrites=ows)
    assert case.compute() == ALL
    assert base_permissions(case.server(), case.member(), case.role_map()) == ALL


@given(non_admin_cases)
def test_administrator_on_a_role_the_member_lacks_gives_nothing(case: Case) -> None:
    lacking = [r for r in ROLE_POOL if r not in case.member_roles]
    if not lacking:
        return
    roles = {**case.roles, lacking[0]: ADMINISTRATOR}
    assert replace(case, roles=roles).compute() == case.compute()


@given(st.lists(st.sampled_from(ROLE_POOL), unique=True))
def test_default_everyone_is_read_and_send(member_roles: list[str]) -> None:
    """No @everyone role, and the member's roles (if any) do not exist."""
    case = Case(OWNER, None, {}, tuple(member_roles), ())
    assert base_permissions(case.server(), case.member(), case.role_map()) == (
        READ_MESSAGES | SEND_MESSAGES
    )
    assert case.compute() == READ_MESSAGES | SEND_MESSAGES


@given(non_admin_cases, plain_bits)
def test_base_is_everyone_or_all_member_roles(case: Case, everyone: int) -> None:
    case = replace(case, everyone=everyone, overwrites=())
    expected = everyone
    for rid in case.member_roles:
        expected |= case.roles.get(rid, 0)
    assert base_permissions(case.server(), case.member(), case.role_map()) == expected
    assert case.compute() == expected


@given(non_admin_cases, st.sampled_from(NON_ADMIN_BITS))
def test_the_member_overwrite_applies_last_and_wins(case: Case, bit: int) -> None:
    others = tuple(o for o in case.overwrites if not (o.type == "member" and o.id == USER))
    deny = replace(case, overwrites=(*others, Overwrite(USER, "member", allow=0, deny=bit)))
    allow = replace(case, overwrites=(Overwrite(USER, "member", allow=bit, deny=0), *others))
    assert not deny.compute() & bit
    assert allow.compute() & bit


@given(non_admin_cases, st.sampled_from(NON_ADMIN_BITS), st.data())
def test_an_allow_on_one_role_beats_a_deny_on_another(
    case: Case, bit: int, data: st.DataObject
) -> None:
    allow_role, deny_role = data.draw(st.permutations(ROLE_POOL))[:2]
    kept = tuple(
        o for o in case.overwrites
        if not (o.type == "member" and o.id == USER) and o.id not in (allow_role, deny_role)
    )
    ows = (
        Overwrite(deny_role, "role", allow=0, deny=bit),
        *kept,
        Overwrite(allow_role, "role", allow=bit, deny=0),
    )
    member_roles = tuple(sorted({*case.member_roles, allow_role, deny_role}))
    both = replace(case, member_roles=member_roles, overwrites=ows)
    assert both.compute() & bit
    # and the same with the overwrites listed the other way round
    assert replace(both, overwrites=tuple(reversed(ows))).compute() & bit


@given(non_admin_cases, st.sampled_from(NON_ADMIN_BITS), st.sampled_from(ROLE_POOL))
def test_role_overwrites_apply_after_the_everyone_overwrite(
    case: Case, bit: int, role: str
) -> None:
    """@everyone allows, a role of the member denies: denied (and the other way round),
    whatever the order of the list."""
    member_roles = tuple(sorted({*case.member_roles, role}))
    denied = (Overwrite(role, "role", deny=bit), Overwrite(SERVER_ID, "role", allow=bit))
    allowed = (Overwrite(role, "role", allow=bit), Overwrite(SERVER_ID, "role", deny=bit))
    for ows in (denied, tuple(reversed(denied))):
        assert not replace(case, member_roles=member_roles, overwrites=ows).compute() & bit
    for ows in (allowed, tuple(reversed(allowed))):
        assert replace(case, member_roles=member_roles, overwrites=ows).compute() & bit


@given(non_admin_cases)
def test_overwrites_for_others_do_not_apply(case: Case) -> None:
    """Overwrites of another member, or of roles the member lacks, change nothing."""
    foreign = (
        *(Overwrite(rid, "role", allow=ALL, deny=ALL) for rid in ROLE_POOL
          if rid not in case.member_roles),
        Overwrite(OTHER_USER, "member", allow=ALL, deny=ALL),
    )
    mine = tuple(o for o in case.overwrites if (o.type, o.id) != ("member", OTHER_USER)
                 and not (o.type == "role" and o.id in ROLE_POOL
                          and o.id not in case.member_roles))
    assert replace(case, overwrites=mine + foreign).compute() == replace(
        case, overwrites=mine).compute()


@given(cases())
def test_can_read_is_the_read_bit(case: Case) -> None:
    assert can_read(case.server(), case.member(), case.role_map(), case.channel()) == bool(
        case.compute() & READ_MESSAGES
    )


# --- hand-written cases ----------------------------------------------------------------


def test_within_one_overwrite_allow_wins_over_deny() -> None:
    case = Case(OWNER, 0, {}, (), (Overwrite(SERVER_ID, "role", allow=READ_MESSAGES,
                                             deny=READ_MESSAGES),))
    assert case.compute() == READ_MESSAGES


def test_protocol_fixture_example_denies_read_to_everyone() -> None:
    """The example of section 11: @everyone 3072, channel c1 denies READ to @everyone."""
    case = Case(OWNER, 3072, {}, (), (Overwrite(SERVER_ID, "role", allow=0, deny=1024),))
    assert case.compute() == SEND_MESSAGES
    assert replace(case, owner_id=USER).compute() == ALL


DEMO = Path(__file__).resolve().parents[2] / "entrypoints" / "demo.json"


def _demo_can_read(user_id: str, channel_id: str) -> bool:
    data = parse_directory(json.loads(DEMO.read_text()))
    channel = next(c for c in data.channels if c.id == channel_id)
    server = next(s for s in data.servers if s.id == channel.server_id)
    member = next(m for m in data.members if m.server_id == server.id and m.user_id == user_id)
    roles = {r.id: r for r in data.roles if r.server_id == server.id}
    return can_read(server, member, roles, channel)


def test_demo_mods_only_channel() -> None:
    # c3 "mods-only" in s1: @everyone denied READ, the mods role allowed it back.
    assert _demo_can_read("u1", "c3")  # alice owns s1
    assert _demo_can_read("u2", "c3")  # bob is a mod
    assert not _demo_can_read("u3", "c3")  # carol is neither
    for user in ("u1", "u2", "u3"):
        assert _demo_can_read(user, "c1")
        assert _demo_can_read(user, "c2")
    for user in ("u2", "u3", "u4"):
        assert _demo_can_read(user, "c4")


def test_mod_denied_by_a_member_overwrite() -> None:
    everyone_deny = Overwrite(SERVER_ID, "role", allow=0, deny=READ_MESSAGES)
    mods_allow = Overwrite("mods", "role", allow=READ_MESSAGES, deny=0)
    bob_deny = Overwrite(USER, "member", allow=0, deny=READ_MESSAGES)
    mod = Case(OWNER, 3072, {"mods": 3072}, ("mods",), (everyone_deny, mods_allow))
    assert mod.compute() & READ_MESSAGES
    assert not replace(mod, overwrites=(bob_deny, everyone_deny, mods_allow)).compute() & (
        READ_MESSAGES
    )
    # a member overwrite allowing READ lets a non-mod in
    carol = replace(mod, member_roles=(), overwrites=(
        everyone_deny, mods_allow, Overwrite(USER, "member", allow=READ_MESSAGES)))
    assert carol.compute() & READ_MESSAGES
