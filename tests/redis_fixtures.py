"""Pytest fixtures that run real ``redis-server`` processes (the embedded binary).

Use from a test module with ``pytest_plugins = ["redis_fixtures"]`` (or from the root
conftest).  Tests that use the ``redis_cluster`` fixture, or whose name starts with
``test_cluster``, are marked ``redis_cluster``, so ``-m redis_cluster`` and
``-m "not redis_cluster"`` select them.  Every fixture is function-scoped: the root
conftest checks after each test that no child process is left.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest

from serif_dask.redis_server import EmbeddedCluster, EmbeddedRedis, start_cluster

CLUSTER_FIXTURES = {"redis_cluster"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "redis_cluster: starts a 3-master Redis Cluster (a few seconds)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) or item.name.startswith(
            "test_cluster"
        ):
            item.add_marker("redis_cluster")


def assert_gone(pids: list[int]) -> None:
    """Every pid is reaped (or at worst a zombie of someone else's)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"redis-server still running: {alive}"


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh single server on a free loopback port, no password."""
    server = EmbeddedRedis().start()
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
        assert_gone([pid] if pid else [])


@pytest.fixture
def redis_password_server() -> Iterator[EmbeddedRedis]:
    """A single server with ``requirepass`` (password in ``.password``)."""
    server = EmbeddedRedis(password="s3cret pass").start()
    pid = server.pid
    try:
        yield server
    finally:
        server.stop()
        assert_gone([pid] if pid else [])


@pytest.fixture
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A fresh 3-master Redis Cluster (function scope: every test leaves no process)."""
    cluster = start_cluster(n_masters=3, replicas=0, timeout=60)
    pids = [s.pid for s in cluster.servers if s.pid]
    try:
        yield cluster
    finally:
        cluster.stop()
        assert_gone(pids)
