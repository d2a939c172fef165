"""The scheduler side of serif-dask: SneakPeek state, worker state and the policy.

Install ahead of time with ``dask scheduler --preload serif_dask.scheduler``, or let
:class:`serif_dask.Serif` install it from a client. The plugin never does Redis or disk
I/O, and the policy runs in a one-thread executor so a large plan does not stall the
scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps, loads
from distributed.scheduler import Scheduler

from serif_dask.config import SerifConfig
from serif_dask.errors import ReconfigureRefused
from serif_dask.planning import (
    ModelTable,
    WorkerView,
    batches,
    build_problem,
    join,
    peek_answer,
    unmet_seconds,
)
from serif_dask.policies import DROP, Plan, PlanProblem, get_policy
from serif_dask.policies._common import MIN_GAIN
from serif_dask.roles import worker_role
from serif_dask.service import keep_key_caches_small, keep_span_metadata_small
from serif_dask.sneakpeek import ForwardBeliefs, GroupBeliefs, make_beliefs, single_look
from serif_dask.wire import pack, unpack, unpack_nodes

logger = logging.getLogger("serif_dask.scheduler")

#: Reality may run this share of the tightest SLA behind the plan before the plugin plans
#: from the real queues instead of its logical clock (and decisions stop being a pure
#: function of config and seed).
SLACK_SLA_FRACTION = 0.5
#: A run whose driver has neither planned nor reported for this long (or five tick periods
#: and deadlines, if longer) is no longer live: another run may configure the scheduler.
LIVE_TIMEOUT_S = 60.0
#: Measured batch times within this factor of their profiled estimate leave plans to the
#: profiles (and plans stay a pure function of config and seed); beyond it, the plugin
#: plans with the measured ratio per (model, worker).
DRIFT_TOLERANCE = 1.3
#: Weight of the newest batch in the running ratio of measured to profiled time.
DRIFT_WEIGHT = 0.3
#: The Dask event topic on which the plugin announces workers that join or leave.
WORKERS_TOPIC = "serif-workers"
#: Workers that left, remembered for the dashboard: the most recent ones only.
LOST_WORKERS_KEPT = 256
#: The Dask event topic on which the plugin announces new config versions of the run
#: (``serif_reconfigure``) and the driver's applying them.
CONFIG_TOPIC = "serif-config"
#: Config versions of a run the plugin keeps (in-flight ticks of an older one still plan
#: under it; a worker may still pull it).
VERSIONS_KEPT = 16
#: Seconds of plans the capacity signal (``serif_capacity``) averages over by default: long
#: enough to span several ticks, short enough for a ramp to show within one adapt step.
CAPACITY_WINDOW_S = 10.0


@dataclass(frozen=True)
class ConfigVersion:
    """One config version of the live run: what its plans use.

    Version 1 is the run's start; ``serif_reconfigure`` adds the next. Ticks carry the
    version they started under, so a tick in flight when the run moves on plans, scores
    and records under its own.
    """

    version: int
    config: SerifConfig
    config_bytes: bytes
    table: ModelTable
    policy_name: str
    policy: Any = field(repr=False)
    data_aware: bool
    changed_at: float  # wall time the version was made
    changes: tuple[str, ...] = ()


@dataclass
class WorkerState:
    """What the plugin believes about one worker, updated by plans and task completions."""

    address: str
    name: str
    role: str  # "compute", "data" or "other"
    node: str  # the compute node or server of the config this worker stands for
    host_node: str  # shared-memory node ($SERIF_NODE or host)
    warm: dict[str, None] = field(default_factory=dict)  # ordered: an LRU of model names
    busy_until: float = 0.0  # on the run's logical clock (seconds since its start)
    # score key -> (planned finish on the logical clock, estimated seconds)
    pending: dict[str, tuple[float, float]] = field(default_factory=dict)

    def book(self, key: str, now: float, seconds: float) -> None:
        """Queue a batch of ``seconds`` planned at logical time ``now`` behind the others."""
        self.busy_until = max(self.busy_until, now) + seconds
        self.pending[key] = (self.busy_until, seconds)

    def backlog(self, now: float, slack: float, real_now: float) -> float:
        """Queued seconds ahead of a new batch planned at logical time ``now``.

        Plans advance ``busy_until`` on the run's logical clock, so decisions are a pure
        function of config and seed. Only when a batch is still unfinished more than
        ``slack`` after its planned finish (reality, at logical time ``real_now``, has
        fallen behind the plan) does the real queue count: the estimates of every
        unfinished batch, from the real present. An overloaded or slowed-down worker must
        never look idle, and a merely busy one keeps decisions reproducible.
        """
        logical = max(0.0, self.busy_until - now)
        if not self.pending:
            return logical
        overdue = real_now - min(finish for finish, _ in self.pending.values())
        if overdue <= slack:
            return logical
        real = sum(seconds for _, seconds in self.pending.values()) + max(0.0, real_now - now)
        return max(logical, real)


@dataclass
class ComputeTime:
    """The number of compute workers over a run, integrated: what the cluster cost.

    Counted from the plugin's own membership hooks, so it holds for any cluster manager
    (a static one, Dask's adaptive, or workers started by hand).
    """

    since: float = 0.0  # wall time the current count holds from
    count: int = 0
    seconds: float = 0.0  # worker-seconds up to ``since``
    started: float = 0.0
    low: int = 0
    high: int = 0

    def start(self, now: float, count: int) -> None:
        self.since = self.started = now
        self.count = self.low = self.high = count
        self.seconds = 0.0

    def change(self, now: float, count: int) -> None:
        if self.started:
            self.seconds += self.count * max(0.0, now - self.since)
        self.since, self.count = now, count
        self.low, self.high = min(self.low, count), max(self.high, count)

    def summary(self, now: float) -> dict[str, Any]:
        total = self.seconds + self.count * max(0.0, now - self.since)
        span = now - self.started
        mean = total / span if span > 0 else float(self.count)
        return {"compute_workers": {"min": self.low, "max": self.high, "mean": mean},
                "worker_seconds": total}


@dataclass
class AppMetrics:
    """Running totals per application, for the dashboard and /metrics."""

    requests: int = 0
    completed: int = 0
    dropped: int = 0
    failed: int = 0
    utility: float = 0.0
    deadline_met: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    latencies: deque = field(default_factory=lambda: deque(maxlen=4096))
    timeline: deque = field(default_factory=lambda: deque(maxlen=2048))  # (t, mean utility)


class SerifSchedulerPlugin(SchedulerPlugin):
    """Holds configs, per-group SneakPeek state, worker state, the policy and metrics."""

    name = "serif"

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.scheduler.handlers.update(
            {
                "serif_configure": self.configure,
                "serif_get_config": self.get_config,
                "serif_plan": self.plan,
                "serif_calibrate": self.calibrate,
                "serif_reconfigure": self.reconfigure,
                "serif_applied": self.applied,
                "serif_end": self.end,
                "serif_report": self.report,
                "serif_state": self.state,
                "serif_warm": self.warm_update,
                "serif_workers_ping": self.workers_ping,
                "serif_capacity": self.capacity,
                "serif_retire": self.retire,
            }
        )
        self.run_started = 0.0  # wall time of logical time 0
        self.slack = 1.0
        self.config: SerifConfig | None = None
        self.config_bytes: bytes | None = None
        self.redis_info: dict[str, Any] | None = None  # Redis nodes, never a password
        self.run_id: str | None = None
        self.table: ModelTable | None = None
        self.policy_name = ""
        self.policy: Any = None
        self.data_aware = False
        self.seed = 0
        self.beliefs: dict[str, ForwardBeliefs | GroupBeliefs] = {}
        self.score_prior: dict[str, np.ndarray] = {}  # per app, from its estimator
        self.workers: dict[str, WorkerState] = {}
        self.pending: dict[str, str] = {}  # score key -> worker address
        self.lost_workers: dict[str, float] = {}
        self.metrics: dict[str, AppMetrics] = {}
        self.decision_ms: deque[float] = deque(maxlen=4096)
        self.latest_pi: dict[str, ForwardBeliefs | GroupBeliefs] = {}  # planned so far
        self.hook_errors = 0
        self.ended = True  # no run is live until one is configured
        self.last_activity = 0.0
        self.live_timeout_s = LIVE_TIMEOUT_S
        self._lock = asyncio.Lock()
        # score key -> (global model index, worker address, estimated seconds), until the
        # driver reports the batch's measured time; and the running ratios it feeds.
        # Drift is keyed by model name ("app/model"), so it survives a new config version
        # whose model table numbers the models differently.
        self.booked: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self.drift: dict[tuple[str, str], float] = {}
        #: The run's config versions (the newest ``VERSIONS_KEPT``); ``version`` is the
        #: newest, ``applied_version`` the one the driver ticks under (and that plans
        #: without a version, and the dashboard, use).
        self.versions: OrderedDict[int, ConfigVersion] = OrderedDict()
        self.version = 0
        self.applied_version = 0
        self.applied_at: dict[int, float] = {}
        #: The capacity signal: per plan, (wall time, booked seconds, requests, requests
        #: left unserved for lack of capacity, the seconds those would have needed).
        self.demand: deque[tuple[float, float, int, int, float]] = deque(maxlen=4096)
        self.last_plan = 0.0
        #: Compute workers being retired (address -> since): no plan books them any more.
        self.retiring: dict[str, float] = {}
        self.compute_time = ComputeTime()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="serif-plan")
        for address in list(self.scheduler.workers):
            self._track_worker(address)
        self.scheduler.add_plugin(self, name=self.name, idempotent=True)
        keep_key_caches_small(self.scheduler)  # new keys every tick: see its docstring
        keep_span_metadata_small(self.scheduler)  # a metadata entry per submit: ditto
        try:  # the dashboard page and /metrics are extras: they never break the plugin
            from serif_dask.dashboard import register

            register(self.scheduler, self)
        except Exception:
            logger.exception("serif: could not add the dashboard page and metrics")

    # -- lifecycle hooks (must never raise: Dask swallows hook errors) ------------------
    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        try:
            self._track_worker(worker)
            self._announce(worker)
            self._count_compute()
        except Exception:
            self.hook_errors += 1
            logger.exception("serif: add_worker hook failed for %s", worker)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        try:
            # Drivers learn of it at once, pushed (``Client.subscribe_topic``), not polled.
            self.scheduler.log_event(WORKERS_TOPIC, {"action": "remove", "worker": worker})
            state = self.workers.pop(worker, None)
            self.retiring.pop(worker, None)
            self._count_compute()
            if state is not None:
                self.lost_workers[worker] = time.time()
                while len(self.lost_workers) > LOST_WORKERS_KEPT:  # a run with churn
                    del self.lost_workers[next(iter(self.lost_workers))]
                for key in state.pending:
                    self.pending.pop(key, None)
                closing = self.scheduler.status.name in ("closing", "closed")
                log = logger.info if closing or not state.pending else logger.warning
                log("serif: %s worker %s (%s) left", state.role, state.name, worker)
        except Exception:
            self.hook_errors += 1
            logger.exception("serif: remove_worker hook failed for %s", worker)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish not in ("memory", "erred", "forgotten"):
            return
        try:
            address = self.pending.pop(key, None)  # type: ignore[arg-type]
            if address is None:
                return
            state = self.workers.get(address)
            if state is not None:
                state.pending.pop(key, None)
        except Exception:
            self.hook_errors += 1
            logger.exception("serif: transition hook failed for %s", key)

    def _count_compute(self) -> None:
        self.compute_time.change(
            time.time(), sum(1 for s in self.workers.values() if s.role == "compute"))

    def _track_worker(self, address: str) -> None:
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return
        role, node = worker_role(ws.name, dict(ws.resources))
        previous = self.workers.get(address)
        self.workers[address] = WorkerState(
            address=address,
            name=str(ws.name),
            role=role,
            node=node,
            host_node=previous.host_node if previous else node,
        )

    # -- handlers -------------------------------------------------------------------------
    async def configure(
        self,
        config: bytes,
        run_id: str,
        policy: str,
        data_aware: bool,
        seed: int,
        redis: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Start a run: install its config and policy and reset every per-run state.

        One run at a time: while another run is live (its driver planned or reported
        within ``live_timeout_s``, and has not ended it) the reply is ``{"refused": why}``,
        unless ``replace``; the old run's driver then learns from its next call
        (``run-changed``) and ends.
        """
        async with self._lock:
            live = self.live_run()
            if live is not None and live != run_id and not replace:
                return {"refused": f"the scheduler serves live run {live}; end it first, "
                                   "or replace it (--replace)", "live_run": live}
            replaced = live if live is not None and live != run_id else None
            if replaced:
                logger.warning("serif: run %s replaces live run %s", run_id, replaced)
            reply = await self._configure(config, run_id, policy, data_aware, seed, redis)
            reply["replaced"] = replaced
            return reply

    def live_run(self) -> str | None:
        """The run a driver is serving now, if any."""
        if self.run_id is None or self.ended:
            return None
        if time.time() - self.last_activity > self.live_timeout_s:
            return None  # its driver went away without ending it
        return self.run_id

    def end(self, run_id: str) -> None:
        """The driver of ``run_id`` is done: the scheduler is free for another run."""
        if run_id == self.run_id:
            self.ended = True

    def _touch(self, run_id: str | None) -> None:
        """A call for ``run_id``: refuse it when that is not the configured run."""
        if self.table is None or self.config is None:
            raise RuntimeError("serif: no run is configured on this scheduler")
        if run_id is not None and run_id != self.run_id:
            raise RuntimeError(f"run-changed: the scheduler now serves run {self.run_id}")
        self.last_activity = time.time()

    async def _configure(
        self, config: bytes, run_id: str, policy: str, data_aware: bool, seed: int,
        redis: dict[str, Any] | None,
    ) -> dict[str, Any]:
        parsed: SerifConfig = loads(config)
        policy_obj = get_policy(policy)
        self.run_id = run_id
        self.ended = False
        self.last_activity = time.time()
        self.booked.clear()
        self.drift.clear()
        first = ConfigVersion(
            version=1, config=parsed, config_bytes=config,
            table=ModelTable.from_config(parsed), policy_name=policy, policy=policy_obj,
            data_aware=bool(data_aware), changed_at=time.time(),
        )
        self.versions = OrderedDict({1: first})
        self.version = 1
        self.applied_at = {}
        self._use(first)
        self.seed = int(seed)
        # Nodes only: a password reaches workers in their RedisCredentials plugin.
        self.redis_info = {k: v for k, v in redis.items() if k != "password"} if redis else None
        self.run_started = time.time()
        self.applied_at[1] = self.run_started
        self.score_prior = {}
        self.beliefs = {
            app.name: make_beliefs(app, parsed.data.num_groups, self._persistence(app))
            for app in parsed.apps
        }
        self.metrics = {app.name: AppMetrics() for app in parsed.apps}
        self.demand.clear()
        self.last_plan = self.run_started
        self.compute_time.start(
            self.run_started, sum(1 for s in self.workers.values() if s.role == "compute"))
        self.decision_ms.clear()
        self.latest_pi.clear()
        self.lost_workers.clear()
        self.pending.clear()
        for state in self.workers.values():
            state.pending.clear()
            state.busy_until = 0.0
        await self._refresh_workers()
        await self.scheduler.broadcast(
            msg={"op": "serif_prepare", "run_id": run_id}, on_error="ignore"
        )
        return {"workers": self._describe_workers()}

    def _use(self, cv: ConfigVersion) -> None:
        """Make ``cv`` the applied version: what the dashboard shows and plans without a
        version use; the run's timeouts follow its SLAs."""
        self.config, self.config_bytes, self.table = cv.config, cv.config_bytes, cv.table
        self.policy_name, self.policy, self.data_aware = cv.policy_name, cv.policy, cv.data_aware
        self.applied_version = cv.version
        apps = cv.config.apps
        self.live_timeout_s = max(LIVE_TIMEOUT_S,
                                  5 * max(a.sample_duration + 2 * a.sla_latency for a in apps))
        self.slack = SLACK_SLA_FRACTION * min(app.sla_latency for app in apps)

    def get_config(self, run_id: str | None = None, version: int | None = None
                   ) -> dict[str, Any]:
        """Workers pull the run's config lazily, on their first task of a run (or of a
        config version: ``version``, else the applied one)."""
        cv = self.versions.get(self.applied_version if version is None else version)
        if cv is None or (run_id is not None and run_id != self.run_id):
            return {"run_id": self.run_id, "config": None, "live": self.live_run() is not None,
                    "version": self.version}
        return {
            "run_id": self.run_id, "config": cv.config_bytes, "seed": self.seed,
            "live": self.live_run() is not None,
            "redis": self.redis_info,
            "version": cv.version, "newest_version": self.version,
            "policy": cv.policy_name, "data_aware": cv.data_aware,
            "changes": list(cv.changes),
        }

    # -- live reconfiguration ---------------------------------------------------------------
    async def reconfigure(
        self, config: bytes | None = None, policy: str | None = None,
        data_aware: bool | None = None, run_id: str | None = None, dry_run: bool = False,
    ) -> dict[str, Any]:
        """A new config version of the live run, from the newest one and what changes.

        ``config`` is a pickled :class:`SerifConfig` (the whole new config, no secrets),
        ``policy``/``data_aware`` override it. The reply is ``{"version", "changes",
        "push"}`` (``push``: real models whose weights must be in the run's Redis before
        the version is made; ``dry_run`` only checks) or ``{"refused": one line}``: the run
        then goes on unchanged. Unpickling, the diff and the policy's import run on the
        plan thread, not on the event loop. The driver applies the version at its next
        tick boundary (``serif_applied``); until then plans use the version they name.
        """
        async with self._lock:
            live = self.live_run()
            if live is None:
                return {"refused": "the scheduler serves no live run to reconfigure"}
            if run_id is not None and run_id != live:
                return {"refused": f"run-changed: the scheduler now serves run {live}"}
            newest = self.versions[self.version]
            loop = asyncio.get_running_loop()
            try:
                proposed, push = await loop.run_in_executor(
                    self._executor, self._propose, newest, config, policy, data_aware)
            except ReconfigureRefused as exc:
                return {"refused": str(exc)}
            if dry_run or not proposed.changes:
                return {"version": self.version, "changes": list(proposed.changes),
                        "push": push, "run_id": live}
            version = self.version + 1
            made = dataclasses.replace(proposed, version=version, changed_at=time.time())
            self.versions[version] = made
            self.version = version
            while len(self.versions) > VERSIONS_KEPT:
                oldest = next(iter(self.versions))
                if oldest == self.applied_version:
                    break
                del self.versions[oldest]
                self.applied_at.pop(oldest, None)
            n_groups = made.config.data.num_groups
            for beliefs in self.beliefs.values():
                if n_groups > beliefs.n_groups:  # plans of the new version may name them
                    beliefs.resize(n_groups)
            logger.info("serif: run %s config version %d: %s", live, version,
                        "; ".join(made.changes))
            self.scheduler.log_event(CONFIG_TOPIC, {
                "action": "new", "run_id": live, "version": version,
                "changes": list(made.changes), "at": made.changed_at,
            })
            return {"version": version, "changes": list(made.changes), "push": push,
                    "run_id": live}

    def _propose(
        self, newest: ConfigVersion, config: bytes | None, policy: str | None,
        data_aware: bool | None,
    ) -> tuple[ConfigVersion, list[str]]:
        """On the plan thread: the proposed version (numbered later) and the real models
        whose weights it needs pushed; raises :class:`ReconfigureRefused`."""
        from serif_dask.reconfigure import diff

        if config is None:
            new_config, config_bytes = newest.config, newest.config_bytes
        else:
            try:
                new_config = loads(config)
            except Exception as exc:
                raise ReconfigureRefused(f"cannot read the new config: {exc}") from None
            if not isinstance(new_config, SerifConfig):
                raise ReconfigureRefused("the new config is not a SerifConfig")
            config_bytes = config
        proposal = diff(newest.config, new_config, live_policy=newest.policy_name,
                        live_data_aware=newest.data_aware, policy=policy,
                        data_aware=data_aware, has_redis=self.redis_info is not None)
        table = newest.table if new_config is newest.config else \
            ModelTable.from_config(new_config)
        made = ConfigVersion(
            version=newest.version, config=new_config, config_bytes=config_bytes,
            table=table, policy_name=proposal.policy,
            policy=newest.policy if proposal.policy == newest.policy_name
            else proposal.policy_obj,
            data_aware=proposal.data_aware, changed_at=time.time(),
            changes=tuple(str(c) for c in proposal.changes),
        )
        return made, list(proposal.push)

    async def applied(self, run_id: str, version: int) -> None:
        """The driver of ``run_id`` ticks under ``version`` from now on."""
        async with self._lock:
            self._touch(run_id)
            cv = self.versions.get(version)
            if cv is None or version <= self.applied_version:
                return
            self._use(cv)
            self.applied_at[version] = time.time()
            for beliefs in self.beliefs.values():
                beliefs.resize(cv.config.data.num_groups)
            self.scheduler.log_event(CONFIG_TOPIC, {
                "action": "applied", "run_id": run_id, "version": version,
                "at": self.applied_at[version],
            })

    def _version(self, version: int | None) -> ConfigVersion:
        """The config version a plan names (None: the applied one)."""
        cv = self.versions.get(self.applied_version if version is None else version)
        if cv is None:
            raise RuntimeError(f"serif: config version {version} of run {self.run_id} is "
                               f"no longer kept (the newest is {self.version})")
        return cv

    def warm_update(
        self, worker: str, node: str | None, warm: list[str], cold: list[str] | None = None
    ) -> None:
        """A worker plugin reports its shared-memory node, its warm models, and the models
        that went cold (evicted or failed to load).

        Plans mark a model warm when they book it; a report only adds what loaded and
        removes what went cold. Replacing the set would forget models booked but not yet
        loaded, at a moment that depends on timing, and decisions would stop being
        reproducible.
        """
        state = self.workers.get(worker)
        if state is None:
            return
        if node is not None:
            self._set_host_node(worker, state, node)
        for name in warm:
            state.warm.setdefault(name, None)
        for name in cold or ():
            state.warm.pop(name, None)

    async def plan(
        self,
        app: str | None = None,
        tick: int | None = None,
        groups: list[int] | None = None,
        arrival: list[float] | None = None,
        scores: bytes | None = None,
        input_node: dict[str, list[str]] | None = None,
        now: float | None = None,
        started: float | None = None,
        attempt: int = 0,
        request: str | None = None,
        run_id: str | None = None,
        parts: list[dict[str, Any]] | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Pick a model and worker (or a drop, or an answer from the peek) per request.

        One application's tick is given by ``app``, ``tick``, ``groups``, ``arrival``,
        ``scores`` and ``input_node``; several ticks due together by ``parts``, a list of
        dicts with those keys, planned as one problem so that every request's model time
        is priced against the same cluster seconds. The reply then has ``parts``, one
        single-tick reply each, in order.

        ``arrival`` and ``now`` are on the run's logical clock (seconds since its start,
        from the tick schedule), which keeps decisions reproducible for a given seed.
        ``scores`` (a tick's peeks, NaN rows for failed ones) advance the groups' beliefs
        by one tick; a re-plan passes None. ``request`` names an ad-hoc request
        (:meth:`serif_dask.Serif.submit`) planned out of tick order: its ``arrival`` is
        wall-clock time, ``now`` is the scheduler's, and its batch key carries the name.
        With ``run_id``, a plan for another run than the configured one is refused rather
        than made against the wrong state. ``version`` is the config version the ticks
        started under (None: the applied one); the reply names it (``version``) and the
        newest (``config_version``), which is how a driver learns of a new one.
        """
        async with self._lock:  # one plan (or configure) at a time: bookings never race
            self._touch(run_id)
            cv = self._version(version)
            reply = await self._plan(app, tick, groups, arrival, scores, input_node, now,
                                     started, attempt, request, parts, cv)
            reply["version"], reply["config_version"] = cv.version, self.version
            return reply

    async def _plan(
        self, app: str | None, tick: int | None, groups: list[int] | None,
        arrival: list[float] | None, scores: bytes | None,
        input_node: dict[str, list[str]] | None, now: float | None, started: float | None,
        attempt: int, request: str | None, parts: list[dict[str, Any]] | None,
        cv: ConfigVersion,
    ) -> dict[str, Any]:
        single = parts is None
        if parts is None:
            parts = [{"app": app, "tick": tick, "groups": groups, "arrival": arrival,
                      "scores": scores, "input_node": input_node}]
        if started is not None:
            self.run_started = started
        if request is not None:
            now = self.clock(time.time())
        if now is None:
            raise TypeError("serif_plan needs now= unless it plans an ad-hoc request")
        real_now = self.clock(time.time())
        if real_now - now > self.slack:
            # The tick reached its plan far later than the logical clock assumes (reads
            # and peeks fell behind): plan from the real present, or every deadline
            # would be planned against time that has already passed.
            now = real_now
        t0 = time.perf_counter()
        table = cv.table
        view = self._worker_view(now, real_now, table)
        # Beliefs, problem and policy run on the plan thread, under the plan lock: nothing
        # per request touches the event loop (the scheduler's, in one-machine mode the
        # driver's too).
        loop = asyncio.get_running_loop()
        problem, problems, beliefs_out, plan, unmet = await loop.run_in_executor(
            self._executor, self._decide, parts, request, view, now, cv)
        model = np.asarray(plan.model)
        booked = 0.0
        replies, offset = [], 0
        for part, sub, (pi_est, single_pi) in zip(parts, problems, beliefs_out, strict=True):
            rows = np.arange(offset, offset + sub.n_requests)
            offset += sub.n_requests
            label = f"{part['tick']}.{attempt}" if request is None else f"submit.{request}"
            batches = self._commit(part["app"], label, problem, plan, view, rows, table)
            for batch in batches:
                batch["version"] = cv.version
                booked += batch["estimate_s"]
            unserved = rows[model[rows] == DROP]
            app_table = table.app(part["app"])
            answer = problem.peek_utility[unserved] > problem.miss_utility[unserved] + MIN_GAIN
            _, prediction = peek_answer(pi_est[unserved - rows[0]], app_table.utility)
            replies.append({
                "batches": batches,
                "dropped": pack(problem.group[unserved[~answer]]),
                "answered": {"groups": pack(problem.group[unserved[answer]]),
                             "prediction": pack(prediction[answer])},
                "drop_reason": "no-worker" if len(view.addresses) == 0 else "policy-drop",
                "pi": dumps(pi_est),
                "pi_single": None if single_pi is None else dumps(single_pi),
            })
        decision_ms = (time.perf_counter() - t0) * 1000.0
        self.decision_ms.append(decision_ms)
        self.last_plan = time.time()
        self.demand.append((self.last_plan, booked, problem.n_requests, *unmet))
        for reply in replies:
            reply["decision_ms"] = decision_ms
        return replies[0] if single else {"parts": replies, "decision_ms": decision_ms}

    async def calibrate(self, app: str, score_prior: list[float] | None = None,
                        persistence: float | None = None, run_id: str | None = None) -> None:
        """What the fitted SneakPeek estimator tells the belief: the prior its scores are
        posteriors under, and the persistence its calibration labels show (if any).

        Called once per application before the first tick; beliefs start again.
        """
        async with self._lock:
            self._touch(run_id)
            self._calibrate(app, score_prior, persistence)

    def _calibrate(self, app: str, score_prior: list[float] | None,
                   persistence: float | None) -> None:
        assert self.config is not None
        app_cfg = self.config.app(app)
        if score_prior is not None:
            self.score_prior[app] = np.asarray(score_prior, dtype=float)
        self.beliefs[app] = make_beliefs(
            app_cfg, self.config.data.num_groups,
            self._persistence(app_cfg, persistence), self.score_prior.get(app),
        )

    def _persistence(self, app: Any, estimated: float | None = None) -> float:
        """ρ: configured, else estimated from calibration labels, else the peeked
        modality's ``label-persistence``."""
        assert self.config is not None
        if app.sneakpeek.persistence is not None:
            return float(app.sneakpeek.persistence)
        if estimated is not None:
            return float(estimated)
        return float(self.config.modality(self.config.peek_modality(app)).label_persistence)

    def report(self, app: str, outcomes: dict[str, int], reasons: dict[str, int],
               utility: float, deadline_met: int, latencies: Any,
               run_id: str | None = None, batches: list[list] | None = None) -> None:
        """The driver reports finished requests, for live metrics, and each score batch's
        measured seconds (``[key, seconds]``), which teach the planner real latencies."""
        if run_id is not None and run_id != self.run_id:
            return  # a replaced run's last ticks: not this run's metrics
        self.last_activity = time.time()
        for key, seconds in batches or ():
            booked = self.booked.pop(key, None)
            if booked is None or booked[2] <= 0:
                continue
            m, address, estimate = booked  # m: the model's name, "app/model"
            # The estimate already used the ratio in force: the new ratio compounds it.
            current = self.drift.get((m, address), 1.0)
            planned_with = current if abs(math.log(current)) > math.log(DRIFT_TOLERANCE) \
                else 1.0
            ratio = planned_with * float(seconds) / estimate
            self.drift[(m, address)] = (1 - DRIFT_WEIGHT) * current + DRIFT_WEIGHT * ratio
        metrics = self.metrics.get(app)
        if metrics is None:
            return
        n = sum(outcomes.values())
        metrics.requests += n
        metrics.completed += outcomes.get("completed", 0)
        metrics.dropped += outcomes.get("dropped", 0)
        metrics.failed += outcomes.get("failed", 0)
        metrics.utility += utility
        metrics.deadline_met += deadline_met
        for reason, count in reasons.items():
            metrics.reasons[reason] = metrics.reasons.get(reason, 0) + count
        recent = unpack(latencies, float)[-(metrics.latencies.maxlen or 0):]
        metrics.latencies.extend(recent.tolist())
        if n:
            metrics.timeline.append((time.time(), utility / n))

    def state(self) -> dict[str, Any]:
        """A snapshot for the dashboard, the CLI and tests (plain, msgpack-able values)."""
        now = time.time()
        newest = self.versions.get(self.version)
        return {
            "run_id": self.run_id,
            "live_run": self.live_run(),
            "policy": self.policy_name,
            "data_aware": self.data_aware,
            "version": self.version,
            "version_changed_at": newest.changed_at if newest else None,
            "applied_version": self.applied_version,
            "applied_at": self.applied_at.get(self.applied_version),
            "versions": [
                {"version": v.version, "changed_at": v.changed_at,
                 "applied_at": self.applied_at.get(v.version), "policy": v.policy_name,
                 "data_aware": v.data_aware, "changes": list(v.changes)}
                for v in self.versions.values()
            ],
            "workers": self._describe_workers(now),
            "lost_workers": list(self.lost_workers),
            "pending": len(self.pending),
            "hook_errors": self.hook_errors,
            "decision_ms": list(self.decision_ms)[-256:],
            "apps": {
                name: {
                    "requests": m.requests,
                    "completed": m.completed,
                    "dropped": m.dropped,
                    "failed": m.failed,
                    "utility": m.utility,
                    "deadline_met": m.deadline_met,
                    "reasons": dict(m.reasons),
                }
                for name, m in self.metrics.items()
            },
        }

    # -- internals ------------------------------------------------------------------------
    def clock(self, wall: float) -> float:
        """Wall time to the run's logical clock."""
        return wall - self.run_started

    async def _refresh_workers(self) -> None:
        """Ask worker plugins for their shared-memory node and warm models (network only)."""
        replies = await self.scheduler.broadcast(
            msg={"op": "serif_describe"}, workers=list(self.workers), on_error="ignore"
        )
        for address, reply in replies.items():
            state = self.workers.get(address)
            if state is not None and isinstance(reply, dict):
                # Workers drop the previous run's models on its first task: start cold.
                self._set_host_node(address, state, reply.get("node") or state.host_node)
                state.warm = {}

    def _decide(
        self, parts: list[dict[str, Any]], request: str | None, view: WorkerView, now: float,
        cv: ConfigVersion,
    ) -> tuple[PlanProblem, list[PlanProblem], list[tuple[np.ndarray, Any]], Plan,
               tuple[int, float]]:
        """Advance the beliefs by the parts' peeks, build one problem, ask the policy
        (all under the config version ``cv`` the ticks started with); and what the plan
        left unserved for lack of capacity (:func:`planning.unmet_seconds`)."""
        table, data_aware = cv.table, cv.data_aware
        problems, beliefs_out, seeds = [], [], [self.seed]
        for part in parts:
            app_table = table.app(part["app"])
            app_cfg = cv.config.app(part["app"])
            groups_arr = unpack(part["groups"], np.int64)
            arrival = part["arrival"]  # one time for the whole tick, or one per request
            arrival_arr = (np.full(groups_arr.size, float(arrival))
                           if isinstance(arrival, int | float) else unpack(arrival, float))
            if request is not None:
                arrival_arr = arrival_arr - self.run_started
            beliefs = self.beliefs[app_table.name]
            single_pi = None
            if part["scores"] is not None and groups_arr.size:
                score_arr = np.asarray(loads(part["scores"]), dtype=float)
                beliefs.observe(groups_arr, score_arr)
                single_pi = single_look(app_table.prior, score_arr,
                                        self.score_prior.get(app_table.name),
                                        app_cfg.sneakpeek.strength)
            pi_est = beliefs.pi(groups_arr)
            self.latest_pi[app_table.name] = beliefs  # the dashboard reads it on demand
            pi = pi_est if data_aware else np.broadcast_to(app_table.prior, pi_est.shape)
            problems.append(build_problem(
                table, app_table, groups_arr, arrival_arr, pi,
                {mod: unpack_nodes(nodes) for mod, nodes in part["input_node"].items()},
                view, now, np.random.default_rng(0),
                answer=data_aware and app_cfg.sneakpeek.answer,
            ))
            beliefs_out.append((pi_est, single_pi))
            seeds += [app_table.index, int(part["tick"])]
        problem = join(problems, np.random.default_rng(seeds))
        if len(view.addresses) == 0:
            r = problem.n_requests
            plan = Plan(model=np.full(r, DROP), worker=np.full(r, DROP), priority=np.zeros(r))
        else:
            plan = cv.policy(problem)
        return problem, problems, beliefs_out, plan, unmet_seconds(problem, plan)

    def workers_ping(self, token: str) -> None:
        """Echo ``token`` on ``WORKERS_TOPIC``: a client that receives it knows its
        subscription is live (it travels apart from handler calls, so it may lag them)."""
        self.scheduler.log_event(WORKERS_TOPIC, {"action": "ping", "token": token})

    # -- capacity: the adaptive scaler's signal ------------------------------------------
    def capacity(self, window: float | None = None) -> dict[str, Any]:
        """The planner's demand on the compute workers, for an adaptive scaler.

        Over the last ``window`` seconds of plans (default ``CAPACITY_WINDOW_S``):
        ``booked`` model seconds per second the plans put on workers, ``unmet`` seconds per
        second of work they left unserved for lack of capacity (dropped or answered from
        the peek although a model would have earned more), their share of requests
        (``unmet_share``), ``busy`` (booked seconds per second per active compute worker),
        ``idle_s`` since the last plan; each compute worker with its pending batches and
        whether it is being retired; and the run's ``compute_workers`` / ``worker_seconds``.
        Arithmetic on what plans left behind: no I/O, no waiting, safe on the event loop.
        """
        now = time.time()
        window = CAPACITY_WINDOW_S if window is None else float(window)
        # Never average over time before the run began: a ramp would look diluted.
        start = max(now - window, self.run_started if self.run_id else now - window)
        span = max(now - start, 1e-6)
        requests = unmet_n = 0
        booked_s = unmet_s = 0.0
        for t, b, r, un, us in self.demand:
            if t >= start:
                booked_s += b
                requests += r
                unmet_n += un
                unmet_s += us
        real_now = self.clock(now)
        compute = []
        for s in sorted(self.workers.values(), key=lambda s: s.name):
            if s.role != "compute":
                continue
            self._forget_unsubmitted(s, real_now)
            compute.append({"address": s.address, "name": s.name, "node": s.node,
                            "pending": len(s.pending),
                            "retiring": s.address in self.retiring,
                            "backlog": s.backlog(real_now, self.slack, real_now)})
        active = sum(1 for w in compute if not w["retiring"])
        booked = booked_s / span
        return {
            "run_id": self.run_id,
            "live": self.live_run() is not None,
            "planned": bool(self.demand),
            "window_s": span,
            "booked": booked,
            "unmet": unmet_s / span,
            "unmet_share": unmet_n / requests if requests else 0.0,
            "requests": requests,
            "busy": booked / active if active else 0.0,
            "idle_s": now - self.last_plan if self.last_plan else math.inf,
            "compute": compute,
            "active": active,
            **self.compute_time.summary(now),
        }

    def retire(self, workers: list[str]) -> dict[str, Any]:
        """Stop booking these compute workers (names or addresses): they are about to be
        closed. Batches already booked there still run; the reply says how many, so the
        caller closes a worker only once its queue is empty and no batch is lost."""
        by_name = {s.name: a for a, s in self.workers.items()}
        out = {}
        for worker in workers:
            address = worker if worker in self.workers else by_name.get(str(worker))
            state = self.workers.get(address) if address else None
            if state is None or state.role != "compute":
                continue
            self.retiring.setdefault(address, time.time())
            out[address] = len(state.pending)
            logger.info("serif: retiring compute worker %s (%d batches queued)",
                        state.name, len(state.pending))
        return {"retiring": out}

    def _set_host_node(self, address: str, state: WorkerState, node: str) -> None:
        """A worker's shared-memory node; drivers hear of a change (``WORKERS_TOPIC``)."""
        if node != state.host_node:
            state.host_node = node
            self._announce(address)

    def _announce(self, address: str) -> None:
        """Publish a worker that joined or changed (its description) on ``WORKERS_TOPIC``."""
        state = self.workers.get(address)
        if state is not None:
            self.scheduler.log_event(WORKERS_TOPIC, {
                "action": "add", "worker": address, "name": state.name, "role": state.role,
                "node": state.node, "host_node": state.host_node,
            })

    def _describe_workers(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        return [
            {
                "address": s.address,
                "name": s.name,
                "role": s.role,
                "node": s.node,
                "host_node": s.host_node,
                "warm": list(s.warm),
                "backlog": s.backlog(self.clock(now), self.slack, self.clock(now)),
                "pending": len(s.pending),
            }
            for s in sorted(self.workers.values(), key=lambda s: s.name)
        ]

    def _worker_view(self, now: float, real_now: float, table: ModelTable) -> WorkerView:
        compute = sorted(
            (
                s
                for s in self.workers.values()
                if s.role == "compute" and s.node in table.node_names
                and s.address not in self.retiring
            ),
            key=lambda s: s.name,
        )
        warm = np.zeros((len(compute), table.n_models), dtype=bool)
        index = {name: i for i, name in enumerate(table.names)}
        for w, s in enumerate(compute):
            cols = [index[m] for m in s.warm if m in index]
            warm[w, cols] = True
        for s in compute:
            self._forget_unsubmitted(s, real_now)
        backlog = np.asarray([s.backlog(now, self.slack, real_now) for s in compute])
        for s, b in zip(compute, backlog, strict=True):
            # Where reality ran behind the plan, the logical clock catches up with it, so
            # it does not fall behind again the moment the overdue batches finish.
            s.busy_until = max(s.busy_until, now + float(b))
        drift = np.ones((table.n_models, len(compute)))
        for (name, address), ratio in self.drift.items():
            m = index.get(name)
            if m is not None and abs(math.log(ratio)) > math.log(DRIFT_TOLERANCE):
                for w, s in enumerate(compute):
                    if s.address == address:
                        drift[m, w] = ratio
        return WorkerView(
            drift=drift if (drift != 1.0).any() else None,
            addresses=tuple(s.address for s in compute),
            node_index=np.asarray([table.node_names.index(s.node) for s in compute], dtype=int),
            host_node=tuple(s.host_node for s in compute),
            backlog=backlog,
            warm=warm,
        )

    def _forget_unsubmitted(self, state: WorkerState, real_now: float) -> None:
        """Drop bookings whose batch was never submitted (its tick failed)."""
        gone = [key for key, (finish, _) in state.pending.items()
                if finish < real_now - 1.0 and key not in self.scheduler.tasks]
        for key in gone:
            state.pending.pop(key, None)
            self.pending.pop(key, None)

    def _commit(
        self, app: str, tick: str, problem: Any, plan: Plan, view: WorkerView,
        rows: np.ndarray, table: ModelTable,
    ) -> list[dict[str, Any]]:
        """Group the plan's ``rows`` (one tick's requests) into one batch per (worker,
        model) and book the work it adds."""
        priority = np.asarray(plan.priority, dtype=float)
        out: list[dict[str, Any]] = []
        for batch in batches(problem, plan, view.warm, rows):
            m, w, chunk = batch.model, batch.worker, batch.rows
            state = self.workers.get(view.addresses[w])
            model_name = table.names[m].split("/", 1)[1]
            key = f"serif-score-{self.run_id}-{app}-{tick}-{m}-{w}"
            self.booked[key] = (table.names[m], view.addresses[w], float(batch.seconds))
            while len(self.booked) > 4096:
                self.booked.popitem(last=False)
            if state is not None:
                state.book(key, problem.now, batch.seconds)
                state.warm[table.names[m]] = None
                self.pending[key] = state.address
            out.append(
                {
                    "key": key,
                    "worker": view.addresses[w],
                    "model": model_name,
                    "groups": pack(problem.group[chunk]),
                    "priority": float(priority[chunk].max()),
                    "estimate_s": batch.seconds,
                }
            )
        return out


def install(dask_scheduler: Scheduler) -> None:
    """Install the plugin once; safe to call again (``client.run_on_scheduler(install)``)."""
    if SerifSchedulerPlugin.name not in dask_scheduler.plugins:
        SerifSchedulerPlugin(dask_scheduler)


def dask_setup(scheduler: Scheduler) -> None:
    """Entry point for ``dask scheduler --preload serif_dask.scheduler``."""
    install(scheduler)
