"""Who receives a published event (PROTOCOL section 7): pure recipient rules.

The shell's fan-out keeps the routing indexes and the permission cache; these
functions decide, from what it found, which of the routed sessions an envelope
reaches and what it changes besides.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from typing import TypeVar

from domain.codec import Envelope
from domain.model import UserId

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)

#: Events that invalidate cached permissions of their server (PROTOCOL section 7).
INVALIDATING_OPS = frozenset(
    {"CHANNEL_UPDATE", "CHANNEL_DELETE", "ROLE_UPDATE", "ROLE_DELETE", "SERVER_MEMBER_UPDATE"}
)
MEMBER_REMOVE = "SERVER_MEMBER_REMOVE"


def invalidates_permissions(envelope: Envelope) -> bool:
    return envelope.op in INVALIDATING_OPS


def removed_member(envelope: Envelope) -> UserId | None:
    """The user a ``SERVER_MEMBER_REMOVE`` removes: every connection of theirs is
    unsubscribed from the server once the event itself was delivered."""
    if envelope.op != MEMBER_REMOVE or not isinstance(envelope.d, dict):
        return None
    user_id = envelope.d.get("userId")
    return user_id if isinstance(user_id, str) else None


def reader_candidates(users: Iterable[UserId | None], exclude: UserId | None) -> list[UserId]:
    """For a channel-scoped event: the users whose READ_MESSAGES must be checked."""
    return [u for u in set(users) - {exclude} if u is not None]


def recipients(
    routed: Collection[T],
    user_of: Callable[[T], UserId | None],
    exclude: UserId | None,
    readers: Collection[UserId] | None,
) -> Collection[T]:
    """The routed sessions an event reaches: ``excludeUserId`` skips every session of
    that user; a channel-scoped event (``readers`` given) reaches only the channel's
    readers (who were computed without the excluded user)."""
    if readers is not None:
        return [r for r in routed if user_of(r) in readers]
    if exclude is not None:
        return [r for r in routed if user_of(r) != exclude]
    return routed


PRESENCE_UPDATE = "PRESENCE_UPDATE"


def presence_subject(envelope: Envelope) -> UserId | None:
    """The user a ``PRESENCE_UPDATE`` is about (None for any other event)."""
    if envelope.op != PRESENCE_UPDATE or not isinstance(envelope.d, dict):
        return None
    user_id = envelope.d.get("userId")
    return user_id if isinstance(user_id, str) else None


def presence_recipients(
    routed: Collection[H], interested: Iterable[H], own: Iterable[H]
) -> list[H]:
    """PROTOCOL section 14: a PRESENCE_UPDATE for a *large* server reaches only the
    routed sessions that asked for its user (SUBSCRIBE_PRESENCE), plus the user's own
    routed sessions; each once. The cost is in the interested, not in the routed."""
    return [c for c in dict.fromkeys((*interested, *own)) if c in routed]
