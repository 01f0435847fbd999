"""Shared fixtures. Real backends come from GATEWAY_TEST_REDIS_URL and
GATEWAY_TEST_DATABASE_URL, a Redis Cluster from GATEWAY_TEST_REDIS_CLUSTER_URL
(``scripts/test`` sets all three); under
GATEWAY_REQUIRE_BACKENDS=1 or CI a missing one fails the run instead of skipping."""

from __future__ import annotations

import os

import pytest


def _backend_url(var: str, what: str) -> str:
    url = os.environ.get(var)
    if url:
        return url
    message = f"{var} is not set: no real {what} for this test (run scripts/test)"
    if os.environ.get("GATEWAY_REQUIRE_BACKENDS") == "1" or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _backend_url("GATEWAY_TEST_REDIS_URL", "Redis")


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    """Any node of a Redis Cluster (scripts/test starts a 3-master one)."""
    return _backend_url("GATEWAY_TEST_REDIS_CLUSTER_URL", "Redis Cluster")


@pytest.fixture(scope="session")
def database_url() -> str:
    return _backend_url("GATEWAY_TEST_DATABASE_URL", "Postgres")
