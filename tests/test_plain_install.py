"""Every documented command works after the plain install (``pip install -e .``, no
dev extras), PROTOCOL section 12.

A fresh venv per test run would cost a minute of downloads; instead each command runs
in a child interpreter where every module that only the dev extras bring is made
unimportable: the distributions that ``chat-gateway``'s runtime requirements reach
(transitively) are allowed, every other installed distribution's top-level modules
raise ``ModuleNotFoundError`` as they would on a plain install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement


def _runtime_closure() -> set[str]:
    """Normalised names of the distributions a plain install brings."""
    seen: set[str] = set()
    todo = ["chat-gateway"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _dev_only_modules() -> list[str]:
    allowed = _runtime_closure()
    blocked: set[str] = set()
    provided_by_allowed: set[str] = set()
    for module, dists in metadata.packages_distributions().items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists}
        if names & allowed:
            provided_by_allowed.add(module)
        else:
            blocked.add(module)
    # Our own packages and the standard library are never blocked.
    ours = {"domain", "adapters", "entrypoints", "simulation", "tests", "bench"}
    return sorted(blocked - provided_by_allowed - ours - set(sys.stdlib_module_names))


_RUNNER = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (dev extra only)")
        return None
sys.meta_path.insert(0, Block())
from entrypoints.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_plain(*args: str) -> subprocess.CompletedProcess[str]:
    blocked = _dev_only_modules()
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(blocked), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_dev_tools_are_really_blocked() -> None:
    """The harness itself: dev-only tools are out of reach, runtime ones are not."""
    blocked = _dev_only_modules()
    assert {"pytest", "hypothesis", "mypy"} <= set(blocked)
    assert not {"anyio", "hypercorn", "redis"} & set(blocked)


def test_gateway_simulate_runs_on_a_plain_install() -> None:
    result = _run_plain(
        "simulate", "--instances", "2", "--clients", "20", "--minutes", "1", "--seed", "7"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "digest" in (result.stdout + result.stderr).lower()


def test_gateway_token_runs_on_a_plain_install() -> None:
    result = _run_plain("token", "alice")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(".") == 2  # a JWT


def test_gateway_connect_and_publish_load_on_a_plain_install() -> None:
    for command in ("connect", "publish"):
        result = _run_plain(command, "--help")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "usage" in result.stdout.lower()
