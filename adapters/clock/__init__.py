"""The real clock."""

from adapters.clock.system import SystemClock

__all__ = ["SystemClock"]
