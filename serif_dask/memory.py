"""Memory of a long-running deployment: each serif process's resident memory, and the
sizes of the state that could grow with a run's length.

Resident memory comes from what Dask already measures, on the event loop and without
I/O: the scheduler's own :class:`~distributed.system_monitor.SystemMonitor` and each
worker's heartbeat (``WorkerState.memory.process``); a driver in another process sends
its own with ``serif_process_memory``. :class:`MemoryHistory` keeps a bounded history of
those samples for the dashboard and ``/metrics``.

:func:`scheduler_sizes` and :func:`worker_sizes` count the entries of every log and map
that a run keeps adding to (Dask's and serif's): a soak run samples them minutes apart,
and whatever keeps growing is a leak, whatever levels off at its cap is bounded.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler
    from distributed.worker import Worker

logger = logging.getLogger("serif_dask.memory")
#: More bounded state to count in :func:`scheduler_sizes`: ``source(plugin) -> sizes``,
#: added by the modules that own it (so that this module imports none of them).
SIZE_SOURCES: list[Callable[[Any], dict[str, int]]] = []

#: Seconds between the samples of :class:`MemoryHistory`.
SAMPLE_S = 10.0
#: Samples kept per process: six hours at one every ten seconds.
HISTORY = 2160
#: A driver that stopped reporting for this long is shown no more.
DRIVER_STALE_S = 120.0


@dataclass(frozen=True)
class ProcessMemory:
    """One serif process: its name, role, host and process id, and resident bytes."""

    name: str
    role: str  # "scheduler", "scheduler+driver", "driver", "compute", "data", "other"
    host: str
    pid: int | None
    rss: int


@dataclass
class MemoryHistory:
    """Resident memory of each serif process over time, bounded per process."""

    maxlen: int = HISTORY
    samples: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    drivers: dict[str, tuple[float, ProcessMemory]] = field(default_factory=dict)

    def report_driver(self, run_id: str, host: str, pid: int, rss: int) -> None:
        """A driver's own sample; only the newest driver per process is kept."""
        self.drivers[f"{host}:{pid}"] = (time.time(), ProcessMemory(
            name=f"driver {run_id}", role="driver", host=host, pid=pid, rss=int(rss)))

    def current(self, scheduler: Scheduler) -> list[ProcessMemory]:
        """Every serif process now: the scheduler, the workers, live drivers."""
        now = time.time()
        for key, (seen, _) in list(self.drivers.items()):
            if now - seen > DRIVER_STALE_S:
                del self.drivers[key]
        host, pid = socket.gethostname(), os.getpid()
        role = "scheduler"
        if f"{host}:{pid}" in self.drivers:
            role = "scheduler+driver"  # serif-dask run: LocalCluster inside the driver
        out = [ProcessMemory("scheduler", role, host, pid, scheduler_rss(scheduler))]
        out += [m for key, (_, m) in sorted(self.drivers.items()) if key != f"{host}:{pid}"]
        from serif_dask.roles import worker_role

        for ws in sorted(scheduler.workers.values(), key=lambda w: str(w.name)):
            worker_kind, _ = worker_role(ws.name, dict(ws.resources))
            out.append(ProcessMemory(str(ws.name), worker_kind, ws.host, ws.pid,
                                     int(ws.memory.process)))
        return out

    def sample(self, scheduler: Scheduler) -> None:
        """Append one sample per process; forget processes gone for a whole history."""
        now = time.time()
        seen = set()
        for proc in self.current(scheduler):
            seen.add(proc.name)
            self.roles[proc.name] = proc.role
            line = self.samples.get(proc.name)
            if line is None:
                line = self.samples[proc.name] = deque(maxlen=self.maxlen)
            line.append((now, proc.rss))
        horizon = now - self.maxlen * SAMPLE_S
        for name in [n for n in self.samples if n not in seen]:
            if not self.samples[name] or self.samples[name][-1][0] < horizon:
                del self.samples[name]
                self.roles.pop(name, None)


def scheduler_rss(scheduler: Scheduler) -> int:
    """This process's resident bytes, from the scheduler's own system monitor."""
    memory = scheduler.monitor.quantities.get("memory")
    if memory:
        return int(memory[-1])
    return int(scheduler.monitor.proc.memory_info().rss)


def history(scheduler: Scheduler) -> MemoryHistory:
    """The scheduler's history, created (with its periodic sampler) on first use."""
    hist = getattr(scheduler, "_serif_memory", None)
    if hist is None:
        hist = MemoryHistory()
        scheduler._serif_memory = hist  # type: ignore[attr-defined]
    return hist


def install(scheduler: Scheduler) -> MemoryHistory:
    """Sample every ``SAMPLE_S`` on the scheduler's loop and answer drivers' reports.

    The periodic callback joins ``scheduler.periodic_callbacks``, which Dask starts and
    stops with the scheduler; idempotent.
    """
    from tornado.ioloop import PeriodicCallback

    hist = history(scheduler)

    def report(run_id: str, host: str, pid: int, rss: int) -> None:
        hist.report_driver(run_id, host, pid, rss)

    scheduler.handlers["serif_process_memory"] = report
    if "serif-memory" not in scheduler.periodic_callbacks:
        def tick() -> None:
            try:
                hist.sample(scheduler)
            except Exception:  # a sample is nice to have; the scheduler goes on
                logger.debug("serif: sampling process memory failed", exc_info=True)

        pc = PeriodicCallback(tick, SAMPLE_S * 1000)
        scheduler.periodic_callbacks["serif-memory"] = pc
        if scheduler.status.name == "running":
            pc.start()
        tick()
    return hist


async def report_memory(client: Any, run_id: str, every_s: float = SAMPLE_S) -> None:
    """A driver's loop: send this process's resident memory to the scheduler, until
    cancelled. The scheduler shows one ``scheduler+driver`` row when they share a process."""
    import asyncio

    import psutil

    me, host = psutil.Process(), socket.gethostname()
    while True:
        try:
            await client.scheduler.serif_process_memory(
                run_id=run_id, host=host, pid=os.getpid(), rss=int(me.memory_info().rss))
        except asyncio.CancelledError:
            raise
        except Exception:  # an older scheduler, or one going away: memory is an extra
            logger.debug("serif: could not report the driver's memory", exc_info=True)
        await asyncio.sleep(every_s)


# -- state sizes ---------------------------------------------------------------------------
def _span_sizes(scheduler: Scheduler) -> dict[str, int]:
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return {"spans": 0, "span_groups": 0, "span_metrics": 0, "span_collections": 0,
                "span_code": 0}
    spans = list(ext.spans.values())
    return {
        "spans": len(spans),
        "span_groups": sum(len(s.groups) for s in spans),
        "span_metrics": sum(len(s._cumulative_worker_metrics) for s in spans),
        "span_collections": sum(len((s.metadata or {}).get("collections", ()))
                                for s in spans),
        "span_code": sum(len(s._code) for s in spans),
    }


def scheduler_sizes(dask_scheduler: Scheduler) -> dict[str, int]:
    """Entry counts of what a run keeps adding to on the scheduler (Dask's and serif's);
    ``client.run_on_scheduler`` this."""
    scheduler = dask_scheduler
    topics = scheduler._broker._topics
    stream = scheduler.plugins.get("task-stream")
    sizes = {
        "tasks": len(scheduler.tasks),
        "task_groups": len(scheduler.task_groups),
        "task_prefixes": len(scheduler.task_prefixes),
        "computations": len(scheduler.computations),
        "computation_groups": sum(len(c.groups) for c in scheduler.computations),
        "transition_log": len(scheduler.transition_log),
        "event_topics": len(topics),
        "events": sum(len(t.events) for t in topics.values()),
        "events_max_topic": max((len(t.events) for t in topics.values()), default=0),
        "task_stream": len(stream.buffer) if stream is not None else 0,
        "log": len(scheduler._deque_handler.deque),
        "cumulative_worker_metrics": len(scheduler.cumulative_worker_metrics),
        "clients": len(scheduler.clients),
        "erred_tasks": len(scheduler.erred_tasks),
        **_span_sizes(scheduler),
    }
    try:  # the driver's client and ticks, when the driver lives here (serif-dask run)
        import asyncio

        from distributed import Client

        sizes["loop_tasks"] = len(asyncio.all_tasks())
        sizes["client_futures"] = sum(len(c.futures) for c in list(Client._instances))
    except RuntimeError:  # not on the event loop
        pass
    plugin = scheduler.plugins.get("serif")
    if plugin is not None:
        sizes.update(
            serif_pending=len(plugin.pending),
            serif_worker_pending=sum(len(w.pending) for w in plugin.workers.values()),
            serif_lost_workers=len(plugin.lost_workers),
            serif_config_versions=len(plugin.versions),
            serif_decision_ms=len(plugin.decision_ms),
            serif_latencies=sum(len(m.latencies) for m in plugin.metrics.values()),
            serif_timeline=sum(len(m.timeline) for m in plugin.metrics.values()),
        )
        for source in SIZE_SOURCES:  # e.g. serif_dask.metrics' telemetry
            sizes.update(source(plugin))
    hist = getattr(scheduler, "_serif_memory", None)
    if hist is not None:
        sizes["serif_memory_samples"] = sum(len(s) for s in hist.samples.values())
    return sizes


def worker_sizes(dask_worker: Worker) -> dict[str, int]:
    """Entry counts of what a run keeps adding to on a worker (``client.run`` this)."""
    state = dask_worker.state
    sizes = {
        "tasks": len(state.tasks),
        "data": len(dask_worker.data),
        "log": len(state.log),
        "stimulus_log": len(state.stimulus_log),
        "transfer_incoming_log": len(dask_worker.transfer_incoming_log),
        "transfer_outgoing_log": len(dask_worker.transfer_outgoing_log),
        "profile_history": len(dask_worker.profile_history),
        "profile_keys": len(dask_worker.profile_keys),
        "digests_total": len(dask_worker.digests_total),
        "digests_max": len(dask_worker.digests_max),
        "server_log": len(dask_worker._deque_handler.deque),
    }
    plugin = dask_worker.plugins.get("serif")
    if plugin is not None:
        sizes.update(
            serif_readers=sum(len(opened) for opened in plugin.readers.values()),
            serif_config_versions=len(plugin.configs),
            serif_models=len(plugin.models.names()),
            serif_inputs=len(plugin.inputs),
            serif_shm=len(plugin.shm),
        )
        from serif_dask import datapath

        sizes["serif_attached"] = len(datapath._attached)
        sizes["serif_buffers"] = len(datapath._buffers)
    return sizes
