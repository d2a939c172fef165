"""A hand-started deployment: ``dask scheduler``/``dask worker`` with serif preloads."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HOSPITAL, run_cli

DASK = str(Path(sys.executable).parent / "dask")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [DASK, *args], stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


@contextlib.contextmanager
def hand_started(tmp_path: Path, tls: tuple[str, ...] = ()) -> Iterator[str]:
    """One scheduler, three GPU workers and two data workers, as in the README recipe;
    with ``tls`` (the ``--tls-*`` options) every process gets them and the scheduler
    listens on ``--protocol tls``. Yields the scheduler's address."""
    sched_file = tmp_path / "scheduler.json"
    procs = [
        _start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                "--scheduler-file", str(sched_file), "--preload", "serif_dask.scheduler",
                *(("--protocol", "tls", *tls) if tls else ())], tmp_path / "scheduler.log")
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        workers = [(n, "GPU=1") for n in ("bay-a", "bay-b", "bay-c")]
        workers += [(f"data@{s}", "DATA=1") for s in ("bay-a", "bay-b")]
        for name, resources in workers:
            procs.append(_start(
                ["worker", address, "--name", name, "--resources", resources, "--nthreads", "1",
                 "--preload", "serif_dask.worker", "--no-dashboard", *tls],
                tmp_path / f"{name}.log",
            ))
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def deployment(tmp_path: Path):
    with hand_started(tmp_path) as address:
        yield address, tmp_path


def test_hand_started_deployment(deployment) -> None:
    address, tmp_path = deployment
    out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
    # Workers take a moment to join; the run must not start before they are there.
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(5, timeout=90)
        assert client.run_on_scheduler(lambda dask_scheduler: "serif" in dask_scheduler.plugins)
        assert all(client.run(lambda dask_worker: "serif" in dask_worker.plugins).values())
    proc = run_cli("run", str(HOSPITAL), "--scheduler-address", address, "--duration", "4",
                   "--policy", "fastest", "--json", str(out), "--records", str(rec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert summary["completed"] > 0.9 * summary["requests"]
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    assert {r["worker"] for r in records if r["outcome"] == "completed"} <= {
        "bay-a", "bay-b", "bay-c"
    }


def test_unreachable_scheduler_is_one_line_exit_1(tmp_path: Path) -> None:
    proc = run_cli("run", str(HOSPITAL), "--scheduler-address", "tcp://127.0.0.1:9",
                   "--duration", "1", timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot reach scheduler" in proc.stderr
