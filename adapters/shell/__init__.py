"""The async shell: feeds the pure core its inputs and carries out its effects.

Written once and used by both the ASGI app (``entrypoints.app``) and the simulation.
It depends on ports only; the composition root (``entrypoints.bootstrap``) or the
simulation picks the adapters.
"""

from adapters.shell.factory import Backends, make_gateway
from adapters.shell.gateway import Gateway
from adapters.shell.settings import GatewaySettings
from adapters.shell.snapshot import GatewaySnapshot

__all__ = ["Backends", "Gateway", "GatewaySettings", "GatewaySnapshot", "make_gateway"]
