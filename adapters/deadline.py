"""``fail_after`` for the per-operation backend deadlines, as a plain class.

Same contract as :func:`anyio.fail_after` (a cancel scope with a deadline ``delay``
seconds from now; :class:`TimeoutError` on leaving it if the deadline cancelled the
block), at a fraction of the cost on the hot paths (every publish, presence
transition, typing claim): anyio's version is a generator context manager wrapping
another one (``fail_after`` -> ``fail_at``) and looks the async backend up three
times per use. The cancel scope itself is anyio's own.

It sits beside the adapter packages, not in one of them, so that the shell and the
backend adapters (which must not know each other) can both use it.
"""

from __future__ import annotations

from types import TracebackType

import anyio

__all__ = ["fail_after"]


class fail_after:  # noqa: N801 (named as the anyio function it replaces)
    __slots__ = ("_delay", "_scope")

    def __init__(self, delay: float) -> None:
        self._delay = delay

    def __enter__(self) -> anyio.CancelScope:
        scope = self._scope = anyio.CancelScope(deadline=anyio.current_time() + self._delay)
        return scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:  # as contextlib's: mypy then reads a return in the block as final
        scope = self._scope
        if not scope.__exit__(exc_type, exc, tb):
            return False
        # The scope swallowed its own cancellation: the deadline's, or an explicit cancel.
        if scope.cancelled_caught and anyio.current_time() >= scope.deadline:
            raise TimeoutError
        return True
