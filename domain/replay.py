"""What a session keeps so that it can be resumed (PROTOCOL section 13).

A :class:`ReplayBuffer` holds ``(s, template)`` pairs: the shared
:class:`~domain.codec.DispatchTemplate` the fan-out encoded once per event (never a
per-session copy of the frame) and the ``s`` the session stamped into it. While the
session is attached it keeps its last ``buffer_frames`` dispatches (those may have
been lost in flight when the connection drops); while parked it keeps everything,
bounded by the outbound bounds: the oldest frames sent before the drop go first, and
when the frames kept since the drop alone exceed a bound the session must end.

:func:`parks` is the rule of which endings park a session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from domain.codec import DispatchTemplate

#: Client close codes that mean "I am leaving": the session ends.
CLIENT_LEAVES = frozenset({1000, 1001})
#: Server close codes after which the session is parked (drain, too big, rate, heartbeat).
SERVER_PARKS = frozenset({1001, 1009, 4008, 4009})


def parks(code: int | None, by_client: bool) -> bool:
    """Whether a READY session whose connection ended this way is kept resumable."""
    if by_client:
        return code not in CLIENT_LEAVES  # 1006 (TCP loss), 1005, 4xxx... park
    return code in SERVER_PARKS


def _cost(s: int, template: DispatchTemplate) -> int:
    return len(template.head) + len(str(s)) + 1


class ReplayBuffer:
    """The kept dispatches of one session. Their ``s`` are consecutive (a session
    stamps 1, 2, 3, ... and the buffer only ever drops its oldest), so only the
    templates are kept, with the ``s`` of the first: one deque slot per frame, no
    tuple and no int object per frame (a busy instance keeps up to
    ``buffer_frames`` per session)."""

    __slots__ = (
        "_bytes",
        "_first",
        "_frames",
        "_limit",
        "buffer_frames",
        "max_bytes",
        "max_frames",
        "parked_from",
    )

    def __init__(self, buffer_frames: int, max_frames: int, max_bytes: int) -> None:
        self.buffer_frames = buffer_frames
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[DispatchTemplate] = deque()
        #: The ``s`` of ``_frames[0]`` (the next ones follow it by one).
        self._first = 0
        self._bytes = 0
        #: The first ``s`` stamped while parked (None while attached).
        self.parked_from: int | None = None
        #: Frames kept at most now (attached: the last ``buffer_frames``; parked: all).
        self._limit = min(buffer_frames, max_frames)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    @property
    def oldest(self) -> int | None:
        return self._first if self._frames else None

    def record(self, s: int, template: DispatchTemplate, cost: int = 0) -> bool:
        """Keep one stamped dispatch; False when a parked session kept too much.
        ``cost``: the stamped frame's length when the caller has it (else computed)."""
        if self._limit <= 0:
            return True  # attached with no buffer: nothing is kept
        frames = self._frames
        if not frames:
            self._first = s
        elif s != self._first + len(frames):  # never: a session's s are gapless
            frames.clear()  # keep no gap: what came before can no longer be replayed
            self._bytes = 0
            self._first = s
        frames.append(template)
        self._bytes += cost or _cost(s, template)
        if len(frames) <= self._limit and self._bytes <= self.max_bytes:
            return True  # within the bounds: nothing to trim (every delivery comes here)
        return self._trim()

    def _trim(self) -> bool:
        frames = self._frames
        limit_frames = self._limit
        parked_from = self.parked_from
        while frames and (len(frames) > limit_frames or self._bytes > self.max_bytes):
            s = self._first
            if parked_from is not None and s >= parked_from:
                return False  # what was kept since the drop alone is over a bound
            self._bytes -= _cost(s, frames.popleft())
            self._first = s + 1
        return True

    def park(self, next_s: int) -> None:
        if self.parked_from is None:  # from the close decision on, all is kept
            self.parked_from = next_s
            self._limit = self.max_frames

    def attach(self) -> None:
        """Attached again: back to keeping the last ``buffer_frames``."""
        self.parked_from = None
        self._limit = min(self.buffer_frames, self.max_frames)
        self._trim()

    def items(self) -> list[tuple[int, DispatchTemplate]]:
        first = self._first
        return [(first + i, template) for i, template in enumerate(self._frames)]

    def hand_in(
        self, earlier: list[tuple[int, DispatchTemplate]], offset: int, parked_from: int | None
    ) -> None:
        """A handoff from another instance: its kept frames go first, and ours (kept
        from ``s`` 1 while we waited for them) move up by ``offset``."""
        frames = [*earlier, *((s + offset, t) for s, t in self.items())]
        # Only a run of consecutive ``s`` can be replayed: keep the last one.
        start = len(frames) - 1
        while start > 0 and frames[start - 1][0] == frames[start][0] - 1:
            start -= 1
        kept = frames[max(start, 0) :]
        self._frames = deque(t for _, t in kept)
        self._first = kept[0][0] if kept else 0
        self._bytes = sum(_cost(s, t) for s, t in kept)
        self.parked_from = parked_from if parked_from is not None else offset + 1
        self._limit = self.max_frames

    def covers(self, seq: int, last: int) -> bool:
        """A resume from ``seq`` (the last ``s`` the client saw) can be replayed."""
        if seq > last:
            return False
        if seq == last:
            return True
        oldest = self.oldest
        return oldest is not None and oldest <= seq + 1

    def after(self, seq: int) -> Iterator[str]:
        """The frames with ``s > seq``, in order, each with its original ``s``."""
        first = self._first
        for i, template in enumerate(self._frames):
            s = first + i
            if s > seq:
                yield template.frame(s)
