"""End-to-end proof that SneakPeek pays on a busy ward, through the CLI as a user runs it.

``configs/ward-busy``: 200 patients, one fall-detection application, two GPUs that cannot
serve everyone with the accurate model in time. Falls are rare (prior 5%) and a detected
fall is worth far more than a cleared patient, so a cheap look that points the accurate
model at suspicious patients must earn clearly more than treating every patient alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ROOT, run_cli

WARD = ROOT / "configs" / "ward-busy"
FIELDS = ("app", "group", "tick", "model", "worker", "prediction", "label", "outcome")


def _run(tmp_path: Path, name: str, *args: str, duration: str = "8") -> tuple[dict, Path]:
    out, rec = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    proc = run_cli("run", str(WARD), "--duration", duration, "--seed", "5", "--quiet",
                   "--json", str(out), "--records", str(rec), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    for s in [summary, *summary["per_app"].values()]:
        assert s["requests"] == s["completed"] + s["dropped"] + s["failed"]
    assert summary["requests"] == 200 * summary["ticks"]
    return summary, rec


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_aware_earns_clearly_more_on_a_busy_ward(tmp_path: Path) -> None:
    aware, aware_rec = _run(tmp_path, "aware", "--data-aware")
    oblivious, oblivious_rec = _run(tmp_path, "oblivious", "--no-data-aware")
    assert aware["data_aware"] and not oblivious["data_aware"]
    assert aware["requests"] == oblivious["requests"]
    assert aware["utility"] > 1.1 * oblivious["utility"], (aware, oblivious)

    # Why: the cheap look catches more of the falls, by pointing the accurate model where it
    # adds most and answering "fall" itself for patients who look like falling (a false
    # alarm costs nothing on this ward, a missed fall everything).
    def falls_caught(rec: Path) -> float:
        falls = [r for r in _records(rec) if r["label"] == 1 and r["outcome"] == "completed"]
        return sum(r["prediction"] == 1 for r in falls) / max(len(falls), 1)

    assert falls_caught(aware_rec) > falls_caught(oblivious_rec)
    assert aware["sneakpeek"]["answered"] > 0 and oblivious["sneakpeek"]["answered"] == 0


def test_sneakpeek_data_aware_is_deterministic(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        _, rec = _run(tmp_path, f"run{i}", "--data-aware", "--policy", "sneakpeek",
                      duration="5")
        runs.append(sorted(tuple(r[f] for f in FIELDS) for r in _records(rec)))
    assert runs[0] == runs[1]
