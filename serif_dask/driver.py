"""The tick clock: one small Dask graph per due application tick.

read (per server × modality) → peek (per server) → plan (the scheduler plugin's handler)
→ score (per worker × model, pinned to GPU workers) → record. The number of tasks in a
tick depends on servers, modalities, workers and models, never on the number of groups.
The driver is a coroutine on the client's event loop; it never waits on the scheduler's
loop and accounts for every request, whatever happens to its tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, Future
from distributed.protocol.pickle import dumps, loads

from serif_dask.config import Application, SerifConfig
from serif_dask.credentials import RedisCredentials
from serif_dask.errors import RunRefused
from serif_dask.membership import membership
from serif_dask.records import (
    PEEK_MODEL,
    Chunk,
    DecisionTimes,
    RecordLog,
    Rotation,
    completed_utility,
    summary,
)
from serif_dask.tasks import (
    export_task,
    fit_task,
    peek_task,
    read_task,
    score_task,
    warm_data_task,
    warm_models_task,
)

logger = logging.getLogger("serif_dask.driver")

#: Seconds past a tick's last deadline (2 × sla) the driver still waits for its batches.
GRACE_S = 30.0
#: Planning assumes a tick's plan happens this long after its samples are taken (read and
#: peek); a constant, so that decisions stay a pure function of config and seed.
PIPELINE_S = 0.1
#: A worker still running a timed-out tick's task this long after the tick's deadline is
#: restarted through its nanny.
STUCK_S = 30.0
#: Preparation (SneakPeek fit, readers opened, models loaded) still running after this
#: many seconds is named in one line; after the second bound the run starts without it.
PREPARE_WARN_S = 60.0
#: Applications whose ticks fall due within this many seconds of each other are planned
#: together, in one problem.
JOINT_WINDOW_S = 0.01
PREPARE_LIMIT_S = 600.0


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


@dataclass
class RunStats:
    ticks: int = 0
    ticks_late: int = 0
    decision_ms: DecisionTimes = field(default_factory=DecisionTimes)  # bounded
    #: "app/model" -> [planned seconds, measured seconds, requests] over its batches
    latency_drift: dict[str, list] = field(default_factory=dict)


@dataclass
class _TickProgress:
    """Where a tick stands, for a truthful reason when its deadline passes."""

    stage: str = "read"  # read, peek, plan, score
    reads: dict[str, list[tuple[str, Future]]] = field(default_factory=dict)
    #: Per group, the labels the reads carried (-1: unknown), once the peeks are in: kept
    #: on failed records too, so that what a failure cost shows as for a drop.
    labels: np.ndarray | None = None


@dataclass
class _TickContext:
    """What a tick's later steps (scoring, re-planning) need from its earlier ones."""

    app: Application
    tick: int
    arrival: float  # wall time the samples were taken
    logical: float  # the same on the run's logical clock
    reads: dict[str, list[tuple[str, Future]]]
    data: dict[str, dict[str, Any]]
    host_node: dict[str, str]
    input_node: dict[str, np.ndarray]
    futures: list[Future]
    labels: np.ndarray  # per group, from the peeks (-1: unknown)
    attempt: int = 0


class _PlanRound:
    """The ticks due together: their requests are planned in one ``serif_plan`` call.

    Each member tick brings its part (:meth:`plan`) or leaves without one (:meth:`withdraw`:
    nothing left to plan, or it failed); once every member has done either, one call plans
    all parts, in the round's turn of the driver's planning order, and each member gets its
    own reply. Rounds plan one after another, in the order they fell due, so the plugin's
    bookings depend only on config and seed.
    """

    def __init__(self, driver: Driver, seq: int, members: int) -> None:
        self.driver = driver
        self.seq = seq
        self.members = members
        self.parts: dict[int, dict[str, Any]] = {}
        self.now: dict[int, float] = {}
        self.left: set[int] = set()
        self.replies: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self.done = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def plan(self, member: int, part: dict[str, Any], now: float) -> dict[str, Any]:
        self.parts[member], self.now[member] = part, now
        self._maybe_start()
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.replies[member]

    def withdraw(self, member: int) -> None:
        if member in self.parts or member in self.left:
            return
        self.left.add(member)
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self._task is None and len(self.parts) + len(self.left) >= self.members:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        driver = self.driver
        try:
            await driver._wait_turn(self.seq)
            members = sorted(self.parts)
            if members:
                reply = await driver.client.scheduler.serif_plan(
                    parts=[self.parts[m] for m in members], now=max(self.now.values()),
                    started=driver.started, run_id=driver.run_id,
                )
                driver.stats.decision_ms.append(reply["decision_ms"])
                self.replies = dict(zip(members, reply["parts"], strict=True))
        except BaseException as exc:  # every member sees it; the round itself ends here
            self.error = exc
        finally:
            await driver._pass_turn(self.seq)
            self.done.set()


def peek_modality(config: SerifConfig, app: Application) -> str:
    """The modality SneakPeek looks at: configured, else the app's smallest input."""
    return config.peek_modality(app)


class Driver:
    """Runs ticks of every application on a Dask cluster whose plugins are installed."""

    def __init__(self, client: Client, config: SerifConfig, options: RunOptions):
        self.client = client
        self.config = config
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.log = RecordLog(options.records_path, options.records_rotation)
        self.stats = RunStats()
        self.stop_event = asyncio.Event()
        self.estimators: dict[str, Future] = {}
        self._estimator_values: dict[str, Any] = {}
        self.inflight: set[asyncio.Task] = set()
        self._ticks: set[asyncio.Task] = set()  # the ticks among them
        self._watchers: set[asyncio.Task] = set()  # restarts of workers stuck in a task
        self._batch_times: list[list] = []  # [score key, measured s], for the next report
        self.started = 0.0
        self.scheduler_lost = False
        self.configured = False
        self.replaced_by: str | None = None  # the run that took the scheduler over
        # Plans are made in tick order (due time, then application), whatever order their
        # reads finish in: the planner's state then depends only on config and seed.
        self._next_seq = 0
        self._turn = 0
        self._turn_changed = asyncio.Condition()
        self._skipped: set[int] = set()

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
        data = await self._data_workers()
        steps: dict[str, Future] = {}
        for app in self.config.apps:
            mod = peek_modality(self.config, app)
            servers = [s for s in self.config.server_names if self.config.groups_of(s, mod)]
            server = next((s for s in servers if s in data), None)
            if server is None:
                continue
            self.estimators[app.name] = steps[f"fitting SneakPeek of {app.name} on {server}"] = (
                self.client.submit(
                    fit_task, self.run_id, app.name, mod, server,
                    key=f"serif-fit-{self.run_id}-{app.name}", workers=[data[server]],
                    allow_other_workers=False, pure=False,
                )
            )
        await self._await_steps(steps)
        for name, fut in self.estimators.items():
            if fut.status != "finished":
                continue
            # Kept here too: small, and put back on the data workers should it be lost.
            value = self._estimator_values[name] = await fut
            if reason := getattr(getattr(value, "estimator", value), "reason", None):
                logger.warning("serif: %s", reason)  # one line: no calibration data
            await self.client.scheduler.serif_calibrate(
                app=name, score_prior=list(getattr(value, "score_prior", ()) or ()) or None,
                persistence=getattr(value, "persistence", None), run_id=self.run_id,
            )
        await self._warm_up(data)

    async def _warm_up(self, data: dict[str, str]) -> None:
        """Pay every one-off cost before the clock starts, so the first tick is like any.

        Each data worker opens its readers and peeks once; each compute worker loads the
        run's real models and runs one forward. Models loaded here are reported warm to the
        scheduler plugin before the first plan.
        """
        steps: dict[str, Future] = {}
        for app in self.config.apps:
            peek_mod = peek_modality(self.config, app)
            mods = sorted({p.modality for p in app.model_profiles} | {peek_mod})
            estimator = self.estimators.get(app.name)
            if estimator is not None and estimator.status != "finished":
                estimator = None
            for server, address in data.items():
                first_group = {m: self.config.groups_of(server, m)[0] for m in mods
                               if self.config.groups_of(server, m)}
                if not first_group:
                    continue
                steps[f"opening readers of {app.name} on data@{server}"] = self.client.submit(
                    warm_data_task, self.run_id, app.name, server, first_group,
                    estimator, peek_mod,
                    key=f"serif-warm-{self.run_id}-{app.name}-{server}", workers=[address],
                    allow_other_workers=False, pure=False,
                )
        compute = {}
        if self.options.warm_models and any(
            not p.use_profile for a in self.config.apps for p in a.model_profiles
        ):
            compute = {w["address"]: w["name"] for w in await self._workers()
                       if w["role"] == "compute"}
        models = {}
        for address, name in compute.items():
            models[address] = self.client.submit(
                warm_models_task, self.run_id, key=f"serif-warm-{self.run_id}-{name}",
                workers=[address], allow_other_workers=False, resources={"GPU": 1},
                pure=False,
            )
            steps[f"loading models on {name}"] = models[address]
        await self._await_steps(steps)
        for address, fut in models.items():
            if fut.status == "finished":
                await self.client.scheduler.serif_warm(
                    worker=address, node=None, warm=await fut, cold=[])
        for fut in steps.values():
            fut.release()

    async def _await_steps(self, steps: dict[str, Future]) -> None:
        """Wait for preparation steps; one line for each that fails, and one line naming
        those still running after ``PREPARE_WARN_S`` (then wait up to ``PREPARE_LIMIT_S``).
        """
        if not steps:
            return
        waiting = {asyncio.ensure_future(self._settled(f)): what for what, f in steps.items()}
        started = time.monotonic()
        warned = False
        while waiting:
            left = PREPARE_LIMIT_S - (time.monotonic() - started)
            if left <= 0 or self.stop_event.is_set():
                break
            timeout = left if warned else min(left, PREPARE_WARN_S - (time.monotonic() - started))
            done, _ = await asyncio.wait(waiting, timeout=max(timeout, 0.0))
            for task in done:
                what = waiting.pop(task)
                error = task.result()
                if error is not None:
                    logger.warning("serif: %s failed: %s", what, error)
            if waiting and not done and not warned:
                warned = True
                logger.warning("serif: still preparing after %.0f s: %s", PREPARE_WARN_S,
                               "; ".join(sorted(waiting.values())))
        for task, what in waiting.items():
            task.cancel()
            logger.warning("serif: %s did not finish in %.0f s; starting without it", what,
                           PREPARE_LIMIT_S)

    async def _workers(self) -> list[dict[str, Any]]:
        """Live workers, kept current by the plugin's pushed events (no round trip)."""
        return list((await membership(self.client)).workers.values())

    async def _wait(self, waiting: Any, timeout: float) -> set:
        """``asyncio.wait`` for the first of ``waiting``, the timeout, or a worker change."""
        change = (await membership(self.client)).changed()
        try:
            done, _ = await asyncio.wait([*waiting, change], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
        done.discard(change)
        return done

    async def _data_workers(self) -> dict[str, str]:
        return {w["node"]: w["address"] for w in await self._workers() if w["role"] == "data"}

    # -- the clock -----------------------------------------------------------------------
    async def run(self, progress: Callable[[RunStats, RecordLog], None] | None = None) -> dict:
        """Tick until the duration is over or :meth:`stop` is called; return the summary."""
        self.log.open()
        watch = asyncio.create_task(self._watch_scheduler())
        try:
            await self.configure()
            await self._clock(progress)
        finally:
            watch.cancel()
            await self._drain()
            for task in list(self._watchers):
                task.cancel()
            self.log.close()
            if self.configured and not self.scheduler_lost and not self.replaced_by:
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
            if self._lost_scheduler():
                logger.debug("serif: client status %s: scheduler lost", self.client.status)
                self.stop()
                return
            await asyncio.sleep(0.2)

    def _lost_scheduler(self) -> bool:
        if self.client.status not in ("running", "newly-created"):
            self.scheduler_lost = True
        return self.scheduler_lost

    def stop(self) -> None:
        self.stop_event.set()

    def _replaced(self, message: str) -> None:
        """Another driver configured the scheduler with ``--replace``: end this run."""
        if self.replaced_by is None:
            self.replaced_by = message.rsplit(" ", 1)[-1]
            logger.warning("serif: run %s: %s; stopping", self.run_id, message)
        self.stop()

    async def _clock(self, progress: Callable[[RunStats, RecordLog], None] | None) -> None:
        apps = self.config.apps
        self.started = start = time.time()
        index = [0] * len(apps)
        duration = self.options.duration
        while not self.stop_event.is_set():
            due = [start + index[i] * a.sample_duration for i, a in enumerate(apps)]
            next_due = min(due)
            if duration and next_due >= start + duration:
                break
            wait = next_due - time.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(self.stop_event.wait(), timeout=wait)
                    break
                except TimeoutError:
                    pass
            now = time.time()
            # Ticks due together (within JOINT_WINDOW_S) are planned together, in one
            # problem: one plan round, one turn in the planning order.
            members = [i for i in range(len(apps)) if due[i] <= now + JOINT_WINDOW_S]
            plan_round = _PlanRound(self, self._next_seq, len(members))
            self._next_seq += 1
            for member, i in enumerate(members):
                app = apps[i]
                if now - due[i] > min(0.5, app.sample_duration / 2):
                    self.stats.ticks_late += 1
                if len(self._ticks) >= self.options.max_inflight_ticks:
                    self._skip(app, index[i], now)
                    plan_round.withdraw(member)
                else:
                    task = asyncio.create_task(
                        self._tick(app, index[i], now, due[i] - start, plan_round, member)
                    )
                    for tasks in (self.inflight, self._ticks):
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                index[i] += 1
                self.stats.ticks += 1
            if progress is not None:
                progress(self.stats, self.log)

    def _skip(self, app: Application, tick: int, arrival: float) -> None:
        """Too many ticks in flight: this one is not started, its requests fail."""
        groups = np.arange(self.config.data.num_groups, dtype=np.int64)
        logger.warning("serif: %d ticks in flight; tick %d of %s skipped",
                       len(self._ticks), tick, app.name)
        chunk = self._chunk(app, tick, groups, arrival, "failed", "tick-skipped")
        self.log.add(chunk)
        if self.options.on_records is not None:
            self.options.on_records(list(chunk.rows()))

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

    # -- one tick ------------------------------------------------------------------------
    async def _wait_turn(self, seq: int) -> None:
        async with self._turn_changed:
            await self._turn_changed.wait_for(lambda: self._turn >= seq)

    async def _pass_turn(self, seq: int) -> None:
        async with self._turn_changed:
            if self._turn == seq:
                self._turn = seq + 1
                self._turn_changed.notify_all()
            elif self._turn < seq:  # an earlier tick still holds its turn: queue ours
                self._skipped.add(seq)
            while self._turn in self._skipped:
                self._skipped.discard(self._turn)
                self._turn += 1
                self._turn_changed.notify_all()

    async def _tick(
        self, app: Application, tick: int, arrival: float, logical: float,
        plan_round: _PlanRound, member: int,
    ) -> None:
        groups = np.arange(self.config.data.num_groups, dtype=np.int64)
        pending = np.ones(groups.size, dtype=bool)  # not yet recorded

        recorded: list[Chunk] = []

        def record(chunk: Chunk) -> None:
            pending[chunk.group] = False
            recorded.append(chunk)
            self.log.add(chunk)
            if self.options.on_records is not None:
                self.options.on_records(list(chunk.rows()))

        def fail(which: np.ndarray, reason: str, model: str = "", worker: str = "") -> None:
            which = which[pending[which]]
            if which.size:
                chunk = self._chunk(app, tick, which, arrival, "failed", reason, model, worker)
                if progress.labels is not None:
                    chunk.label = progress.labels[which]
                record(chunk)

        futures: list[Future] = []
        progress = _TickProgress()
        limit = 2 * app.sla_latency + self.options.tick_grace_s
        try:
            await asyncio.wait_for(
                self._tick_body(app, tick, arrival, logical, plan_round, member, groups,
                                pending, record, fail, futures, progress),
                timeout=max(0.0, arrival + limit - time.time()),
            )
        except TimeoutError:
            self._timed_out(app, tick, progress, futures, groups[pending], fail)
        except asyncio.CancelledError:  # stopped, or futures cancelled with the scheduler
            fail(groups, "scheduler-lost" if self._lost_scheduler() else "stopped")
            raise
        except Exception as exc:
            if self._lost_scheduler():
                self.stop()
                fail(groups, "scheduler-lost")
            elif str(exc).startswith("run-changed"):
                self._replaced(str(exc))
                fail(groups, "run-replaced")
            else:
                logger.exception("serif: tick %d of %s failed", tick, app.name)
                fail(groups, f"tick-error: {type(exc).__name__}: {exc}")
        finally:
            plan_round.withdraw(member)  # no-op once this tick's requests were planned
            fail(groups, "unaccounted")  # nothing recorded yet is failed, never lost
            for fut in futures:
                fut.release()
            if not self.scheduler_lost:
                await self._report(app, recorded)

    def _take_batch_times(self) -> list[list]:
        times, self._batch_times = self._batch_times, []
        return times

    def _timed_out(
        self, app: Application, tick: int, progress: _TickProgress, futures: list[Future],
        left: np.ndarray, fail: Callable[..., None],
    ) -> None:
        """The tick's deadline passed: fail what is left with the step it waited for.

        A group whose read has not returned fails ``read-timeout``; the others fail with
        the step the tick was in (``peek-timeout``, ``plan-timeout``, ``score-timeout``).
        The tick's tasks are cancelled; a worker still running one of them after
        ``STUCK_S`` is restarted through its nanny.
        """
        for mod, reads in progress.reads.items():
            for server, fut in reads:
                if fut.status != "finished":
                    owned = np.asarray(self.config.groups_of(server, mod), dtype=np.int64)
                    fail(owned, "read-timeout")
        logger.warning("serif: tick %d of %s passed its deadline in its %s step; %d requests "
                       "failed", tick, app.name, progress.stage, left.size)
        fail(left, f"{progress.stage}-timeout")
        unfinished = [f for f in futures if f.status not in ("finished", "error", "cancelled")]
        if unfinished:
            self._watch_stuck({f.key for f in unfinished})
            cancel = asyncio.ensure_future(self.client.cancel(unfinished, asynchronous=True))
            cancel.add_done_callback(lambda t: t.cancelled() or t.exception())  # best effort

    def _watch_stuck(self, keys: set[str]) -> None:
        task = asyncio.ensure_future(self._restart_if_stuck(keys))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _restart_if_stuck(self, keys: set[str]) -> None:
        """Restart (through its nanny) a worker still running a timed-out tick's task."""
        await asyncio.sleep(STUCK_S)
        try:
            processing = await self.client.scheduler.processing()
        except Exception:
            return
        stuck = [w for w, running in processing.items() if keys & set(running)]
        for address in stuck:
            logger.warning("serif: worker %s still runs a task of a timed-out tick after "
                           "%.0f s; restarting it", address, STUCK_S)
        if stuck:
            with contextlib.suppress(Exception):
                await self.client.restart_workers(stuck, timeout=60, raise_for_error=False)

    async def _report(self, app: Application, chunks: list[Chunk]) -> None:
        """Send one tick's outcomes to the scheduler plugin, for live metrics."""
        outcomes: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for c in chunks:
            outcomes[c.outcome] = outcomes.get(c.outcome, 0) + len(c)
            for r in c.reason:
                if r:
                    key = r.split(":", 1)[0]
                    reasons[key] = reasons.get(key, 0) + 1
        done = [c for c in chunks if c.outcome == "completed"]
        try:
            await asyncio.wait_for(
                self.client.scheduler.serif_report(
                    app=app.name, outcomes=outcomes, reasons=reasons,
                    utility=float(sum(c.utility.sum() for c in chunks)),
                    deadline_met=int(sum(c.deadline_met.sum() for c in done)),
                    latencies=[float(x) for c in done for x in c.latency],
                    run_id=self.run_id, batches=self._take_batch_times(),
                ),
                timeout=10,
            )
        except Exception:
            logger.debug("serif: could not report tick metrics", exc_info=True)

    async def _tick_body(
        self, app: Application, tick: int, arrival: float, logical: float,
        plan_round: _PlanRound, member: int, groups: np.ndarray, pending: np.ndarray,
        record: Callable[[Chunk], None], fail: Callable[..., None], futures: list[Future],
        progress: _TickProgress,
    ) -> None:
        config, client = self.config, self.client
        workers = await self._workers()
        data = {w["node"]: w for w in workers if w["role"] == "data"}
        peek_mod = peek_modality(config, app)
        mods = sorted({p.modality for p in app.model_profiles} | {peek_mod})
        shared = {
            m: any(p.modality == m and not p.use_profile for p in app.model_profiles)
            for m in mods
        }
        reads: dict[str, list[tuple[str, Future]]] = {m: [] for m in mods}
        progress.reads = reads
        input_node = {m: np.full(groups.size, "", dtype=object) for m in mods}
        for mod in mods:
            for server in config.server_names:
                owned = np.asarray(config.groups_of(server, mod), dtype=np.int64)
                if owned.size == 0:
                    continue
                worker = data.get(server)
                if worker is None:
                    fail(owned, "reader-lost")
                    continue
                input_node[mod][owned] = worker["host_node"]
                fut = client.submit(
                    read_task, self.run_id, app.name, mod, server, owned.tolist(), tick,
                    mod == peek_mod, shared[mod],
                    key=f"serif-read-{self.run_id}-{app.name}-{tick}-{server}-{mod}",
                    workers=[worker["address"]], allow_other_workers=False, pure=False,
                )
                futures.append(fut)
                reads[mod].append((server, fut))

        scores = np.full((groups.size, len(app.prior)), np.nan)
        progress.stage = "peek"
        estimator = await self._estimator(app, data)
        peeks: dict[str, Future] = {}
        if estimator is not None:
            for server, fut in reads[peek_mod]:
                peeks[server] = client.submit(
                    peek_task, fut, estimator, len(app.prior),
                    key=f"serif-peek-{self.run_id}-{app.name}-{tick}-{server}",
                    workers=[data[server]["address"]], allow_other_workers=False, pure=False,
                )
            futures.extend(peeks.values())
        # A late look is worth nothing: plan with the prior rather than wait past 2 × sla.
        deadline = time.monotonic() + 2 * app.sla_latency
        results = []
        if peeks:  # the peeks wait for these reads anyway: watch them for a dead worker
            for server in await self._await_reads(app, tick, reads, peek_mod, data, fail,
                                                  deadline):
                with contextlib.suppress(Exception):
                    await client.cancel([peeks.pop(server)], asynchronous=True)
            results = await self._gather_peeks(app, tick, list(peeks.values()), deadline)
        labels = np.full(groups.size, -1, dtype=np.int64)
        for result in results:
            scores[result["groups"][result["ok"]]] = result["scores"][result["ok"]]
            labels[result["groups"]] = result["labels"]
        progress.labels = labels
        if all(p.modality == peek_mod for p in app.model_profiles):
            # no model could serve a group whose only input failed: do not plan it
            by_reason: dict[str, list[int]] = {}
            for result in results:
                for group, reason in result.get("errors", {}).items():
                    by_reason.setdefault(reason, []).append(int(group))
            for reason, which in by_reason.items():
                fail(np.asarray(which, dtype=np.int64), reason)

        live = groups[pending]
        if live.size == 0:
            return
        progress.stage = "plan"
        plan = await plan_round.plan(member, {
            "app": app.name, "tick": tick, "groups": live.tolist(),
            "arrival": [logical] * live.size, "scores": dumps(scores[live]),
            "input_node": {m: input_node[m][live].tolist() for m in mods},
        }, logical + PIPELINE_S)
        planned = time.time()
        pi = np.asarray(loads(plan["pi"]), dtype=float)
        single = None if plan["pi_single"] is None else np.asarray(loads(plan["pi_single"]))
        self.log.add_beliefs(app.name, labels[live], pi, np.asarray(app.prior, dtype=float),
                             single)
        dropped = np.asarray(plan["dropped"], dtype=np.int64)
        if dropped.size:  # labels known from the peek are kept: a drop's lost utility shows
            chunk = self._chunk(app, tick, dropped, arrival, "dropped", plan["drop_reason"])
            chunk.label = labels[dropped]
            record(chunk)
        answered = np.asarray(plan["answered"]["groups"], dtype=np.int64)
        if answered.size:
            record(self._answered(app, tick, arrival, planned, answered, labels[answered],
                                  np.asarray(plan["answered"]["prediction"], dtype=np.int64)))
        pi_by_group = np.full((groups.size, pi.shape[1]), np.nan)
        pi_by_group[live] = pi

        host_node = {w["address"]: w["host_node"] for w in workers}
        ctx = _TickContext(app, tick, arrival, logical, reads, data, host_node,
                           input_node, futures, labels)
        progress.stage = "score"
        batches = self._submit_batches(ctx, plan["batches"])
        await self._collect(ctx, batches, pi_by_group, record, fail)

    async def _estimator(self, app: Application, data: dict[str, dict[str, Any]]) -> Any:
        """The app's SneakPeek estimator future; put back on the data workers if lost.

        The fit task is pinned to one data worker: if every worker holding its result dies,
        Dask would recompute it there, wait in ``no-worker`` for ever, and hold every peek
        back. The driver keeps the (small) fitted estimator and scatters it again instead.
        """
        fut = self.estimators.get(app.name)
        if fut is None or fut.status == "finished":
            return fut
        value = self._estimator_values.get(app.name)
        if value is None or not data:
            return None
        with contextlib.suppress(Exception):
            await self.client.cancel([fut], asynchronous=True)
        logger.warning("serif: SneakPeek estimator of %s lost with its data worker; "
                       "scattering it again", app.name)
        try:  # bounded: a worker in the list may be dying too (this tick then peeks nothing)
            live = [w["address"] for w in await self._workers() if w["role"] == "data"]
            fut = await asyncio.wait_for(
                self.client.scatter(value, workers=live, broadcast=True, hash=False,
                                    asynchronous=True),
                timeout=2 * app.sla_latency,
            )
        except Exception as exc:
            logger.warning("serif: could not scatter the estimator of %s: %r", app.name, exc)
            return None
        self.estimators[app.name] = fut
        return fut

    async def _gather_peeks(
        self, app: Application, tick: int, peeks: list[Future], deadline: float
    ) -> list[dict[str, Any]]:
        """The peeks that finish by the deadline; stop waiting once the estimator is lost.

        Only finished peeks are gathered, so a peek stuck behind a lost dependency never
        holds the tick; its groups are planned with their current belief instead.
        """
        waiting = {asyncio.ensure_future(self._settled(f)) for f in peeks}
        try:
            while waiting:
                timeout = min(0.5, deadline - time.monotonic())
                estimator = self.estimators.get(app.name)
                if timeout <= 0 or estimator is None or estimator.status != "finished":
                    logger.warning("serif: peek of %s tick %d %s", app.name, tick,
                                   "timed out" if timeout <= 0 else "lost its estimator")
                    break
                _, waiting = await asyncio.wait(waiting, timeout=timeout)
        finally:
            for task in waiting:
                task.cancel()
        done = [f for f in peeks if f.status == "finished"]
        if not done:
            return []
        try:  # a finished peek's data may be lost right now, with its worker
            return await asyncio.wait_for(
                self.client.gather(done, errors="skip", asynchronous=True),
                timeout=max(0.1, deadline - time.monotonic()),
            )
        except TimeoutError:
            return []

    async def _await_reads(
        self, app: Application, tick: int, reads: dict[str, list[tuple[str, Future]]],
        mod: str, data: dict[str, dict[str, Any]], fail: Callable[..., None], deadline: float,
    ) -> set[str]:
        """Wait for a tick's reads of ``mod``; fail the groups of those whose worker is gone.

        A read pinned to a dead worker would wait in ``no-worker`` for ever, and the peeks
        and score batches that need it with it. Its groups fail ``reader-lost`` (a read
        that erred: ``reader-error``), it is cancelled and taken out of ``reads``, and the
        tick goes on with the other servers. Returns the servers whose reads were lost.
        (Reads of other modalities are watched by :meth:`_collect`, through the batches.)
        """
        waiting = {asyncio.ensure_future(self._settled(f)): server for server, f in reads[mod]}
        lost: dict[str, str] = {}  # server -> reason
        try:
            while waiting:
                timeout = min(0.5, deadline - time.monotonic())
                if timeout <= 0:
                    # Past 2 × sla a request earns nothing: a read still running is a
                    # stuck sensor or server, and the batches must not wait for it.
                    lost.update(dict.fromkeys(waiting.values(), "read-timeout"))
                    self._watch_stuck({f.key for s, f in reads[mod] if s in lost})
                    break
                done = await self._wait(waiting, timeout)
                for task in done:
                    server = waiting.pop(task)
                    error = task.result()
                    if error is not None:
                        reason = "reader-lost" if "KilledWorker" in error else "reader-error"
                        lost[server] = f"{reason}: {error}"[:200]
                if waiting:
                    alive = {w["address"] for w in await self._workers()}
                    for task, server in list(waiting.items()):
                        if data[server]["address"] not in alive:
                            task.cancel()
                            del waiting[task]
                            lost[server] = "reader-lost"
        finally:
            for task in waiting:
                task.cancel()
        for server, reason in lost.items():
            fut = next(f for s, f in reads[mod] if s == server)
            reads[mod] = [(s, f) for s, f in reads[mod] if s != server]
            with contextlib.suppress(Exception):
                await self.client.cancel([fut], asynchronous=True)
            owned = np.asarray(self.config.groups_of(server, mod), dtype=np.int64)
            logger.warning("serif: %s read of %s tick %d on %s failed (%s); %d requests",
                           mod, app.name, tick, server, reason, owned.size)
            fail(owned, reason)
        return set(lost)

    def _exports(
        self, app: Application, tick: int, modality: str, batch: dict[str, Any],
        reads: dict[str, list[tuple[str, Future]]], data: dict[str, dict[str, Any]],
        host_node: dict[str, str], futures: list[Future],
    ) -> list[Future]:
        """Inputs whose data node is not the batch worker's node go through Redis."""
        exports = []
        groups = np.asarray(batch["groups"], dtype=np.int64)
        for server, read in reads[modality]:
            if data[server]["host_node"] == host_node.get(batch["worker"]):
                continue
            owned = np.asarray(self.config.groups_of(server, modality), dtype=np.int64)
            mine = groups[np.isin(groups, owned)]
            if mine.size == 0:
                continue
            fut = self.client.submit(
                export_task, read, mine.tolist(), 2 * app.sla_latency + GRACE_S,
                key=f"serif-export-{self.run_id}-{app.name}-{tick}-{server}-{batch['key']}",
                workers=[data[server]["address"]], allow_other_workers=False, pure=False,
            )
            futures.append(fut)
            exports.append(fut)
        return exports

    def _submit_batches(
        self, ctx: _TickContext, plan_batches: list[dict[str, Any]]
    ) -> dict[Future, dict[str, Any]]:
        """One score task per (worker, model) batch, pinned to its GPU worker."""
        app, batches = ctx.app, {}
        for batch in plan_batches:
            profile = next(p for p in app.model_profiles if p.name == batch["model"])
            exports = []
            if not profile.use_profile:
                exports = self._exports(app, ctx.tick, profile.modality, batch, ctx.reads,
                                        ctx.data, ctx.host_node, ctx.futures)
            fut = self.client.submit(
                score_task, self.run_id, app.name, batch["model"], batch["groups"],
                [f for _, f in ctx.reads[profile.modality]], ctx.tick, exports,
                key=batch["key"], workers=[batch["worker"]], allow_other_workers=False,
                resources={"GPU": 1}, priority=int(round(batch["priority"] * 1000)),
                pure=False,
            )
            ctx.futures.append(fut)
            # The data workers whose results this batch waits for (reads and exports).
            batch["modality"] = profile.modality
            batch["sources"] = {s: ctx.data[s]["address"] for s, _ in ctx.reads[profile.modality]}
            batches[fut] = batch
        return batches

    async def _replan(
        self, ctx: _TickContext, groups: np.ndarray
    ) -> tuple[dict[Future, dict[str, Any]], np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Plan a lost worker's requests again on the survivors; returns (batches, dropped,
        (answered from the peek, their predictions))."""
        ctx.attempt += 1
        now = time.time() - self.started
        plan = await self.client.scheduler.serif_plan(
            app=ctx.app.name, tick=ctx.tick, groups=groups.tolist(),
            arrival=[ctx.logical] * groups.size, scores=None,
            input_node={m: nodes[groups].tolist() for m, nodes in ctx.input_node.items()},
            now=max(now, ctx.logical + PIPELINE_S), started=self.started, attempt=ctx.attempt,
            run_id=self.run_id,
        )
        self.stats.decision_ms.append(plan["decision_ms"])
        answered = plan["answered"]
        return (self._submit_batches(ctx, plan["batches"]),
                np.asarray(plan["dropped"], dtype=np.int64),
                (np.asarray(answered["groups"], dtype=np.int64),
                 np.asarray(answered["prediction"], dtype=np.int64)))

    async def _collect(
        self, ctx: _TickContext, batches: dict[Future, dict[str, Any]], pi: np.ndarray,
        record: Callable[[Chunk], None], fail: Callable[..., None],
    ) -> None:
        """Record each batch as it finishes; re-plan (or fail) batches whose worker is gone.

        A batch also waits for its reads: when a data worker holding one dies first, Dask
        would recompute that read on the dead worker (``no-worker``), so the batch is
        taken back too; that server's groups fail ``reader-lost``, the others are re-planned.
        """
        app, tick, arrival = ctx.app, ctx.tick, ctx.arrival
        waiting = {asyncio.ensure_future(self._result(f)): f for f in batches}
        while waiting:
            done = await self._wait(waiting, timeout=1.0)
            for task in done:
                fut = waiting.pop(task)
                batch = batches[fut]
                groups = np.asarray(batch["groups"], dtype=np.int64)
                result, error = task.result()
                if error is not None:
                    fail(groups, f"model-error: {error}", batch["model"], batch["worker"])
                    continue
                self._record_result(app, tick, arrival, result, pi, record, fail)
                self._measured(app, batch, result)
            if waiting:
                alive = {w["address"] for w in await self._workers()}
                for task, fut in list(waiting.items()):
                    batch = batches[fut]
                    gone = [s for s, a in batch.get("sources", {}).items() if a not in alive]
                    if batch["worker"] in alive and not gone:
                        continue
                    task.cancel()
                    with contextlib.suppress(Exception):
                        await self.client.cancel([fut], asynchronous=True)
                    del waiting[task]
                    lost = np.asarray(batch["groups"], dtype=np.int64)
                    reason = "worker-lost" if batch["worker"] not in alive else "reader-lost"
                    logger.warning("serif: %s: %d requests of %s tick %d on %s (inputs from %s)",
                                   reason, lost.size, app.name, tick, batch["worker"],
                                   ", ".join(gone) or "live data workers")
                    for server in gone:
                        await self._drop_reads(ctx, server)
                        owned = np.asarray(self.config.groups_of(server, batch["modality"]))
                        fail(lost[np.isin(lost, owned)], "reader-lost")
                        lost = lost[~np.isin(lost, owned)]
                    if lost.size == 0:
                        continue
                    if time.time() - arrival >= 2 * app.sla_latency or ctx.attempt >= 3:
                        fail(lost, reason, batch["model"], batch["worker"])
                        continue
                    try:
                        again, dropped, (answered, prediction) = await self._replan(ctx, lost)
                    except Exception as exc:
                        fail(lost, f"{reason}: re-plan failed: {exc}"[:200],
                             batch["model"], batch["worker"])
                        continue
                    if dropped.size:
                        fail(dropped, reason, batch["model"], batch["worker"])
                    if answered.size:
                        record(self._answered(app, tick, arrival, time.time(), answered,
                                              ctx.labels[answered], prediction))
                    batches.update(again)
                    waiting.update({asyncio.ensure_future(self._result(f)): f for f in again})

    async def _drop_reads(self, ctx: _TickContext, server: str) -> None:
        """Cancel a dead data worker's reads (re-plans skip them) rather than wait for them."""
        for mod, rs in ctx.reads.items():
            ctx.reads[mod] = [(s, f) for s, f in rs if s != server]
            ctx.input_node[mod][np.asarray(self.config.groups_of(server, mod), np.int64)] = ""
            with contextlib.suppress(Exception):
                await self.client.cancel([f for s, f in rs if s == server], asynchronous=True)

    @staticmethod
    async def _settled(fut: Future) -> str | None:
        """Wait for a task to end without fetching its result: None, or why it erred."""
        exc = await fut.exception(asynchronous=True)
        if fut.status == "cancelled":  # by the client itself: it lost the scheduler
            raise asyncio.CancelledError(f"{fut.key} cancelled")
        if exc is None:
            return None
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    @staticmethod
    async def _result(fut: Future) -> tuple[Any, str | None]:
        try:
            return await fut, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    def _record_result(
        self, app: Application, tick: int, arrival: float, result: dict[str, Any],
        pi: np.ndarray, record: Callable[[Chunk], None], fail: Callable[..., None],
    ) -> None:
        groups, ok = result["groups"], result["ok"]
        for group, reason in sorted(result["errors"].items()):
            fail(np.asarray([group]), reason, result["model"], result["worker"])
        groups, pred, labels = groups[ok], result["pred"][ok], result["labels"][ok]
        if groups.size == 0:
            return
        finish = np.broadcast_to(np.asarray(result["finish"], dtype=float), ok.shape)[ok]
        latency = finish - arrival
        u = completed_utility(
            latency, app.sla_latency, np.asarray(app.utility_matrix, dtype=float),
            np.asarray(app.prior, dtype=float), labels, pred,
        )
        chunk = Chunk(
            app=app.name, tick=tick, model=result["model"], worker=result["worker"],
            outcome="completed", group=groups, arrival=np.full(groups.size, arrival),
            finish=finish, prediction=pred, label=labels, utility=u,
            deadline_met=latency <= app.sla_latency, reason=[""] * groups.size,
        )
        record(chunk)

    def _measured(self, app: Application, batch: dict[str, Any], result: dict[str, Any]) -> None:
        """Note a batch's measured seconds against the plan's estimate (profiled latency)."""
        finish = np.asarray(result["finish"], dtype=float)
        if finish.size == 0 or not np.isfinite(finish).all():
            return
        seconds = float(finish.max() - float(result["start"]))
        self._batch_times.append([batch["key"], seconds])
        model = f"{app.name}/{batch['model']}"
        total = self.stats.latency_drift.setdefault(model, [0.0, 0.0, 0])
        total[0] += float(batch.get("estimate_s", 0.0))
        total[1] += seconds
        total[2] += len(batch["groups"])

    def _answered(
        self, app: Application, tick: int, arrival: float, finish: float, groups: np.ndarray,
        labels: np.ndarray, prediction: np.ndarray,
    ) -> Chunk:
        """Requests answered from their SneakPeek estimate when the plan was made."""
        n = groups.size
        latency = np.full(n, finish - arrival)
        u = completed_utility(
            latency, app.sla_latency, np.asarray(app.utility_matrix, dtype=float),
            np.asarray(app.prior, dtype=float), labels, prediction,
        )
        return Chunk(
            app=app.name, tick=tick, model=PEEK_MODEL, worker="", outcome="completed",
            group=groups, arrival=np.full(n, arrival), finish=np.full(n, finish),
            prediction=prediction, label=labels, utility=u,
            deadline_met=latency <= app.sla_latency, reason=[""] * n,
        )

    def _chunk(
        self, app: Application, tick: int, groups: np.ndarray, arrival: float, outcome: str,
        reason: str, model: str = "", worker: str = "",
    ) -> Chunk:
        n = groups.size
        return Chunk(
            app=app.name, tick=tick, model=model, worker=worker, outcome=outcome,
            group=groups, arrival=np.full(n, arrival), finish=np.full(n, np.nan),
            prediction=np.full(n, -1), label=np.full(n, -1),
            utility=np.full(n, float(app.miss_utility)), deadline_met=np.zeros(n, bool),
            reason=[reason] * n,
        )

    def summary(self) -> dict[str, Any]:
        return summary(
            self.log, policy=self.options.policy, data_aware=self.options.data_aware,
            ticks=self.stats.ticks, decision_ms=self.stats.decision_ms,
            extra={
                "ticks_late": self.stats.ticks_late,
                "seed": self.options.seed,
                "run_id": self.run_id,
                "wall_s": time.time() - self.started if self.started else 0.0,
                "batch_latency": {
                    model: {"planned_ms_per_request": 1000 * planned / n,
                            "measured_ms_per_request": 1000 * measured / n}
                    for model, (planned, measured, n) in sorted(
                        self.stats.latency_drift.items()) if n
                },
            },
        )
