"""``serif-dask report`` on small records files: the table, the plots, the comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serif_dask import records as rec
from serif_dask.report import make_report, read_records, run_labels, summarise, tick_series
from tests.conftest import HOSPITAL, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def row(app: str, group: int, tick: int, arrival: float, outcome: str = "completed",
        latency: float | None = 0.2, prediction: int | None = 0, label: int | None = 0,
        utility: float = 1.0, reason: str | None = None) -> dict:
    done = outcome == "completed"
    return {
        "app": app, "group": group, "tick": tick, "model": "m" if done else None,
        "worker": "w" if done else None, "arrival": arrival,
        "finish": arrival + latency if done else None, "latency": latency if done else None,
        "prediction": prediction if done else None, "label": label, "utility": utility,
        "outcome": outcome, "reason": None if done else reason,
    }


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    t0 = 1_700_000_000.0
    a = [
        row("falls", 0, 0, t0, latency=0.1, utility=1.0),
        row("falls", 1, 0, t0, latency=0.3, prediction=1, label=0, utility=-0.1),
        row("falls", 0, 1, t0 + 2, latency=2.5, utility=0.0),  # past 2 × SLA
        row("falls", 1, 1, t0 + 2, "dropped", utility=0.0, reason="policy-drop"),
        row("wake", 0, 0, t0 + 0.5, latency=0.4, label=None, utility=0.8),
        row("wake", 1, 0, t0 + 0.5, "failed", utility=0.0, reason="model-error: boom"),
    ]
    b = [row("falls", g, t, t0 + 10 + 2 * t, latency=0.2) for t in range(3) for g in range(2)]
    return write(tmp_path / "sneakpeek.jsonl", a), write(tmp_path / "random.jsonl", b)


def test_summary_numbers(two_runs: tuple[Path, Path]) -> None:
    run = read_records(two_runs[0], "a")
    s = summarise(run, sla={"falls": 1.0, "wake": 0.5})
    assert (s["requests"], s["completed"], s["dropped"], s["failed"]) == (6, 4, 1, 1)
    assert s["utility"] == pytest.approx(1.7)
    assert s["mean_utility"] == pytest.approx(1.7 / 6)
    assert s["deadline_met"] == pytest.approx(3 / 6)  # 0.1, 0.3 (falls) and 0.4 (wake)
    assert s["accuracy"] == pytest.approx(2 / 3)  # wake's label is unknown
    assert s["latency_ms"]["p50"] == pytest.approx(350.0)
    assert s["failures_by_reason"] == {"model-error": 1, "policy-drop": 1}
    assert summarise(run)["deadline_met"] is None  # records alone do not know SLAs
    series = tick_series(run.select("falls"))
    assert series.t.tolist() == [0.0, 2.0]
    assert series.mean_utility.tolist() == pytest.approx([0.45, 0.0])
    assert series.p50_ms[0] == pytest.approx(200.0)


def test_summary_agrees_with_the_run_summary(tmp_path: Path) -> None:
    """Records written by the engine's RecordLog summarise as the engine summarises them."""
    rng = np.random.default_rng(0)
    log = rec.RecordLog(tmp_path / "r.jsonl")
    log.open()
    chunks = []
    for tick in range(5):
        n = 8
        arrival = np.full(n, 100.0 + tick)
        finish = arrival + rng.uniform(0.05, 1.5, n)
        common = dict(group=np.arange(n), arrival=arrival, finish=finish,
                      prediction=rng.integers(0, 2, n), label=rng.integers(-1, 2, n),
                      utility=rng.normal(0.5, 0.5, n), deadline_met=finish - arrival <= 1.0)
        chunks += [
            rec.Chunk(app="falls", tick=tick, model="m", worker="w", outcome="completed",
                      reason=[""] * n, **common),
            rec.Chunk(app="falls", tick=tick, model="", worker="", outcome="dropped",
                      reason=["policy-drop"] * 3, **{k: v[:3] for k, v in common.items()}),
        ]
        for chunk in chunks[-2:]:
            log.add(chunk)
    log.close()
    expected = rec.summarise(chunks)
    assert log.totals.result() == expected
    got = summarise(read_records(tmp_path / "r.jsonl", "r"), sla={"falls": 1.0})
    for key in ("requests", "completed", "dropped", "failed", "failures_by_reason"):
        assert got[key] == expected[key], key
    for key in ("utility", "mean_utility", "deadline_met", "accuracy"):
        assert got[key] == pytest.approx(expected[key]), key
    for q, v in expected["latency_ms"].items():
        assert got["latency_ms"][q] == pytest.approx(v)


def test_report_files(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = make_report(two_runs, out)
    assert set(result["summaries"]) == {"sneakpeek", "random"}
    for name in ("report.html", "utility.png", "latency.png", "comparison.png",
                 "summary.json"):
        assert (out / name).stat().st_size > 0, name
    for name in ("utility.png", "latency.png", "comparison.png"):
        assert (out / name).read_bytes().startswith(PNG)
    html = (out / "report.html").read_text()
    assert "Bokeh" in html and "Comparison of runs" in html and "sneakpeek" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random"]["per_app"]["falls"]["requests"] == 6


def test_one_run_has_no_comparison(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    make_report(two_runs[:1], tmp_path / "one")
    assert not (tmp_path / "one" / "comparison.png").exists()
    assert "Comparison of runs" not in (tmp_path / "one" / "report.html").read_text()


def test_labels() -> None:
    assert run_labels([Path("x/a.jsonl"), Path("y/a.jsonl")]) == ["x/a", "y/a"]
    assert run_labels([Path("a.jsonl")], ["sneakpeek"]) == ["sneakpeek"]
    with pytest.raises(ValueError):
        run_labels([Path("a.jsonl")], ["x", "y"])


def test_cli(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = run_cli("report", *map(str, two_runs), "--out", str(out),
                   "--config", str(HOSPITAL), "--label", "sneak", "--label", "rand",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sneak" in proc.stdout and "rand" in proc.stdout and "falls" in proc.stdout
    assert (out / "comparison.png").exists()


def test_cli_bad_records(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"app": "x"}\n')
    proc = run_cli("report", str(bad), "--out", str(tmp_path / "o"), timeout=60)
    assert proc.returncode == 2
    assert "bad.jsonl:1" in proc.stderr


def test_latency_sketch_is_exact_then_bounded() -> None:
    """Past its exact cap the sketch keeps a fixed histogram: bounded memory, ~1% error."""
    rng = np.random.default_rng(1)
    values = rng.lognormal(mean=-1.0, sigma=0.8, size=50_000)
    exact = rec.LatencySketch(exact_cap=100_000)
    binned = rec.LatencySketch(exact_cap=1_000)
    for part in np.array_split(values, 50):
        exact.add(part)
        binned.add(part)
    assert len(exact) == len(binned) == values.size
    truth = {f"p{q}": np.percentile(values, q) * 1000 for q in (50, 95, 99)}
    assert exact.percentiles_ms((50, 95, 99)) == pytest.approx(truth)
    assert binned.percentiles_ms((50, 95, 99)) == pytest.approx(truth, rel=0.025)
    assert binned._values.size == 0 and binned._counts.size == 1000
