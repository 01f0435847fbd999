"""`gateway simulate` side by side: a baseline checkout and this one, interleaved in
rounds (branch, baseline, branch, baseline, ...; or both at once with ``--parallel``),
each run its own process. Per run:
wall time, CPU (user + sys of the child), peak RSS, the trace digest, the checks
count and the result; then the medians.

    python bench/bench_simulation.py --baseline /path/to/other/worktree \\
        [--rounds 2] [--keep-going] [--parallel] \\
        -- --instances 8 --clients 10000 --minutes 10 --seed 31337

The baseline runs with its own ``.venv/bin/gateway``, this checkout with its own. The
machine may be shared: compare within one run of this script, not across runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    name: str
    wall: float
    cpu: float
    rss_mb: float
    digest: str
    checks: int
    result: str


class Started:
    def __init__(self, name: str, tree: Path, args: list[str]) -> None:
        self.name = name
        self.out = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by finish)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(tree / ".venv/bin/gateway"), "simulate", *args],
            cwd=tree,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(self) -> Run:
        _, status, usage = os.wait4(self.proc.pid, 0)  # this child's own CPU and peak RSS
        wall = time.perf_counter() - self.started
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.out.seek(0)
        out = self.out.read()
        self.out.close()
        digest = re.search(r"trace digest\s+sha256:([0-9a-f]+)", out)
        checks = re.search(r"invariants checked (\d+)", out)
        result = re.search(r"result\s+(.*)", out)
        return Run(
            self.name,
            wall,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss / 1024,
            digest.group(1) if digest else "?",
            int(checks.group(1)) if checks else -1,
            result.group(1) if result else f"exit {self.proc.returncode}: {out[-300:]}",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other worktree")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="pass --keep-going to both (a run stopped by a violation does less work)",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run the two of a round at the same time (on a shared machine, the same load)",
    )
    parser.add_argument("args", nargs="*", help="gateway simulate arguments (after --)")
    opts = parser.parse_args()
    args = list(opts.args)
    if opts.keep_going:
        args.append("--keep-going")
    runs: list[Run] = []
    trees = (("branch", ROOT), ("baseline", opts.baseline.resolve()))
    for round_no in range(opts.rounds):
        if opts.parallel:  # both at once: the same share of a shared machine
            started = [Started(name, tree, args) for name, tree in trees]
            done = [s.finish() for s in started]
        else:
            done = [Started(name, tree, args).finish() for name, tree in trees]
        for run in done:
            runs.append(run)
            print(
                f"round {round_no + 1} {run.name:8} wall {run.wall:7.1f} s  CPU {run.cpu:7.1f} s  "
                f"peak RSS {run.rss_mb:6.0f} MB  checks {run.checks}  "
                f"sha256:{run.digest[:16]}  {run.result}",
                flush=True,
            )
    print("medians (the machine may be shared; CPU is user + sys of the child):")
    for name in ("baseline", "branch"):
        mine = [r for r in runs if r.name == name]
        print(
            f"  {name:8} wall {statistics.median(r.wall for r in mine):7.1f} s  "
            f"CPU {statistics.median(r.cpu for r in mine):7.1f} s"
        )
    base = [r for r in runs if r.name == "baseline"]
    branch = [r for r in runs if r.name == "branch"]
    ratio = statistics.median(r.wall for r in base) / statistics.median(r.wall for r in branch)
    cpu_ratio = statistics.median(r.cpu for r in base) / statistics.median(r.cpu for r in branch)
    print(f"  speed-up: wall {ratio:.2f}x, CPU {cpu_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
