"""``GATEWAY_WORKERS=N``: N gateway instances on one port, sharing Redis.

Hypercorn's own multi-worker mode stops every worker as soon as one exits, dropping
connections without a close frame. Instead this supervisor binds the listening socket
once, starts N ``gateway serve --bind fd://N`` processes that inherit it, restarts a
worker that dies on its own (with backoff), and on SIGTERM/SIGINT forwards SIGTERM to
every worker and waits for all of them: each one drains (RECONNECT, 1001, presence
grace) before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from entrypoints.config import Config, ConfigError
from entrypoints.serve import bind_socket

log = logging.getLogger("gateway.workers")


def run_workers(config: Config) -> int:
    if not config.redis_url:
        raise ConfigError("GATEWAY_WORKERS > 1 needs GATEWAY_REDIS_URL (instances share Redis)")
    sock = bind_socket(config.host, config.port, backlog=config.listen_backlog)
    fd = sock.fileno()
    env = {**os.environ, "GATEWAY_WORKERS": "1"}
    command = [sys.executable, "-m", "entrypoints.cli", "serve", "--bind", f"fd://{fd}"]
    stopping = False
    workers: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, float] = {}

    def start(index: int) -> None:
        workers[index] = subprocess.Popen(command, env=env, pass_fds=(fd,))
        log.info("worker %d started (pid %d)", index, workers[index].pid)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"gateway: serving ws://{config.host}:{config.port}/ws/gateway with "
        f"{config.workers} workers",
        file=sys.stderr,
    )
    for i in range(config.workers):
        start(i)
    try:
        while True:
            alive = 0
            for index, proc in list(workers.items()):
                code = proc.poll()
                if code is None:
                    alive += 1
                    continue
                if stopping:
                    continue
                log.error("worker %d (pid %d) exited with %s; restarting", index, proc.pid, code)
                delay = min(5.0, 0.5 * (1 + (time.monotonic() - restarts.get(index, 0) < 10)))
                restarts[index] = time.monotonic()
                time.sleep(delay)
                start(index)
                alive += 1
            if stopping and alive == 0:
                break
            time.sleep(0.1)
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
        sock.close()
    return 0
