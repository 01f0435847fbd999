"""Presence in memory: the model of the Redis store, shared by simulated instances."""

from __future__ import annotations

from collections.abc import Sequence

from domain.model import InstanceId, PresenceChange, SessionId, Status, UserId
from domain.ports import BackendUnavailable, Clock
from domain.presence import PresenceEvent, transition


class MemoryPresenceStore:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._status: dict[UserId, Status] = {}
        #: user -> session -> instance
        self._sessions: dict[UserId, dict[SessionId, InstanceId]] = {}
        self._instance_users: dict[InstanceId, set[UserId]] = {}
        self._alive_until: dict[InstanceId, float] = {}
        #: Fault injection: while set, every call raises BackendUnavailable.
        self.failing = False

    def _check(self) -> None:
        if self.failing:
            raise BackendUnavailable("presence store unavailable (injected)")

    def _apply(
        self,
        user_id: UserId,
        event: PresenceEvent,
        before_count: int,
        requested: Status | None = None,
    ) -> PresenceChange:
        before = self._status.get(user_id, Status.OFFLINE)
        after_count = len(self._sessions.get(user_id, ()))
        after = transition(before, before_count, after_count, event, requested)
        if after is Status.OFFLINE:
            self._status.pop(user_id, None)
        else:
            self._status[user_id] = after
        return PresenceChange(user_id, before, after)

    async def session_opened(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        self._check()
        sessions = self._sessions.setdefault(user_id, {})
        before_count = len(sessions)
        sessions[session_id] = instance_id
        self._instance_users.setdefault(instance_id, set()).add(user_id)
        return self._apply(user_id, PresenceEvent.OPENED, before_count)

    async def session_closed(
        self, instance_id: InstanceId, user_id: UserId, session_id: SessionId
    ) -> PresenceChange:
        self._check()
        sessions = self._sessions.get(user_id, {})
        before_count = len(sessions)
        if sessions.pop(session_id, None) is None:
            status = self._status.get(user_id, Status.OFFLINE)
            return PresenceChange(user_id, status, status)
        if not sessions:
            self._sessions.pop(user_id, None)
        if instance_id not in sessions.values():
            self._instance_users.get(instance_id, set()).discard(user_id)
        return self._apply(user_id, PresenceEvent.CLOSED, before_count)

    async def set_status(self, user_id: UserId, status: Status) -> PresenceChange:
        self._check()
        count = len(self._sessions.get(user_id, ()))
        return self._apply(user_id, PresenceEvent.SET, count, status)

    async def get_status(self, user_id: UserId) -> Status:
        self._check()
        return self._status.get(user_id, Status.OFFLINE)

    async def get_statuses(self, user_ids: Sequence[UserId]) -> list[Status]:
        self._check()
        return [self._status.get(u, Status.OFFLINE) for u in user_ids]

    async def keep_alive(self, instance_id: InstanceId, ttl_ms: int) -> bool:
        self._check()
        known = instance_id in self._alive_until
        self._alive_until[instance_id] = self._clock.monotonic() + ttl_ms / 1000.0
        return known

    async def reap(self) -> list[PresenceChange]:
        self._check()
        now = self._clock.monotonic()
        dead = [i for i, until in self._alive_until.items() if until <= now]
        changes: list[PresenceChange] = []
        for instance_id in dead:
            del self._alive_until[instance_id]
            for user_id in sorted(self._instance_users.pop(instance_id, set())):
                sessions = self._sessions.get(user_id, {})
                before_count = len(sessions)
                for sid in [s for s, i in sessions.items() if i == instance_id]:
                    del sessions[sid]
                if not sessions:
                    self._sessions.pop(user_id, None)
                change = self._apply(user_id, PresenceEvent.CLOSED, before_count)
                if change.before is not change.after:
                    changes.append(change)
        return changes

    async def ping(self) -> None:
        self._check()

    # Introspection for tests and the simulation's leak checks.
    def live_sessions(self) -> dict[UserId, dict[SessionId, InstanceId]]:
        return {u: dict(s) for u, s in self._sessions.items()}

    def stored_statuses(self) -> dict[UserId, Status]:
        return dict(self._status)
