"""Sampling profile of a server process under fan-out load (py-spy), summarised.

py-spy samples the process from outside (``--nonblocking``: the target is never
paused), writing collapsed stacks (``--format raw``: one ``frame;frame;... count``
line per distinct stack). :func:`summarise` turns them into the top functions by
self time and by inclusive time, and self time by package.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: Self time is attributed to the first of these found in the file path.
_PACKAGES: tuple[tuple[str, str], ...] = (
    ("adapters/shell/", "gateway shell (adapters/shell)"),
    ("adapters/websocket/", "gateway transport (adapters/websocket)"),
    ("adapters/redis/", "gateway redis adapter"),
    ("adapters/", "gateway adapters (other)"),
    ("domain/", "gateway domain (codec, session)"),
    ("entrypoints/", "gateway entrypoints"),
    ("hypercorn/", "hypercorn"),
    ("wsproto/", "wsproto"),
    ("h11/", "h11"),
    ("starlette/", "starlette"),
    ("anyio/", "anyio"),
    ("prometheus_client/", "prometheus_client"),
    ("redis/", "redis-py"),
    ("json/", "json (stdlib)"),
    ("asyncio/", "asyncio (stdlib)"),
    ("logging/", "logging (stdlib)"),
    ("uvloop", "uvloop"),
)


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


async def record(pid: int, seconds: float, out: Path, rate: int = 250) -> str:
    """Record ``seconds`` of ``pid``; returns py-spy's own summary line."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed")
    proc = await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
        "--format", "raw", "--nonblocking", "--output", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        data, _ = await asyncio.wait_for(proc.communicate(), seconds + 30.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = data.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed ({proc.returncode}): {text[-500:]}")
    summary = [line for line in text.splitlines() if "Samples" in line]
    return summary[-1].strip() if summary else text.strip()[-200:]


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        i = path.find(marker)
        if i >= 0:
            return path[i + len(marker):]
    return path


def _parse(frame: str) -> tuple[str, str]:
    """``func (file:line)`` -> (``func (file)``, file)."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    file = _short(m.group("file"))
    return f"{m.group('func')} ({file})", file


def _package(file: str) -> str:
    for marker, name in _PACKAGES:
        if marker in file:
            return name
    return "other" if file else "native/unknown"


@dataclass
class Summary:
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)

    def top(self, which: str, n: int) -> list[tuple[str, float]]:
        counter = self.self_time if which == "self" else (
            self.inclusive if which == "inclusive" else self.packages)
        total = max(1, self.samples)
        return [(name, 100.0 * count / total) for name, count in counter.most_common(n)]


def summarise(raw: Path) -> Summary:
    summary = Summary()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse(f) for f in stack.split(";") if f]
        if not frames:
            continue
        summary.samples += count
        leaf, leaf_file = frames[-1]
        summary.self_time[leaf] += count
        summary.packages[_package(leaf_file)] += count
        for name in {name for name, _ in frames}:
            summary.inclusive[name] += count
    return summary
