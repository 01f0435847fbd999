"""Names of Redis channels and keys (PROTOCOL sections 7 and 8): the external contract."""

from __future__ import annotations

from domain.model import ChannelId, ServerId, UserId

SERVER_CHANNEL_PREFIX = "ws:server:"
USER_CHANNEL_PREFIX = "ws:user:"


def server_channel(server_id: ServerId) -> str:
    return SERVER_CHANNEL_PREFIX + server_id


def user_channel(user_id: UserId) -> str:
    return USER_CHANNEL_PREFIX + user_id


def typing_key(channel_id: ChannelId, user_id: UserId) -> str:
    return f"typing:{channel_id}:{user_id}"


def presence_key(user_id: UserId) -> str:
    return f"presence:{user_id}"
