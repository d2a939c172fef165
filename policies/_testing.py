"""A realistic synthetic :class:`PlanProblem`, for tests and ``bench/overhead.py``.

Two applications with two classes each (a rare, valuable positive class), models of
different speed and accuracy, workers that cannot run every model, some warm models,
random backlogs and input locality, and SneakPeek-like class estimates: confident for
most negatives, uncertain or positive for the rest.
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import PlanProblem
from serif_dask.utility import expected_utility, row_normalise

__all__ = ["make_problem"]

# (name, per-request seconds on a reference GPU, context switch seconds,
#  P(correct | negative), P(correct | positive))
_APPS = (
    {
        "name": "fall",
        "sla": 1.0,
        "prior": (0.9, 0.1),
        "utility": ((0.1, -0.1), (-1.0, 1.0)),
        "models": (
            ("tiny", 0.0008, 0.05, 0.97, 0.55),
            ("small", 0.0020, 0.10, 0.97, 0.75),
            ("base", 0.0050, 0.25, 0.98, 0.88),
            ("large", 0.0120, 0.60, 0.99, 0.96),
        ),
    },
    {
        "name": "wake",
        "sla": 0.5,
        "prior": (0.8, 0.2),
        "utility": ((0.2, -0.2), (-0.6, 1.0)),
        "models": (
            ("kws-s", 0.0005, 0.03, 0.95, 0.70),
            ("kws-m", 0.0015, 0.08, 0.96, 0.85),
            ("kws-l", 0.0040, 0.20, 0.98, 0.94),
        ),
    },
)


def make_problem(
    n_requests: int,
    *,
    n_workers: int = 4,
    n_ticks: int = 1,
    seed: int = 0,
    now: float = 1_000.0,
    data_aware: bool = True,
    load: float = 1.0,
) -> PlanProblem:
    """Build a problem with ``n_requests`` pending requests split over both applications.

    ``n_ticks`` sets how many distinct arrival times (ticks) are pending; ``load`` scales
    every latency, so ``load < 1`` makes a lightly loaded cluster.
    """
    rng = np.random.default_rng(seed)
    names: list[str] = []
    model_app: list[int] = []
    infer_ref: list[float] = []
    switch_ref: list[float] = []
    P: list[np.ndarray] = []
    for a, spec in enumerate(_APPS):
        for name, t, s, tn, tp in spec["models"]:
            names.append(f"{spec['name']}/{name}")
            model_app.append(a)
            infer_ref.append(t)
            switch_ref.append(s)
            P.append(row_normalise([[tn, 1 - tn], [1 - tp, tp]]))
    m = len(names)
    model_app_arr = np.asarray(model_app)
    # Workers differ in speed; each model is missing on about a fifth of the workers, but
    # every model runs somewhere.
    speed = rng.uniform(0.7, 1.5, n_workers)
    infer = np.outer(infer_ref, 1.0 / speed) * load
    switch = np.outer(switch_ref, 1.0 / speed) * load
    infeasible = rng.random((m, n_workers)) < 0.2
    infeasible[np.arange(m), rng.integers(0, n_workers, m)] = False
    infer[infeasible] = np.inf
    switch[infeasible] = np.inf
    warm = (rng.random((n_workers, m)) < 0.3) & ~infeasible.T

    app = rng.integers(0, len(_APPS), n_requests)
    group = rng.permutation(n_requests)
    sla = np.array([spec["sla"] for spec in _APPS])[app]
    tick = rng.integers(0, n_ticks, n_requests)
    arrival = now - 0.05 - 0.1 * tick - rng.uniform(0, 0.01, n_requests) * (n_ticks > 1)
    eu = np.full((n_requests, m), -np.inf)
    eu_prior = np.full((n_requests, m), -np.inf)
    for a, spec in enumerate(_APPS):
        rows = np.flatnonzero(app == a)
        cols = np.flatnonzero(model_app_arr == a)
        prior = np.asarray(spec["prior"])
        truth = rng.random(rows.size) < prior[1]
        # A cheap look: positives look positive-ish, most negatives look clearly negative.
        p_pos = np.where(truth, rng.beta(4, 2, rows.size), rng.beta(1, 8, rows.size))
        pi = np.stack([1 - p_pos, p_pos], axis=1) if data_aware else np.tile(prior, (rows.size, 1))
        stack = np.stack([P[c] for c in cols])
        eu[np.ix_(rows, cols)] = expected_utility(pi, stack, spec["utility"])
        eu_prior[np.ix_(rows, cols)] = expected_utility(prior, stack, spec["utility"])[None, :]
    # Inputs sit in one node's cache; any other worker pays 5-20 ms to fetch them.
    home = rng.integers(0, n_workers, n_requests)
    seconds = rng.uniform(0.005, 0.02, n_workers)
    fetch = np.broadcast_to(seconds[None, None, :], (n_workers, m, n_workers)).copy()
    fetch[np.arange(n_workers), :, np.arange(n_workers)] = 0.0  # placement s: worker s's node
    return PlanProblem(
        now=now,
        app=app,
        group=group,
        arrival=arrival,
        sla=sla,
        eu=eu,
        eu_prior=eu_prior,
        miss_utility=np.zeros(n_requests),
        source=home,
        fetch=fetch,
        model_app=model_app_arr,
        infer=infer,
        switch=switch,
        backlog=rng.uniform(0.0, 0.1, n_workers),
        warm=warm,
        rng=np.random.default_rng(seed + 1),
        model_names=tuple(names),
        worker_names=tuple(f"gpu-{w}" for w in range(n_workers)),
    )
