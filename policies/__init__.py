"""Scheduling policies: given pending requests and worker state, pick a (model, worker) or a drop.

A policy is any callable ``policy(problem: PlanProblem) -> Plan`` (a function, or an instance
of a class with ``__call__``). It sees only plain numpy arrays, so it can be tested and
benchmarked without a cluster, and it must be vectorised: no Python loops over requests ×
models × workers, no enumeration of permutations.

Built-in policies are looked up by SERIF's names (``random``, ``locally-optimal-edf`` ...);
third-party ones through the ``serif_dask.policies`` entry-point group or a
``"package.module:callable"`` path (see :func:`get_policy`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

__all__ = [
    "DROP",
    "Plan",
    "PlanProblem",
    "Policy",
    "available_policies",
    "builtin_policies",
    "get_policy",
    "register_policy",
]

#: Model/worker index meaning "not served": the request is dropped.
DROP = -1


@dataclass(frozen=True, eq=False)
class PlanProblem:
    """Everything a policy may look at, as arrays. R requests, M models, W compute workers.

    Times are seconds on one wall clock (``time.time()``): ``now`` is when the plan is made.
    A request's utility is ``timeliness(finish - arrival, sla) * U[true][pred]``: full until
    ``arrival + sla`` and decaying to zero at ``arrival + 2 * sla``.
    """

    now: float
    # -- requests (R) --------------------------------------------------------------------
    app: np.ndarray  # int (R,): index of the request's application
    group: np.ndarray  # int (R,): group id (patient, machine)
    arrival: np.ndarray  # float (R,): when the sample was taken
    sla: np.ndarray  # float (R,): the application's sla-latency
    eu: np.ndarray  # float (R, M): expected accuracy utility Σ_c π_c Σ_k P_m[c,k] U[c,k];
    #                 -inf where model m does not belong to the request's application
    eu_prior: np.ndarray  # float (R, M): the same with π = prior (data-oblivious baseline)
    miss_utility: np.ndarray  # float (R,): utility of a drop or failure
    #: int (R,): where r's inputs lie, as an index into ``fetch``: requests whose inputs sit
    #: on the same nodes share one placement, so the cost table stays small at any R.
    source: np.ndarray
    #: float (S, M, W): seconds to bring the inputs of placement s for model m's modality
    #: to worker w (0 when they are in w's node-local cache); see :attr:`retrieval`.
    fetch: np.ndarray
    # -- models (M) ----------------------------------------------------------------------
    model_app: np.ndarray  # int (M,): application index of each model
    infer: np.ndarray  # float (M, W): per-request inference seconds; inf when infeasible
    switch: np.ndarray  # float (M, W): context-switch (load) seconds when m is cold on w
    # -- workers (W) ---------------------------------------------------------------------
    backlog: np.ndarray  # float (W,): seconds of already-queued work on each worker
    warm: np.ndarray  # bool (W, M): model m is loaded on worker w
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    model_names: tuple[str, ...] = ()
    worker_names: tuple[str, ...] = ()
    #: float (R,): expected utility of answering r from its SneakPeek estimate alone, at
    #: no GPU cost (-inf where that is not allowed, or None for no request). A request a
    #: policy drops is answered so when this beats ``miss_utility``; the built-ins count
    #: it as what a drop is worth.
    peek_utility: np.ndarray | None = None

    @property
    def drop_utility(self) -> np.ndarray:
        """float (R,): what not serving r with a model earns: a drop, or the peek's answer."""
        miss = np.broadcast_to(np.asarray(self.miss_utility, dtype=float), self.app.shape)
        if self.peek_utility is None:
            return miss
        return np.maximum(miss, np.asarray(self.peek_utility, dtype=float))

    @property
    def retrieval(self) -> np.ndarray:
        """float (R, M, W): ``fetch`` per request. Dense, so R·M·W floats: index ``fetch``
        with ``source`` for the rows you need instead, as the built-in policies do."""
        return np.asarray(self.fetch, dtype=float)[np.asarray(self.source)]

    def retrieval_of(self, rows: np.ndarray, m: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Seconds to bring request ``rows[i]``'s input for model ``m[i]`` to worker ``w[i]``."""
        return np.asarray(self.fetch, dtype=float)[np.asarray(self.source)[rows], m, w]

    @property
    def feasible(self) -> np.ndarray:
        """bool (M, W): worker w's node has a latency profile for model m."""
        return np.isfinite(self.infer)

    @property
    def n_requests(self) -> int:
        return int(self.app.shape[0])


@dataclass(frozen=True, eq=False)
class Plan:
    """A policy's answer, aligned with the problem's requests.

    ``model[r] == DROP`` (and then ``worker[r] == DROP``) drops request r. ``priority`` is
    passed to Dask (higher runs first) for the score task that carries r.
    """

    model: np.ndarray  # int (R,)
    worker: np.ndarray  # int (R,)
    priority: np.ndarray  # float (R,)
    #: Optional: the policy's own estimate of each request's finish time (NaN for a drop),
    #: under its own cost model; for metrics and tests, never needed to execute the plan.
    finish: np.ndarray | None = None

    def __post_init__(self) -> None:
        model, worker = np.asarray(self.model), np.asarray(self.worker)
        if model.shape != worker.shape or model.shape != np.shape(self.priority):
            raise ValueError("Plan arrays must all have shape (R,)")
        if self.finish is not None and np.shape(self.finish) != model.shape:
            raise ValueError("Plan.finish must have shape (R,)")
        if np.any((model == DROP) != (worker == DROP)):
            raise ValueError("Plan: a request is dropped only when both model and worker are DROP")


Policy = Callable[[PlanProblem], Plan]

_BUILTINS: dict[str, str] = {}
_REGISTERED: dict[str, Policy] = {}


def register_policy(name: str, policy: Policy) -> None:
    """Register a policy object under ``name`` for this process (tests, notebooks)."""
    _REGISTERED[name] = policy


def available_policies() -> list[str]:
    """Names :func:`get_policy` accepts (besides ``package.module:callable`` paths)."""
    names = set(_BUILTINS) | set(_REGISTERED)
    names |= {ep.name for ep in entry_points(group="serif_dask.policies")}
    return sorted(names)


def _instantiate(obj: object) -> Policy:
    # A class is instantiated with no arguments; a function or instance is used as is.
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable")
    return obj  # type: ignore[return-value]


def get_policy(name: str) -> Policy:
    """Resolve a policy by built-in name, registered name, entry point, or import path."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTINS:
        module_name, _, attr = _BUILTINS[name].partition(":")
        return _instantiate(getattr(importlib.import_module(module_name), attr))
    for ep in entry_points(group="serif_dask.policies"):
        if ep.name == name:
            return _instantiate(ep.load())
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import policy {name!r}: {exc}") from None
        return _instantiate(obj)
    raise ValueError(
        f"unknown policy {name!r}; known: {', '.join(available_policies())}, "
        "or give 'package.module:callable'"
    )


def builtin_policies() -> tuple[str, ...]:
    """The policies shipped with serif-dask, in registration order (SERIF's first)."""
    return tuple(_BUILTINS)


def _builtin(name: str, target: str) -> None:
    _BUILTINS[name] = target


_builtin("random", "serif_dask.policies.baseline:random_policy")
_builtin("random-cache", "serif_dask.policies.baseline:random_cache")
_builtin("fastest", "serif_dask.policies.baseline:fastest")
_builtin("most-accurate", "serif_dask.policies.baseline:most_accurate")
_builtin("locally-optimal-edf", "serif_dask.policies.edf:locally_optimal_edf")
_builtin("locally-optimal-edf-cache", "serif_dask.policies.edf:locally_optimal_edf_cache")
_builtin("grouped-priority", "serif_dask.policies.grouped:grouped_priority")
_builtin("sneakpeek", "serif_dask.policies.sneakpeek:sneakpeek")
