"""PermissionCache's synchronous answers (the fan-out's path without a deadline): they
exist only when every piece is cached and fresh, and then equal what the directory
path answers (and the generated population's own oracle)."""

from __future__ import annotations

import random

from adapters.memory import ManualClock, MemoryDirectory
from adapters.shell.permissions import MISS, PermissionCache
from simulation.population import generate

TTL = 30.0


async def test_cached_readers_only_from_fresh_entries_and_equal_to_readers() -> None:
    pop = generate(random.Random(7), 300)
    clock = ManualClock()
    cache = PermissionCache(MemoryDirectory(pop.data), clock, ttl=TTL)
    checked = 0
    for server in pop.servers[:12]:
        candidates = [*pop.members[server], "u-not-a-member"]
        assert cache.cached_server(server) is MISS
        for i, channel in enumerate(pop.channels_of[server]):
            if i == 0:  # cold: nothing of the server is cached yet
                assert cache.cached_readers(server, channel, candidates) is None
            answer = await cache.readers(server, channel, candidates)
            assert answer == pop.readers[channel] & set(candidates)
            assert cache.cached_readers(server, channel, candidates) == answer
            # A candidate never looked up is not guessed.
            assert cache.cached_readers(server, channel, [*candidates, "u-never-asked"]) is None
            checked += 1
        context = cache.cached_server(server)
        assert context is not MISS and context is not None and context.server.id == server
    assert checked >= 24
    server = pop.servers[0]
    channel = pop.channels_of[server][0]
    candidates = pop.members[server]
    cache.invalidate_server(server)
    assert cache.cached_server(server) is MISS
    assert cache.cached_readers(server, channel, candidates) is None
    await cache.readers(server, channel, candidates)
    clock.advance(TTL + 0.001)  # expired: the directory must be asked again
    assert cache.cached_server(server) is MISS
    assert cache.cached_readers(server, channel, candidates) is None


async def test_cached_server_of_an_unknown_server_is_none_once_asked() -> None:
    pop = generate(random.Random(8), 50)
    cache = PermissionCache(MemoryDirectory(pop.data), ManualClock(), ttl=TTL)
    assert cache.cached_server("s-unknown") is MISS
    assert await cache.server("s-unknown") is None
    assert cache.cached_server("s-unknown") is None
    assert cache.cached_readers("s-unknown", "c-x", ["u1"]) == set()
