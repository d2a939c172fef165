"""The tick clock: configures the run, then starts one tick per due application tick.

The driver is a coroutine on the client's event loop; it never waits on the scheduler's
loop. Its jobs, one module each: preparation before the first tick
(:mod:`serif_dask.prepare`), the tick graph (:mod:`serif_dask.tick`), joint planning in
due order (:mod:`serif_dask.rounds`) and the books every request ends in
(:mod:`serif_dask.accounting`). This module keeps the clock, the run's life (started,
stopped, replaced, scheduler lost) and what it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from distributed.protocol.pickle import dumps, loads

from serif_dask.accounting import BatchTimes, StageTimes, TickLedger
from serif_dask.config import Application, SerifConfig
from serif_dask.credentials import RedisCredentials
from serif_dask.errors import RunRefused
from serif_dask.prepare import (
    Estimators,
    ReadyDataWorkers,
    await_steps,
    data_steps,
    data_workers,
    warm_models,
    warm_up,
)
from serif_dask.records import DecisionTimes, RecordLog, Rotation, summary
from serif_dask.rounds import JOINT_WINDOW_S, PlanOrder, PlanRound
from serif_dask.tick import GRACE_S, StuckWorkers, Tick

logger = logging.getLogger("serif_dask.driver")


@dataclass(frozen=True)
class RunOptions:
    """What ``run`` was asked to do; the edge (CLI or API) resolves every default."""

    duration: float  # seconds; 0 = until stopped
    policy: str
    data_aware: bool
    seed: int
    records_path: Path | None = None
    records_rotation: Rotation | None = None
    on_records: Callable[[list[dict[str, Any]]], None] | None = None
    stop_grace_s: float = 3.0
    redis: dict[str, Any] | None = field(default=None, repr=False)  # nodes and password
    replace: bool = False  # end a live run on the scheduler instead of being refused
    #: A tick still unfinished this long after its last deadline (2 × sla) fails what is
    #: left; at most ``max_inflight_ticks`` ticks run at once (more are skipped).
    tick_grace_s: float = 5.0
    max_inflight_ticks: int = 32
    #: Load every real model on every compute worker before the first tick; off, models
    #: load on first use (a cold start, as a restarted worker sees it).
    warm_models: bool = True


@dataclass(frozen=True)
class AppliedVersion:
    """A config version of the run, as the driver applied it (at a tick boundary)."""

    version: int
    applied_at: float  # wall time of the first tick boundary under it
    policy: str
    data_aware: bool
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Prepared:
    """A new config version made ready (readers opened, new models warm) to switch to."""

    version: int
    config: SerifConfig
    policy: str
    data_aware: bool
    changes: tuple[str, ...]


@dataclass
class RunStats:
    ticks: int = 0
    ticks_late: int = 0
    decision_ms: DecisionTimes = field(default_factory=DecisionTimes)  # bounded
    stages: StageTimes = field(default_factory=StageTimes)  # bounded


class Driver:
    """Runs ticks of every application on a Dask cluster whose plugins are installed."""

    def __init__(self, client: Client, config: SerifConfig, options: RunOptions):
        self.client = client
        self.config = config
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.log = RecordLog(options.records_path, options.records_rotation)
        self.stats = RunStats()
        self.batch_times = BatchTimes()
        self.stop_event = asyncio.Event()
        self.estimators = Estimators(client, config, self.run_id)
        self.stuck = StuckWorkers(client)
        self.ready = ReadyDataWorkers(client, config, self.run_id, self.estimators)
        self.inflight: set[asyncio.Task] = set()  # ticks, and what they started
        self._ticks: set[asyncio.Task] = set()  # the ticks among them
        self.plan_order = PlanOrder()
        self.started = 0.0
        self.scheduler_lost = False
        self.configured = False
        self.replaced_by: str | None = None  # the run that took the scheduler over
        # Live reconfiguration: the version ticks start under, what it runs, and the
        # newest one the scheduler plugin has (plan replies say), prepared off the clock.
        self.version = 1
        self.policy, self.data_aware = options.policy, options.data_aware
        self.versions: list[AppliedVersion] = []
        self.newest_version = 1
        self._preparing: asyncio.Task | None = None
        self._prepared_for = 1  # the version last prepared (applied or not)
        self.capacity: dict[str, Any] = {}  # serif_capacity at the run's end

    def join(self, run_id: str) -> None:
        """Serve another driver's live run (ad-hoc requests only): its id, our estimators."""
        self.run_id = run_id
        self.estimators = Estimators(self.client, self.config, run_id)

    # -- set-up --------------------------------------------------------------------------
    async def configure(self) -> None:
        redis = dict(self.options.redis or {})
        # The password goes to the workers in a plugin the client registers, never to the
        # scheduler plugin, whose config reply any client may ask for.
        password = redis.pop("password", None)
        reply = await self.client.scheduler.serif_configure(
            config=dumps(self.config.without_secrets()),
            run_id=self.run_id,
            policy=self.options.policy,
            data_aware=self.options.data_aware,
            seed=self.options.seed,
            redis=redis or None,
            replace=self.options.replace,
        )
        if reply.get("refused"):
            raise RunRefused(reply["refused"])
        if self.options.redis is not None:  # before any task of the run needs Redis
            await self.client.register_plugin(RedisCredentials(password))
        self.configured = True
        data = await data_workers(self.client)
        await await_steps(self.estimators.fit(data), self.stop_event)
        for name, value in (await self.estimators.keep()).items():
            if reason := getattr(getattr(value, "estimator", value), "reason", None):
                logger.warning("serif: %s", reason)  # one line: no calibration data
            await self.client.scheduler.serif_calibrate(
                app=name, score_prior=list(getattr(value, "score_prior", ()) or ()) or None,
                persistence=getattr(value, "persistence", None), run_id=self.run_id,
            )
        await warm_up(self.client, self.config, self.run_id, self.estimators, data,
                      self.options.warm_models, self.stop_event)
        await self.ready.begin()

    # -- the run's life ------------------------------------------------------------------
    async def run(self, progress: Callable[[RunStats, RecordLog], None] | None = None) -> dict:
        """Tick until the duration is over or :meth:`stop` is called; return the summary."""
        self.log.open()
        watchers = [asyncio.create_task(self._watch_scheduler())]
        try:
            await self.configure()
            watchers.append(asyncio.create_task(self.ready.watch(self.stop_event)))
            await self._clock(progress)
        finally:
            for task in watchers:
                task.cancel()
            if self._preparing is not None:  # a version not applied before the end
                self._preparing.cancel()
                await asyncio.wait([self._preparing])
            await self._drain()
            self.stuck.cancel()
            self.ready.cancel()
            self.log.close()
            if self.configured and not self.scheduler_lost and not self.replaced_by:
                with contextlib.suppress(Exception):  # what the run's compute workers cost
                    self.capacity = await asyncio.wait_for(
                        self.client.scheduler.serif_capacity(), timeout=5)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.client.scheduler.serif_end(run_id=self.run_id), timeout=5)
        return self.summary()

    async def _watch_scheduler(self) -> None:
        """Stop the run as soon as the client loses its scheduler.

        Dask's client then cancels every future and tries to reconnect for its whole
        connect timeout; ticking on meanwhile would only fail tick after tick. The ticks
        in flight record their requests ``scheduler-lost`` and the run ends in order.
        """
        while not self.stop_event.is_set():
            if self.lost_scheduler():
                logger.debug("serif: client status %s: scheduler lost", self.client.status)
                self.stop()
                return
            await asyncio.sleep(0.2)

    def lost_scheduler(self) -> bool:
        if self.client.status not in ("running", "newly-created"):
            self.scheduler_lost = True
        return self.scheduler_lost

    def stop(self) -> None:
        self.stop_event.set()

    def replaced(self, message: str) -> None:
        """Another driver configured the scheduler with ``--replace``: end this run."""
        if self.replaced_by is None:
            self.replaced_by = message.rsplit(" ", 1)[-1]
            logger.warning("serif: run %s: %s; stopping", self.run_id, message)
        self.stop()

    async def _drain(self) -> None:
        """Let in-flight ticks finish: up to their deadlines on a normal end, briefly on stop."""
        if not self.inflight:
            return
        if self.stop_event.is_set():
            timeout = self.options.stop_grace_s
        else:
            timeout = max(2 * a.sla_latency for a in self.config.apps) + GRACE_S
        _, pending = await asyncio.wait(set(self.inflight), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- the clock -----------------------------------------------------------------------
    async def _clock(self, progress: Callable[[RunStats, RecordLog], None] | None) -> None:
        self.started = start = time.time()
        self.versions = [AppliedVersion(1, start, self.policy, self.data_aware)]
        # Per application: its next tick's index, and the (time, index) its ticks are
        # counted from; a new sample-duration counts from the last tick before it.
        index = {a.name: 0 for a in self.config.apps}
        base = {a.name: (start, 0) for a in self.config.apps}
        duration = self.options.duration
        while not self.stop_event.is_set():
            if self._preparing is not None and self._preparing.done():
                await self._switch(index, base)
            apps = self.config.apps
            due = {a.name: base[a.name][0] + (index[a.name] - base[a.name][1])
                   * a.sample_duration for a in apps}
            next_due = min(due.values())
            if duration and next_due >= start + duration:
                break
            wait = next_due - time.time()
            if wait > 0:
                if await self._sleep(wait):
                    break
                continue  # a new config version may be ready: it applies from this tick
            now = time.time()
            # Ticks due together (within JOINT_WINDOW_S) are planned together, in one
            # problem: one plan round, one turn in the planning order.
            members = [a for a in apps if due[a.name] <= now + JOINT_WINDOW_S]
            plan_round = PlanRound(self.plan_order,
                                   functools.partial(self._plan_parts, version=self.version),
                                   len(members))
            for member, app in enumerate(members):
                if now - due[app.name] > min(0.5, app.sample_duration / 2):
                    self.stats.ticks_late += 1
                if len(self._ticks) >= self.options.max_inflight_ticks:
                    self._skip(app, index[app.name], now)
                    plan_round.withdraw(member)
                else:
                    tick = Tick(self, app, index[app.name], now, due[app.name] - start,
                                plan_round, member)
                    task = asyncio.create_task(tick.run())
                    for tasks in (self.inflight, self._ticks):
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                index[app.name] += 1
                self.stats.ticks += 1
            if progress is not None:
                progress(self.stats, self.log)

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less when stopped or a new config version is ready;
        returns whether the run was stopped."""
        stop = asyncio.ensure_future(self.stop_event.wait())
        waiting = {stop}
        if self._preparing is not None:
            waiting.add(self._preparing)
        try:
            await asyncio.wait(waiting, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return self.stop_event.is_set()

    async def _plan_parts(self, parts: list[dict[str, Any]], now: float,
                          version: int = 1) -> list[dict[str, Any]]:
        """One ``serif_plan`` call for a plan round's parts (of one config version)."""
        reply = await self.client.scheduler.serif_plan(
            parts=parts, now=now, started=self.started, run_id=self.run_id, version=version)
        self.stats.decision_ms.append(reply["decision_ms"])
        self.note_version(reply.get("config_version"))
        return reply["parts"]

    # -- live reconfiguration ------------------------------------------------------------
    def note_version(self, newest: int | None) -> None:
        """The scheduler plugin has config version ``newest``: prepare it, off the clock."""
        if newest is None or newest <= self.newest_version:
            return
        self.newest_version = int(newest)
        if self._preparing is None:
            self._start_preparing()

    def _start_preparing(self) -> None:
        self._prepared_for = self.newest_version
        self._preparing = asyncio.ensure_future(self._prepare(self.newest_version))

    async def _prepare(self, version: int) -> _Prepared | None:
        """Fetch ``version`` and make it ready: every data worker opens its readers under
        it and peeks once, and compute workers load its new real models (as before the
        first tick), so that the first tick under it pays nothing extra."""
        reply = await self.client.scheduler.serif_get_config(run_id=self.run_id,
                                                             version=version)
        if reply.get("config") is None:
            logger.warning("serif: config version %d of run %s is gone; skipped", version,
                           self.run_id)
            return None
        config: SerifConfig = loads(reply["config"])
        data = await data_workers(self.client)
        steps = data_steps(self.client, config, self.run_id, self.estimators, data, version)
        old = {(a.name, p.name): p for a in self.config.apps for p in a.model_profiles}
        new_models = [f"{a.name}/{p.name}" for a in config.apps for p in a.model_profiles
                      if not p.use_profile and old.get((a.name, p.name)) != p]
        try:
            await warm_models(self.client, self.run_id, steps, self.options.warm_models,
                              self.stop_event, version=version, only=new_models)
        finally:
            for fut in steps.values():
                fut.release()
        return _Prepared(version, config, reply["policy"], bool(reply["data_aware"]),
                         tuple(reply.get("changes") or ()))

    async def _switch(self, index: dict[str, int], base: dict[str, tuple[float, int]]) -> None:
        """At a tick boundary: ticks start under the prepared version from now on.

        Ticks in flight finish under the version they started with (their config, their
        plans, their records' ``version``). An application whose sample-duration changed
        counts its next tick from its last one.
        """
        task, self._preparing = self._preparing, None
        assert task is not None
        try:
            prepared = task.result()
        except Exception as exc:
            logger.warning("serif: could not prepare config version %d: %s",
                           self.newest_version, exc)
            prepared = None
        if prepared is not None and prepared.version > self.version:
            old = {a.name: a for a in self.config.apps}
            for app in prepared.config.apps:
                before = old[app.name]
                if app.sample_duration != before.sample_duration and index[app.name]:
                    t0, i0 = base[app.name]
                    last = t0 + (index[app.name] - 1 - i0) * before.sample_duration
                    base[app.name] = (last, index[app.name] - 1)
            self.config = prepared.config
            self.estimators.config = self.ready.config = prepared.config
            self.ready.version = prepared.version
            self.version = prepared.version
            self.policy, self.data_aware = prepared.policy, prepared.data_aware
            applied = AppliedVersion(prepared.version, time.time(), prepared.policy,
                                     prepared.data_aware, prepared.changes)
            self.versions.append(applied)
            logger.info("serif: run %s now at config version %d (%s)", self.run_id,
                           applied.version, "; ".join(applied.changes) or "no change")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.scheduler.serif_applied(
                    run_id=self.run_id, version=prepared.version), timeout=10)
        if self.newest_version > self._prepared_for:  # another came meanwhile
            self._start_preparing()

    def _skip(self, app: Application, tick: int, arrival: float) -> None:
        """Too many ticks in flight: this one is not started, its requests fail."""
        groups = np.arange(self.config.data.num_groups, dtype=np.int64)
        logger.warning("serif: %d ticks in flight; tick %d of %s skipped",
                       len(self._ticks), tick, app.name)
        ledger = TickLedger(app, tick, arrival, groups, self.log, self.options.on_records,
                            version=self.version)
        ledger.fail(groups, "tick-skipped")

    # -- what it reports -----------------------------------------------------------------
    async def report(self, app: Application, ledger: TickLedger) -> None:
        """Send one tick's outcomes to the scheduler plugin, for live metrics."""
        try:
            await asyncio.wait_for(
                self.client.scheduler.serif_report(
                    app=app.name, run_id=self.run_id, batches=self.batch_times.take(),
                    **ledger.outcomes(),
                ),
                timeout=10,
            )
        except Exception:
            logger.debug("serif: could not report tick metrics", exc_info=True)

    def summary(self) -> dict[str, Any]:
        """The run's summary; ``policy``/``data_aware`` are its final version's."""
        return summary(
            self.log, policy=self.policy, data_aware=self.data_aware,
            ticks=self.stats.ticks, decision_ms=self.stats.decision_ms,
            extra={
                "version": self.version,
                "versions": [dataclasses.asdict(v) | {"changes": list(v.changes)}
                             for v in self.versions],
                "ticks_late": self.stats.ticks_late,
                "seed": self.options.seed,
                "run_id": self.run_id,
                "wall_s": time.time() - self.started if self.started else 0.0,
                "batch_latency": self.batch_times.summary(),
                "tick_ms": self.stats.stages.result(),
                "compute_workers": self.capacity.get(
                    "compute_workers", {"min": 0, "max": 0, "mean": 0.0}),
                "worker_seconds": self.capacity.get("worker_seconds", 0.0),
            },
        )
