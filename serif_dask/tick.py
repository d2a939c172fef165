"""One tick's graph: read (per server × modality) → peek (per server) → plan → score.

The plan is the scheduler plugin's ``serif_plan`` handler, called once per
:class:`~serif_dask.rounds.PlanRound`; score tasks are one per (worker, model), pinned to
GPU workers. The number of tasks depends on servers, modalities, workers and models, never
on the number of groups. A tick has a deadline of its own (its last request's 2 × sla plus
a grace): what has not returned by then fails with the step it waited for, and a worker
still running one of its tasks long after is restarted through its nanny. Whatever
happens, every request of the tick ends in one record (:class:`TickLedger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from distributed import Client, Future
from distributed.protocol.pickle import dumps, loads

from serif_dask.accounting import TickLedger, answered
from serif_dask.config import Application
from serif_dask.rounds import PIPELINE_S, PlanRound
from serif_dask.tasks import export_task, peek_task, read_task, score_task
from serif_dask.waiting import gathered, live_workers, outcome, settled, wait_or_change
from serif_dask.wire import pack, pack_nodes, unpack

if TYPE_CHECKING:
    from serif_dask.driver import Driver

logger = logging.getLogger("serif_dask.tick")

#: Seconds past a request's last deadline (2 × sla) an exported input stays in Redis.
GRACE_S = 30.0
#: A worker still running a timed-out tick's task this long after the tick's deadline is
#: restarted through its nanny.
STUCK_S = 30.0


class StuckWorkers:
    """Restarts, through its nanny, a worker still running a timed-out tick's task."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._watchers: set[asyncio.Task] = set()

    def watch(self, keys: set[str]) -> None:
        task = asyncio.ensure_future(self._restart_if_stuck(keys))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def cancel(self) -> None:
        for task in list(self._watchers):
            task.cancel()

    async def _restart_if_stuck(self, keys: set[str]) -> None:
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


@dataclass
class _Graph:
    """The tick's tasks, and what its later steps (scoring, re-planning) need."""

    stage: str = "read"  # read, peek, plan, score: where a timeout finds the tick
    reads: dict[str, list[tuple[str, Future]]] = field(default_factory=dict)
    futures: list[Future] = field(default_factory=list)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # server -> worker
    host_node: dict[str, str] = field(default_factory=dict)  # worker address -> node
    #: per modality, per group: the shared-memory node holding its input, as an index
    #: into ``nodes`` (0: none known)
    input_code: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=lambda: [""])
    attempt: int = 0  # re-plans so far


class Tick:
    """One application tick, from its reads to its last record."""

    def __init__(self, driver: Driver, app: Application, tick: int, arrival: float,
                 logical: float, plan_round: PlanRound, member: int) -> None:
        self.driver = driver
        self.client: Client = driver.client
        self.config = driver.config
        self.version = driver.version  # the config version the tick lives under, to its end
        self.run_id = driver.run_id
        self.app, self.tick = app, tick
        self.arrival = arrival  # wall time the samples were taken
        self.logical = logical  # the same on the run's logical clock
        self.plan_round, self.member = plan_round, member
        groups = np.arange(self.config.data.num_groups, dtype=np.int64)
        self.ledger = TickLedger(app, tick, arrival, groups, driver.log,
                                 driver.options.on_records, version=self.version)
        self.graph = _Graph()
        #: seconds this tick spent per step (read, peek, plan, score), for the summary
        self.times: dict[str, float] = {}

    def _key(self, kind: str, *parts: object) -> str:
        return "-".join(["serif", kind, self.run_id, self.app.name, str(self.tick),
                         *map(str, parts)])

    # -- the tick's life ---------------------------------------------------------------
    async def run(self) -> None:
        ledger, driver = self.ledger, self.driver
        limit = 2 * self.app.sla_latency + driver.options.tick_grace_s
        try:
            await asyncio.wait_for(self._steps(),
                                   timeout=max(0.0, self.arrival + limit - time.time()))
        except TimeoutError:
            self._timed_out()
        except asyncio.CancelledError:  # stopped, or futures cancelled with the scheduler
            ledger.fail(ledger.groups, "scheduler-lost" if driver.lost_scheduler() else "stopped")
            raise
        except Exception as exc:
            if driver.lost_scheduler():
                driver.stop()
                ledger.fail(ledger.groups, "scheduler-lost")
            elif str(exc).startswith("run-changed"):
                driver.replaced(str(exc))
                ledger.fail(ledger.groups, "run-replaced")
            else:
                logger.exception("serif: tick %d of %s failed", self.tick, self.app.name)
                ledger.fail(ledger.groups, f"tick-error: {type(exc).__name__}: {exc}")
        finally:
            self.plan_round.withdraw(self.member)  # no-op once this tick was planned
            ledger.fail(ledger.groups, "unaccounted")  # nothing unrecorded is ever lost
            for fut in self.graph.futures:
                fut.release()
            driver.stats.stages.add({**self.times, "record": ledger.record_s})
            if not driver.scheduler_lost:
                await driver.report(self.app, ledger)

    def _timed_out(self) -> None:
        """The tick's deadline passed: fail what is left with the step it waited for.

        A group whose read has not returned fails ``read-timeout``; the others fail with
        the step the tick was in (``peek-timeout``, ``plan-timeout``, ``score-timeout``).
        The tick's tasks are cancelled; a worker still running one of them after
        ``STUCK_S`` is restarted through its nanny.
        """
        graph, ledger = self.graph, self.ledger
        left = ledger.left()
        for mod, reads in graph.reads.items():
            for server, fut in reads:
                if fut.status != "finished":
                    ledger.fail(self._owned(server, mod), "read-timeout")
        logger.warning("serif: tick %d of %s passed its deadline in its %s step; %d requests "
                       "failed", self.tick, self.app.name, graph.stage, left.size)
        ledger.fail(left, f"{graph.stage}-timeout")
        unfinished = [f for f in graph.futures
                      if f.status not in ("finished", "error", "cancelled")]
        if unfinished:
            self.driver.stuck.watch({f.key for f in unfinished})
            cancel = asyncio.ensure_future(self.client.cancel(unfinished, asynchronous=True))
            cancel.add_done_callback(lambda t: t.cancelled() or t.exception())  # best effort

    def _input_nodes(self, groups: np.ndarray) -> dict[str, Any]:
        """Where ``groups``' inputs lie, per modality, for ``serif_plan`` (codes, no strings)."""
        graph = self.graph
        return {m: pack_nodes(graph.nodes, codes[groups]) for m, codes in graph.input_code.items()}

    def _owned(self, server: str, mod: str) -> np.ndarray:
        return np.asarray(self.config.groups_of(server, mod), dtype=np.int64)

    async def _steps(self) -> None:
        app, graph, ledger = self.app, self.graph, self.ledger
        started = time.perf_counter()
        workers = await live_workers(self.client)
        graph.data = {w["node"]: w for w in workers if w["role"] == "data"}
        graph.host_node = {w["address"]: w["host_node"] for w in workers}
        peek_mod = self.config.peek_modality(app)
        self._submit_reads(peek_mod)

        graph.stage = "peek"
        scores, labels = await self._peek(peek_mod, started)
        live = ledger.left()
        if live.size == 0:
            return
        graph.stage = "plan"
        planning = time.perf_counter()
        plan = await self.plan_round.plan(self.member, {
            "app": app.name, "tick": self.tick, "groups": pack(live, np.int64),
            "arrival": float(self.logical), "scores": dumps(scores[live]),
            "input_node": self._input_nodes(live),
        }, self.logical + PIPELINE_S)
        planned = time.time()
        self.times["plan"] = time.perf_counter() - planning
        pi = np.asarray(loads(plan["pi"]), dtype=float)
        single = None if plan["pi_single"] is None else np.asarray(loads(plan["pi_single"]))
        self.driver.log.add_beliefs(app.name, labels[live], pi,
                                    np.asarray(app.prior, dtype=float), single)
        dropped = unpack(plan["dropped"], np.int64)
        if dropped.size:  # labels known from the peek are kept: a drop's lost utility shows
            ledger.drop(dropped, plan["drop_reason"])
        self._answered(plan["answered"], planned)
        graph.stage = "score"
        scoring = time.perf_counter()
        await self._collect(self._submit_batches(plan["batches"]))
        self.times["score"] = time.perf_counter() - scoring

    def _submit_reads(self, peek_mod: str) -> None:
        app, graph, ledger = self.app, self.graph, self.ledger
        mods = sorted({p.modality for p in app.model_profiles} | {peek_mod})
        shared = {m: any(p.modality == m and not p.use_profile for p in app.model_profiles)
                  for m in mods}
        graph.reads = {m: [] for m in mods}
        graph.input_code = {m: np.zeros(ledger.groups.size, dtype=np.int32) for m in mods}
        for mod in mods:
            for server in self.config.server_names:
                owned = self._owned(server, mod)
                if owned.size == 0:
                    continue
                worker = graph.data.get(server)
                if worker is None or worker["address"] not in self.driver.ready:
                    ledger.fail(owned, "reader-lost")  # gone, or back but not warm yet
                    continue
                if worker["host_node"] not in graph.nodes:
                    graph.nodes.append(worker["host_node"])
                graph.input_code[mod][owned] = graph.nodes.index(worker["host_node"])
                fut = self.client.submit(
                    read_task, self.run_id, app.name, mod, server, owned.tolist(), self.tick,
                    mod == peek_mod, shared[mod], self.version,
                    key=self._key("read", server, mod),
                    workers=[worker["address"]], allow_other_workers=False, pure=False,
                )
                graph.futures.append(fut)
                graph.reads[mod].append((server, fut))

    async def _peek(self, peek_mod: str, started: float) -> tuple[np.ndarray, np.ndarray]:
        """Class scores and labels per group (NaN / -1 where the look failed)."""
        app, graph, ledger = self.app, self.graph, self.ledger
        scores = np.full((ledger.groups.size, len(app.prior)), np.nan)
        estimator = await self.driver.estimators.current(app.name, 2 * app.sla_latency)
        peeks: dict[str, Future] = {}
        if estimator is not None:
            for server, fut in graph.reads[peek_mod]:
                peeks[server] = self.client.submit(
                    peek_task, fut, estimator, len(app.prior), key=self._key("peek", server),
                    workers=[graph.data[server]["address"]], allow_other_workers=False,
                    pure=False,
                )
            graph.futures.extend(peeks.values())
        # A late look is worth nothing: plan with the prior rather than wait past 2 × sla.
        deadline = time.monotonic() + 2 * app.sla_latency
        results = []
        if peeks:  # the peeks wait for these reads anyway: watch them for a dead worker
            for server in await self._await_reads(peek_mod, deadline):
                with contextlib.suppress(Exception):
                    await self.client.cancel([peeks.pop(server)], asynchronous=True)
            read = time.perf_counter()
            self.times["read"] = read - started
            results = await self._gather_peeks(list(peeks.values()), deadline)
            self.times["peek"] = time.perf_counter() - read
        labels = np.full(ledger.groups.size, -1, dtype=np.int64)
        for result in results:
            scores[result["groups"][result["ok"]]] = result["scores"][result["ok"]]
            labels[result["groups"]] = result["labels"]
        ledger.labels = labels
        if all(p.modality == peek_mod for p in app.model_profiles):
            # no model could serve a group whose only input failed: do not plan it
            by_reason: dict[str, list[int]] = {}
            for result in results:
                for group, reason in result.get("errors", {}).items():
                    by_reason.setdefault(reason, []).append(int(group))
            for reason, which in by_reason.items():
                ledger.fail(np.asarray(which, dtype=np.int64), reason)
        return scores, labels

    async def _gather_peeks(self, peeks: list[Future], deadline: float) -> list[dict[str, Any]]:
        """The peeks that finish by the deadline; stop waiting once the estimator is lost.

        Only finished peeks are gathered, so a peek stuck behind a lost dependency never
        holds the tick; its groups are planned with their current belief instead.
        """
        waiting = {asyncio.ensure_future(settled(f)) for f in peeks}
        try:
            while waiting:
                timeout = min(0.5, deadline - time.monotonic())
                if timeout <= 0 or self.driver.estimators.fitted(self.app.name) is None:
                    logger.warning("serif: peek of %s tick %d %s", self.app.name, self.tick,
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
                gathered(self.client, done, errors="skip"),
                timeout=max(0.1, deadline - time.monotonic()),
            )
        except TimeoutError:
            return []

    async def _await_reads(self, mod: str, deadline: float) -> set[str]:
        """Wait for the tick's reads of ``mod``; fail the groups of those whose worker is gone.

        A read pinned to a dead worker would wait in ``no-worker`` for ever, and the peeks
        and score batches that need it with it. Its groups fail ``reader-lost`` (a read
        that erred: ``reader-error``), it is cancelled and taken out of the tick's reads,
        and the tick goes on with the other servers. Returns the servers whose reads were
        lost. (Reads of other modalities are watched by :meth:`_collect`, through the
        batches.)
        """
        reads = self.graph.reads
        waiting = {asyncio.ensure_future(settled(f)): server for server, f in reads[mod]}
        lost: dict[str, str] = {}  # server -> reason
        try:
            while waiting:
                timeout = min(0.5, deadline - time.monotonic())
                if timeout <= 0:
                    # Past 2 × sla a request earns nothing: a read still running is a
                    # stuck sensor or server, and the batches must not wait for it.
                    lost.update(dict.fromkeys(waiting.values(), "read-timeout"))
                    self.driver.stuck.watch({f.key for s, f in reads[mod] if s in lost})
                    break
                done = await wait_or_change(self.client, waiting, timeout)
                for task in done:
                    server = waiting.pop(task)
                    error = task.result()
                    if error is not None:
                        reason = "reader-lost" if "KilledWorker" in error else "reader-error"
                        lost[server] = f"{reason}: {error}"[:200]
                if waiting:
                    alive = {w["address"] for w in await live_workers(self.client)}
                    for task, server in list(waiting.items()):
                        if self.graph.data[server]["address"] not in alive:
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
            owned = self._owned(server, mod)
            logger.warning("serif: %s read of %s tick %d on %s failed (%s); %d requests",
                           mod, self.app.name, self.tick, server, reason, owned.size)
            self.ledger.fail(owned, reason)
        return set(lost)

    def _answered(self, reply: dict[str, Any], finish: float) -> None:
        groups = unpack(reply["groups"], np.int64)
        if groups.size:
            labels = self.ledger.labels
            assert labels is not None
            self.ledger.record(answered(
                self.app, self.tick, self.arrival, finish, groups, labels[groups],
                unpack(reply["prediction"], np.int64), self.version))

    # -- scoring -----------------------------------------------------------------------
    def _exports(self, modality: str, batch: dict[str, Any]) -> list[Future]:
        """Inputs whose data node is not the batch worker's node go through Redis."""
        graph, exports = self.graph, []
        groups = np.asarray(batch["groups"], dtype=np.int64)
        for server, read in graph.reads[modality]:
            if graph.data[server]["host_node"] == graph.host_node.get(batch["worker"]):
                continue
            mine = groups[np.isin(groups, self._owned(server, modality))]
            if mine.size == 0:
                continue
            fut = self.client.submit(
                export_task, read, mine.tolist(), 2 * self.app.sla_latency + GRACE_S,
                key=self._key("export", server, batch["key"]),
                workers=[graph.data[server]["address"]], allow_other_workers=False, pure=False,
            )
            graph.futures.append(fut)
            exports.append(fut)
        return exports

    def _submit_batches(self, plan_batches: list[dict[str, Any]]) -> dict[Future, dict[str, Any]]:
        """One score task per (worker, model) batch, pinned to its GPU worker."""
        app, graph, batches = self.app, self.graph, {}
        for batch in plan_batches:
            batch["groups"] = unpack(batch["groups"], np.int64)
            profile = next(p for p in app.model_profiles if p.name == batch["model"])
            exports = [] if profile.use_profile else self._exports(profile.modality, batch)
            reads = graph.reads[profile.modality]
            fut = self.client.submit(
                score_task, self.run_id, app.name, batch["model"], batch["groups"],
                [f for _, f in reads], self.tick, exports, self.version,
                key=batch["key"], workers=[batch["worker"]], allow_other_workers=False,
                resources={"GPU": 1}, priority=int(round(batch["priority"] * 1000)),
                pure=False,
            )
            graph.futures.append(fut)
            # The data workers whose results this batch waits for (reads and exports).
            batch["modality"] = profile.modality
            batch["sources"] = {s: graph.data[s]["address"] for s, _ in reads}
            batches[fut] = batch
        return batches

    async def _replan(self, groups: np.ndarray) -> dict[Future, dict[str, Any]]:
        """Plan a lost worker's requests again on the survivors; records the drops and the
        answers from the peek, returns the new batches."""
        graph = self.graph
        graph.attempt += 1
        now = time.time() - self.driver.started
        plan = await self.client.scheduler.serif_plan(
            app=self.app.name, tick=self.tick, groups=pack(groups, np.int64),
            arrival=float(self.logical), scores=None, input_node=self._input_nodes(groups),
            now=max(now, self.logical + PIPELINE_S), started=self.driver.started,
            attempt=graph.attempt, run_id=self.run_id, version=self.version,
        )
        self.driver.stats.decision_ms.append(plan["decision_ms"])
        return plan

    async def _collect(self, batches: dict[Future, dict[str, Any]]) -> None:
        """Record each batch as it finishes; re-plan (or fail) batches whose worker is gone.

        A batch also waits for its reads: when a data worker holding one dies first, Dask
        would recompute that read on the dead worker (``no-worker``), so the batch is
        taken back too; that server's groups fail ``reader-lost``, the others are re-planned.
        """
        app, ledger = self.app, self.ledger
        waiting = {asyncio.ensure_future(outcome(f)): f for f in batches}
        while waiting:
            done = await wait_or_change(self.client, waiting, timeout=1.0)
            for task in done:
                batch = batches[waiting.pop(task)]
                result, error = task.result()
                if error is not None:
                    ledger.fail(np.asarray(batch["groups"], dtype=np.int64),
                                f"model-error: {error}", batch["model"], batch["worker"])
                    continue
                ledger.scored(result)
                self.driver.batch_times.note(app, batch, result)
            if not waiting:
                break
            alive = {w["address"] for w in await live_workers(self.client)}
            for task, fut in list(waiting.items()):
                batch = batches[fut]
                gone = [s for s, a in batch.get("sources", {}).items() if a not in alive]
                if batch["worker"] in alive and not gone:
                    continue
                task.cancel()
                with contextlib.suppress(Exception):
                    await self.client.cancel([fut], asynchronous=True)
                del waiting[task]
                again = await self._lost_batch(batch, alive, gone)
                batches.update(again)
                waiting.update({asyncio.ensure_future(outcome(f)): f for f in again})

    async def _lost_batch(self, batch: dict[str, Any], alive: set[str],
                          gone: list[str]) -> dict[Future, dict[str, Any]]:
        """A batch whose worker or input died: fail or re-plan its requests."""
        app, ledger = self.app, self.ledger
        lost = np.asarray(batch["groups"], dtype=np.int64)
        reason = "worker-lost" if batch["worker"] not in alive else "reader-lost"
        logger.warning("serif: %s: %d requests of %s tick %d on %s (inputs from %s)",
                       reason, lost.size, app.name, self.tick, batch["worker"],
                       ", ".join(gone) or "live data workers")
        for server in gone:
            await self._drop_reads(server)
            owned = self._owned(server, batch["modality"])
            ledger.fail(lost[np.isin(lost, owned)], "reader-lost")
            lost = lost[~np.isin(lost, owned)]
        if lost.size == 0:
            return {}
        if time.time() - self.arrival >= 2 * app.sla_latency or self.graph.attempt >= 3:
            ledger.fail(lost, reason, batch["model"], batch["worker"])
            return {}
        try:
            plan = await self._replan(lost)
        except Exception as exc:
            ledger.fail(lost, f"{reason}: re-plan failed: {exc}"[:200], batch["model"],
                        batch["worker"])
            return {}
        dropped = unpack(plan["dropped"], np.int64)
        if dropped.size:
            ledger.fail(dropped, reason, batch["model"], batch["worker"])
        self._answered(plan["answered"], time.time())
        return self._submit_batches(plan["batches"])

    async def _drop_reads(self, server: str) -> None:
        """Cancel a dead data worker's reads (re-plans skip them) rather than wait for them."""
        graph = self.graph
        for mod, rs in graph.reads.items():
            graph.reads[mod] = [(s, f) for s, f in rs if s != server]
            graph.input_code[mod][self._owned(server, mod)] = 0
            with contextlib.suppress(Exception):
                await self.client.cancel([f for s, f in rs if s == server], asynchronous=True)
