"""In-process implementations of every port.

These are real implementations, not mocks: they back ``gateway serve`` when no Redis
or Postgres is configured, they are the world of the simulation, and they pass the
same contract tests as the Redis and Postgres adapters.
"""

from adapters.memory.broker import MemoryBroker, MemoryBrokerNetwork
from adapters.memory.clock import ManualClock
from adapters.memory.directory import MemoryDirectory
from adapters.memory.presence import MemoryPresenceStore
from adapters.memory.typing_gate import MemoryTypingGate

__all__ = [
    "ManualClock",
    "MemoryBroker",
    "MemoryBrokerNetwork",
    "MemoryDirectory",
    "MemoryPresenceStore",
    "MemoryTypingGate",
]
