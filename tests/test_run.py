"""End-to-end runs through the CLI on a real LocalCluster, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import HOSPITAL, REFERENCE, run_cli, serif_cmd, serif_segments

SUMMARY_KEYS = {
    "requests", "completed", "dropped", "failed", "utility", "mean_utility",
    "deadline_met", "accuracy", "latency_ms", "decision_ms", "policy", "data_aware",
    "ticks", "per_app",
}
RECORD_KEYS = {
    "app", "group", "tick", "model", "worker", "arrival", "finish", "latency",
    "prediction", "label", "utility", "outcome", "reason", "version",
}


def check_summary(summary: dict, records: list[dict] | None = None) -> None:
    assert set(summary) >= SUMMARY_KEYS
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert set(summary["decision_ms"]) == {"p50", "max"}
    for s in [summary, *summary["per_app"].values(), *summary.get("per_version", {}).values()]:
        assert s["requests"] == s["completed"] + s["dropped"] + s["failed"]
    if "per_version" in summary:  # every request under exactly one config version
        assert sum(v["requests"] for v in summary["per_version"].values()) == summary["requests"]
    if records is not None:
        assert len(records) == summary["requests"]
        for rec in records:
            assert set(rec) == RECORD_KEYS
            assert rec["outcome"] in ("completed", "dropped", "failed")
            assert (rec["reason"] is None) == (rec["outcome"] == "completed")
        assert sum(r["outcome"] == "completed" for r in records) == summary["completed"]
        utility = sum(r["utility"] for r in records)
        assert abs(utility - summary["utility"]) < 1e-6 * max(1.0, abs(utility))
        keys = {(r["app"], r["group"], r["tick"]) for r in records}
        assert len(keys) == len(records), "a request was recorded twice"
        for version, part in summary.get("per_version", {}).items():
            assert sum(r["version"] == int(version) for r in records) == part["requests"]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hospital_run_end_to_end(tmp_path: Path) -> None:
    out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
    proc = run_cli("run", str(HOSPITAL), "--duration", "5", "--policy", "fastest",
                   "--json", str(out), "--records", str(rec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "utility" in proc.stdout
    summary = json.loads(out.read_text())
    records = read_records(rec)
    check_summary(summary, records)
    # 40 groups: falldetection every 2 s, wakeword every 1 s, over 5 s.
    assert summary["per_app"]["falldetection"]["requests"] == 40 * 3
    assert summary["per_app"]["wakeword"]["requests"] == 40 * 5
    assert summary["completed"] > 0.9 * summary["requests"]
    assert summary["policy"] == "fastest" and summary["ticks"] == 8
    assert 0.5 < summary["accuracy"] <= 1.0
    assert {r["worker"] for r in records if r["worker"]} <= {"bay-a", "bay-b", "bay-c"}
    assert os.stat(rec).st_mode & 0o077 == 0, "records must be readable by their owner only"


def test_same_seed_gives_identical_records(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        rec = tmp_path / f"r{i}.jsonl"
        proc = run_cli("run", str(HOSPITAL), "--duration", "3", "--policy", "fastest",
                       "--seed", "11", "--records", str(rec), "--quiet")
        assert proc.returncode == 0, proc.stderr[-3000:]
        fields = ("app", "group", "tick", "model", "worker", "prediction", "label", "outcome")
        runs.append(sorted(tuple(r[f] for f in fields) for r in read_records(rec)))
    assert runs[0] == runs[1]


def test_reference_configs_validate_names_missing_file() -> None:
    proc = run_cli("validate", str(REFERENCE))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "x3d_m.ckpt" in lines[0] or "fall.mp4" in lines[0]


def test_reference_configs_run_simulated(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    files = [str(REFERENCE / f) for f in ("systemcfg.json", "applicationcfg.json", "datacfg.json")]
    proc = run_cli("run", *files, "--simulate", "--duration", "7", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    check_summary(summary)
    assert set(summary["per_app"]) == {"falldetection", "wakeword"}
    assert summary["completed"] > 0


def test_bad_config_is_one_line_and_exit_2(config_dir) -> None:
    def break_cmat(doc: dict) -> None:
        doc["applications"][0]["model-profiles"][1]["cmat"] = [[1, 2, 3], [4, 5]]

    path = config_dir(application=break_cmat)
    proc = run_cli("run", str(path), "--duration", "1")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "application.json" in proc.stderr and "model-profiles[1].cmat" in proc.stderr


def test_unknown_policy_is_usage_error() -> None:
    proc = run_cli("run", str(HOSPITAL), "--policy", "no-such-policy", "--duration", "1")
    assert proc.returncode == 2
    assert "no-such-policy" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_flushes_and_cleans_up(tmp_path: Path, sig: int, status: int) -> None:
    out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
    before = serif_segments()
    proc = subprocess.Popen(
        serif_cmd("run", str(HOSPITAL), "--duration", "0", "--policy", "fastest",
                  "--json", str(out), "--records", str(rec)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline and (not rec.exists() or rec.stat().st_size == 0):
        time.sleep(0.5)
    assert rec.exists() and rec.stat().st_size > 0, "the run never recorded anything"
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    proc.send_signal(sig)
    stopped = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - stopped < 20, "stopping took too long"
    assert proc.returncode == status, err[-3000:]
    summary = json.loads(out.read_text())
    check_summary(summary, read_records(rec))
    time.sleep(1.0)
    alive = [p for p in family if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left after stop: {alive}"
    assert serif_segments() <= before
