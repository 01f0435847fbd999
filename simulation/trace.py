"""The canonical trace: what clients observed and which faults were injected.

The digest is a sha256 over lines ``<time µs> <subject> <text>``, where dispatch
frames lose their ``s`` (checked by the invariants) and the lines of one virtual
instant are sorted: the order in which the loop happened to run tasks within an
instant (set iteration over objects hashed by address, for example) never changes
the digest, while anything observable at a different time or with different content
does. A ring of recent lines is kept for violation reports.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from typing import Protocol

SEQ_MARK = ',"s":'


def strip_seq(text: str) -> str:
    """A dispatch frame without its ``s`` (control frames are returned unchanged)."""
    if text.endswith("}"):
        i = text.rfind(SEQ_MARK)
        if i > 0 and text[i + 5 : -1].isdigit():
            return text[:i] + "}"
    return text


class Ticks(Protocol):
    """A clock in whole microseconds (:class:`simulation.loop.VirtualTimeLoop`)."""

    ticks: int


class _Zero:
    ticks = 0


class Trace:
    """Lines are kept as given and formatted with their time only for the digest, one
    instant at a time (and for a violation report, from the ring)."""

    def __init__(self, ring: int = 6000) -> None:
        self._clock: Ticks = _Zero()
        self._hash = hashlib.sha256()
        self._instant = -1
        self._bucket: list[str] = []
        self.lines = 0
        self._recent: deque[tuple[int, str]] = deque(maxlen=ring)

    def bind(self, clock: Ticks) -> None:
        self._clock = clock

    def _add(self, line: str) -> None:
        t = self._clock.ticks
        if t != self._instant:
            self._flush()
            self._instant = t
        self._bucket.append(line)
        self._recent.append((t, line))
        self.lines += 1

    def _flush(self) -> None:
        bucket = self._bucket
        if bucket:
            # Every line of the bucket starts with the same "<time> ": sorting without
            # it gives the order of the full lines.
            bucket.sort()
            prefix = f"{self._instant} "
            self._hash.update((prefix + ("\n" + prefix).join(bucket) + "\n").encode())
            bucket.clear()

    def frame(self, subject: str, text: str) -> None:
        self._add(f"{subject} < {strip_seq(text)}")

    def dispatch(self, subject: str, text: str, seq_at: int) -> None:
        """A dispatch frame whose ``,"s":`` starts at ``seq_at`` (see strip_seq)."""
        self._add(f"{subject} < {text[:seq_at]}}}")

    def sent(self, subject: str, text: str) -> None:
        self._add(f"{subject} > {text}")

    def event(self, subject: str, text: str) -> None:
        self._add(f"{subject} {text}")

    def digest(self) -> str:
        self._flush()
        return self._hash.hexdigest()

    @property
    def recent(self) -> list[str]:
        return [f"{t} {line}" for t, line in self._recent]

    def relevant(self, tokens: Iterable[str], limit: int = 30) -> list[str]:
        """The last ``limit`` recent lines mentioning any of ``tokens`` (and faults)."""
        wanted = [t for t in tokens if t]
        found: list[str] = []
        for t, text in reversed(self._recent):
            line = f"{t} {text}"
            if " FAULT " in line or any(w in line for w in wanted):
                found.append(line)
                if len(found) >= limit:
                    break
        found.reverse()
        return found
