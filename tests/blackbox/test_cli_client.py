"""``gateway connect`` and ``gateway publish`` as processes against a served gateway:
what a user sees on the terminal, the stdin commands, exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from tests.blackbox.conftest import TEST_SECRET, WAIT, GatewayServer, StartGateway

KEY = "cli-test-api-key-" + "f00d" * 8


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return {**env, "GATEWAY_JWT_SECRET": TEST_SECRET, **extra}


async def run_cli(*args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "entrypoints.cli",
        *args,
        env=cli_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Terminal:
    """A running ``gateway connect``: write command lines, read printed lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str, **env: str) -> Terminal:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "entrypoints.cli",
            "connect",
            *args,
            env=cli_env(**env),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def line(self, within: float = 20.0) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), within)
        assert raw, f"gateway connect ended; printed: {self.lines}"
        self.lines.append(raw.decode().rstrip("\n"))
        return self.lines[-1]

    async def until(self, text: str) -> str:
        """The next printed line containing ``text`` (earlier lines skipped)."""
        while True:
            line = await self.line()
            if text in line:
                return line

    async def type(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def wait(self) -> tuple[int, str]:
        assert self.proc.stderr is not None
        code = await asyncio.wait_for(self.proc.wait(), WAIT * 2)
        return code, (await self.proc.stderr.read()).decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest.fixture
async def api(start_gateway: StartGateway) -> GatewayServer:
    return await start_gateway({"GATEWAY_API_KEY": KEY})


async def test_connect_shows_others_events_and_runs_stdin_commands(api: GatewayServer) -> None:
    bob = await api.login("u2")
    await bob.subscribe("s1")
    alice = await Terminal.start("alice", "--subscribe", "s1", "--url", api.ws_url)
    try:
        assert "as alice (u1)" in await alice.until("* connected")
        await alice.until("subscribed to s1")
        await bob.expect_event(
            "PRESENCE_UPDATE", {"userId": "u1", "serverId": "s1", "status": "online"}
        )
        await bob.send_op("TYPING_START", {"channelId": "c1"})
        assert await alice.line() == "[s1 #c1] bob is typing"
        await bob.send_op("PRESENCE_UPDATE", {"status": "dnd"})
        await bob.expect("PRESENCE_UPDATE")  # his own
        assert await alice.line() == "[s1] bob is now dnd"

        code, out, err = await run_cli(
            "publish", "s1", "HELLO_WORLD", "{}", "--url", api.http_url, GATEWAY_API_KEY=KEY
        )
        assert code == 0, err
        assert out.strip() == "published HELLO_WORLD to server s1"
        assert await alice.line() == "HELLO_WORLD {}"
        await bob.expect_event("HELLO_WORLD", {})

        await alice.type("typing c1")
        typing = await bob.expect("TYPING_START")
        assert typing["d"]["userId"] == "u1" and typing["d"]["username"] == "alice"
        await alice.type("status idle")
        await bob.expect_event(
            "PRESENCE_UPDATE", {"userId": "u1", "serverId": "s1", "status": "idle"}
        )
        assert await alice.line() == "[s1] alice is now idle"
        await alice.type("typing c404")
        assert await alice.line() == "! error NOT_FOUND (TYPING_START): unknown channel"
        await alice.type("quit")
        code, err = await alice.wait()
        assert code == 0, err
        await bob.expect_event(
            "PRESENCE_UPDATE", {"userId": "u1", "serverId": "s1", "status": "offline"}
        )
    finally:
        alice.kill()


async def test_connect_json_prints_raw_frames_and_ends_at_end_of_input(
    api: GatewayServer,
) -> None:
    term = await Terminal.start("bob", "--json", "--subscribe", "s1", "--url", api.ws_url)
    try:
        ready = json.loads(await term.line())
        assert ready["op"] == "READY" and ready["s"] == 1
        assert ready["d"]["user"]["id"] == "u2"
        assert json.loads(await term.line()) == {
            "op": "SUBSCRIBED",
            "d": {"serverId": "s1"},
            "s": 2,
        }
        await api.gateway.publish_to_server("s1", {"op": "X", "d": {"k": [1, 2]}})
        assert json.loads(await term.line()) == {"op": "X", "d": {"k": [1, 2]}, "s": 3}
        assert term.proc.stdin is not None
        term.proc.stdin.close()  # end of input: leave
        code, err = await term.wait()
        assert code == 0, err
        assert "* connected" in err  # state lines go to stderr, frames alone to stdout
    finally:
        term.kill()


async def test_connect_with_an_explicit_token(api: GatewayServer) -> None:
    token = api.mint("u3")
    term = await Terminal.start("ignored", "--token", token, "--url", api.ws_url)
    try:
        assert "as carol (u3)" in await term.until("* connected")
        await term.type("quit")
        assert (await term.wait())[0] == 0
    finally:
        term.kill()


async def test_connect_with_a_bad_token_exits_1_and_says_why(api: GatewayServer) -> None:
    term = await Terminal.start("x", "--token", "not-a-jwt", "--url", api.ws_url)
    try:
        code, err = await term.wait()
        assert code == 1
        assert "4004" in err
    finally:
        term.kill()


async def test_connect_unknown_user_exits_1(api: GatewayServer) -> None:
    term = await Terminal.start("mallory", "--url", api.ws_url)
    try:
        code, err = await term.wait()
        assert code == 1 and "no user" in err and "mallory" in err
    finally:
        term.kill()


async def test_publish_refusals_exit_non_zero_with_the_reason(api: GatewayServer) -> None:
    url = ("--url", api.http_url)
    code, _, err = await run_cli("publish", "s1", "X", "{}", *url, GATEWAY_API_KEY="wrong")
    assert code == 1 and "HTTP 401" in err
    code, _, err = await run_cli("publish", "s1", "X", "{nope", *url, GATEWAY_API_KEY=KEY)
    assert code == 2 and "not valid JSON" in err
    code, _, err = await run_cli("publish", "s1", "X", *url, GATEWAY_API_KEY=KEY)
    assert code == 2 and "expected" in err
    code, _, err = await run_cli(
        "publish", "--user", "u1", "X", "{}", "--channel", "c1", *url, GATEWAY_API_KEY=KEY
    )
    assert code == 2
    # No key and not development mode (a JWT secret is set): say what to set.
    code, _, err = await run_cli("publish", "s1", "X", "{}", *url)
    assert code == 2 and "GATEWAY_API_KEY" in err
    # Nothing listening.
    code, _, err = await run_cli(
        "publish", "s1", "X", "{}", "--url", "http://127.0.0.1:9", GATEWAY_API_KEY=KEY
    )
    assert code == 1 and "cannot reach" in err


async def test_publish_to_a_user_by_username_channel_and_exclude(api: GatewayServer) -> None:
    alice, bob, carol = await api.login("u1"), await api.login("u2"), await api.login("u3")
    for client in (alice, bob, carol):  # all online before anyone subscribes: no presence
        await client.subscribe("s1")
    url = ("--url", api.http_url)
    code, out, err = await run_cli(
        "publish", "--user", "bob", "DM", '"hi"', *url, GATEWAY_API_KEY=KEY
    )
    assert code == 0, err
    assert "user u2" in out
    await bob.expect_event("DM", "hi")
    code, _, err = await run_cli(
        "publish",
        "s1",
        "MOD",
        "null",
        "--channel",
        "c3",
        "--exclude",
        "u1",
        *url,
        GATEWAY_API_KEY=KEY,
    )
    assert code == 0, err
    await bob.expect_event("MOD", None)  # bob reads c3; alice excluded; carol cannot read
    await alice.assert_no_frame()
    await carol.assert_no_frame()
