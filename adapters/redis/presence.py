"""Presence on Redis: :func:`domain.presence.transition` as Lua, one script per event.

Key layout (``P`` is ``registry_prefix``, ``gw:presence:`` by default)::

    presence:{userId}             string  the stored status (online/idle/dnd/invisible);
                                          deleted when the user has no live session.
                                          External contract (PROTOCOL 7a).
    P sessions:{userId}           hash    sessionId -> instanceId, the user's live sessions
    P instance:{instanceId}:users set     users with at least one session on that instance
    P instance:{instanceId}:alive string  "1" with a PX TTL, renewed by keep_alive
    P instances                   set     instances that called keep_alive and were not
                                          reaped yet

Every transition is one ``EVALSHA``, so it is atomic with respect to every other
instance: two instances closing a user's last two sessions at once see 2 -> 1 -> 0
and exactly one of them gets the change to offline. ``reap`` handles all dead
instances in one script: it removes each one from ``P instances`` in the same step
that closes its sessions, so concurrent reapers never return the same change twice.
The transitions issued while one round trip is in flight go to Redis together, as
one non-transactional pipeline of their EVALSHA calls (:mod:`adapters.redis.batch`):
still one script per user and transition, one round trip for the batch.

The scripts compute some key names (the reaped instances' and users' keys) inside
Lua, which standalone Redis allows; on a Redis Cluster every script must stay in one
slot: :mod:`adapters.redis.cluster_presence`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from adapters.redis._common import DEFAULT_TIMEOUT, create_client, unavailable_as
from adapters.redis.batch import CommandBatcher
from domain.keys import presence_key
from domain.model import InstanceId, PresenceChange, SessionId, Status, UserId

logger = logging.getLogger(__name__)

DEFAULT_REGISTRY_PREFIX = "gw:presence:"

# Helpers shared by every script. ``stored`` reads the status key as the domain sees
# it (no key, or anything that is not a settable status, is offline); ``store``
# writes it back, deleting the key for offline (PROTOCOL 7a).
_PRELUDE = """
local SETTABLE = {online = true, idle = true, dnd = true, invisible = true}
local function stored(key)
  local value = redis.call('GET', key)
  if value and SETTABLE[value] then return value end
  return 'offline'
end
local function store(key, status)
  if status == 'offline' then
    redis.call('DEL', key)
  else
    redis.call('SET', key, status)
  end
end
"""

# opened: 0 sessions before -> online; otherwise unchanged.
# KEYS: status, sessions, instance users. ARGV: instance, user, session.
_OPENED = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local count = redis.call('HLEN', KEYS[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
local after = before
if count == 0 then after = 'online' end
if after ~= before then store(KEYS[1], after) end
return {before, after}
"""
)

# closed: unknown session -> unchanged; last session -> offline; otherwise unchanged.
# KEYS: status, sessions. ARGV: session, user, registry prefix.
_CLOSED = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local instance = redis.call('HGET', KEYS[2], ARGV[1])
if not instance then return {before, before} end
redis.call('HDEL', KEYS[2], ARGV[1])
local remaining = redis.call('HVALS', KEYS[2])
local still_there = false
for _, other in ipairs(remaining) do
  if other == instance then
    still_there = true
    break
  end
end
if not still_there then
  redis.call('SREM', ARGV[3] .. 'instance:' .. instance .. ':users', ARGV[2])
end
local after = before
if #remaining == 0 then after = 'offline' end
if after ~= before then store(KEYS[1], after) end
return {before, after}
"""
)

# set: at least one live session -> the requested status; none -> unchanged.
# KEYS: status, sessions. ARGV: status.
_SET = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local after = before
if redis.call('HLEN', KEYS[2]) > 0 then after = ARGV[1] end
if after ~= before then store(KEYS[1], after) end
return {before, after}
"""
)

# keep_alive: renew the liveness key, (re)register the instance. Returns 1 when the
# instance was registered already, 0 when it is new or was reaped in the meantime.
# KEYS: alive, instances. ARGV: instance, ttl_ms.
_KEEP_ALIVE = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[1]) == 0 and 1 or 0
"""

# reap: for every registered instance whose liveness key expired, atomically:
# unregister it, drop its sessions, apply `closed` to each of its users, and return
# the changes as a flat list user, before, after, user, before, after, ...
# ARGV: registry prefix, status key prefix.
_REAP = (
    _PRELUDE
    + """
local registry, status_prefix = ARGV[1], ARGV[2]
local changes = {}
local instances = redis.call('SMEMBERS', registry .. 'instances')
table.sort(instances)
for _, instance in ipairs(instances) do
  if redis.call('EXISTS', registry .. 'instance:' .. instance .. ':alive') == 0 then
    redis.call('SREM', registry .. 'instances', instance)
    local users_key = registry .. 'instance:' .. instance .. ':users'
    local users = redis.call('SMEMBERS', users_key)
    redis.call('DEL', users_key)
    table.sort(users)
    for _, user in ipairs(users) do
      local sessions_key = registry .. 'sessions:' .. user
      local flat = redis.call('HGETALL', sessions_key)
      local remaining = #flat / 2
      for i = 1, #flat, 2 do
        if flat[i + 1] == instance then
          redis.call('HDEL', sessions_key, flat[i])
          remaining = remaining - 1
        end
      end
      local status_key = status_prefix .. user
      local before = stored(status_key)
      local after = before
      if remaining == 0 then after = 'offline' end
      if after ~= before then
        store(status_key, after)
        table.insert(changes, user)
        table.insert(changes, before)
        table.insert(changes, after)
      end
    end
  end
end
return changes
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def stored_status(value: bytes | str | None) -> Status:
    """The status a ``presence:{userId}`` value stands for (absent or unknown: offline)."""
    if value is None:
        return Status.OFFLINE
    try:
        return Status(_text(value))
    except ValueError:
        return Status.OFFLINE


class RedisPresenceStore:
    """:class:`domain.ports.PresenceStore` on Redis, shared by every instance."""

    def __init__(
        self,
        client: Redis,
        *,
        registry_prefix: str = DEFAULT_REGISTRY_PREFIX,
    ) -> None:
        """``client``'s own bounds (:func:`create_client`) bound every call."""
        self._client = client
        self._prefix = registry_prefix
        self._owns_client = False
        self._opened: AsyncScript = client.register_script(_OPENED)
        self._closed: AsyncScript = client.register_script(_CLOSED)
        self._set: AsyncScript = client.register_script(_SET)
        self._keep_alive: AsyncScript = client.register_script(_KEEP_ALIVE)
        self._reap: AsyncScript = client.register_script(_REAP)
        #: A session's transitions (opened, closed, set) issued while one round trip is
        #: in flight go together in the next: one pipeline of EVALSHA calls.
        self.transitions = CommandBatcher(client)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        registry_prefix: str = DEFAULT_REGISTRY_PREFIX,
    ) -> RedisPresenceStore:
        """A store with its own client, closed by :meth:`close`."""
        store = cls(create_client(url, timeout=timeout), registry_prefix=registry_prefix)
        store._owns_client = True
        return store

    # Key names (the status key is the external one, from domain.keys).
    def sessions_key(self, user_id: UserId) -> str:
        return f"{self._prefix}sessions:{user_id}"

    def instance_users_key(self, instance_id: InstanceId) -> str:
        return f"{self._prefix}instance:{instance_id}:users"

    def instance_alive_key(self, instance_id: InstanceId) -> str:
        return f"{self._prefix}instance:{instance_id}:alive"

    def instances_key(self) -> str:
        return f"{self._prefix}instances"

    async def _call(
        self, what: str, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        with unavailable_as(f"presence {what}"):
            result: object = await script(keys=keys, args=args)
        return result

    async def _transition(
        self, what: str, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        with unavailable_as(f"presence {what}"):
            return await self.transitions.call(script, keys, args)

    def _change(self, user_id: UserId, result: object) -> PresenceChange:
        if not isinstance(result, list) or len(result) != 2:
            raise TypeError(f"unexpected presence script result {result!r}")
        before, after = result
        return PresenceChange(user_id, Status(_text(before)), Status(_text(after)))

    async def session_opened(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        keys = [
            presence_key(user_id),
            self.sessions_key(user_id),
            self.instance_users_key(instance_id),
        ]
        result = await self._transition(
            "session_opened", self._opened, keys, [instance_id, user_id, session_id]
        )
        return self._change(user_id, result)

    async def session_closed(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        # The session is removed from the instance it was opened on (recorded in the
        # sessions hash), whatever ``instance_id`` the caller passes.
        keys = [presence_key(user_id), self.sessions_key(user_id)]
        result = await self._transition(
            "session_closed", self._closed, keys, [session_id, user_id, self._prefix]
        )
        return self._change(user_id, result)

    async def set_status(self, user_id: UserId, status: Status) -> PresenceChange:
        if status is Status.OFFLINE:
            raise ValueError("SET needs a settable status")
        keys = [presence_key(user_id), self.sessions_key(user_id)]
        result = await self._transition("set_status", self._set, keys, [status.value])
        return self._change(user_id, result)

    async def get_status(self, user_id: UserId) -> Status:
        with unavailable_as("presence get_status"):
            value = await self._client.get(presence_key(user_id))
        return stored_status(value)

    async def get_statuses(self, user_ids: Sequence[UserId]) -> list[Status]:
        if not user_ids:
            return []
        with unavailable_as("presence get_statuses"):
            pipe = self._client.pipeline(transaction=False)
            for user_id in user_ids:
                pipe.get(presence_key(user_id))
            values = await pipe.execute()
        return [stored_status(value) for value in values]

    async def keep_alive(self, instance_id: InstanceId, ttl_ms: int) -> bool:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        keys = [self.instance_alive_key(instance_id), self.instances_key()]
        known = await self._call("keep_alive", self._keep_alive, keys, [instance_id, ttl_ms])
        if known == 0:
            logger.info("presence: instance %s registered (new, or reaped before)", instance_id)
        return known == 1

    async def reap(self) -> list[PresenceChange]:
        result = await self._call("reap", self._reap, [], [self._prefix, presence_key("")])
        if not isinstance(result, list) or len(result) % 3:
            raise TypeError(f"unexpected reap result {result!r}")
        changes = [
            PresenceChange(_text(user), Status(_text(before)), Status(_text(after)))
            for user, before, after in zip(result[0::3], result[1::3], result[2::3], strict=True)
        ]
        if changes:
            logger.info("presence: reaped %d user(s) of dead instances", len(changes))
        return changes

    async def ping(self) -> None:
        with unavailable_as("presence ping"):
            await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisPresenceStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
