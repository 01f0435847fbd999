"""The other instances that are alive, as far as the handoff needs to know.

Every instance with RESUME on says ``here`` on ``gw:resume`` when it starts and every
:data:`ANNOUNCE_S` after, and ``gone`` when it stops; one not heard from for
:data:`EXPIRY_S` is taken for dead (a crash says nothing). A RESUME of a session held
elsewhere then waits for the answers of exactly these instances: an owner that is
slow under a storm is waited for (up to the backend timeout) instead of being taken
for absent after a fixed second, and an unknown session is refused as soon as every
live instance said it does not hold it.
"""

from __future__ import annotations

ANNOUNCE_S = 1.0
EXPIRY_S = 3.5


class Peers:
    def __init__(self, me: str) -> None:
        self._me = me
        self._seen: dict[str, float] = {}

    def heard(self, instance_id: str, now: float) -> None:
        if instance_id != self._me:
            self._seen[instance_id] = now

    def gone(self, instance_id: str) -> None:
        self._seen.pop(instance_id, None)

    def alive(self, now: float) -> set[str]:
        expired = [p for p, seen in self._seen.items() if now - seen > EXPIRY_S]
        for p in expired:
            del self._seen[p]
        return set(self._seen)

    def is_alive(self, instance_id: str, now: float) -> bool:
        seen = self._seen.get(instance_id)
        return seen is not None and now - seen <= EXPIRY_S
