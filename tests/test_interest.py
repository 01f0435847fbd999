"""ChannelInterest: any interleaving of acquire and release ends with the broker
subscribed exactly to the channels with a positive count, and nothing left over."""

from __future__ import annotations

import random

import anyio
import pytest

from adapters.shell.interest import ChannelInterest
from domain.ports import BackendUnavailable, MessageHandler


class SlowBroker:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.subscribed: set[str] = set()
        self.fail_next = False

    async def _delay(self) -> None:
        await anyio.sleep(self.rng.choice([0, 0, 0.001, 0.003]))

    async def subscribe(self, channel: str) -> None:
        await self._delay()
        if self.fail_next:
            self.fail_next = False
            raise BackendUnavailable("injected")
        self.subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        await self._delay()
        self.subscribed.discard(channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        raise NotImplementedError

    async def run(self, handler: MessageHandler) -> None:
        raise NotImplementedError

    def is_healthy(self) -> bool:
        return True


@pytest.mark.parametrize("seed", range(12))
async def test_interleavings_end_consistent(seed: int) -> None:
    rng = random.Random(seed)
    broker = SlowBroker(rng)
    interest = ChannelInterest(broker)
    held: dict[str, int] = {}

    async def user(channel: str) -> None:
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.1:
                broker.fail_next = True
            try:
                await interest.acquire(channel)
            except BackendUnavailable:
                continue
            held[channel] = held.get(channel, 0) + 1
            assert channel in broker.subscribed  # acquire returns only once live
            await anyio.sleep(rng.choice([0, 0.001, 0.002]))
            if rng.random() < 0.8:
                held[channel] -= 1
                await interest.release(channel)

    async with anyio.create_task_group() as group:
        for i in range(30):
            group.start_soon(user, f"ch{i % 4}")
    expected = {c: n for c, n in held.items() if n}
    assert interest.channels() == expected
    assert broker.subscribed == set(expected)
    for channel, n in expected.items():
        for _ in range(n):
            await interest.release(channel)
    assert interest.channels() == {}
    assert broker.subscribed == set()
    assert interest._channels == {}
