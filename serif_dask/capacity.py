"""Capacity planning (``serif-dask plan``): how many workers of each node type a load needs.

A candidate cluster (a count per compute-node type) is judged by replaying the run it
would make, offline and faster than real time: the same tick schedule and plan rounds as
the driver (:mod:`serif_dask.driver`), the same SneakPeek beliefs (the reader's
class-conditional samples through the calibrated estimator and the forward filter), the
same :class:`~serif_dask.policies.PlanProblem` (:mod:`serif_dask.planning`), the same
policy and seeded generator, and the same booking of batches on each worker's logical
clock as the scheduler plugin (:func:`serif_dask.planning.batches`,
:meth:`serif_dask.scheduler.WorkerState.book`). Outcomes are drawn from the models'
confusion matrices exactly as profile mode draws them, and scored with timeliness
(:mod:`serif_dask.utility`). With a fixed seed the replay makes the run's own decisions
for as long as the cluster keeps up with its plan, so its numbers are a prediction of that
run, not of an idealised one.

Real models' batches take what their ``serif-dask profile`` curve (``profile.json`` next to
``application.json``) says, ``t(b) = a + c·b`` scaled to each node type's latency, while
the policy plans with the per-request latency the run's policy sees.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serif_dask.config import KINDS, ComputeNode, SerifConfig, load_config_dicts
from serif_dask.models.profile import ProfileModel
from serif_dask.planning import ModelTable, WorkerView, batches, build_problem, join, peek_answer
from serif_dask.policies import DROP, get_policy
from serif_dask.policies._common import MIN_GAIN
from serif_dask.records import completed_utility
from serif_dask.rounds import JOINT_WINDOW_S, PIPELINE_S
from serif_dask.scheduler import SLACK_SLA_FRACTION, WorkerState

__all__ = [
    "PlanError",
    "PlanResult",
    "Prediction",
    "SimulatedLoad",
    "node_costs",
    "plan_capacity",
    "planned_documents",
    "simulate",
    "write_plan",
]

#: Seconds simulated when the config runs until stopped (``duration-in-secs: 0``).
DEFAULT_DURATION_S = 60.0
#: Every count vector is tried when there are at most this many; else a greedy search.
EXHAUSTIVE_LIMIT = 64
#: Plans within this share of the best mean utility (at least ``MIN_TOLERANCE``) count as
#: equally good, and the cheapest of them is chosen.
UTILITY_TOLERANCE = 0.01
MIN_TOLERANCE = 1e-3
#: A plan keeps every worker's booked time at most this share of the run: a real cluster
#: needs headroom for what profiles leave out (task dispatch, the first tick's start-up,
#: a shared machine's jitter). Near full booking, a batch that runs late makes the plugin
#: plan from its real queues, and the run leaves the replay behind.
DEFAULT_MAX_BUSY = 0.85
#: Calibration samples the driver's fit task uses (``tasks.fit_task``).
CALIBRATION_SAMPLES = 256


class PlanError(RuntimeError):
    """No plan can be made or none meets the target; the message is one line."""


@dataclass(frozen=True)
class Prediction:
    """What a candidate cluster's replayed run delivers."""

    workers: dict[str, int]  # node type -> count
    cost: float
    requests: int
    completed: int
    dropped: int
    answered: int  # completed from the SneakPeek estimate
    mean_utility: float
    deadline_met: float
    per_app: dict[str, dict[str, float]]
    #: worker -> {model: share of the worker's booked seconds}: what stays warm there
    warm: dict[str, dict[str, float]]
    busy: dict[str, float]  # worker -> booked seconds / simulated seconds
    behind_s: float  # how far real batches ran behind their booking (batch curves)
    left_out: tuple[str, ...] = ()  # "app/model" no planned node can run

    @property
    def busiest(self) -> float:
        """The highest share of the run any worker is booked for."""
        return max(self.busy.values(), default=0.0)

    def brief(self) -> dict[str, Any]:
        return {"workers": self.workers, "cost": self.cost,
                "predicted": {"mean_utility": self.mean_utility,
                              "deadline_met": self.deadline_met},
                "busiest": self.busiest}


@dataclass(frozen=True)
class PlanResult:
    best: Prediction
    alternatives: tuple[Prediction, ...]  # every candidate judged, best first
    documents: dict[str, dict[str, Any]]  # the planned system/application/data JSON
    duration_s: float
    policy: str
    data_aware: bool
    seed: int
    target_deadline_met: float | None
    max_busy: float = DEFAULT_MAX_BUSY

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "workers": best.workers,
            "cost": best.cost,
            "predicted": {
                "mean_utility": best.mean_utility, "deadline_met": best.deadline_met,
                "requests": best.requests, "completed": best.completed,
                "dropped": best.dropped, "answered": best.answered, "per_app": best.per_app,
            },
            "warm": {w: sorted(m, key=m.get, reverse=True) for w, m in best.warm.items()},
            "busy": best.busy,
            "left_out": list(best.left_out),
            "alternatives": [p.brief() for p in self.alternatives],
            "policy": self.policy,
            "data_aware": self.data_aware,
            "seed": self.seed,
            "duration_s": self.duration_s,
            "target_deadline_met": self.target_deadline_met,
            "max_busy": self.max_busy,
        }


# --------------------------------------------------------------------------- the load
@dataclass
class _AppLoad:
    """One application's requests, tick by tick: what does not depend on the cluster."""

    pi: list[np.ndarray]  # per tick, (G, K): the belief the plan sees
    pi_est: list[np.ndarray]  # per tick, (G, K): the belief itself (for answers)
    labels: dict[str, list[np.ndarray]]  # modality -> per tick (G,) true classes
    peek_modality: str


@dataclass
class SimulatedLoad:
    """Requests, beliefs and labels of a run of ``duration`` seconds, computed once.

    Beliefs depend on the data and the estimator only, never on which workers serve, so
    every candidate cluster is judged on the very same requests.
    """

    config: SerifConfig
    duration: float
    seed: int
    data_aware: bool
    #: the driver's plan rounds: ([(app index, tick, due)], now), on the logical clock
    rounds: list[tuple[list[tuple[int, int, float]], float]]
    apps: list[_AppLoad] = field(default_factory=list)

    @classmethod
    def build(cls, config: SerifConfig, *, duration: float, seed: int,
              data_aware: bool) -> SimulatedLoad:
        load = cls(config, duration, seed, data_aware, _rounds(config, duration))
        n_ticks = [0] * len(config.apps)
        for members, _ in load.rounds:
            for a, tick, _ in members:
                n_ticks[a] = max(n_ticks[a], tick + 1)
        for a, app in enumerate(config.apps):
            load.apps.append(_app_load(config, app, n_ticks[a], seed, data_aware))
        return load


def _rounds(config: SerifConfig,
            duration: float) -> list[tuple[list[tuple[int, int, float]], float]]:
    """The driver's plan rounds on the logical clock: ticks due together, and the plan's
    ``now`` (``Driver._clock``, ``rounds.PlanRound``)."""
    index = [0] * len(config.apps)
    out = []
    while True:
        due = [index[i] * a.sample_duration for i, a in enumerate(config.apps)]
        next_due = min(due)
        if next_due >= duration:
            return out
        members = [i for i in range(len(due)) if due[i] <= next_due + JOINT_WINDOW_S]
        out.append(([(i, index[i], due[i]) for i in members],
                    max(due[i] for i in members) + PIPELINE_S))
        for i in members:
            index[i] += 1


def _reader(config: SerifConfig, app: Any, modality: str, server: str, seed: int) -> Any:
    from serif_dask.readers import get_reader

    return get_reader(config.modality(modality), app, config.server(server), seed)


def _app_load(config: SerifConfig, app: Any, n_ticks: int, seed: int,
              data_aware: bool) -> _AppLoad:
    from serif_dask.sneakpeek import calibrate, make_beliefs

    groups = np.arange(config.data.num_groups, dtype=np.int64)
    peek_mod = config.peek_modality(app)
    mods = sorted({p.modality for p in app.model_profiles} | {peek_mod})
    owners = {m: [(s, np.asarray(config.groups_of(s, m), dtype=np.int64))
                  for s in config.server_names] for m in mods}
    readers = {(m, s): _reader(config, app, m, s, seed)
               for m in mods for s, owned in owners[m] if owned.size}
    prior = np.asarray(app.prior, dtype=float)
    estimator = None
    if data_aware:
        fit_server = next((s for s, owned in owners[peek_mod] if owned.size), None)
        if fit_server is not None:
            estimator = calibrate(app, readers[(peek_mod, fit_server)], CALIBRATION_SAMPLES)
    persistence = app.sneakpeek.persistence
    if persistence is None and estimator is not None:
        persistence = estimator.persistence
    if persistence is None:
        persistence = config.modality(peek_mod).label_persistence
    beliefs = make_beliefs(app, groups.size, float(persistence),
                           None if estimator is None else np.asarray(estimator.score_prior))
    load = _AppLoad(pi=[], pi_est=[], labels={m: [] for m in mods}, peek_modality=peek_mod)
    for tick in range(n_ticks):
        scores = np.full((groups.size, app.k), np.nan)
        for m in mods:
            labels = np.full(groups.size, -1, dtype=np.int64)
            for s, owned in owners[m]:
                if not owned.size:
                    continue
                reader = readers[(m, s)]
                if m == peek_mod and estimator is not None:
                    read = reader.read(owned, tick)
                    labels[owned] = read.labels
                    samples = np.asarray(read.samples, dtype=np.float32)
                    scores[owned] = estimator.scores(samples)
                elif hasattr(reader, "labels"):
                    labels[owned] = reader.labels(owned, tick)
                else:
                    labels[owned] = reader.read(owned, tick).labels
            load.labels[m].append(labels)
        if estimator is not None:
            beliefs.observe(groups, scores)
        pi_est = np.asarray(beliefs.pi(groups), dtype=float)
        load.pi_est.append(pi_est)
        load.pi.append(pi_est if data_aware else np.broadcast_to(prior, pi_est.shape))
    return load


# --------------------------------------------------------------------------- curves
def batch_curves(config: SerifConfig) -> dict[str, tuple[float, float, int]]:
    """``"app/model" -> (a, c, reference batch)`` from ``profile.json`` beside
    ``application.json`` (written by ``serif-dask profile --out``), where there is one."""
    source = config.sources.get("application")
    if source is None:
        return {}
    path = Path(source).with_name("profile.json")
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {f"{m['app']}/{m['model']}": (float(m["intercept_s"]), float(m["slope_s"]),
                                            int(m["reference_batch"]))
                for m in doc["models"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path.name}: not a profile written by serif-dask profile: "
                        f"{type(exc).__name__}: {exc}") from None


def _batch_seconds(n: int, infer: float, curve: tuple[float, float, int] | None) -> float:
    """What ``n`` requests really take: the curve, scaled so that its per-request time at
    the reference batch is the node's profiled ``infer``; ``n · infer`` without one."""
    if curve is None:
        return n * infer
    a, c, ref = curve
    at_ref = a + c * ref
    if at_ref <= 0:
        return n * infer
    return infer * ref * (a + c * n) / at_ref


# --------------------------------------------------------------------------- one replay
def simulate(config: SerifConfig, load: SimulatedLoad, policy: str, *,
             curves: Mapping[str, tuple[float, float, int]] | None = None,
             costs: Mapping[str, float] | None = None,
             trace: list[dict[str, Any]] | None = None,
             plan_times: list[tuple[int, float]] | None = None) -> Prediction:
    """Replay ``load`` on ``config``'s compute nodes with ``policy``; see the module doc.

    ``trace`` (a list) receives one dict per batch and per set of answered requests, to
    compare a replay with a run's records; ``plan_times`` one ``(requests, seconds)`` per
    plan round, the time to build the joint problem and run the policy on it (the work of
    the plugin's plan thread), to measure planning cost without a cluster.
    """
    table = ModelTable.from_config(config)
    policy_fn = get_policy(policy)
    nodes = sorted(config.system.compute_nodes, key=lambda n: n.name)  # the plugin's order
    names = tuple(n.name for n in nodes)
    states = [WorkerState(address=n, name=n, role="compute", node=n, host_node=n)
              for n in names]
    warm = np.zeros((len(names), table.n_models), dtype=bool)
    real = np.asarray([not config.model(*name.split("/", 1)).use_profile
                       for name in table.names], dtype=bool)
    warm[:, real] = True  # the driver loads every real model before the clock starts
    node_index = np.asarray([table.node_names.index(n) for n in names], dtype=int)
    actual_free = np.zeros(len(names))  # when each worker really finishes its queue
    booked = np.zeros((len(names), table.n_models))
    behind = 0.0
    curves = curves or {}
    simulators = {
        m: ProfileModel(np.asarray(config.model(*name.split("/", 1)).cmat, dtype=float),
                        table.apps[int(table.model_app[m])].prior,
                        stream=int(table.model_app[m]) * 1009
                        + int(m - table.apps[int(table.model_app[m])].models[0]))
        for m, name in enumerate(table.names)
    }
    groups = np.arange(config.data.num_groups, dtype=np.int64)
    input_node = {}
    for app in config.apps:
        for mod in {p.modality for p in app.model_profiles}:
            # As the driver sends them (serif_dask.wire): server names, a code per group.
            owners = np.asarray(config.data.reader_indices(mod), dtype=np.int64)
            input_node[mod] = (np.asarray(config.server_names, dtype=object), owners)
    tallies = {app.name: _Tally() for app in config.apps}
    slack = SLACK_SLA_FRACTION * min(app.sla_latency for app in config.apps)
    finishes: list[dict[str, float]] = [{} for _ in states]  # key -> real finish
    for members, now in load.rounds:
        # The plugin's view at ``now``: batches not yet really finished are pending, and
        # the real queue counts once one runs more than ``slack`` behind its booking.
        for state, real in zip(states, finishes, strict=True):
            for key in [k for k, t in real.items() if t <= now]:
                del real[key]
                state.pending.pop(key, None)
        backlog = np.asarray([s.backlog(now, slack, now) for s in states])
        for state, b in zip(states, backlog, strict=True):
            state.busy_until = max(state.busy_until, now + float(b))
        view = WorkerView(addresses=names, node_index=node_index, host_node=names,
                          backlog=backlog, warm=warm.copy())
        problems, seeds = [], [load.seed]
        started = time.perf_counter()
        for a, tick, due in members:
            app, app_table = config.apps[a], table.apps[a]
            mods = {p.modality for p in app.model_profiles}
            problems.append(build_problem(
                table, app_table, groups, np.full(groups.size, due),
                load.apps[a].pi[tick], {m: input_node[m] for m in mods}, view, now,
                np.random.default_rng(0), answer=load.data_aware and app.sneakpeek.answer,
            ))
            seeds += [a, tick]
        problem = join(problems, np.random.default_rng(seeds))
        plan = policy_fn(problem)
        model = np.asarray(plan.model)
        if plan_times is not None:
            plan_times.append((problem.n_requests, time.perf_counter() - started))
        queued = []  # (part, batch), in the order the plugin books (and the driver submits)
        offset = 0
        for j, ((a, tick, arrival), sub) in enumerate(zip(members, problems, strict=True)):
            rows = np.arange(offset, offset + sub.n_requests)
            offset += sub.n_requests
            app, app_load, tally = config.apps[a], load.apps[a], tallies[config.apps[a].name]
            utility = np.asarray(app.utility_matrix, dtype=float)
            prior = np.asarray(app.prior, dtype=float)
            for batch in batches(problem, plan, view.warm, rows):
                m, w = batch.model, batch.worker
                key = f"{a}-{tick}-{m}-{w}"
                states[w].book(key, now, batch.seconds)
                warm[w, m] = True
                booked[w, m] += batch.seconds
                queued.append((key, j, batch))
            unserved = rows[model[rows] == DROP]
            answer = (problem.peek_utility[unserved]
                      > problem.miss_utility[unserved] + MIN_GAIN)
            g = problem.group[unserved[answer]]
            if g.size:
                _, pred = peek_answer(app_load.pi_est[tick][g], utility)
                labels = app_load.labels[app_load.peek_modality][tick][g]
                latency = np.full(g.size, now - arrival)
                tally.add(completed_utility(latency, app.sla_latency, utility, prior, labels,
                                            pred), latency <= app.sla_latency, answered=True)
                if trace is not None:
                    trace.append({"app": app.name, "tick": tick, "model": "sneakpeek",
                                  "worker": None, "groups": g.tolist(),
                                  "latency": float(latency[0])})
            tally.drop(int((~answer).sum()), app.miss_utility)
        # Batches run on their worker in the order they were submitted (the first reaches
        # an idle worker and starts before the rest arrive): the round's ticks submit in
        # order of their batches' top priority (rounds.PlanRound), each in booking order.
        priority = np.asarray(plan.priority, dtype=float)
        top = {j: max(float(priority[b.rows].max()) for _, i, b in queued if i == j)
               for j in {i for _, i, _ in queued}}
        queued.sort(key=lambda q: -top[q[1]])
        for key, j, batch in queued:
            a, tick, arrival = members[j]
            app, app_load = config.apps[a], load.apps[a]
            m, w, n = batch.model, batch.worker, batch.rows.size
            profile = config.model(*table.names[m].split("/", 1))
            infer = float(problem.infer[m, w])
            setup = batch.seconds - n * infer
            if profile.use_profile:  # request k is done after k + 1 inferences
                done = setup + infer * np.arange(1, n + 1)
            else:  # one forward for the whole batch
                done = np.full(n, setup + _batch_seconds(n, infer, curves.get(table.names[m])))
            real_start = max(actual_free[w], now)
            actual_free[w] = real_start + float(done[-1])
            finishes[w][key] = actual_free[w]
            g = problem.group[batch.rows]
            labels = app_load.labels[profile.modality][tick][g]
            pred = simulators[m].predict(labels, g, tick, load.seed)
            latency = real_start + done - arrival
            if trace is not None:
                trace.append({"app": app.name, "tick": tick, "model": table.names[m],
                              "worker": names[w], "groups": g.tolist(),
                              "latency": float(latency.max())})
            tallies[app.name].add(completed_utility(
                latency, app.sla_latency, np.asarray(app.utility_matrix, dtype=float),
                np.asarray(app.prior, dtype=float), labels, pred), latency <= app.sla_latency)
        for w, state in enumerate(states):
            behind = max(behind, actual_free[w] - state.busy_until)
    total = _Tally()
    for t in tallies.values():
        total.merge(t)
    counts = _type_counts(config)
    costs = costs or {}
    span = max(load.duration, 1e-9)
    return Prediction(
        workers=counts,
        cost=float(sum(n * costs.get(t, 1.0) for t, n in counts.items())),
        requests=total.requests, completed=total.completed, dropped=total.dropped,
        answered=total.answered, mean_utility=total.mean_utility,
        deadline_met=total.deadline_share,
        per_app={name: {"mean_utility": t.mean_utility, "deadline_met": t.deadline_share,
                        "requests": t.requests, "dropped": t.dropped, "answered": t.answered}
                 for name, t in tallies.items()},
        warm={names[w]: {table.names[m]: float(booked[w, m] / booked[w].sum())
                         for m in np.flatnonzero(booked[w])}
              for w in range(len(names)) if booked[w].sum() > 0},
        busy={names[w]: float(booked[w].sum() / span) for w in range(len(names))},
        behind_s=float(max(behind, 0.0)),
    )


@dataclass
class _Tally:
    requests: int = 0
    completed: int = 0
    dropped: int = 0
    answered: int = 0
    utility: float = 0.0
    met: int = 0

    def add(self, utility: np.ndarray, met: np.ndarray, answered: bool = False) -> None:
        n = int(np.size(utility))
        self.requests += n
        self.completed += n
        self.answered += n if answered else 0
        self.utility += float(np.sum(utility))
        self.met += int(np.sum(met))

    def drop(self, n: int, miss_utility: float) -> None:
        self.requests += n
        self.dropped += n
        self.utility += n * float(miss_utility)

    def merge(self, other: _Tally) -> None:
        for name in ("requests", "completed", "dropped", "answered", "utility", "met"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def mean_utility(self) -> float:
        return self.utility / self.requests if self.requests else 0.0

    @property
    def deadline_share(self) -> float:
        return self.met / self.requests if self.requests else 0.0


def _type_counts(config: SerifConfig) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in config.system.compute_nodes:
        counts[node.node_type] = counts.get(node.node_type, 0) + 1
    return counts


# --------------------------------------------------------------------------- configs
def raw_documents(config: SerifConfig) -> tuple[dict[str, dict[str, Any]], dict[str, Path]]:
    """The config's JSON documents as written (from its files), and their folders."""
    if all(kind in config.sources for kind in KINDS):
        docs = {kind: json.loads(Path(config.sources[kind]).read_text(encoding="utf-8"))
                for kind in KINDS}
        return docs, {kind: Path(config.sources[kind]).resolve().parent for kind in KINDS}
    return config.to_json_dicts(include_secrets=True), {kind: Path.cwd() for kind in KINDS}


def _rebase(value: Any, src: Path, out: Path | None) -> Any:
    """A relative path of a file in ``src`` as seen from ``out`` (absolute without one)."""
    if not isinstance(value, str) or "://" in value or os.path.isabs(value):
        return value
    target = (src / os.path.expanduser(value)).resolve()
    return str(target) if out is None else os.path.relpath(target, out.resolve())


def node_costs(config: SerifConfig, overrides: Mapping[str, float] | None = None
               ) -> dict[str, float]:
    """Cost of one node per type: ``overrides``, else the config's ``cost``, else 1."""
    costs = {t: 1.0 for t in config.system.node_types}
    for node in config.system.compute_nodes:
        if node.cost is not None:
            costs[node.node_type] = float(node.cost)
    for name, cost in (overrides or {}).items():
        if name not in costs:
            raise PlanError(f"--node-cost: unknown node type {name!r}; known: "
                            f"{', '.join(costs)}")
        costs[name] = float(cost)
    return costs


def planned_documents(config: SerifConfig, counts: Mapping[str, int], *,
                      out_dir: Path | None = None,
                      costs: Mapping[str, float] | None = None,
                      ) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """The config's documents with ``counts[type]`` compute nodes of each type.

    Nodes of a type are the config's own of that type, then copies of its first one named
    ``<first>-2``, ``<first>-3`` ... (skipping names in use); latencies are keyed by type.
    Models no planned node can run are left out (returned as ``"app/model"``). Relative
    paths are rewritten to hold from ``out_dir``.
    """
    docs, folders = raw_documents(config)
    docs = copy.deepcopy(docs)
    system = config.system
    by_type: dict[str, list[tuple[int, ComputeNode]]] = {}
    for i, node in enumerate(system.compute_nodes):
        by_type.setdefault(node.node_type, []).append((i, node))
    taken = set(system.node_names) | set(config.server_names)
    raw_nodes = docs["system"]["compute-nodes"]
    planned: list[dict[str, Any]] = []
    template_of: dict[str, str] = {}
    for node_type, n in counts.items():
        if n <= 0:
            continue
        own = by_type[node_type]
        template_of[node_type] = own[0][1].name
        names = [node.name for _, node in own[:n]]
        k = 2
        while len(names) < n:
            name = f"{own[0][1].name}-{k}"
            k += 1
            if name not in taken:
                names.append(name)
                taken.add(name)
        for j, name in enumerate(names):
            entry = copy.deepcopy(raw_nodes[own[min(j, len(own) - 1)][0]])
            entry["name"], entry["type"] = name, node_type
            if costs is not None and node_type in costs:
                entry["cost"] = costs[node_type]
            planned.append(entry)
    docs["system"]["compute-nodes"] = planned
    redis = docs["system"].get("redis")
    if isinstance(redis, dict):
        for key in ("tls-ca-file", "tls-cert-file", "tls-key-file"):
            if key in redis:
                redis[key] = _rebase(redis[key], folders["system"], out_dir)

    left_out: list[str] = []
    for a, app in enumerate(config.apps):
        raw_app = docs["application"]["applications"][a]
        kept = []
        for j, profile in enumerate(app.model_profiles):
            entry = raw_app["model-profiles"][j]
            latencies = {t: list(profile.latencies[node])
                         for t, node in template_of.items() if node in profile.latencies}
            if not latencies:
                left_out.append(f"{app.name}/{profile.name}")
                continue
            entry["latencies"] = latencies
            for key in ("model-weights", "model-data", "weights"):
                if key in entry:
                    entry[key] = _rebase(entry[key], folders["application"], out_dir)
            kept.append(entry)
        if not kept:
            raise PlanError(f"no planned node runs any model of {app.name}")
        raw_app["model-profiles"] = kept
    for i, modality in enumerate(config.data.data_modalities):
        raw_mod = docs["data"]["data-modalities"][i]
        raw_mod["retrieval-latencies"] = {
            t: modality.retrieval_latencies[node] for t, node in template_of.items()
            if node in modality.retrieval_latencies
        }
        if raw_mod.get("impl"):
            continue
        for server in docs["data"].get("servers", []):
            streams = (server.get("streams") or {}).get(modality.name)
            if isinstance(streams, dict):
                for g, value in streams.items():
                    streams[g] = _rebase(value, folders["data"], out_dir)
    return docs, tuple(left_out)


def _load_planned(docs: Mapping[str, dict[str, Any]], out_dir: Path | None,
                  simulate_models: bool) -> SerifConfig:
    base = out_dir if out_dir is not None else Path.cwd()
    sources = {kind: base / f"{kind}.json" for kind in KINDS}
    return load_config_dicts(docs["system"], docs["application"], docs["data"],
                             simulate=simulate_models, check_files=False, sources=sources)


def write_plan(result: PlanResult, out_dir: Path) -> list[Path]:
    """Write the planned config's three files into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in KINDS:
        path = out_dir / f"{kind}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(result.documents[kind], indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


# --------------------------------------------------------------------------- the search
def _candidates(types: Sequence[str], max_workers: int) -> list[dict[str, int]] | None:
    """Every count vector with 1 .. max_workers workers, or None when there are too many."""
    n = math.comb(max_workers + len(types), len(types)) - 1
    if n > EXHAUSTIVE_LIMIT:
        return None
    return [dict(zip(types, c, strict=True))
            for c in itertools.product(range(max_workers + 1), repeat=len(types))
            if 1 <= sum(c) <= max_workers]


def plan_capacity(
    config: SerifConfig,
    *,
    max_workers: int = 8,
    costs: Mapping[str, float] | None = None,
    target_deadline_met: float | None = None,
    duration: float | None = None,
    policy: str | None = None,
    data_aware: bool | None = None,
    seed: int | None = None,
    out_dir: Path | None = None,
    simulate_models: bool = False,
    max_busy: float = DEFAULT_MAX_BUSY,
) -> PlanResult:
    """Choose worker counts per node type for ``config``'s load (``serif-dask plan``).

    Without a target: the highest predicted mean utility, and among plans within
    ``UTILITY_TOLERANCE`` of it the cheapest. With ``target_deadline_met``: the cheapest
    plan whose predicted deadline-met share reaches it (PlanError when none does). Every
    count vector is judged when there are few (``EXHAUSTIVE_LIMIT``), else a greedy
    search adds, one at a time, the worker of most utility (or deadline share, while
    the target is unmet) per unit of cost. Only plans that book no worker for more than
    ``max_busy`` of the run are chosen (all are listed).
    """
    if max_workers < 1:
        raise PlanError("--max-workers must be at least 1")
    given = {t for t in costs or {}} | {n.node_type for n in config.system.compute_nodes
                                         if n.cost is not None}
    costs = node_costs(config, costs)
    explicit = {t: c for t, c in costs.items() if t in given}  # written to the planned nodes
    types = list(config.system.node_types)
    duration = float(duration if duration else config.system.duration_in_secs
                     or DEFAULT_DURATION_S)
    policy = policy or config.system.scheduler_type
    data_aware = config.system.data_aware if data_aware is None else bool(data_aware)
    seed = int(seed if seed else config.system.effective_seed)
    load = SimulatedLoad.build(config, duration=duration, seed=seed, data_aware=data_aware)
    curves = batch_curves(config)
    judged: dict[tuple[int, ...], tuple[Prediction, dict[str, dict[str, Any]]]] = {}

    def judge(counts: dict[str, int]) -> Prediction | None:
        key = tuple(counts.get(t, 0) for t in types)
        if key not in judged:
            try:
                docs, left_out = planned_documents(config, counts, out_dir=out_dir,
                                                   costs=explicit)
            except PlanError:
                return None  # some application has no model on these nodes
            planned = _load_planned(docs, out_dir, simulate_models)
            prediction = simulate(planned, load, policy, curves=curves, costs=costs)
            prediction = _with(prediction, workers={t: counts.get(t, 0) for t in types},
                               left_out=left_out)
            judged[key] = (prediction, docs)
        return judged[key][0]

    candidates = _candidates(types, max_workers)
    if candidates is not None:
        for counts in candidates:
            judge(counts)
    else:
        _greedy(types, max_workers, costs, target_deadline_met, judge)
    if not judged:
        raise PlanError("no combination of node types runs a model of every application")
    predictions = [p for p, _ in judged.values()]
    best = _choose(predictions, target_deadline_met, max_workers, max_busy)
    ranked = sorted(predictions, key=lambda p: (p is not best, -p.mean_utility, p.cost))
    docs = judged[tuple(best.workers.get(t, 0) for t in types)][1]
    return PlanResult(best=best, alternatives=tuple(ranked), documents=docs,
                      duration_s=duration, policy=policy, data_aware=data_aware, seed=seed,
                      target_deadline_met=target_deadline_met, max_busy=max_busy)


def _with(p: Prediction, **changes: Any) -> Prediction:
    from dataclasses import replace

    return replace(p, **changes)


def _greedy(types: Sequence[str], max_workers: int, costs: Mapping[str, float],
            target: float | None, judge: Any) -> None:
    current: Prediction | None = None
    counts = dict.fromkeys(types, 0)
    for _ in range(max_workers):
        steps = []
        for t in types:
            trial = {**counts, t: counts[t] + 1}
            p = judge(trial)
            if p is not None:
                steps.append((t, p))
        if not steps:
            return
        if current is None:
            t, current = max(steps, key=lambda s: (s[1].mean_utility, -costs[s[0]]))
            counts[t] += 1
            continue
        chasing = target is not None and current.deadline_met < target

        def gain(step: tuple[str, Prediction], cur: Prediction = current,
                 chasing: bool = chasing) -> float:
            t, p = step
            d = (p.deadline_met - cur.deadline_met) if chasing else (
                p.mean_utility - cur.mean_utility)
            return d / max(costs[t], 1e-9)

        t, p = max(steps, key=gain)
        better = (p.deadline_met > current.deadline_met if chasing else
                  p.mean_utility > current.mean_utility + _tolerance(current.mean_utility))
        if not better:
            return
        counts[t] += 1
        current = p


def _tolerance(best: float) -> float:
    return max(MIN_TOLERANCE, UTILITY_TOLERANCE * abs(best))


def _choose(predictions: Sequence[Prediction], target: float | None,
            max_workers: int, max_busy: float) -> Prediction:
    def workers(p: Prediction) -> int:
        return sum(p.workers.values())

    roomy = [p for p in predictions if p.busiest <= max_busy + 1e-12]
    if not roomy:
        top = min(predictions, key=lambda p: p.busiest)
        raise PlanError(
            f"every plan of at most {max_workers} workers books a worker for more than "
            f"{max_busy:.0%} of the run (the least: {top.busiest:.0%} with "
            f"{_describe(top.workers)}); allow more workers or a higher --max-busy")
    predictions = roomy

    if target is not None:
        meets = [p for p in predictions if p.deadline_met >= target - 1e-12]
        if not meets:
            top = max(predictions, key=lambda p: (p.deadline_met, p.mean_utility))
            raise PlanError(
                f"no plan of at most {max_workers} workers meets deadline-met {target:.3f}; "
                f"the best reaches {top.deadline_met:.3f} with "
                f"{_describe(top.workers)}")
        return min(meets, key=lambda p: (p.cost, -p.mean_utility, workers(p)))
    top = max(p.mean_utility for p in predictions)
    good = [p for p in predictions if p.mean_utility >= top - _tolerance(top)]
    return min(good, key=lambda p: (p.cost, workers(p), -p.mean_utility))


def _describe(counts: Mapping[str, int]) -> str:
    return " + ".join(f"{n}×{t}" for t, n in counts.items() if n) or "no workers"


def describe_workers(counts: Mapping[str, int]) -> str:
    """``2×bay-a + 1×bay-c``."""
    return _describe(counts)
