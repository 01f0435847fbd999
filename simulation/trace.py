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
from collections.abc import Callable, Iterable

SEQ_MARK = ',"s":'


def strip_seq(text: str) -> str:
    """A dispatch frame without its ``s`` (control frames are returned unchanged)."""
    if text.endswith("}"):
        i = text.rfind(SEQ_MARK)
        if i > 0 and text[i + 5 : -1].isdigit():
            return text[:i] + "}"
    return text


class Trace:
    def __init__(self, now: Callable[[], float], ring: int = 6000) -> None:
        self._now = now
        self._hash = hashlib.sha256()
        self._instant = -1
        self._bucket: list[str] = []
        self.lines = 0
        self.recent: deque[str] = deque(maxlen=ring)

    def _add(self, line: str) -> None:
        t = round(self._now() * 1_000_000)
        if t != self._instant:
            self._flush()
            self._instant = t
        entry = f"{t} {line}"
        self._bucket.append(entry)
        self.recent.append(entry)
        self.lines += 1

    def _flush(self) -> None:
        if self._bucket:
            self._bucket.sort()
            self._hash.update(("\n".join(self._bucket) + "\n").encode())
            self._bucket.clear()

    def frame(self, subject: str, text: str) -> None:
        self._add(f"{subject} < {strip_seq(text)}")

    def dispatch(self, subject: str, head: str) -> None:
        """A dispatch frame, given as its text up to ``s`` (see strip_seq)."""
        self._add(f"{subject} < {head[:-5]}}}")

    def sent(self, subject: str, text: str) -> None:
        self._add(f"{subject} > {text}")

    def event(self, subject: str, text: str) -> None:
        self._add(f"{subject} {text}")

    def digest(self) -> str:
        self._flush()
        return self._hash.hexdigest()

    def relevant(self, tokens: Iterable[str], limit: int = 30) -> list[str]:
        """The last ``limit`` recent lines mentioning any of ``tokens`` (and faults)."""
        wanted = [t for t in tokens if t]
        found: list[str] = []
        for line in reversed(self.recent):
            if " FAULT " in line or any(t in line for t in wanted):
                found.append(line)
                if len(found) >= limit:
                    break
        found.reverse()
        return found
