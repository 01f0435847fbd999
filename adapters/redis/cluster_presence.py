"""Presence on a Redis Cluster: :mod:`.presence`'s transitions with every script on
one hash slot (PROTOCOL 16).

Key layout (``P`` is the registry prefix, ``gw:presence:`` by default; the ``{...}``
are hash tags)::

    presence:{userId}                 string  the stored status (PROTOCOL 7a), as standalone
    {presence:<userId>}:P sessions    hash    sessionId -> instanceId (the status's slot)
    {P instance:<id>}:users           hash    userId -> sessions of that user the instance
                                              opened, an upper bound (see below)
    {P instance:<id>}:alive           string  "1" with a PX TTL, renewed by keep_alive
    {P instance:<id>}:reaped          string  a reaper took the instance's sessions
    P instances                       set     instances that called keep_alive

A user's transition is one script on the user's slot, atomic as in standalone. The
instance's own keys are one slot too; what spans the two is done in steps, ordered
so that the instance's ``users`` count never falls below the sessions it really has:
``session_opened`` counts up *before* its script, ``session_closed`` counts down
*after* (a crash in between leaves a count too high: harmless, reaping that user
changes nothing).

Reaping without a cross-slot script: for each registered instance whose ``alive``
expired, a reaper marks it ``reaped`` (one instance-slot script, only while
``alive`` is missing), then runs one user-slot script per user of it that drops that
instance's sessions and reports a change only when it dropped one, and finally
deletes its users (again only while ``alive`` is missing) and unregisters it. Every
step may be repeated: two reapers, or one that died half way and the next one,
report each user's change once. ``keep_alive`` clears the mark and answers "not
known", so an instance that was (even partly) reaped opens its sessions again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError

from adapters.redis._common import (
    DEFAULT_TIMEOUT,
    cluster_ready,
    create_cluster_client,
    unavailable_as,
)
from adapters.redis.presence import (
    _PRELUDE,
    _SET,
    DEFAULT_REGISTRY_PREFIX,
    _text,
    stored_status,
)
from domain.keys import presence_key
from domain.model import InstanceId, PresenceChange, SessionId, Status, UserId
from domain.ports import BackendUnavailable

logger = logging.getLogger(__name__)

# KEYS: status, sessions. ARGV: instance, session.
_OPENED = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local count = redis.call('HLEN', KEYS[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
local after = before
if count == 0 then after = 'online' end
if after ~= before then store(KEYS[1], after) end
return {before, after}
"""
)

# KEYS: status, sessions. ARGV: session. Returns before, after, and the instance the
# session was on ('' when it was unknown).
_CLOSED = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local instance = redis.call('HGET', KEYS[2], ARGV[1])
if not instance then return {before, before, ''} end
redis.call('HDEL', KEYS[2], ARGV[1])
local after = before
if redis.call('HLEN', KEYS[2]) == 0 then after = 'offline' end
if after ~= before then store(KEYS[1], after) end
return {before, after, instance}
"""
)

# KEYS: instance users. ARGV: user, delta.
_COUNT = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""

# KEYS: alive, reaped. ARGV: ttl_ms. Returns 1 when a reaper had taken the instance.
_KEEP_ALIVE = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return redis.call('DEL', KEYS[2])
"""

# KEYS: alive, reaped. Returns 1 when the instance is dead (and now marked reaped: the
# mark outlives the reaping, for an instance that comes back, within a day).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', 86400000)
return 1
"""

# KEYS: status, sessions. ARGV: instance. Drops the instance's sessions of the user.
_REAP_USER = (
    _PRELUDE
    + """
local before = stored(KEYS[1])
local flat = redis.call('HGETALL', KEYS[2])
local remaining, dropped = #flat / 2, 0
for i = 1, #flat, 2 do
  if flat[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[2], flat[i])
    remaining, dropped = remaining - 1, dropped + 1
  end
end
if dropped == 0 then return {before, before} end
local after = before
if remaining == 0 then after = 'offline' end
if after ~= before then store(KEYS[1], after) end
return {before, after}
"""
)

# KEYS: alive, users. Returns 1 when the instance's users were deleted.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""


@dataclass(frozen=True)
class Script:
    """A Lua script run by EVALSHA on the node of its keys' slot, and by EVAL there
    when that node does not have it yet (redis-py's ``register_script`` would SCRIPT
    LOAD it on *every* master first, which fails while any one is down)."""

    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()

    async def __call__(
        self, client: RedisCluster, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.text, len(keys), *keys, *args)


class RedisClusterPresenceStore:
    """:class:`domain.ports.PresenceStore` on a Redis Cluster."""

    def __init__(
        self,
        client: RedisCluster,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        registry_prefix: str = DEFAULT_REGISTRY_PREFIX,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._prefix = registry_prefix
        self._owns_client = False
        self._opened = Script(_OPENED)
        self._closed = Script(_CLOSED)
        self._set = Script(_SET)
        self._count = Script(_COUNT)
        self._keep_alive = Script(_KEEP_ALIVE)
        self._claim = Script(_CLAIM)
        self._reap_user = Script(_REAP_USER)
        self._forget = Script(_FORGET)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        registry_prefix: str = DEFAULT_REGISTRY_PREFIX,
    ) -> RedisClusterPresenceStore:
        store = cls(
            create_cluster_client(url, timeout=timeout),
            timeout=timeout,
            registry_prefix=registry_prefix,
        )
        store._owns_client = True
        return store

    # Key names.
    def sessions_key(self, user_id: UserId) -> str:
        return "{" + presence_key(user_id) + "}:" + self._prefix + "sessions"

    def _instance(self, instance_id: InstanceId, what: str) -> str:
        return "{" + f"{self._prefix}instance:{instance_id}" + "}:" + what

    def instance_users_key(self, instance_id: InstanceId) -> str:
        return self._instance(instance_id, "users")

    def instance_alive_key(self, instance_id: InstanceId) -> str:
        return self._instance(instance_id, "alive")

    def instances_key(self) -> str:
        return f"{self._prefix}instances"

    async def _call(
        self, what: str, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        with unavailable_as(f"presence {what}", self._timeout):
            await cluster_ready(self._client)
            return await script(self._client, keys, args)

    def _change(self, user_id: UserId, result: object) -> PresenceChange:
        if not isinstance(result, list) or len(result) < 2:
            raise TypeError(f"unexpected presence script result {result!r}")
        return PresenceChange(user_id, Status(_text(result[0])), Status(_text(result[1])))

    def _user_keys(self, user_id: UserId) -> list[str]:
        return [presence_key(user_id), self.sessions_key(user_id)]

    async def session_opened(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        users = self.instance_users_key(instance_id)
        await self._call("session_opened", self._count, [users], [user_id, 1])
        result = await self._call(
            "session_opened", self._opened, self._user_keys(user_id), [instance_id, session_id]
        )
        return self._change(user_id, result)

    async def session_closed(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        result = await self._call(
            "session_closed", self._closed, self._user_keys(user_id), [session_id]
        )
        change = self._change(user_id, result)
        assert isinstance(result, list)
        owner = _text(result[2]) if len(result) > 2 else ""
        if owner:
            users = self.instance_users_key(owner)
            try:
                await self._call("session_closed", self._count, [users], [user_id, -1])
            except BackendUnavailable as exc:
                # The change happened: report it. A count left too high is harmless.
                logger.warning("presence: %s not counted down for %s: %s", users, user_id, exc)
        return change

    async def set_status(self, user_id: UserId, status: Status) -> PresenceChange:
        if status is Status.OFFLINE:
            raise ValueError("SET needs a settable status")
        result = await self._call("set_status", self._set, self._user_keys(user_id), [status.value])
        return self._change(user_id, result)

    async def get_status(self, user_id: UserId) -> Status:
        return (await self.get_statuses([user_id]))[0]

    async def get_statuses(self, user_ids: Sequence[UserId]) -> list[Status]:
        if not user_ids:
            return []
        with unavailable_as("presence get_statuses", self._timeout):
            await cluster_ready(self._client)
            if len(user_ids) == 1:
                values = [await self._client.get(presence_key(user_ids[0]))]
            else:
                pipe = self._client.pipeline(transaction=False)
                for user_id in user_ids:
                    pipe.get(presence_key(user_id))
                values = await pipe.execute()
        return [stored_status(value) for value in values]

    async def keep_alive(self, instance_id: InstanceId, ttl_ms: int) -> bool:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        keys = [self.instance_alive_key(instance_id), self._instance(instance_id, "reaped")]
        reaped = await self._call("keep_alive", self._keep_alive, keys, [ttl_ms])
        with unavailable_as("presence keep_alive", self._timeout):
            await cluster_ready(self._client)
            added = await self._client.sadd(self.instances_key(), instance_id)
        known = added == 0 and reaped == 0
        if not known:
            logger.info("presence: instance %s registered (new, or reaped before)", instance_id)
        return known

    async def reap(self) -> list[PresenceChange]:
        with unavailable_as("presence reap", self._timeout):
            await cluster_ready(self._client)
            instances = sorted(_text(i) for i in await self._client.smembers(self.instances_key()))
        changes: list[PresenceChange] = []
        for instance in instances:
            alive = self.instance_alive_key(instance)
            reaped = self._instance(instance, "reaped")
            users_key = self.instance_users_key(instance)
            if not await self._call("reap", self._claim, [alive, reaped], []):
                continue
            with unavailable_as("presence reap", self._timeout):
                users = sorted(_text(u) for u in await self._client.hkeys(users_key))
            for user in users:
                result = await self._call(
                    "reap", self._reap_user, self._user_keys(user), [instance]
                )
                change = self._change(user, result)
                if change.before is not change.after:
                    changes.append(change)
            if await self._call("reap", self._forget, [alive, users_key], []):
                with unavailable_as("presence reap", self._timeout):
                    await self._client.srem(self.instances_key(), instance)
        if changes:
            logger.info("presence: reaped %d user(s) of dead instances", len(changes))
        return changes

    async def ping(self) -> None:
        """Every master answers (a master down makes presence unready)."""
        with unavailable_as("presence ping", self._timeout):
            await cluster_ready(self._client)
            await self._client.ping(target_nodes=RedisCluster.PRIMARIES)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> RedisClusterPresenceStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
