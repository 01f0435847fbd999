"""HTTP endpoints (PROTOCOL section 12 and 7a): /healthz, /readyz, /metrics."""

from __future__ import annotations

from adapters.memory import MemoryDirectory, MemoryPresenceStore
from adapters.shell import Gateway
from tests.blackbox.conftest import GatewayServer, StartGateway


async def test_healthz_answers_200(harness: GatewayServer) -> None:
    async with harness.http() as http:
        response = await http.get("/healthz")
    assert response.status_code == 200


async def test_readyz_follows_the_backends(harness: GatewayServer) -> None:
    async with harness.http() as http:
        assert (await http.get("/readyz")).status_code == 200

        harness.directory.failing = True
        try:
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
        finally:
            harness.directory.failing = False
        assert (await http.get("/readyz")).status_code == 200

        harness.presence.failing = True
        try:
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
        finally:
            harness.presence.failing = False
        assert (await http.get("/readyz")).status_code == 200


async def test_the_gateway_starts_with_a_backend_down(start_gateway: StartGateway) -> None:
    def break_backends(gateway: Gateway) -> None:
        assert isinstance(gateway.directory, MemoryDirectory)
        assert isinstance(gateway.presence, MemoryPresenceStore)
        gateway.directory.failing = True
        gateway.presence.failing = True

    server = await start_gateway(customize=break_backends)
    async with server.http() as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 503
        client = await server.connect()  # HELLO even so
        assert client.hello["op"] == "HELLO"

        server.directory.failing = False
        server.presence.failing = False
        assert (await http.get("/readyz")).status_code == 200
    await client.identify(server.mint("u1"))
    await client.subscribe("s1")


async def test_metrics_is_prometheus_text_with_gateway_metrics(harness: GatewayServer) -> None:
    alice = await harness.login("u1")
    await alice.subscribe("s1")
    await alice.send_raw("not json")
    await alice.expect_error("DECODE_ERROR", None)
    async with harness.http() as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE gateway_connections gauge" in text
    assert 'gateway_connections{state="ready"} 1.0' in text
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert types and all(name.startswith("gateway_") for name in types), types
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, value = line.rsplit(" ", 1)
            float(value)  # every sample is "<name>{labels} <number>"
            assert name_and_labels.startswith("gateway_"), line
    assert await harness.metric("gateway_connections_opened_total") >= 1
