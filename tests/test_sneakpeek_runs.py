"""SneakPeek end to end through the CLI: answers from the peek, joint plans, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

TRIAGE = ROOT / "configs" / "triage"
FIELDS = ("app", "group", "tick", "model", "worker", "prediction", "label", "outcome")


def _run(config: Path, tmp_path: Path, name: str, *args: str, duration: str = "5"):
    out, rec = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    proc = run_cli("run", str(config), "--duration", duration, "--seed", "4", "--quiet",
                   "--json", str(out), "--records", str(rec), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    records = [json.loads(line) for line in rec.read_text().splitlines()]
    for s in [summary, *summary["per_app"].values()]:
        assert s["requests"] == s["completed"] + s["dropped"] + s["failed"]
    assert len(records) == summary["requests"]
    return summary, records


def test_overloaded_triage_answers_from_the_peek(tmp_path: Path) -> None:
    aware, records = _run(TRIAGE, tmp_path, "aware", "--data-aware")
    answered = [r for r in records if r["model"] == "sneakpeek"]
    assert answered and aware["sneakpeek"]["answered"] == len(answered)
    assert all(r["outcome"] == "completed" and r["worker"] is None for r in answered)
    assert all(r["prediction"] in (0, 1) and r["latency"] >= 0 for r in answered)
    # Accuracy counts the answers like any model's.
    done = [r for r in records if r["outcome"] == "completed" and r["label"] is not None]
    right = sum(r["prediction"] == r["label"] for r in done)
    assert aware["accuracy"] == pytest.approx(right / len(done))
    # Beliefs: the filter beats both the prior and one look, on the same requests.
    peek = aware["sneakpeek"]
    assert peek["brier"] < peek["brier_single"] < peek["brier_prior"]

    oblivious, records = _run(TRIAGE, tmp_path, "oblivious", "--no-data-aware")
    assert oblivious["sneakpeek"]["answered"] == 0
    assert not any(r["model"] == "sneakpeek" for r in records)
    assert aware["mean_utility"] > 1.25 * oblivious["mean_utility"]


def test_answering_can_be_turned_off(tmp_path: Path, config_dir) -> None:
    def no_answers(doc: dict) -> None:
        for app in doc["applications"]:
            app["sneakpeek"] = {"answer": False}

    config = config_dir(application=no_answers, data={"num-groups": 300})
    summary, records = _run(config, tmp_path, "off", "--data-aware", duration="4")
    assert summary["sneakpeek"]["answered"] == 0
    assert not any(r["model"] == "sneakpeek" for r in records)


def test_joint_plans_are_deterministic(tmp_path: Path, config_dir) -> None:
    """The hospital's two applications fall due together every 2 s: planned as one problem,
    the records are the same for the same seed (at a load the cluster keeps up with, even
    on a busy machine: decisions follow the real clock once reality falls behind)."""
    config = config_dir(data={"num-groups": 12})
    runs = []
    for i in range(2):
        _, records = _run(config, tmp_path, f"run{i}", "--data-aware", duration="5")
        runs.append(sorted(tuple(r[f] for f in FIELDS) for r in records))
    assert runs[0] == runs[1]
    assert {r[0] for r in runs[0]} == {"falldetection", "wakeword"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"persistence": 1.5}, "applications[0].sneakpeek.persistence"),
        ({"belief": "kalman"}, "applications[0].sneakpeek.belief"),
    ],
)
def test_bad_sneakpeek_settings_are_one_clear_line(config_dir, settings, message) -> None:
    def edit(doc: dict) -> None:
        doc["applications"][0]["sneakpeek"] = settings

    proc = run_cli("validate", str(config_dir(application=edit)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_memory_with_the_filter_warns_in_one_line(config_dir) -> None:
    def edit(doc: dict) -> None:
        doc["applications"][0]["sneakpeek"] = {"memory": 0.3}

    proc = run_cli("validate", str(config_dir(application=edit)))
    assert proc.returncode == 0
    warnings = [line for line in proc.stderr.splitlines() if "sneakpeek.memory" in line]
    assert len(warnings) == 1 and "dirichlet" in warnings[0], proc.stderr
