"""SERIF's ``locally-optimal-edf`` and ``locally-optimal-edf-cache``, vectorised.

Earliest deadline first: in EDF order, each request gets the model of highest expected
utility that still meets its deadline given every worker's queue (and the context switch a
new batch pays); failing that, the (model, worker) of highest expected realised utility;
it is dropped when even that earns no more than ``miss_utility``. Requests are taken in
cohorts of equal deadline, and within a cohort one list-scheduling pass per model replaces
SERIF's per-request search with deep copies.
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import Plan, PlanProblem
from serif_dask.policies._common import (
    Planner,
    cohorts_by_key,
    edf_order,
    run_cohorts,
    servable,
)

__all__ = ["locally_optimal_edf", "locally_optimal_edf_cache"]


def _edf(problem: PlanProblem, *, cache_aware: bool) -> Plan:
    planner = Planner(problem, cache_aware=cache_aware)
    ok = servable(problem)
    pref = np.where(ok & (planner.eu > planner.miss[:, None]), planner.eu, -np.inf)
    order = edf_order(problem)
    order = order[ok.any(axis=1)[order]]
    run_cohorts(planner, cohorts_by_key(order, planner.deadline), pref)
    return planner.plan(-planner.deadline)


def locally_optimal_edf(problem: PlanProblem) -> Plan:
    """EDF, paying a context switch for every new batch and ignoring input locality."""
    return _edf(problem, cache_aware=False)


def locally_optimal_edf_cache(problem: PlanProblem) -> Plan:
    """EDF knowing warm models (no switch; a model used in this plan stays warm) and
    where each input lies (retrieval latency)."""
    return _edf(problem, cache_aware=True)
