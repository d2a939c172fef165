"""Request records: one per request, each completed, dropped or failed, and the summary.

Records are kept as columnar numpy chunks (one per scored batch, drop set or failure set),
so a long run at thousands of requests per second stays compact, and the summary is a few
vectorised reductions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from serif_dask.utility import timeliness

OUTCOMES = ("completed", "dropped", "failed")

COLUMNS = (
    "app", "group", "tick", "model", "worker", "arrival", "finish", "latency",
    "prediction", "label", "utility", "outcome", "reason",
)


@dataclass
class Chunk:
    """Records that share app, tick, model, worker and outcome; the rest are arrays."""

    app: str
    tick: int
    model: str
    worker: str
    outcome: str
    group: np.ndarray
    arrival: np.ndarray
    finish: np.ndarray
    prediction: np.ndarray
    label: np.ndarray
    utility: np.ndarray
    deadline_met: np.ndarray
    reason: list[str]
    pi_correct: np.ndarray | None = None  # argmax pi == label, for known labels
    brier: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.group.shape[0])

    @property
    def latency(self) -> np.ndarray:
        return self.finish - self.arrival

    def rows(self) -> Iterator[dict[str, Any]]:
        latency = self.latency
        for i in range(len(self)):
            done = self.outcome == "completed"
            yield {
                "app": self.app,
                "group": int(self.group[i]),
                "tick": self.tick,
                "model": self.model or None,
                "worker": self.worker or None,
                "arrival": float(self.arrival[i]),
                "finish": float(self.finish[i]) if done else None,
                "latency": float(latency[i]) if done else None,
                "prediction": int(self.prediction[i]) if done else None,
                "label": int(self.label[i]) if self.label[i] >= 0 else None,
                "utility": float(self.utility[i]),
                "outcome": self.outcome,
                "reason": self.reason[i] or None,
            }


def completed_utility(
    latency: np.ndarray, sla: float, utility_matrix: np.ndarray, prior: np.ndarray,
    label: np.ndarray, prediction: np.ndarray,
) -> np.ndarray:
    """``f(L) · U[true][pred]``; with the label unknown, U is averaged over the prior."""
    f = timeliness(latency, sla)
    known = label >= 0
    u = np.where(
        known,
        utility_matrix[np.maximum(label, 0), prediction],
        prior @ utility_matrix[:, prediction],
    )
    return f * u


@dataclass
class RecordLog:
    """Every request of a run, optionally streamed to a JSONL file as it is recorded."""

    path: Path | None = None
    chunks: list[Chunk] = field(default_factory=list)
    _file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None and self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            self._file = os.fdopen(fd, "w", encoding="utf-8")

    def add(self, chunk: Chunk) -> None:
        if len(chunk) == 0:
            return
        self.chunks.append(chunk)
        if self._file is not None:
            self._file.write("".join(json.dumps(row) + "\n" for row in chunk.rows()))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def rows(self) -> Iterator[dict[str, Any]]:
        for chunk in self.chunks:
            yield from chunk.rows()


def _percentiles_ms(values: np.ndarray, qs: tuple[int, ...]) -> dict[str, float | None]:
    if values.size == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(values, q) * 1000.0) for q in qs}


def summarise(chunks: list[Chunk]) -> dict[str, Any]:
    """The summary keys of DESIGN.md for a set of records (no run-level keys)."""
    n = sum(len(c) for c in chunks)
    counts = {o: sum(len(c) for c in chunks if c.outcome == o) for o in OUTCOMES}
    utility = float(sum(c.utility.sum() for c in chunks))
    done = [c for c in chunks if c.outcome == "completed"]
    latency = np.concatenate([c.latency for c in done]) if done else np.zeros(0)
    met = int(sum(c.deadline_met.sum() for c in done))
    labels = np.concatenate([c.label for c in done]) if done else np.zeros(0, int)
    preds = np.concatenate([c.prediction for c in done]) if done else np.zeros(0, int)
    known = labels >= 0
    reasons: dict[str, int] = {}
    for c in chunks:
        if c.outcome == "completed":
            continue
        for reason in c.reason:
            key = (reason or c.outcome).split(":", 1)[0]
            reasons[key] = reasons.get(key, 0) + 1
    pi_ok = [c.pi_correct for c in chunks if c.pi_correct is not None]
    brier = [c.brier for c in chunks if c.brier is not None]
    pi_ok_arr = np.concatenate(pi_ok) if pi_ok else np.zeros(0)
    brier_arr = np.concatenate(brier) if brier else np.zeros(0)
    brier_arr = brier_arr[np.isfinite(brier_arr)]
    return {
        "requests": n,
        **counts,
        "utility": utility,
        "mean_utility": utility / n if n else 0.0,
        "deadline_met": met / n if n else 0.0,
        "accuracy": float((labels[known] == preds[known]).mean()) if known.any() else None,
        "latency_ms": _percentiles_ms(latency, (50, 95, 99)),
        "failures_by_reason": dict(sorted(reasons.items())),
        "sneakpeek": {
            "accuracy": float(pi_ok_arr.mean()) if pi_ok_arr.size else None,
            "brier": float(brier_arr.mean()) if brier_arr.size else None,
        },
    }


def summary(
    log: RecordLog, *, policy: str, data_aware: bool, ticks: int,
    decision_ms: list[float], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary of DESIGN.md, with ``per_app`` and the invariant checked."""
    result = summarise(log.chunks)
    decisions = np.asarray(decision_ms, dtype=float)
    result["decision_ms"] = {
        "p50": float(np.percentile(decisions, 50)) if decisions.size else None,
        "max": float(decisions.max()) if decisions.size else None,
    }
    result["policy"] = policy
    result["data_aware"] = data_aware
    result["ticks"] = ticks
    apps = sorted({c.app for c in log.chunks})
    result["per_app"] = {a: summarise([c for c in log.chunks if c.app == a]) for a in apps}
    if extra:
        result.update(extra)
    if result["requests"] != result["completed"] + result["dropped"] + result["failed"]:
        raise AssertionError("serif: accounting invariant broken")
    return result
