"""Request records: one per request, each completed, dropped or failed, and the summary.

Records arrive as columnar numpy chunks (one per scored batch, drop set or failure set);
the run keeps running totals of them, not the records, so a long run at thousands of
requests per second stays in bounded memory and the summary costs nothing to produce.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from serif_dask.utility import timeliness

OUTCOMES = ("completed", "dropped", "failed")
#: The model name of requests answered from their SneakPeek estimate, at no GPU cost.
PEEK_MODEL = "sneakpeek"

COLUMNS = (
    "app", "group", "tick", "model", "worker", "arrival", "finish", "latency",
    "prediction", "label", "utility", "outcome", "reason", "version",
)
#: Per config version, the summary's ``per_version`` keys (accounting checked on each).
VERSION_KEYS = ("requests", "completed", "dropped", "failed", "deadline_met", "mean_utility")


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
    #: The run's config version the request was served under (1: the run's start).
    version: int = 1

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
                "version": self.version,
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


class LatencySketch:
    """Latencies of completed requests, exact up to ``exact_cap`` values, then binned.

    Exact percentiles up to 65536 values (512 KB); past them a fixed log-spaced histogram
    (100 bins per decade from 1 µs to 10⁴ s, so a percentile is off by at most ~1.2%),
    so a run with no end stays in bounded memory: a run keeps one per application and
    one in total, and a larger cap would take minutes of a busy run to fill, which reads
    as growth.
    """

    EDGES = np.logspace(-6, 4, 1001)

    def __init__(self, exact_cap: int = 1 << 16) -> None:
        self.exact_cap = exact_cap
        self._values = np.empty(1024)
        self._n = 0
        self._counts: np.ndarray | None = None  # histogram, once past the cap

    def __len__(self) -> int:
        return self._n if self._counts is None else int(self._counts.sum())

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=float)
        if self._counts is None and self._n + values.size > self.exact_cap:
            self._counts = self._histogram(self._values[: self._n])
            self._values = np.empty(0)
        if self._counts is not None:
            self._counts += self._histogram(values)
            return
        if self._n + values.size > self._values.size:
            grown = np.empty(max(2 * self._values.size, self._n + values.size))
            grown[: self._n] = self._values[: self._n]
            self._values = grown
        self._values[self._n : self._n + values.size] = values
        self._n += values.size

    def _histogram(self, values: np.ndarray) -> np.ndarray:
        clipped = np.clip(values, self.EDGES[0], self.EDGES[-1])
        return np.histogram(clipped, bins=self.EDGES)[0]

    def percentiles_ms(self, qs: tuple[int, ...]) -> dict[str, float | None]:
        if len(self) == 0:
            return {f"p{q}": None for q in qs}
        if self._counts is None:
            values = self._values[: self._n]
            return {f"p{q}": float(np.percentile(values, q) * 1000.0) for q in qs}
        cum = np.cumsum(self._counts)
        mids = np.sqrt(self.EDGES[:-1] * self.EDGES[1:])
        out = {}
        for q in qs:
            i = int(np.searchsorted(cum, q / 100.0 * cum[-1], side="left"))
            out[f"p{q}"] = float(mids[min(i, mids.size - 1)] * 1000.0)
        return out


class DecisionTimes:
    """The policy's decision time per plan (ms): the exact maximum, the rest sketched, so
    a run with no end keeps a bounded record of them."""

    def __init__(self) -> None:
        self.sketch = LatencySketch()
        self.max: float | None = None

    def append(self, ms: float) -> None:
        self.sketch.add(np.asarray([ms / 1000.0], dtype=float))  # the sketch holds seconds
        self.max = ms if self.max is None else max(self.max, ms)

    def __len__(self) -> int:
        return len(self.sketch)

    def result(self) -> dict[str, float | None]:
        """``{"p50", "max"}`` in ms, as the summary reports them."""
        return {"p50": self.sketch.percentiles_ms((50,))["p50"], "max": self.max}


@dataclass
class Tally:
    """Running totals of a set of records: what the summary needs, in constant memory."""

    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    utility: float = 0.0
    deadline_met: int = 0
    labelled: int = 0  # completed with a known label
    correct: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    answered: int = 0  # completed by an answer from the peek (model "sneakpeek")
    pi_seen: int = 0  # planned requests with a known label (from their peek)
    pi_correct: int = 0
    brier_sum: float = 0.0  # of the belief π the plan used
    brier_prior_sum: float = 0.0  # of the prior, on the same requests
    brier_single_sum: float = 0.0  # of one look alone (the prior updated once)
    single_seen: int = 0  # of those, requests whose peek succeeded
    latency: LatencySketch = field(default_factory=LatencySketch)

    def add(self, chunk: Chunk) -> None:
        n = len(chunk)
        self.requests += n
        self.outcomes[chunk.outcome] = self.outcomes.get(chunk.outcome, 0) + n
        self.utility += float(chunk.utility.sum())
        if chunk.outcome == "completed":
            self.deadline_met += int(chunk.deadline_met.sum())
            known = chunk.label >= 0
            self.labelled += int(known.sum())
            self.correct += int((chunk.label[known] == chunk.prediction[known]).sum())
            self.latency.add(chunk.latency)
            if chunk.model == PEEK_MODEL:
                self.answered += n
        else:
            for reason in chunk.reason:
                key = (reason or chunk.outcome).split(":", 1)[0]
                self.reasons[key] = self.reasons.get(key, 0) + 1

    def add_beliefs(self, labels: np.ndarray, pi: np.ndarray, prior: np.ndarray,
                    single: np.ndarray | None) -> None:
        """How good a tick's class estimates were, for the requests whose label is known:
        the belief, the prior and a single look, scored on the same requests (Brier)."""
        known = labels >= 0
        if not known.any():
            return
        y, pi = labels[known], pi[known]
        onehot = np.eye(pi.shape[1])[y]
        self.pi_seen += int(y.size)
        self.pi_correct += int((pi.argmax(axis=1) == y).sum())
        self.brier_sum += float(((pi - onehot) ** 2).sum())
        self.brier_prior_sum += float(((prior[None, :] - onehot) ** 2).sum())
        if single is not None:
            self.single_seen += int(y.size)
            self.brier_single_sum += float(((single[known] - onehot) ** 2).sum())

    def result(self) -> dict[str, Any]:
        """The summary keys of DESIGN.md for these records (no run-level keys)."""
        n = self.requests
        return {
            "requests": n,
            **{o: self.outcomes.get(o, 0) for o in OUTCOMES},
            "utility": self.utility,
            "mean_utility": self.utility / n if n else 0.0,
            "deadline_met": self.deadline_met / n if n else 0.0,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "latency_ms": self.latency.percentiles_ms((50, 95, 99)),
            "failures_by_reason": dict(sorted(self.reasons.items())),
            "sneakpeek": {
                "accuracy": self.pi_correct / self.pi_seen if self.pi_seen else None,
                "brier": self.brier_sum / self.pi_seen if self.pi_seen else None,
                "brier_prior": self.brier_prior_sum / self.pi_seen if self.pi_seen else None,
                "brier_single": (self.brier_single_sum / self.single_seen
                                 if self.single_seen else None),
                "answered": self.answered,
            },
        }


@dataclass(frozen=True)
class Rotation:
    """When a records file is rotated, and how many rotated files are kept.

    The file rotates once it reaches ``max_bytes``, or ``every_s`` seconds after it was
    opened, whichever comes first; ``records.jsonl`` becomes ``records.jsonl.1`` (the
    previous ``.1`` becomes ``.2``, and so on) and anything past ``.<keep>`` is deleted,
    so the records take at most ``(keep + 1) × max_bytes`` of disk (plus one chunk).
    A chunk's lines are never split between two files.
    """

    max_bytes: int | None = None
    every_s: float | None = None
    keep: int = 5

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self.every_s is not None and self.every_s <= 0:
            raise ValueError("every_s must be positive")
        if self.keep < 0:
            raise ValueError("keep must be 0 or more")

    def due(self, size: int, age_s: float) -> bool:
        return (self.max_bytes is not None and size >= self.max_bytes) or (
            self.every_s is not None and age_s >= self.every_s)


def rotated_paths(path: Path, keep: int) -> list[Path]:
    """``path`` and its rotated files, newest first (``path``, ``path.1`` .. ``path.keep``)."""
    return [path, *(path.with_name(f"{path.name}.{i}") for i in range(1, keep + 1))]


@dataclass
class RecordLog:
    """Every request of a run: streamed to a JSONL file as recorded, tallied for the summary.

    Records are not kept in memory, so a run without an end stays in bounded memory; with
    a :class:`Rotation` the file is rotated, so its disk is bounded too.
    """

    path: Path | None = None
    rotation: Rotation | None = None
    totals: Tally = field(default_factory=Tally)
    per_app: dict[str, Tally] = field(default_factory=dict)
    per_version: dict[int, Tally] = field(default_factory=dict)
    rotations: int = 0
    #: Set by :meth:`open` on the caller's thread; ``_file`` belongs to the writer thread,
    #: which closes and reopens it while rotating, so only this says whether to write.
    _writing: bool = False
    _file: IO[str] | None = None
    _opened: float = 0.0
    #: One thread writes the file, in order: JSON encoding and disk I/O stay off the event
    #: loop the driver (and, in one-machine mode, the scheduler) runs on.
    _writer: ThreadPoolExecutor | None = None
    _last_write: Future | None = None
    _write_error: BaseException | None = None  # the first, raised by drain()

    def open(self) -> None:
        if self.path is not None and not self._writing:
            self._open_file()
            self._writing = True

    def _open_file(self) -> None:
        if self.path is not None and self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # also when the file was there before, with looser modes
            self._file = os.fdopen(fd, "w", encoding="utf-8")
            self._opened = time.monotonic()

    def add_beliefs(self, app: str, labels: np.ndarray, pi: np.ndarray, prior: np.ndarray,
                    single: np.ndarray | None) -> None:
        for tally in (self.totals, self.per_app.setdefault(app, Tally())):
            tally.add_beliefs(labels, pi, prior, single)

    def add(self, chunk: Chunk) -> None:
        if len(chunk) == 0:
            return
        self.totals.add(chunk)
        self.per_app.setdefault(chunk.app, Tally()).add(chunk)
        self.per_version.setdefault(chunk.version, Tally()).add(chunk)
        if self._writing:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="serif-records")
            self._last_write = self._writer.submit(self._write, chunk)

    def _write(self, chunk: Chunk) -> None:
        if self._file is None or self._write_error is not None:
            return
        try:
            self._file.write("".join(json.dumps(row) + "\n" for row in chunk.rows()))
            if self.rotation is not None and self.rotation.due(
                    self._file.tell(), time.monotonic() - self._opened):
                self._rotate()
        except BaseException as exc:  # a full disk: the tallies stay right, drain() says so
            self._write_error = exc

    def drain(self) -> None:
        """Wait until every record added so far is written; re-raise a write's error."""
        last, self._last_write = self._last_write, None
        if last is not None:
            last.result()
        if self._write_error is not None:
            raise self._write_error

    def _rotate(self) -> None:
        """On the writer thread: close the file, shift the rotated ones by one (dropping the
        oldest), reopen."""
        if self.path is None or self._file is None or self.rotation is None:
            return
        self._close_file()
        paths = rotated_paths(self.path, self.rotation.keep)
        if self.rotation.keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            paths[-1].unlink(missing_ok=True)
            for older, newer in zip(reversed(paths[1:]), reversed(paths[:-1]), strict=True):
                if newer.exists():
                    newer.rename(older)
        self.rotations += 1
        self._open_file()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.submit(self._flush).result()
        else:
            self._flush()

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self._writing = False
        try:
            self.drain()
        finally:
            self._close_file()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return self.totals.requests


def summarise(chunks: list[Chunk]) -> dict[str, Any]:
    """The summary keys of DESIGN.md for a set of records (no run-level keys)."""
    tally = Tally()
    for chunk in chunks:
        tally.add(chunk)
    return tally.result()


def summary(
    log: RecordLog, *, policy: str, data_aware: bool, ticks: int,
    decision_ms: DecisionTimes | list[float], extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run summary of DESIGN.md, with ``per_app`` and the invariant checked."""
    result = log.totals.result()
    if isinstance(decision_ms, DecisionTimes):
        result["decision_ms"] = decision_ms.result()
    else:
        decisions = np.asarray(decision_ms, dtype=float)
        result["decision_ms"] = {
            "p50": float(np.percentile(decisions, 50)) if decisions.size else None,
            "max": float(decisions.max()) if decisions.size else None,
        }
    result["policy"] = policy
    result["data_aware"] = data_aware
    result["ticks"] = ticks
    result["per_app"] = {a: log.per_app[a].result() for a in sorted(log.per_app)}
    result["per_version"] = {}
    for version in sorted(log.per_version):
        tally = log.per_version[version].result()
        result["per_version"][str(version)] = {k: tally[k] for k in VERSION_KEYS}
    if extra:
        result.update(extra)
    for part in [result, *result["per_version"].values()]:
        if part["requests"] != part["completed"] + part["dropped"] + part["failed"]:
            raise AssertionError("serif: accounting invariant broken")
    if sum(p["requests"] for p in result["per_version"].values()) != result["requests"]:
        raise AssertionError("serif: accounting invariant broken across versions")
    return result
