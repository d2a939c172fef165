"""Faults against real processes: every request ends completed, dropped or failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from serif_dask.driver import peek_modality
from tests.conftest import BIN, HOSPITAL, ROOT, run_cli
from tests.fault_kit import KILL_ENV

CONFIG_FILES = ("system", "application", "data")


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
        stuck = _no_worker_tasks(client)
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


def _stop_when(serif: Serif, done: Callable[[list[dict]], bool], cap_s: float = 90.0):
    """``on_records`` that stops the run once ``done(records so far)``; and a safety cap.

    Runs end on an event, not after a fixed time, so a slow machine makes a test longer,
    never flaky. Returns (callback, the records list, the cap timer to cancel).
    """
    rows: list[dict] = []

    def on_records(new: list[dict]) -> None:
        rows.extend(new)
        if done(rows):
            serif.stop()

    cap = threading.Timer(cap_s, lambda: serif.client.loop.add_callback(serif.stop))
    return on_records, rows, cap


def _accounted(summary: dict, records: list[dict]) -> None:
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert len(records) == summary["requests"]
    assert len({(r["app"], r["group"], r["tick"]) for r in records}) == len(records)


def _no_worker_tasks(client: Client, settle_s: float = 10.0) -> list[str]:
    """Tasks the scheduler holds in ``no-worker``, once releases sent at run end land."""
    deadline = time.monotonic() + settle_s
    while True:
        stuck = client.run_on_scheduler(
            lambda dask_scheduler: [
                str(k) for k, ts in dask_scheduler.tasks.items() if ts.state == "no-worker"
            ]
        )
        if not stuck or time.monotonic() > deadline:
            return stuck
        time.sleep(0.2)


def test_data_worker_killed_mid_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data@bay-a dies inside its read of tick 2; its groups fail, bay-b's carry on."""
    docs = {n: json.loads((HOSPITAL / f"{n}.json").read_text()) for n in CONFIG_FILES}
    for mod in docs["data"]["data-modalities"]:
        mod["impl"] = "tests.fault_kit:KillingReader"
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"bay-a:2:{marker}")
    config = load_config([tmp_path])
    kill_tick = {"wakeword": 2, "falldetection": 1}  # the ticks read at t = 2 s
    bay_a = {
        app.name: set(config.groups_of("bay-a", peek_modality(config, app)))
        for app in config.apps
    }

    def back(rows: list[dict]) -> bool:  # bay-a's groups served again after the kill
        return any(r["outcome"] == "completed" and r["group"] in bay_a[r["app"]]
                   and r["tick"] > kill_tick[r["app"]] + 1 for r in rows)

    with local_cluster(config) as cluster, Client(cluster) as client:
        serif = Serif(client, config, policy="fastest", seed=4, records=tmp_path / "r.jsonl")
        serif.on_records, _, cap = _stop_when(serif, back)
        cap.start()
        try:
            summary = serif.run(duration=0)
        finally:
            cap.cancel()
        stuck = _no_worker_tasks(client)
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    _accounted(summary, records)
    assert marker.exists(), "the data worker never died"
    assert not stuck, f"tasks left waiting for a dead worker: {stuck}"
    lost = [r for r in records if r["outcome"] == "failed"]
    assert lost and {r["reason"] for r in lost} == {"reader-lost"}, summary
    # Only the dead server's groups fail, and only until its worker is back.
    assert all(r["group"] in bay_a[r["app"]] for r in lost if r["tick"] > kill_tick[r["app"]])
    assert back(records)
    others = [r for r in records if r["group"] not in bay_a[r["app"]]
              and r["tick"] > kill_tick[r["app"]]]
    assert others and all(r["outcome"] == "completed" for r in others)


def _fault_config(target: Path) -> Path:
    """The hospital example whose reads go through :class:`tests.fault_kit.KillingReader`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        doc = json.loads((HOSPITAL / f"{name}.json").read_text())
        for mod in doc.get("data-modalities", []):
            mod["impl"] = "tests.fault_kit:KillingReader"
        (target / f"{name}.json").write_text(json.dumps(doc))
    return target


def test_scheduler_killed_mid_tick(tmp_path: Path) -> None:
    """`serif-dask run` against a hand-started cluster whose scheduler dies mid-tick."""
    dask = str(BIN / "dask")
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([dask, *args], stdin=subprocess.DEVNULL,
                                stdout=(logs / f"{name}.log").open("w"),
                                stderr=subprocess.STDOUT, env=env)

    sched_file, marker = tmp_path / "scheduler.json", tmp_path / "killed"
    scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                       ":0", "--scheduler-file", str(sched_file), "--preload",
                       "serif_dask.scheduler"], "scheduler")
    procs = [scheduler]
    try:
        while not sched_file.exists():
            assert scheduler.poll() is None, (logs / "scheduler.log").read_text()
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        # data@bay-a kills the scheduler in the middle of its read of tick 3.
        env = os.environ | {KILL_ENV: f"bay-a:3:{marker}:{scheduler.pid}",
                            "PYTHONPATH": str(ROOT)}  # workers import tests.fault_kit
        workers = [(n, "GPU=1") for n in ("bay-a", "bay-b", "bay-c")]
        workers += [(f"data@{s}", "DATA=1") for s in ("bay-a", "bay-b")]
        for name, resources in workers:
            procs.append(start(
                ["worker", address, "--name", name, "--resources", resources, "--nthreads", "1",
                 "--preload", "serif_dask.worker", "--no-dashboard"], name, env,
            ))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(workers), timeout=120)
        out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
        proc = run_cli("run", str(_fault_config(tmp_path / "config")), "--scheduler-address",
                       address, "--duration", "30", "--policy", "fastest", "--json", str(out),
                       "--records", str(rec), timeout=120)
    finally:
        for p in reversed(procs):
            p.kill()
        for p in procs:
            p.wait()
    assert marker.exists(), "the scheduler was never killed"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: lost the Dask scheduler; summary holds what was recorded"
    ], proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    _accounted(summary, records)
    assert summary["ticks"] < 30  # it stopped on the loss, not at the end of the duration
    failed = {r["reason"] for r in records if r["outcome"] == "failed"}
    assert failed == {"scheduler-lost"}, summary  # tick 3 was in flight
    assert {r["tick"] for r in records if r["app"] == "wakeword"} >= {0, 1, 2, 3}
