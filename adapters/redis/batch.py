"""Commands batched into one round trip (group commit): the presence store's script
calls and the broker's PUBLISHes.

A handshake storm issues hundreds of presence transitions (one Lua script each) and
their PUBLISHes within a few milliseconds; a RESUME storm as many asks and markers.
Sent one by one, each takes a pooled connection and a round trip of its own.
:class:`CommandBatcher` sends them as **one non-transactional pipeline**: the first
command goes out at once, alone (no added latency when the gateway is quiet), and
every command issued while a batch is in flight waits for the next one, which carries
all of them. Each script still touches the keys of one user, so the batch splits by
slot as it is (Redis Cluster: the pipeline goes per node), and one caller's commands
keep their order (they are awaited one after another).

There is no background task: the caller whose call starts a batch sends it (the
*leader*) and then hands the role to the oldest waiting call, whose task sends the
next batch. The round trip of a batch is shielded from its leader's cancellation
(the batch carries other callers' calls, and a command cancelled in flight would make
redis-py discard its pooled connection); it is bounded by the client's pool wait and
socket timeouts. A call cancelled while it waits is taken out of the queue (it never
runs), and if it had just been made leader, the role goes on to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

#: Calls per pipeline at most (a larger queue goes in several batches, in order).
MAX_BATCH = 128


#: Queues one command on a pipeline.
Command = Callable[[Pipeline], object]


class _Call:
    __slots__ = ("add", "error", "finished", "lead", "result", "script", "wake")

    def __init__(self, add: Command, script: AsyncScript | None = None) -> None:
        self.add = add
        #: The script an EVALSHA runs (loaded and sent again after NOSCRIPT).
        self.script = script
        #: Made only for a call that waits (a leader's own call never does).
        self.wake: anyio.Event | None = None
        self.lead = False
        self.finished = False
        self.result: object = None
        self.error: BaseException | None = None

    def outcome(self) -> object:
        if self.error is not None:
            raise self.error
        return self.result


class CommandBatcher:
    def __init__(self, client: Redis, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._max = max(1, max_batch)
        self._queue: list[_Call] = []
        self._busy = False
        #: Round trips made and calls carried (tests and benchmarks read them).
        self.batches = 0
        self.calls = 0

    @property
    def waiting(self) -> int:
        """Calls queued for the next batch."""
        return len(self._queue)

    async def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]
    ) -> object:
        """Run ``script`` with ``keys`` and ``args`` in the next batch; its result, or
        the exception of its command (or of the whole round trip)."""
        sha, n = script.sha, len(keys)
        return await self._run(_Call(lambda p: p.evalsha(sha, n, *keys, *args), script))

    async def command(self, add: Command) -> object:
        """Run the command ``add`` queues on a pipeline in the next batch (as
        :meth:`call`), e.g. ``lambda p: p.publish(channel, payload)``."""
        return await self._run(_Call(add))

    async def _run(self, call: _Call) -> object:
        self._queue.append(call)
        if self._busy:
            call.wake = anyio.Event()
            try:
                await call.wake.wait()
            except BaseException:
                if call in self._queue:
                    self._queue.remove(call)
                if call.lead:
                    self._hand_on()
                raise
            if call.finished:
                return call.outcome()
        self._busy = True
        try:
            while not call.finished:
                batch = self._queue[: self._max]
                del self._queue[: self._max]
                with anyio.CancelScope(shield=True):
                    await self._execute(batch)
        finally:
            if not call.finished and call in self._queue:  # the round trip raised
                self._queue.remove(call)
            self._hand_on()
        return call.outcome()

    def _hand_on(self) -> None:
        """The leader is done: the oldest waiting call sends the next batch."""
        if self._queue:
            first = self._queue[0]
            first.lead = True
            if first.wake is not None:
                first.wake.set()
        else:
            self._busy = False

    async def _execute(self, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        try:
            results = await self._pipeline(batch)
            missing = [
                i
                for i, r in enumerate(results)
                if isinstance(r, NoScriptError) and batch[i].script is not None
            ]
            if missing:  # a restarted or flushed Redis: load the scripts, send those again
                again = [batch[i] for i in missing]
                scripts = {id(c.script): c.script for c in again if c.script is not None}
                for script in scripts.values():
                    await self._client.script_load(script.script)
                for i, r in zip(missing, await self._pipeline(again), strict=True):
                    results[i] = r
            for c, r in zip(batch, results, strict=True):
                if isinstance(r, Exception):
                    c.error = r
                else:
                    c.result = r
        except BaseException as exc:  # the whole round trip failed: every call with it
            for c in batch:
                c.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for c in batch:
                c.finished = True
                if c.wake is not None:
                    c.wake.set()

    async def _pipeline(self, calls: list[_Call]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for c in calls:
            c.add(pipe)
        results: list[object] = await pipe.execute(raise_on_error=False)
        return results
