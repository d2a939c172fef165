"""Adaptive scaling of compute workers (``run --adaptive``, ``Serif(adaptive=...)``) on a
real LocalCluster with worker processes: it grows under overload, shrinks when idle
without losing a request, and is refused where serif-dask has no cluster to scale."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from distributed import Client

from serif_dask import Serif, load_config
from serif_dask.adaptive import SerifAdaptive, compute_pool, parse_range, target_workers
from serif_dask.cluster import start_local_cluster
from tests.conftest import HOSPITAL, run_cli

#: Generous: worker processes start slowly on a loaded 2-core machine.
WAIT_S = 120.0


def _signal(**values: Any) -> dict[str, Any]:
    base = {"live": True, "planned": True, "booked": 0.0, "unmet": 0.0, "unmet_share": 0.0,
            "idle_s": 0.0}
    return base | values


def test_target_follows_the_planner_signal() -> None:
    assert target_workers(_signal(booked=0.9), 1) == 2  # over 0.8 of one worker: grow
    assert target_workers(_signal(booked=0.9, unmet=1.5), 1) == 3
    assert target_workers(_signal(booked=0.5, unmet_share=0.2), 1) == 2  # work was dropped
    assert target_workers(_signal(booked=1.5), 3) == 3  # 0.75 of two: inside the band
    assert target_workers(_signal(booked=0.3), 3) == 1  # fits one worker fewer easily
    assert target_workers(_signal(booked=0.0, idle_s=60.0), 3) == 0  # idle: the minimum
    assert target_workers(_signal(planned=False), 3) == 3  # warming up: hold
    assert target_workers(_signal(live=False, booked=5.0), 2) == 2


def test_parse_range() -> None:
    assert parse_range("1:4") == (1, 4)
    assert parse_range("2") == (2, 2)
    for bad in ("0:2", "3:2", "a:b"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_compute_pool_names_and_profiles() -> None:
    config = load_config([HOSPITAL])
    pool = compute_pool(config, 5)
    names = pool.system.node_names
    assert names[:3] == config.system.node_names and len(set(names)) == 5
    assert names[3:] == ("bay-a-2", "bay-a-3")  # copies of the cheapest type's first node
    for node in pool.system.compute_nodes[3:]:
        assert node.node_type == "bay-a"
        for app in pool.apps:
            for profile in app.model_profiles:
                assert profile.latencies[node.name] == profile.latencies["bay-a"]
        for modality in pool.data.data_modalities:
            assert modality.retrieval_latencies[node.name] == \
                modality.retrieval_latencies["bay-a"]
    assert compute_pool(config, 2) is config


def test_adaptive_is_refused_with_a_scheduler_address() -> None:
    result = run_cli("run", str(HOSPITAL), "--adaptive", "1:2", "--duration", "5",
                     "--scheduler-address", "tcp://127.0.0.1:1", timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--adaptive" in lines[0] and "--scheduler-address" in lines[0]
    result = run_cli("run", str(HOSPITAL), "--adaptive", "0:2", timeout=60)
    assert result.returncode == 2 and "minimum" in result.stderr


def test_adaptive_needs_the_cluster_object() -> None:
    with pytest.raises(ValueError, match="cluster"):
        Serif(None, load_config([HOSPITAL]), adaptive=(1, 2))  # type: ignore[arg-type]


async def _until(check: Callable[[], Awaitable[bool]], what: str, run: asyncio.Task,
                 timeout: float = WAIT_S) -> None:
    """Wait for ``check`` (polled), failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if run.done():
            run.result()  # a run that ended early says why
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.5)


async def _adaptive_run(config: Any, start: int, bounds: tuple[int, int],
                        scenario: Callable[[Client, Serif, asyncio.Task], Awaitable[None]],
                        ) -> dict[str, Any]:
    """Run ``config`` on a LocalCluster of ``start`` compute workers scaled within
    ``bounds``, while ``scenario`` waits on what it checks; then stop and summarise."""
    pool = compute_pool(config, bounds[1])
    cluster = await start_local_cluster(pool, compute_workers=start)
    try:
        async with Client(cluster, asynchronous=True) as client:
            serif = Serif(client, pool, cluster=cluster, adaptive=bounds, policy="sneakpeek",
                          seed=5)
            run = asyncio.create_task(serif.run_async(duration=600))
            try:
                await scenario(client, serif, run)
            finally:
                serif.stop()
                summary = await asyncio.wait_for(run, timeout=60)
                serif.close()
            assert isinstance(serif._adaptive, type(None))  # stopped with the run
            return summary
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cluster.close(), timeout=30)


async def _capacity(client: Client) -> dict[str, Any]:
    return await client.scheduler.serif_capacity()


def _accounted(summary: dict[str, Any]) -> None:
    assert summary["requests"] > 0
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    for version in summary["per_version"].values():
        assert version["requests"] == (version["completed"] + version["dropped"]
                                       + version["failed"])


def test_adaptive_local_cluster_grows_under_overload() -> None:
    """The hospital ward needs about 1.5 model seconds per second at its best: one compute
    worker is overloaded, so the planner's signal asks for more and Dask starts them."""
    config = load_config([HOSPITAL])

    async def scenario(client: Client, serif: Serif, run: asyncio.Task) -> None:
        async def grew() -> bool:
            return (await _capacity(client))["active"] >= 2

        await _until(grew, "a second compute worker joined", run)
        adaptive = serif._adaptive
        assert isinstance(adaptive, SerifAdaptive)
        assert adaptive.log and adaptive.log[0][1]["status"] == "up"
        # The new worker is planned on: it gets batches.
        state = await client.scheduler.serif_state()
        new = {w["name"] for w in state["workers"] if w["role"] == "compute"} - {"bay-a"}
        assert new and new <= set(serif.config.system.node_names)

        async def booked_there() -> bool:
            workers = (await client.scheduler.serif_state())["workers"]
            return any(w["name"] in new and (w["warm"] or w["pending"]) for w in workers)

        await _until(booked_there, "a batch was booked on a new worker", run, timeout=60)

    summary = asyncio.run(_adaptive_run(config, 1, (1, 3), scenario))
    _accounted(summary)
    assert summary["compute_workers"]["min"] == 1
    assert summary["compute_workers"]["max"] >= 2
    assert 1.0 <= summary["compute_workers"]["mean"] <= summary["compute_workers"]["max"]
    assert summary["worker_seconds"] > 0


def test_adaptive_local_cluster_shrinks_when_idle_and_loses_no_request(tmp_path) -> None:
    """Three compute workers for a ward of four groups: the demand fits one, so two are
    retired: first no longer booked, then retired by Dask once their batches are done.
    Every request still ends completed, dropped or failed, and none fails for it."""
    config = load_config([HOSPITAL])
    data = config.data.model_copy(update={"num_groups": 4})
    config = config.model_copy(update={"data": data})

    async def scenario(client: Client, serif: Serif, run: asyncio.Task) -> None:
        async def shrank() -> bool:
            capacity = await _capacity(client)
            return capacity["active"] == 1 and len(capacity["compute"]) == 1

        await _until(shrank, "two compute workers were retired", run)
        statuses = [entry["status"] for _, entry in serif._adaptive.log]
        assert "down" in statuses and "up" not in statuses
        await asyncio.sleep(3)  # ticks go on with the one that is left

    summary = asyncio.run(_adaptive_run(config, 3, (1, 3), scenario))
    _accounted(summary)
    assert "worker-lost" not in summary["failures_by_reason"], summary["failures_by_reason"]
    assert summary["compute_workers"]["max"] == 3
    assert summary["compute_workers"]["min"] == 1
    assert summary["compute_workers"]["mean"] < 3
    assert summary["worker_seconds"] > 0
