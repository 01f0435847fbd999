"""Where a sharded channel lives, and SPUBLISH to it (see :mod:`adapters.redis.cluster`).

:class:`SlotRouter` keeps the slot map (``CLUSTER SLOTS`` from the first node that
answers: the URL's, then the masters it knows) and one pooled client per master for
publishing and for reading the map. A ``MOVED`` reply patches the map at once (and
the owner of the router hears of it, to re-route its subscriptions); an ``ASK`` is
followed for one command.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from redis.asyncio import Redis
from redis.exceptions import AskError, MovedError, ResponseError

from adapters.redis._common import UNAVAILABLE_ERRORS, create_client
from adapters.redis.cluster_shard import SlotMap, channel_slot, node_url, url_address

#: A node that cannot tell the slot map (down, or not a cluster node): ask the next.
_MAP_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, ResponseError)


class SlotRouter:
    """The slot map and the per-master publish clients of one broker."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        on_moved: Callable[[int], None],
    ) -> None:
        self._url = url
        self._seed = url_address(url)
        self._timeout = timeout
        self._connect_timeout = min(connect_timeout, timeout)
        self._max_connections = max_connections
        self._on_moved = on_moved
        self._clients: dict[str, Redis] = {}
        self._slots: dict[str, int] = {}
        self.map: SlotMap | None = None

    def slot(self, channel: str) -> int:
        slot = self._slots.get(channel)
        if slot is None:
            if len(self._slots) > 100_000:
                self._slots.clear()
            slot = self._slots[channel] = channel_slot(channel)
        return slot

    def owner(self, channel: str) -> str | None:
        return None if self.map is None else self.map.owner(self.slot(channel))

    def client(self, address: str) -> Redis:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = create_client(
                node_url(self._url, address),
                timeout=self._timeout,
                connect_timeout=self._connect_timeout,
                max_connections=self._max_connections,
            )
        return client

    def moved(self, slot: int, address: str) -> None:
        """A MOVED reply: ``slot`` is served by ``address`` now."""
        if self.map is not None and self.map.owner(slot) != address:
            self.map = self.map.moved(slot, address)
        self._on_moved(slot)

    async def spublish(self, channel: str, payload: bytes) -> None:
        if self.map is None:
            await self.refresh()
        for _ in range(3):
            address = self.owner(channel)
            if address is None:
                raise ConnectionError(f"no master serves slot {self.slot(channel)}")
            try:
                await self.client(address).spublish(channel, payload)
                return
            except MovedError as exc:
                self.moved(exc.slot_id, f"{exc.host}:{exc.port}")
            except AskError as exc:
                pipe = self.client(f"{exc.host}:{exc.port}").pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.execute_command("SPUBLISH", channel, payload)
                await pipe.execute()
                return
        raise ConnectionError(f"SPUBLISH {channel}: too many redirections")

    async def refresh(self) -> bool:
        """Read the slot map from the first node that answers; True if it changed."""
        known = [self._seed, *sorted(self.map.masters() if self.map else ())]
        failure = "no node"
        for address in dict.fromkeys(known):
            try:
                with anyio.fail_after(self._timeout):
                    reply = await self.client(address).execute_command(  # type: ignore[no-untyped-call]
                        "CLUSTER SLOTS"
                    )
            except _MAP_ERRORS as exc:
                failure = f"{address}: {type(exc).__name__}: {exc}"
                continue
            new = SlotMap.parse(reply)
            if new == self.map:
                return False
            self.map = new
            return True
        raise ConnectionError(f"slot map: no node answered ({failure})")

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            for client in self._clients.values():
                await client.aclose()
