"""Baseline policies: ``random``, ``random-cache``, ``fastest`` and ``most-accurate``.

They ignore timeliness when choosing a model (that is what makes them baselines), but
they never pick an infeasible (model, worker) or another application's model, and the
load-aware ones balance workers by exact list scheduling (see ``_common.fill``).
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import DROP, Plan, PlanProblem
from serif_dask.policies._common import (
    Planner,
    always,
    cohorts_by_key,
    deadlines,
    edf_order,
    servable,
)

__all__ = ["fastest", "most_accurate", "random_cache", "random_policy"]


def _random_pick(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """One uniformly random True column per row of ``mask`` (-1 for an all-False row)."""
    keys = rng.random(mask.shape)
    keys[~mask] = -1.0
    pick = keys.argmax(axis=1)
    return np.where(mask.any(axis=1), pick, DROP)


def _random(problem: PlanProblem, *, prefer_warm: bool) -> Plan:
    rng = problem.rng
    ok = servable(problem)
    model = _random_pick(rng, ok)
    served = model != DROP
    candidates = problem.feasible.copy()  # (M, W)
    if prefer_warm:
        # Warm feasible workers only, where there are any; a model warm nowhere goes to one
        # random feasible worker, so all its requests share one context switch.
        warm = candidates & np.asarray(problem.warm, dtype=bool).T
        cold_models = ~warm.any(axis=1) & candidates.any(axis=1)
        one = _random_pick(rng, candidates)
        chosen = np.zeros_like(candidates)
        chosen[np.flatnonzero(cold_models), one[cold_models]] = True
        candidates = np.where(cold_models[:, None], chosen, warm)
    worker = np.full(problem.n_requests, DROP)
    if served.any():
        worker[served] = _random_pick(rng, candidates[model[served]])
    return Plan(model=model, worker=worker, priority=-deadlines(problem))


def random_policy(problem: PlanProblem) -> Plan:
    """``random``: a uniform model of the request's application, then a uniform feasible worker."""
    return _random(problem, prefer_warm=False)


def random_cache(problem: PlanProblem) -> Plan:
    """``random-cache``: like ``random``, but on a worker where the chosen model is warm."""
    return _random(problem, prefer_warm=True)


def fastest(problem: PlanProblem) -> Plan:
    """``fastest``: earliest finish for every request, whatever the accuracy.

    Every worker runs the application's fastest model it can run; requests go, earliest
    deadline first, to the earliest finishing slot over all workers (least-loaded).
    """
    planner = Planner(problem, cache_aware=True)
    ok = servable(problem)
    infer = np.where(problem.feasible, problem.infer, np.inf)
    order = edf_order(problem)
    model_app = np.asarray(problem.model_app)
    for cohort in cohorts_by_key(order, deadlines(problem)):
        apps = np.asarray(problem.app)[cohort]
        for a in np.unique(apps):
            own = ok[cohort[apps == a]].any(axis=0) & (model_app == a)  # (M,)
            if not own.any():
                continue
            masked = np.where(own[:, None], infer, np.inf)  # (M, W)
            row = np.where(np.isfinite(masked).any(axis=0), masked.argmin(axis=0), -1)
            planner.place(cohort[apps == a], row, always)
    _leftovers(planner, order[ok.any(axis=1)[order]])
    return planner.plan(-deadlines(problem))


def most_accurate(problem: PlanProblem) -> Plan:
    """``most-accurate``: the model of highest expected utility, on the least-loaded worker."""
    planner = Planner(problem, cache_aware=True)
    ok = servable(problem)
    eu = np.where(ok, problem.eu, -np.inf)
    best = eu.argmax(axis=1)
    served = ok.any(axis=1)
    order = edf_order(problem)
    for cohort in cohorts_by_key(order, deadlines(problem)):
        cohort = cohort[served[cohort]]
        for m in np.unique(best[cohort]):
            sel = cohort[best[cohort] == m]
            planner.place(sel, planner.model_worker_rows(int(m)), always)
    _leftovers(planner, order[served[order]])
    return planner.plan(-deadlines(problem))


def _leftovers(planner: Planner, idx: np.ndarray) -> None:
    # A request whose batch was closed by a later one on every worker still gets the best
    # remaining (model, worker), if that earns more than a drop.
    planner.best_effort(idx[planner.model[idx] == DROP])
