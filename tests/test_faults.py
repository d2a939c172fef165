"""Faults against real processes: every request ends completed, dropped or failed."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from tests.conftest import HOSPITAL


def test_compute_worker_killed_mid_run(tmp_path: Path) -> None:
    config = load_config([HOSPITAL])
    rec = tmp_path / "r.jsonl"
    with local_cluster(config) as cluster, Client(cluster) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        victim = next(a for a, w in info.items() if w["name"] == "bay-a")
        pid = client.run(os.getpid, workers=[victim])[victim]
        killer = threading.Timer(3.0, os.kill, (pid, signal.SIGKILL))
        serif = Serif(client, config, policy="fastest", seed=4, records=rec)
        killer.start()
        try:
            summary = serif.run(duration=10)
        finally:
            killer.cancel()
        state = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["serif"].state()
        )
        stuck = client.run_on_scheduler(
            lambda dask_scheduler: [
                str(k) for k, ts in dask_scheduler.tasks.items() if ts.state == "no-worker"
            ]
        )
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert len(records) == summary["requests"]
    assert len({(r["app"], r["group"], r["tick"]) for r in records}) == len(records)
    assert not stuck, f"tasks left waiting for a dead worker: {stuck}"
    assert victim in state["lost_workers"]
    # The nanny restarts bay-a under the same name; it rejoins and gets work again.
    start = min(r["arrival"] for r in records)
    late = [r for r in records if r["worker"] == "bay-a" and r["arrival"] > start + 7]
    assert late, "the restarted worker never served again"
    failed = summary.get("failures_by_reason", {})
    assert set(failed) <= {"worker-lost", "policy-drop"}, failed
