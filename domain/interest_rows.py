"""The session's rows for presence interest (PROTOCOL section 14), kept apart from
:mod:`domain.session` for length; the tables there name them.

SUBSCRIBE_PRESENCE asks the shell for a :class:`~domain.effects.WatchPresence` with the
session's verdict on the subscription; the shell answers NOT_FOUND for an unknown
server first, then NOT_SUBSCRIBED, else reports the members' statuses as a
:class:`~domain.effects.PresenceSnapshot`, which becomes the PRESENCE_SNAPSHOT dispatch
unless the session left the server meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from domain.codec import SubscribePresence
from domain.effects import Effect, PresenceSnapshot, Send, WatchPresence

if TYPE_CHECKING:
    from domain.session import Session

C = TypeVar("C")


def subscribe_presence(session: Session, command: SubscribePresence, now: float) -> list[Effect]:
    sid = command.server_id
    return [WatchPresence(sid, command.user_ids, sid in session.subscriptions)]


def presence_snapshot(session: Session, outcome: PresenceSnapshot, now: float) -> list[Effect]:
    if outcome.server_id not in session.subscriptions:  # left the server meanwhile
        return []
    presences = [{"userId": u, "status": s.visible.value} for u, s in outcome.presences]
    d = {"serverId": outcome.server_id, "presences": presences}
    return [Send(session.dispatch("PRESENCE_SNAPSHOT", d))]



_Action = Callable[["Session", C, float], list[Effect]]

#: The rows :mod:`domain.session`'s tables hold for these (READY only).
PRESENCE_OP: tuple[type[SubscribePresence], _Action[SubscribePresence]]
PRESENCE_OP = (SubscribePresence, subscribe_presence)
PRESENCE_OUTCOME: tuple[type[PresenceSnapshot], _Action[PresenceSnapshot]]
PRESENCE_OUTCOME = (PresenceSnapshot, presence_snapshot)
