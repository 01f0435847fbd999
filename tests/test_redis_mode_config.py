"""GATEWAY_REDIS_MODE (PROTOCOL 16): standalone by default, cluster on request, and
anything else refuses to start with a message naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from entrypoints.config import Config, ConfigError


def test_standalone_is_the_default() -> None:
    assert Config.from_env({}).redis_mode == "standalone"
    assert Config.from_env({"GATEWAY_REDIS_MODE": ""}).redis_mode == "standalone"


def test_cluster_is_read() -> None:
    assert Config.from_env({"GATEWAY_REDIS_MODE": "cluster"}).redis_mode == "cluster"
    assert Config.from_env({"GATEWAY_REDIS_MODE": " Cluster "}).redis_mode == "cluster"


def test_an_invalid_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_REDIS_MODE must be one of standalone, cluster"):
        Config.from_env({"GATEWAY_REDIS_MODE": "sentinel"})


def test_serve_refuses_to_start_with_an_invalid_mode() -> None:
    env = {"GATEWAY_REDIS_MODE": "shard", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "serve", "--port", "0"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "GATEWAY_REDIS_MODE must be one of standalone, cluster" in result.stderr
