"""A reconnect storm is not dropped at the door: the listening socket's accept queue
holds it (GATEWAY_LISTEN_BACKLOG, default 2048; Hypercorn's own default is 100).

The gateway process is stopped (SIGSTOP) so nothing is accepted; the kernel still
completes the TCP handshakes the accept queue has room for. Every connection beyond
it would have its SYN dropped and wait for a retransmit (1 s, then 3 s, ...): what
made every client of a drained instance wait seconds to be live again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess

import pytest

from tests.process.helpers import served

pytestmark = pytest.mark.timeout(60)

STORM = 600


def listen_queue(port: int) -> tuple[int, int]:
    """(connections waiting in the accept queue, the queue's size) from ``ss``."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert len(out) == 1, out  # one listening socket, shared by the workers
    _, waiting, size, *_ = out[0].split()
    return int(waiting), int(size)


def signal_tree(pid: int, sig: signal.Signals) -> None:
    """The process and its children (the workers, which share its socket)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        children = [int(c) for c in fh.read().split()]
    for p in (pid, *children):
        os.kill(p, sig)


async def storm(port: int, n: int) -> list[asyncio.StreamWriter]:
    async def one() -> asyncio.StreamWriter | None:
        with contextlib.suppress(OSError, TimeoutError):
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
            return writer
        return None

    return [w for w in await asyncio.gather(*(one() for _ in range(n))) if w is not None]


@pytest.mark.parametrize("workers", [1, 2])
async def test_the_accept_queue_holds_a_storm(workers: int, redis_url: str) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url} if workers > 1 else {}
    with served(env, workers=workers) as gw:
        # (the readiness probe's own connection may still wait for a worker)
        assert listen_queue(gw.port)[1] == 2048
        signal_tree(gw.proc.pid, signal.SIGSTOP)
        try:
            writers = await storm(gw.port, STORM)
            waiting, size = listen_queue(gw.port)
        finally:
            signal_tree(gw.proc.pid, signal.SIGCONT)
        for w in writers:
            w.close()
        assert len(writers) == STORM
        assert (waiting >= STORM, size) == (True, 2048)


async def test_the_backlog_is_configurable() -> None:
    with served({"GATEWAY_LISTEN_BACKLOG": "300"}) as gw:
        assert listen_queue(gw.port)[1] == 300
