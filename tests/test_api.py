"""The Python API on a real LocalCluster (processes), checked against Dask's own records."""

from __future__ import annotations

import json

import pytest
from distributed import Client, get_task_stream

from serif_dask import Serif, load_config, local_cluster
from tests.conftest import HOSPITAL


@pytest.fixture(scope="module")
def hospital_client():
    config = load_config([HOSPITAL])
    with local_cluster(config) as cluster, Client(cluster) as client:
        yield client, config


def test_score_tasks_run_only_on_gpu_workers(hospital_client, tmp_path) -> None:
    client, config = hospital_client
    serif = Serif(client, config, policy="fastest", seed=3, records=tmp_path / "r.jsonl")
    with get_task_stream(client) as stream:
        summary = serif.run(duration=3)
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert summary["completed"] > 0
    info = client.scheduler_info(n_workers=-1)["workers"]
    resources = {addr: w.get("resources", {}) for addr, w in info.items()}
    score = [t for t in stream.data if str(t["key"]).startswith("serif-score-")]
    assert score, "Dask recorded no score task"
    for task in score:
        assert resources[task["worker"]].get("GPU", 0) >= 1, task
        assert resources[task["worker"]].get("DATA", 0) == 0, task
    reads = [t for t in stream.data if str(t["key"]).startswith("serif-read-")]
    assert reads and all(resources[t["worker"]].get("DATA", 0) >= 1 for t in reads)
    # Tasks per tick do not depend on the number of groups: at most servers × modalities
    # reads, servers peeks and workers × models score batches per application tick.
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == summary["requests"]
    state = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["serif"].state())
    assert state["hook_errors"] == 0
    assert state["apps"]["wakeword"]["requests"] == summary["per_app"]["wakeword"]["requests"]


def test_plugins_install_idempotently(hospital_client) -> None:
    client, config = hospital_client
    Serif(client, config)
    Serif(client, config)
    names = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.plugins))
    assert "serif" in names
    plugins = client.run(lambda dask_worker: "serif" in dask_worker.plugins)
    assert all(plugins.values())
