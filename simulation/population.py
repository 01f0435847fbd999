"""A generated directory: users, servers, roles, members and channels, from a seed.

Besides the :class:`~domain.model.DirectoryData` the gateway loads, it keeps an
independent oracle of who may read each channel. The oracle is written from the way
each channel was *built* (public, role-private, member-private, role-muted), not with
:mod:`domain.permissions`, so that a bug in the permission code shows up as a
delivery to the wrong connections.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from domain.model import (
    Channel,
    ChannelId,
    DirectoryData,
    Member,
    Overwrite,
    Role,
    Server,
    ServerId,
    User,
    UserId,
)

READ = 1 << 10
SEND = 1 << 11
ADMINISTRATOR = 1 << 3
EVERYONE_PERMISSIONS = READ | SEND

#: A server id no directory knows (SUBSCRIBE_SERVER answers NOT_FOUND).
UNKNOWN_SERVER = "s-unknown"

_WORDS = (
    "hello",
    "ship it",
    "lgtm",
    "héllo",
    "naïve café",
    "🎉",
    "tab\tand\nline",
    '"quoted"',
    "\\back\\slash",
    "日本語",
    "ok",
)


@dataclass
class Population:
    data: DirectoryData
    users: list[UserId]
    servers: list[ServerId]
    #: user -> sorted servers the user is a member of
    servers_of: dict[UserId, list[ServerId]]
    #: server -> members (sorted)
    members: dict[ServerId, list[UserId]]
    #: server -> its channels
    channels_of: dict[ServerId, list[ChannelId]]
    channel_server: dict[ChannelId, ServerId]
    #: channel -> users with READ_MESSAGES (the oracle)
    readers: dict[ChannelId, frozenset[UserId]]
    usernames: dict[UserId, str] = field(default_factory=dict)
    #: wire form of the servers in READY, per user (ids only, sorted)
    ready_servers: dict[UserId, list[ServerId]] = field(default_factory=dict)

    def readable(self, user: UserId, server: ServerId) -> list[ChannelId]:
        return [c for c in self.channels_of[server] if user in self.readers[c]]


def generate(
    rng: random.Random, connecting_users: int, avg_server_size: int = 18, max_server_size: int = 48
) -> Population:
    """``connecting_users`` users that will have clients, plus 10% who never connect."""
    n_users = connecting_users + max(1, connecting_users // 10)
    users = [f"u{i}" for i in range(n_users)]
    memberships_per_user = [1 + min(3, int(rng.expovariate(0.9))) for _ in users]
    total = sum(memberships_per_user)
    n_servers = max(2, round(total / avg_server_size))
    servers = [f"s{i}" for i in range(n_servers)]
    # Mild popularity skew, capped so that no server dominates the fan-out.
    weights = [1.0 / (1 + i) ** 0.35 for i in range(n_servers)]
    members: dict[ServerId, list[UserId]] = {s: [] for s in servers}
    servers_of: dict[UserId, list[ServerId]] = {}
    for user, k in zip(users, memberships_per_user, strict=True):
        chosen: set[ServerId] = set()
        attempts = 0
        while len(chosen) < k and attempts < 20:
            attempts += 1
            s = rng.choices(servers, weights)[0]
            if s not in chosen and len(members[s]) < max_server_size:
                chosen.add(s)
                members[s].append(user)
        servers_of[user] = sorted(chosen, key=_id_key)
    for s in servers:  # every server has at least two members
        while len(members[s]) < 2:
            user = rng.choice(users)
            if user not in members[s]:
                members[s].append(user)
                servers_of[user] = sorted([*servers_of[user], s], key=_id_key)

    data_users = [
        User(
            u,
            f"user{u[1:]}",
            display_name=f"User {u[1:]}",
            avatar_url=None if rng.random() < 0.5 else f"https://cdn.example/{u}.png",
        )
        for u in users
    ]
    data_servers: list[Server] = []
    roles: list[Role] = []
    data_members: list[Member] = []
    channels: list[Channel] = []
    channels_of: dict[ServerId, list[ChannelId]] = {}
    channel_server: dict[ChannelId, ServerId] = {}
    readers: dict[ChannelId, frozenset[UserId]] = {}
    for s in servers:
        mem = members[s]
        mem.sort(key=_id_key)
        owner = rng.choice(mem)
        data_servers.append(
            Server(
                s,
                f"Server {s[1:]}",
                owner,
                None if rng.random() < 0.7 else f"https://cdn.example/{s}.png",
            )
        )
        admin_role, team_role = f"{s}-admin", f"{s}-team"
        roles += [
            Role(s, s, "@everyone", EVERYONE_PERMISSIONS),
            Role(admin_role, s, "admin", ADMINISTRATOR),
            Role(team_role, s, "team", 0),
        ]
        admins = {u for u in mem if u != owner and rng.random() < 0.08}
        team = {u for u in mem if rng.random() < 0.35}
        for u in mem:
            role_ids = tuple(
                r for r, has in ((admin_role, u in admins), (team_role, u in team)) if has
            )
            data_members.append(Member(s, u, role_ids))
        privileged = admins | {owner}
        everyone = frozenset(mem)
        secret_allowed = set(rng.sample(mem, k=min(len(mem), rng.randint(1, 3))))
        specs: list[tuple[str, tuple[Overwrite, ...], frozenset[UserId]]] = [
            ("general", (), everyone),
            (
                "team",
                (Overwrite(s, "role", 0, READ), Overwrite(team_role, "role", READ, 0)),
                frozenset(privileged | team),
            ),
            (
                "secret",
                (
                    Overwrite(s, "role", 0, READ),
                    *(Overwrite(u, "member", READ, 0) for u in sorted(secret_allowed, key=_id_key)),
                ),
                frozenset(privileged | secret_allowed),
            ),
            (
                "muted",
                (Overwrite(team_role, "role", 0, READ),),
                frozenset((everyone - team) | privileged),
            ),
        ]
        channels_of[s] = []
        for i, (name, overwrites, can_read) in enumerate(specs):
            cid = f"{s}c{i}"
            channels.append(Channel(cid, s, name, "text", overwrites))
            channels_of[s].append(cid)
            channel_server[cid] = s
            readers[cid] = can_read
    data = DirectoryData(
        users=tuple(data_users),
        servers=tuple(data_servers),
        roles=tuple(roles),
        members=tuple(data_members),
        channels=tuple(channels),
    )
    return Population(
        data=data,
        users=users,
        servers=servers,
        servers_of=servers_of,
        members=members,
        channels_of=channels_of,
        channel_server=channel_server,
        readers=readers,
        usernames={u.id: u.username for u in data_users},
        ready_servers={u: list(servers_of[u]) for u in users},
    )


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))


def _id_key(ident: str) -> tuple[int, str]:
    digits = "".join(ch for ch in ident if ch.isdigit())
    return (int(digits) if digits else -1, ident)
