"""Commands issued in one loop tick, sent to Redis as one pipeline.

A storm is many small commands at once: a thousand IDENTIFYs each PUBLISH a presence
change, a thousand RESUMEs each PUBLISH an ask and their markers. One command per
round trip costs a pooled-connection checkout, a write syscall and a read per
command; a pipeline of the tick's commands costs them once.

:class:`TickBatcher` collects what callers submit until the event loop has run every
task that was ready with the first of them (one checkpoint), then runs the batch as
one call. The first caller of a batch runs it, shielded and bounded by its own
deadline: a batch is everybody's, so its leader being cancelled must not strand the
rest (they would wait forever) or discard their commands halfway. Each caller gets
its own command's result or exception. Batches do not wait for each other: a command
submitted while a batch is on the wire starts the next one, on another pooled
connection, so a slow batch never queues the following ones behind it (order between
commands of *different* callers was never promised; one caller's commands keep their
order, since it awaits each).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Runs one batch: one result (or the exception it raised) per item, in order.
BatchRunner = Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]]


@dataclass(eq=False)
class _Slot(Generic[Item, Result]):
    item: Item
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Result | None = None
    error: BaseException | None = None


class TickBatcher(Generic[Item, Result]):
    """``await submit(item)``: the result of ``item``, run in one batch with every item
    submitted in the same loop tick (at most ``max_batch`` per batch).

    ``run`` must bound itself (it runs shielded) and must answer every item: a
    missing answer, or ``run`` raising, fails every item of the batch with that
    exception."""

    def __init__(self, run: BatchRunner[Item, Result], *, max_batch: int = 512) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self._max = max_batch
        self._pending: list[_Slot[Item, Result]] = []
        self.batches = 0  #: batches run (for tests and metrics)

    async def submit(self, item: Item) -> Result:
        slot: _Slot[Item, Result] = _Slot(item)
        self._pending.append(slot)
        if len(self._pending) == 1:  # the first of this tick: it runs the batch
            with anyio.CancelScope(shield=True):
                await anyio.lowlevel.checkpoint()  # let the rest of the tick join
                tick, self._pending = self._pending, []
                for start in range(0, len(tick), self._max):
                    await self._run_batch(tick[start : start + self._max])
            # Whatever was submitted while this tick's batch was on the wire led its own.
        else:
            await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    async def _run_batch(self, batch: list[_Slot[Item, Result]]) -> None:
        self.batches += 1
        try:
            results = await self._run([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} answered {len(results)} times")
        except BaseException as exc:  # every caller hears of it (cancellation included)
            results = [exc] * len(batch)
            if not isinstance(exc, Exception):
                _settle(batch, results)
                raise
        _settle(batch, results)


def _settle(
    batch: list[_Slot[Item, Result]], results: Sequence[Result | BaseException]
) -> None:
    for slot, outcome in zip(batch, results, strict=True):
        if isinstance(outcome, BaseException):
            slot.error = outcome
        else:
            slot.result = outcome
        slot.done.set()
