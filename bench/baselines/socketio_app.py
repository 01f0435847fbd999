"""python-socketio with ``AsyncRedisManager``, as the ASGI app ``socketio.ASGIApp``,
served by Hypercorn like the gateway (``bench.baselines.serving``).

A client joins the room named in its connect auth payload (``40{"room": "..."}``),
so connect -> joined is one round trip, like the gateway's SUBSCRIBE_SERVER.
Publishers emit through Redis with socket.io's own pub/sub message (JSON, on
``--channel``): ``{"method": "emit", "event": ..., "data": [...], "room": ...}``.

    python -m bench.baselines.socketio_app --port 8201 \
        --redis-url redis://127.0.0.1:6379/14 --channel bench-socketio
"""

from __future__ import annotations

import argparse
from typing import Any

import socketio  # type: ignore[import-untyped, import-not-found, unused-ignore]

from bench.baselines import serving


def create_app(redis_url: str, channel: str) -> Any:
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=manager,
        transports=["websocket"],
        cors_allowed_origins=[],
        logger=False,
        engineio_logger=False,
    )

    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> bool:
        room = auth.get("room") if isinstance(auth, dict) else None
        if not isinstance(room, str):
            return False
        await sio.enter_room(sid, room)
        return True

    sio.on("connect", connect)
    return socketio.ASGIApp(sio, socketio_path="socket.io")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True)
    args = parser.parse_args()
    serving.run(create_app(args.redis_url, args.channel), args.host, args.port)


if __name__ == "__main__":
    main()
