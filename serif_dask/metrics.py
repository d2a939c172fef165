"""Prometheus metrics of serif-dask on the scheduler's ``/metrics``.

Dask serves ``/metrics`` from ``prometheus_client.REGISTRY``; we register one collector
there per process. It reads the scheduler plugin's in-memory totals at scrape time, so
the values are those the driver reported, tick by tick, and match the run's summary.

The plugin keeps only recent latency samples (a bounded deque), so histograms need their
own cumulative buckets: :func:`register` wraps the plugin's ``serif_report`` and
``serif_plan`` handlers to feed a :class:`Telemetry` next to it. Totals restart with each
run (a new ``run_id``), which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serif_dask import memory
from serif_dask.wire import unpack

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from serif_dask.scheduler import SerifSchedulerPlugin

logger = logging.getLogger("serif_dask.metrics")

#: Seconds; SLAs are around a second, requests are worth nothing after twice the SLA.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
#: Seconds the policy may take per plan (the driver waits on it every tick).
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class Histogram:
    """Cumulative-ready bucket counts, sum and count (Prometheus semantics)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, values: Any) -> None:
        values = np.asarray(values, dtype=float).ravel()
        if values.size == 0:
            return
        # searchsorted "left": a value equal to a bound counts in that bucket (le="bound").
        slots = np.searchsorted(self.bounds, values, side="left")
        for slot, n in enumerate(np.bincount(slots, minlength=len(self.counts)).tolist()):
            self.counts[slot] += n
        self.total += float(values.sum())
        self.count += int(values.size)

    def buckets(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs, ending with ``+Inf``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class TickPoint:
    """One application tick as the driver reported it, for plots over time."""

    t: float
    requests: int
    utility: float
    deadline_met: int


@dataclass
class Telemetry:
    """What the plugin does not keep: cumulative histograms and a per-tick timeline."""

    run_id: str | None = None
    latency: dict[str, Histogram] = field(default_factory=dict)
    decision: Histogram = field(default_factory=lambda: Histogram(DECISION_BUCKETS))
    timeline: dict[str, deque[TickPoint]] = field(default_factory=dict)

    def sync_run(self, run_id: str | None) -> None:
        """Start afresh when the plugin was configured for another run."""
        if run_id != self.run_id:
            self.run_id = run_id
            self.latency.clear()
            self.timeline.clear()
            self.decision = Histogram(DECISION_BUCKETS)

    def observe_report(
        self, app: str, n: int, utility: float, deadline_met: int, latencies: Any
    ) -> None:
        hist = self.latency.setdefault(app, Histogram(LATENCY_BUCKETS))
        hist.observe(latencies)
        if n:
            line = self.timeline.setdefault(app, deque(maxlen=4096))
            line.append(TickPoint(time.time(), n, float(utility), int(deadline_met)))


_telemetry: weakref.WeakKeyDictionary[Any, Telemetry] = weakref.WeakKeyDictionary()
_plugins: list[weakref.ref] = []  # newest last
_lock = threading.Lock()
_collector: SerifCollector | None = None


def _telemetry_sizes(plugin: SerifSchedulerPlugin) -> dict[str, int]:
    return {"serif_telemetry_timeline": sum(len(t) for t in telemetry(plugin).timeline.values())}


def telemetry(plugin: SerifSchedulerPlugin) -> Telemetry:
    """The telemetry of ``plugin``, synced to its current run."""
    tel = _telemetry.get(plugin)
    if tel is None:
        tel = _telemetry[plugin] = Telemetry(run_id=plugin.run_id)
    tel.sync_run(plugin.run_id)
    return tel


def _wrap_report(plugin: SerifSchedulerPlugin, original: Callable[..., Any]) -> Callable:
    @functools.wraps(original)
    def serif_report(**kwargs: Any) -> Any:
        result = original(**kwargs)
        try:
            app = kwargs.get("app")
            if app in plugin.metrics:  # the plugin ignores apps of no configured run
                outcomes = kwargs.get("outcomes") or {}
                telemetry(plugin).observe_report(
                    app,
                    sum(outcomes.values()),
                    kwargs.get("utility", 0.0),
                    kwargs.get("deadline_met", 0),
                    unpack(kwargs.get("latencies"), float),
                )
        except Exception:
            logger.exception("serif: could not record report metrics")
        return result

    serif_report.__serif_hook__ = True  # type: ignore[attr-defined]
    return serif_report


def _wrap_plan(plugin: SerifSchedulerPlugin, original: Callable[..., Any]) -> Callable:
    @functools.wraps(original)
    async def serif_plan(**kwargs: Any) -> Any:
        result = await original(**kwargs)
        try:
            ms = result.get("decision_ms") if isinstance(result, dict) else None
            if ms is not None:
                telemetry(plugin).decision.observe([ms / 1000.0])
        except Exception:
            logger.exception("serif: could not record decision metrics")
        return result

    serif_plan.__serif_hook__ = True  # type: ignore[attr-defined]
    return serif_plan


def register(plugin: SerifSchedulerPlugin) -> None:
    """Feed ``plugin``'s telemetry from its handlers and expose it on ``/metrics``.

    Safe to call again for the same or a new plugin: handlers are wrapped once, and the
    collector is registered once per process.
    """
    handlers = plugin.scheduler.handlers
    for op, wrap in (("serif_report", _wrap_report), ("serif_plan", _wrap_plan)):
        current = handlers.get(op)
        if current is not None and not getattr(current, "__serif_hook__", False):
            handlers[op] = wrap(plugin, current)
    telemetry(plugin)
    with _lock:
        _plugins[:] = [r for r in _plugins if r() is not None and r() is not plugin]
        _plugins.append(weakref.ref(plugin))
    _register_collector()


def _register_collector() -> None:
    global _collector
    from prometheus_client import REGISTRY

    with _lock:
        if _collector is not None:
            return
        collector = SerifCollector()
        try:
            REGISTRY.register(collector)
        except ValueError:  # names already taken, e.g. the module was reloaded
            logger.info("serif: a collector for serif_ metrics is already registered")
        _collector = collector


def current_plugin() -> SerifSchedulerPlugin | None:
    """The newest plugin whose scheduler still runs (tests start several in a process)."""
    with _lock:
        plugins = [p for r in _plugins if (p := r()) is not None]
    for plugin in reversed(plugins):
        status = getattr(plugin.scheduler.status, "name", "")
        if status not in ("closing", "closed", "failed"):
            return plugin
    return None


class SerifCollector:
    """A prometheus_client custom collector reading the plugin's state at scrape time."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._families(current_plugin())
        except Exception:  # a scrape must never take /metrics down with it
            logger.exception("serif: collecting metrics failed")

    def _families(self, plugin: SerifSchedulerPlugin | None) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "serif_requests", "Requests finished, by application and outcome",
            labels=["app", "outcome"],
        )
        # Utility can be negative (a wrong call costs), so it is a gauge, not a counter:
        # a falling counter would read as a reset to rate().
        utility = GaugeMetricFamily(
            "serif_utility_total", "Utility earned so far in this run, by application",
            labels=["app"],
        )
        met = CounterMetricFamily(
            "serif_deadline_met", "Requests completed within their SLA, by application",
            labels=["app"],
        )
        reasons = CounterMetricFamily(
            "serif_not_completed", "Dropped and failed requests, by application and reason",
            labels=["app", "reason"],
        )
        latency = HistogramMetricFamily(
            "serif_latency_seconds", "Latency of completed requests, by application",
            labels=["app"],
        )
        decision = HistogramMetricFamily(
            "serif_decision_seconds", "Time the scheduler plugin took to plan one tick",
        )
        warm = GaugeMetricFamily(
            "serif_models_warm", "Models loaded on a compute worker", labels=["worker"],
        )
        backlog = GaugeMetricFamily(
            "serif_worker_backlog_seconds",
            "Work booked on a compute worker that the plugin expects to be still queued",
            labels=["worker"],
        )
        resident = GaugeMetricFamily(
            "serif_process_resident_bytes",
            "Resident memory of each serif process: the scheduler (with the driver in "
            "serif-dask run), other drivers, and every worker (from its heartbeat)",
            labels=["process", "role"],
        )
        version = GaugeMetricFamily(
            "serif_config_version",
            "The live run's config version its driver ticks under (1: the run's start)",
        )
        if plugin is not None:
            version.add_metric([], plugin.applied_version)
            tel = telemetry(plugin)
            for app, m in sorted(plugin.metrics.items()):
                for outcome in ("completed", "dropped", "failed"):
                    requests.add_metric([app, outcome], getattr(m, outcome))
                utility.add_metric([app], m.utility)
                met.add_metric([app], m.deadline_met)
                for reason, count in sorted(m.reasons.items()):
                    reasons.add_metric([app, reason], count)
                hist = tel.latency.get(app) or Histogram(LATENCY_BUCKETS)
                latency.add_metric([app], hist.buckets(), sum_value=hist.total)
            decision.add_metric([], tel.decision.buckets(), sum_value=tel.decision.total)
            for worker in plugin.state()["workers"]:
                if worker["role"] == "compute":
                    warm.add_metric([worker["name"]], len(worker["warm"]))
                    backlog.add_metric([worker["name"]], worker["backlog"])
            for proc in memory.history(plugin.scheduler).current(plugin.scheduler):
                resident.add_metric([proc.name, proc.role], proc.rss)
        yield from (requests, utility, met, reasons, latency, decision, warm, backlog,
                    resident, version)


memory.SIZE_SOURCES.append(_telemetry_sizes)
