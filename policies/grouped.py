"""SERIF's ``grouped-priority``, decided greedily instead of by permutations.

Requests are ranked by the expected utility at stake (best expected utility minus what a
drop earns) and planned in a few stake bands, most at stake first; within a band they are
grouped into one batch per (model, worker), each request taking its best model that meets
its deadline, else its best realised utility, else a drop. Priority is the stake.
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import Plan, PlanProblem
from serif_dask.policies._common import Planner, run_cohorts, servable

__all__ = ["grouped_priority"]

#: Number of stake bands planned one after another.
BANDS = 4


def grouped_priority(problem: PlanProblem) -> Plan:
    planner = Planner(problem, cache_aware=True)
    ok = servable(problem)
    eu = np.where(ok, planner.eu, -np.inf)
    stake = eu.max(axis=1, initial=-np.inf) - planner.miss
    pref = np.where(ok & (eu > planner.miss[:, None]), eu, -np.inf)
    r = problem.n_requests
    order = np.lexsort((np.arange(r), problem.group, planner.deadline, -stake))
    order = order[ok.any(axis=1)[order]]
    bands = [b for b in np.array_split(order, min(BANDS, max(order.size, 1))) if b.size]
    run_cohorts(planner, bands, pref)
    return planner.plan(np.where(np.isfinite(stake), stake, 0.0))
