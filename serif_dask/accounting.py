"""Accounting: every request ends in exactly one record, whatever happens to its tasks.

The tick path and ad-hoc requests (:mod:`serif_dask.submit`) build their records with
the same functions: :func:`scored` for a score task's result, :func:`answered` for
requests answered from their SneakPeek estimate, :func:`missed` for drops and failures.
A :class:`TickLedger` keeps one tick's books: which groups are still unrecorded, so a
late failure never records a request twice and the tick's end records what is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serif_dask.config import Application
from serif_dask.records import PEEK_MODEL, Chunk, LatencySketch, RecordLog, completed_utility
from serif_dask.wire import pack


def _utility(app: Application, latency: np.ndarray, labels: np.ndarray,
             prediction: np.ndarray) -> np.ndarray:
    return completed_utility(
        latency, app.sla_latency, np.asarray(app.utility_matrix, dtype=float),
        np.asarray(app.prior, dtype=float), labels, prediction,
    )


def missed(
    app: Application, tick: int, groups: np.ndarray, arrival: float, outcome: str,
    reason: str, model: str = "", worker: str = "", labels: np.ndarray | None = None,
    version: int = 1,
) -> Chunk:
    """Dropped or failed requests: ``miss-utility`` each; ``labels`` kept when known, so
    that what a miss cost shows."""
    n = groups.size
    return Chunk(
        app=app.name, tick=tick, model=model, worker=worker, outcome=outcome,
        group=groups, arrival=np.full(n, arrival), finish=np.full(n, np.nan),
        prediction=np.full(n, -1), label=np.full(n, -1) if labels is None else labels,
        utility=np.full(n, float(app.miss_utility)), deadline_met=np.zeros(n, bool),
        reason=[reason] * n, version=version,
    )


def answered(
    app: Application, tick: int, arrival: float, finish: float, groups: np.ndarray,
    labels: np.ndarray, prediction: np.ndarray, version: int = 1,
) -> Chunk:
    """Requests answered from their SneakPeek estimate when the plan was made."""
    n = groups.size
    latency = np.full(n, finish - arrival)
    return Chunk(
        app=app.name, tick=tick, model=PEEK_MODEL, worker="", outcome="completed",
        group=groups, arrival=np.full(n, arrival), finish=np.full(n, finish),
        prediction=prediction, label=labels, utility=_utility(app, latency, labels, prediction),
        deadline_met=latency <= app.sla_latency, reason=[""] * n, version=version,
    )


def scored(
    app: Application, tick: int, arrival: float, result: dict[str, Any], version: int = 1,
) -> tuple[Chunk | None, dict[int, str]]:
    """A score task's result: the completed requests (None when none) and, per failed
    group, its reason."""
    ok = result["ok"]
    groups, pred, labels = result["groups"][ok], result["pred"][ok], result["labels"][ok]
    errors = dict(sorted(result["errors"].items()))
    if groups.size == 0:
        return None, errors
    finish = np.broadcast_to(np.asarray(result["finish"], dtype=float), ok.shape)[ok]
    latency = finish - arrival
    chunk = Chunk(
        app=app.name, tick=tick, model=result["model"], worker=result["worker"],
        outcome="completed", group=groups, arrival=np.full(groups.size, arrival),
        finish=finish, prediction=pred, label=labels,
        utility=_utility(app, latency, labels, pred),
        deadline_met=latency <= app.sla_latency, reason=[""] * groups.size,
        version=version,
    )
    return chunk, errors


class TickLedger:
    """One tick's books: each group is recorded once; :meth:`close` fails what is left.

    ``version`` is the run's config version the tick started under: every record of the
    tick carries it, even when the run moves to a newer one before the tick ends.
    """

    def __init__(self, app: Application, tick: int, arrival: float, groups: np.ndarray,
                 log: RecordLog, on_records: Callable[[list[dict[str, Any]]], None] | None,
                 version: int = 1):
        self.app, self.tick, self.arrival = app, tick, arrival
        self.version = version
        self.groups = groups
        self.pending = np.ones(groups.size, dtype=bool)
        self.recorded: list[Chunk] = []
        #: Per group, the labels the reads carried (-1: unknown), once the peeks are in:
        #: kept on failed records too, so that what a failure cost shows as for a drop.
        self.labels: np.ndarray | None = None
        self._log = log
        self._on_records = on_records
        self.record_s = 0.0  # spent recording (the log, the results stream callback)

    def left(self) -> np.ndarray:
        return self.groups[self.pending]

    def record(self, chunk: Chunk) -> None:
        started = time.perf_counter()
        self.pending[chunk.group] = False
        self.recorded.append(chunk)
        self._log.add(chunk)
        if self._on_records is not None:
            self._on_records(list(chunk.rows()))
        self.record_s += time.perf_counter() - started

    def fail(self, which: np.ndarray, reason: str, model: str = "", worker: str = "") -> None:
        """Fail those of ``which`` not yet recorded."""
        which = which[self.pending[which]]
        if which.size:
            labels = None if self.labels is None else self.labels[which]
            self.record(missed(self.app, self.tick, which, self.arrival, "failed", reason,
                               model, worker, labels, version=self.version))

    def drop(self, which: np.ndarray, reason: str) -> None:
        labels = None if self.labels is None else self.labels[which]
        self.record(missed(self.app, self.tick, which, self.arrival, "dropped", reason,
                           labels=labels, version=self.version))

    def scored(self, result: dict[str, Any]) -> None:
        chunk, errors = scored(self.app, self.tick, self.arrival, result, self.version)
        for group, reason in errors.items():
            self.fail(np.asarray([group]), reason, result["model"], result["worker"])
        if chunk is not None:
            self.record(chunk)

    def outcomes(self) -> dict[str, Any]:
        """The tick's totals, for the scheduler plugin's live metrics (``serif_report``)."""
        outcomes: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for c in self.recorded:
            outcomes[c.outcome] = outcomes.get(c.outcome, 0) + len(c)
            for r in c.reason:
                if r:
                    key = r.split(":", 1)[0]
                    reasons[key] = reasons.get(key, 0) + 1
        done = [c for c in self.recorded if c.outcome == "completed"]
        return {
            "outcomes": outcomes, "reasons": reasons,
            "utility": float(sum(c.utility.sum() for c in self.recorded)),
            "deadline_met": int(sum(c.deadline_met.sum() for c in done)),
            "latencies": pack(np.concatenate([c.latency for c in done]) if done else [], float),
        }


class BatchTimes:
    """Measured batch seconds: sent to the plugin (which learns drifting latencies from
    them) and summed against the plan's estimates per model for the summary."""

    def __init__(self) -> None:
        self._unsent: list[list] = []  # [score key, measured s]
        #: "app/model" -> [planned seconds, measured seconds, requests]
        self.drift: dict[str, list] = {}

    def note(self, app: Application, batch: dict[str, Any], result: dict[str, Any]) -> None:
        finish = np.asarray(result["finish"], dtype=float)
        if finish.size == 0 or not np.isfinite(finish).all():
            return
        seconds = float(finish.max() - float(result["start"]))
        self._unsent.append([batch["key"], seconds])
        total = self.drift.setdefault(f"{app.name}/{batch['model']}", [0.0, 0.0, 0])
        total[0] += float(batch.get("estimate_s", 0.0))
        total[1] += seconds
        total[2] += len(batch["groups"])

    def take(self) -> list[list]:
        """What was measured since the last call (for the next report)."""
        times, self._unsent = self._unsent, []
        return times

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            model: {"planned_ms_per_request": 1000 * planned / n,
                    "measured_ms_per_request": 1000 * measured / n}
            for model, (planned, measured, n) in sorted(self.drift.items()) if n
        }


class StageTimes:
    """Per tick, the seconds spent in each step, sketched: where the next bottleneck is.

    ``read``: from the tick's start until its peeked reads returned; ``peek``: until the
    peeks were in; ``plan``: waiting for and getting the plan (its round and turn
    included); ``score``: from the batches' submission until the last was recorded;
    ``record``: the driver's own time building and writing the records.
    """

    STAGES = ("read", "peek", "plan", "score", "record")

    def __init__(self) -> None:
        self._sketches = {stage: LatencySketch(exact_cap=1 << 12) for stage in self.STAGES}

    def add(self, times: dict[str, float]) -> None:
        for stage, seconds in times.items():
            if stage in self._sketches:
                self._sketches[stage].add(np.asarray([seconds]))

    def result(self) -> dict[str, dict[str, float | None]]:
        """``{stage: {"p50", "p95"}}`` in ms per tick."""
        return {stage: sketch.percentiles_ms((50, 95))
                for stage, sketch in self._sketches.items()}
