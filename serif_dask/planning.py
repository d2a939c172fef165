"""Turn a config and the cluster's state into the arrays a policy plans over.

Built once per run on the scheduler (:class:`ModelTable`), then, per tick, a
:class:`~serif_dask.policies.PlanProblem` is assembled with pure numpy: no per-request
Python loops, so planning cost grows with requests only through vectorised operations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from serif_dask.config import SerifConfig
from serif_dask.policies import DROP, Plan, PlanProblem
from serif_dask.policies._common import MIN_GAIN
from serif_dask.utility import expected_utility, row_normalise


@dataclass(frozen=True, eq=False)
class AppTable:
    """One application's matrices: P (M_a, K, K) row-normalised confusion, U (K, K)."""

    index: int
    name: str
    k: int
    prior: np.ndarray
    utility: np.ndarray
    confusion: np.ndarray
    models: np.ndarray  # int (M_a,): global model indices
    sla: float
    miss_utility: float


@dataclass(frozen=True, eq=False)
class ModelTable:
    """Every model of every application, indexed globally, with per-node latencies."""

    names: tuple[str, ...]  # "app/model"
    model_app: np.ndarray  # int (M,)
    modality: tuple[str, ...]  # (M,)
    infer_node: np.ndarray  # float (M, N): inf where the node has no profile
    switch_node: np.ndarray  # float (M, N)
    node_names: tuple[str, ...]  # compute nodes, N
    apps: tuple[AppTable, ...]
    modality_names: tuple[str, ...]
    # retrieval_node[mod, n]: seconds to fetch an input of modality mod to compute node n
    retrieval_node: np.ndarray

    @classmethod
    def from_config(cls, config: SerifConfig) -> ModelTable:
        nodes = tuple(node.name for node in config.system.compute_nodes)
        node_index = {name: i for i, name in enumerate(nodes)}
        names: list[str] = []
        model_app: list[int] = []
        modality: list[str] = []
        infer_rows: list[np.ndarray] = []
        switch_rows: list[np.ndarray] = []
        apps: list[AppTable] = []
        for a, app in enumerate(config.apps):
            first = len(names)
            confusion = []
            for profile in app.model_profiles:
                names.append(f"{app.name}/{profile.name}")
                model_app.append(a)
                modality.append(profile.modality)
                infer = np.full(len(nodes), np.inf)
                switch = np.full(len(nodes), np.inf)
                for node, (t_infer, t_switch) in profile.latencies.items():
                    infer[node_index[node]] = t_infer
                    switch[node_index[node]] = t_switch
                infer_rows.append(infer)
                switch_rows.append(switch)
                confusion.append(row_normalise(np.asarray(profile.cmat, dtype=float)))
            apps.append(
                AppTable(
                    index=a,
                    name=app.name,
                    k=len(app.prior),
                    prior=np.asarray(app.prior, dtype=float),
                    utility=np.asarray(app.utility_matrix, dtype=float),
                    confusion=np.stack(confusion),
                    models=np.arange(first, len(names)),
                    sla=float(app.sla_latency),
                    miss_utility=float(app.miss_utility),
                )
            )
        modality_names = tuple(m.name for m in config.data.data_modalities)
        retrieval = np.zeros((len(modality_names), len(nodes)))
        for i, mod in enumerate(config.data.data_modalities):
            for node, seconds in mod.retrieval_latencies.items():
                if node in node_index:
                    retrieval[i, node_index[node]] = seconds
        return cls(
            names=tuple(names),
            model_app=np.asarray(model_app, dtype=np.int64),
            modality=tuple(modality),
            infer_node=np.stack(infer_rows),
            switch_node=np.stack(switch_rows),
            node_names=nodes,
            apps=tuple(apps),
            modality_names=modality_names,
            retrieval_node=retrieval,
        )

    @property
    def n_models(self) -> int:
        return len(self.names)

    def app(self, name: str) -> AppTable:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def model_index(self, app: str, model: str) -> int:
        return self.names.index(f"{app}/{model}")


@dataclass(frozen=True, eq=False)
class WorkerView:
    """The compute workers a plan may use, in a fixed order."""

    addresses: tuple[str, ...]
    node_index: np.ndarray  # int (W,): index into ModelTable.node_names
    host_node: tuple[str, ...]  # shared-memory node of each worker ($SERIF_NODE)
    backlog: np.ndarray  # float (W,)
    warm: np.ndarray  # bool (W, M)
    #: float (M, W): measured over profiled inference time, where they disagree (None: 1)
    drift: np.ndarray | None = None


def build_problem(
    table: ModelTable,
    app: AppTable,
    groups: np.ndarray,
    arrival: np.ndarray,
    pi: np.ndarray,
    input_node: dict[str, Any],
    workers: WorkerView,
    now: float,
    rng: np.random.Generator,
    answer: bool = False,
) -> PlanProblem:
    """Assemble one application's pending requests into a PlanProblem.

    ``input_node[modality]`` names, per request, the shared-memory node holding its input
    (empty string when unknown), or is a ``(names, code per request)`` pair; a worker on
    that node reads it for free, any other pays the modality's retrieval latency for its
    compute node. With ``answer``, a request may
    be answered from ``pi`` itself (:func:`peek_answer`).
    """
    n = groups.shape[0]
    m_all = table.n_models
    eu = np.full((n, m_all), -np.inf)
    eu_prior = np.full((n, m_all), -np.inf)
    eu[:, app.models] = expected_utility(pi, app.confusion, app.utility)
    prior = np.broadcast_to(app.prior, (1, app.k))
    eu_prior[:, app.models] = expected_utility(prior, app.confusion, app.utility)[0]

    w = len(workers.addresses)
    infer = table.infer_node[:, workers.node_index] if w else np.zeros((m_all, 0))
    if w and workers.drift is not None:
        infer = infer * workers.drift
    switch = table.switch_node[:, workers.node_index] if w else np.zeros((m_all, 0))
    source, fetch = placements(table, app, workers, input_node, n)
    return PlanProblem(
        now=now,
        app=np.full(n, app.index, dtype=np.int64),
        group=np.asarray(groups, dtype=np.int64),
        arrival=np.asarray(arrival, dtype=float),
        sla=np.full(n, app.sla),
        eu=eu,
        eu_prior=eu_prior,
        miss_utility=np.full(n, app.miss_utility),
        source=source,
        fetch=fetch,
        model_app=table.model_app,
        infer=infer,
        switch=switch,
        backlog=workers.backlog.astype(float),
        warm=workers.warm,
        rng=rng,
        model_names=table.names,
        worker_names=workers.addresses,
        peek_utility=peek_answer(pi, app.utility)[0] if answer else np.full(n, -np.inf),
    )


def placements(
    table: ModelTable, app: AppTable, workers: WorkerView, input_node: dict[str, Any], n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Requests grouped by where their inputs lie: (source (n,), fetch (S, M, W)).

    A request's placement is the node holding each of its modalities' inputs; the groups
    of one data server share one, so S is at most the number of distinct server
    combinations, whatever n is. ``fetch[s, m, w]`` is 0 when worker w's node holds the
    input of model m's modality, else that modality's retrieval latency for w's node.
    """
    w = len(workers.addresses)
    mods = [m for m in sorted(input_node)
            if any(table.modality[i] == m for i in app.models)]
    if not mods or n == 0:
        return np.zeros(n, dtype=np.int64), np.zeros((1, table.n_models, w))
    codes, names = [], []
    for mod_name in mods:
        given = input_node[mod_name]
        if isinstance(given, tuple):  # already (names, code per request): serif_dask.wire
            names.append(np.asarray(given[0], dtype=object))
            codes.append(np.asarray(given[1], dtype=np.int64))
            continue
        index: dict[str, int] = {}  # factorise the node names: a dict pass, no string sort
        codes.append(np.fromiter((index.setdefault(str(node), len(index)) for node in given),
                                 dtype=np.int64, count=n))
        names.append(np.asarray(list(index), dtype=object))
    width = [len(x) for x in names]
    flat = np.ravel_multi_index(codes, width)  # one int per combination of nodes
    uniq, source = np.unique(flat, return_inverse=True)
    combos = np.stack(np.unravel_index(uniq, width), axis=1)
    fetch = np.zeros((combos.shape[0], table.n_models, w))
    if w:
        hosts = np.asarray(workers.host_node).astype(str)
        for k, mod_name in enumerate(mods):
            cols = [i for i in app.models if table.modality[i] == mod_name]
            mod = table.modality_names.index(mod_name)
            cost = table.retrieval_node[mod, workers.node_index]  # (W,)
            remote = names[k][combos[:, k]][:, None] != hosts[None, :]  # (S, W)
            fetch[:, cols, :] = (remote * cost[None, :])[:, None, :]
    return source.reshape(-1).astype(np.int64), fetch


def peek_answer(pi: np.ndarray, utility: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best answer from a class estimate alone: (expected utility, prediction) per row.

    The prediction is ``argmax_k Σ_c π_c U[c][k]``, the Bayes decision under π; it costs no
    GPU time, so a request the cluster cannot serve in time is still worth that much.
    """
    value = np.asarray(pi, dtype=float) @ np.asarray(utility, dtype=float)  # (n, K)
    pred = value.argmax(axis=1) if value.size else np.zeros(len(value), dtype=np.int64)
    return value[np.arange(len(value)), pred], pred.astype(np.int64)


#: The request-indexed fields of a PlanProblem (first axis R), joined by :func:`join`
#: (``source`` too, shifted to the joined ``fetch`` table).
_PER_REQUEST = ("app", "group", "arrival", "sla", "eu", "eu_prior", "miss_utility",
                "peek_utility")


def join(problems: list[PlanProblem], rng: np.random.Generator) -> PlanProblem:
    """One problem holding every request of ``problems`` (same models, workers and now).

    Planning applications due together in one problem lets a policy price every request's
    model time against the same cluster seconds, instead of the first application planned
    taking what the second needed more.
    """
    if len(problems) == 1:
        return dataclasses.replace(problems[0], rng=rng)
    first = problems[0]
    joined = {name: np.concatenate([getattr(p, name) for p in problems])
              for name in _PER_REQUEST}
    offsets = np.cumsum([0] + [len(p.fetch) for p in problems[:-1]])
    joined["source"] = np.concatenate([p.source + o for p, o in zip(problems, offsets,
                                                                    strict=True)])
    joined["fetch"] = np.concatenate([p.fetch for p in problems])
    return dataclasses.replace(first, rng=rng, **joined)


@dataclass(frozen=True, eq=False)
class Batch:
    """One (worker, model) score task of a plan: its requests and estimated seconds."""

    model: int  # index into ModelTable.names
    worker: int  # index into the plan's WorkerView
    rows: np.ndarray  # int: the problem's request rows, in the order the task runs them
    seconds: float  # switch (when cold) + the slowest retrieval + one inference per request


def batches(problem: PlanProblem, plan: Plan, warm: np.ndarray, rows: np.ndarray) -> list[Batch]:
    """Group the served requests among ``rows`` into one batch per (worker, model).

    ``warm`` (W, M) is what the planner believed loaded; a cold model pays its switch once.
    The scheduler plugin books exactly these seconds on its logical clock, and
    :mod:`serif_dask.capacity` replays the same arithmetic offline.
    """
    model = np.asarray(plan.model)
    worker = np.asarray(plan.worker)
    served = rows[model[rows] != DROP]
    if served.size == 0:
        return []
    pairs = model[served] * problem.infer.shape[1] + worker[served]
    order = np.argsort(pairs, kind="stable")
    bounds = np.flatnonzero(np.diff(pairs[order])) + 1
    out = []
    for chunk in np.split(served[order], bounds):
        m, w = int(model[chunk[0]]), int(worker[chunk[0]])
        seconds = (
            (problem.switch[m, w] if not warm[w, m] else 0.0)
            + float(problem.fetch[problem.source[chunk], m, w].max())
            + len(chunk) * problem.infer[m, w]
        )
        out.append(Batch(m, w, chunk, float(seconds)))
    return out


def unmet_seconds(problem: PlanProblem, plan: Plan) -> tuple[int, float]:
    """Requests the plan left unserved although a model would have earned more than the
    drop (or the peek's answer), and the model seconds the cheapest such model needs.

    This is work dropped for lack of capacity, not by choice: what the adaptive scaler
    (:mod:`serif_dask.adaptive`) counts as demand the cluster did not meet.
    """
    model = np.asarray(plan.model)
    unserved = np.flatnonzero(model == DROP)
    if unserved.size == 0 or problem.infer.shape[1] == 0:
        return 0, 0.0
    eu = np.asarray(problem.eu, dtype=float)[unserved]
    worth = eu > problem.drop_utility[unserved, None] + MIN_GAIN  # (U, M)
    wanted = worth.any(axis=1)
    if not wanted.any():
        return 0, 0.0
    infer = np.asarray(problem.infer, dtype=float)
    cheapest = np.where(np.isfinite(infer), infer, np.inf).min(axis=1)  # (M,)
    cost = np.where(worth[wanted], cheapest[None, :], np.inf).min(axis=1)
    cost = cost[np.isfinite(cost)]
    return int(wanted.sum()), float(cost.sum())
