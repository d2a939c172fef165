import dataclasses

import numpy as np
import pytest

from serif_dask.policies import DROP, Plan, available_policies, builtin_policies, get_policy
from serif_dask.policies._common import MIN_GAIN
from serif_dask.policies._testing import make_problem
from serif_dask.utility import timeliness

BUILTINS = [
    "random",
    "random-cache",
    "fastest",
    "most-accurate",
    "locally-optimal-edf",
    "locally-optimal-edf-cache",
    "grouped-priority",
    "sneakpeek",
]
EDF = ["locally-optimal-edf", "locally-optimal-edf-cache"]
UTILITY_AWARE = [*EDF, "grouped-priority", "sneakpeek"]
CACHE_AWARE = {
    "locally-optimal-edf-cache",
    "grouped-priority",
    "sneakpeek",
    "fastest",
    "most-accurate",
}


def _no_retrieval(p):
    return dataclasses.replace(p, fetch=np.zeros_like(p.fetch))


def _plan(name, p) -> Plan:
    plan = get_policy(name)(p)
    assert isinstance(plan, Plan)
    return plan


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("n", [0, 1, 37, 600])
def test_plan_valid_feasible_own_app(name, n):
    p = make_problem(n, n_ticks=3, seed=n)
    plan = _plan(name, p)
    for a in (plan.model, plan.worker, plan.priority):
        assert a.shape == (n,)
    assert np.all(np.isfinite(plan.priority))
    served = plan.model != DROP
    m, w = plan.model[served], plan.worker[served]
    assert np.all((m >= 0) & (m < p.infer.shape[0]) & (w >= 0) & (w < p.infer.shape[1]))
    assert np.all(np.isfinite(p.infer[m, w])), "assigned to a worker without a latency profile"
    assert np.all(p.model_app[m] == p.app[served]), "assigned another application's model"
    assert np.all(np.isfinite(p.eu[served, m]))
    if name not in UTILITY_AWARE:
        assert served.all(), "baselines serve everything they can"


@pytest.mark.parametrize("name", BUILTINS)
def test_deterministic(name):
    a = _plan(name, make_problem(300, n_ticks=2, seed=5))
    b = _plan(name, make_problem(300, n_ticks=2, seed=5))
    np.testing.assert_array_equal(a.model, b.model)
    np.testing.assert_array_equal(a.worker, b.worker)
    np.testing.assert_array_equal(a.priority, b.priority)


def _worker_ends(p, plan, cache_aware):
    """Independent replay of the cost model: when each worker drains, and its last model."""
    m_count, w_count = p.infer.shape
    served = plan.model != DROP
    counts = np.zeros((m_count, w_count), int)
    np.add.at(counts, (plan.model[served], plan.worker[served]), 1)
    has = counts > 0
    switch = np.where(p.warm.T, 0.0, p.switch) if cache_aware else p.switch
    work = np.where(has, np.where(has, switch, 0) + counts * np.where(has, p.infer, 0), 0)
    end = p.now + p.backlog + work.sum(axis=0)
    retr = p.retrieval[np.flatnonzero(served), plan.model[served], plan.worker[served]]
    start_of_last = plan.finish[served] - (retr if cache_aware else 0.0)
    tail = np.full(w_count, -1)
    for w in range(w_count):  # W is tiny
        on_w = plan.worker[served] == w
        if on_w.any():
            tail[w] = plan.model[served][on_w][np.argmax(start_of_last[on_w])]
    return end, has, tail, switch


@pytest.mark.parametrize("name", [n for n in BUILTINS if not n.startswith("random")])
def test_estimates_match_replay(name):
    p = make_problem(400, n_ticks=2, seed=2)
    plan = _plan(name, p)
    cache = name in CACHE_AWARE
    end, *_ = _worker_ends(p, plan, cache)
    served = plan.model != DROP
    retr = p.retrieval[np.flatnonzero(served), plan.model[served], plan.worker[served]]
    done = plan.finish[served] - (retr if cache else 0.0)
    for w in range(p.infer.shape[1]):
        on_w = plan.worker[served] == w
        if on_w.any():
            assert done[on_w].max() == pytest.approx(end[w])
    assert np.all(np.isnan(plan.finish[~served]))


@pytest.mark.parametrize("name", EDF)
def test_edf_order_per_worker(name):
    p = _no_retrieval(make_problem(500, n_ticks=4, seed=7))
    plan = _plan(name, p)
    served = np.flatnonzero(plan.model != DROP)
    deadline = p.arrival + p.sla
    start = plan.finish[served] - p.infer[plan.model[served], plan.worker[served]]
    for w in range(p.infer.shape[1]):
        on = plan.worker[served] == w
        d, s = deadline[served][on], start[on]
        order = np.argsort(d, kind="stable")
        d, s = d[order], s[order]
        # every later-deadline request starts no earlier than all earlier-deadline ones
        earlier_max = np.maximum.accumulate(s)
        strictly_later = d[1:] > d[:-1]
        assert np.all(s[1:][strictly_later] >= earlier_max[:-1][strictly_later] - 1e-9)
    assert np.all(np.diff(plan.priority[np.argsort(deadline)]) <= 0), "priority is -deadline"


@pytest.mark.parametrize("name", [*UTILITY_AWARE, "fastest", "most-accurate"])
def test_deadlines_met_under_light_load(name):
    p = make_problem(60, n_ticks=2, seed=11, load=0.05)
    plan = _plan(name, p)
    assert np.all(plan.model != DROP)
    assert np.all(plan.finish <= p.arrival + p.sla + 1e-9)


@pytest.mark.parametrize("name", UTILITY_AWARE)
def test_drops_only_when_nothing_beats_a_miss(name):
    p = make_problem(2500, n_ticks=2, seed=4)
    plan = _plan(name, p)
    dropped = np.flatnonzero(plan.model == DROP)
    assert dropped.size > 0, "the workload should be overloaded"
    cache = name in CACHE_AWARE
    end, has, tail, switch = _worker_ends(p, plan, cache)
    m_idx = np.arange(p.infer.shape[0])[:, None]
    is_tail = tail[None, :] == m_idx
    open_ = np.isfinite(p.infer) & (is_tail | ~has)
    finish = end[None, :] + np.where(is_tail, 0.0, np.where(np.isfinite(switch), switch, 0))
    finish = finish + np.where(open_, p.infer, np.inf)  # (M, W)
    fin = finish[None] + (p.retrieval[dropped] if cache else 0.0)
    f = timeliness(fin - p.arrival[dropped, None, None], p.sla[dropped, None, None])
    eu = p.eu[dropped][:, :, None]
    best = np.where(np.isfinite(eu) & open_[None], f * np.where(np.isfinite(eu), eu, 0), -np.inf)
    assert np.all(best.max(axis=(1, 2)) <= p.miss_utility[dropped] + MIN_GAIN + 1e-9)


@pytest.mark.parametrize("name", UTILITY_AWARE)
def test_everything_dropped_when_a_miss_beats_any_model(name):
    p = make_problem(50, seed=1)
    p = dataclasses.replace(p, miss_utility=np.full(50, 1.5))
    assert np.all(_plan(name, p).model == DROP)


def test_sneakpeek_spends_accurate_models_where_pi_is_uncertain():
    p = make_problem(800, seed=9)
    plan = _plan("sneakpeek", p)
    served = plan.model != DROP
    # per request: gain of its app's most accurate (slowest) model over its cheapest one
    eu = p.eu
    cheapest = np.where(
        np.isfinite(eu),
        np.nanmin(np.where(np.isfinite(p.infer), p.infer, np.nan), axis=1)[None],
        np.inf,
    ).argmin(axis=1)
    gain = np.nanmax(np.where(np.isfinite(eu), eu, np.nan), axis=1) - eu[np.arange(800), cheapest]
    cost = np.nanmin(np.where(np.isfinite(p.infer), p.infer, np.nan), axis=1)
    heavy = served & (cost[np.maximum(plan.model, 0)] > np.median(cost))
    hi = gain > np.median(gain)
    assert heavy[hi].mean() > heavy[~hi].mean() + 0.2
    # and the decisions follow pi: with the prior instead, the plan changes
    prior_plan = _plan("sneakpeek", dataclasses.replace(p, eu=p.eu_prior))
    assert np.any(prior_plan.model != plan.model)


def test_data_aware_beats_prior_for_sneakpeek():
    p = make_problem(1500, seed=3)

    def expected_total(plan):
        s = plan.model != DROP
        f = timeliness(np.where(s, plan.finish, 0) - p.arrival, p.sla)
        return np.where(s, f * p.eu[np.arange(1500), np.maximum(plan.model, 0)], 0).sum()

    aware = _plan("sneakpeek", p)
    oblivious = _plan("sneakpeek", dataclasses.replace(p, eu=p.eu_prior))
    assert expected_total(aware) > expected_total(oblivious)


def test_random_cache_prefers_warm_workers():
    p = make_problem(400, seed=6)
    plan = _plan("random-cache", p)
    s = plan.model != DROP
    warm_any = (p.warm.T & np.isfinite(p.infer)).any(axis=1)[plan.model[s]]
    assert np.all(p.warm[plan.worker[s], plan.model[s]][warm_any])
    # a model warm nowhere lands on a single worker (one context switch)
    for m in np.unique(plan.model[s][~warm_any]):
        assert np.unique(plan.worker[s][plan.model[s] == m]).size == 1


def test_registry():
    assert set(BUILTINS) <= set(available_policies())
    assert builtin_policies() == tuple(BUILTINS)
    p = make_problem(20)
    for name in BUILTINS:
        assert callable(get_policy(name))
    by_path = get_policy("serif_dask.policies.baseline:fastest")
    np.testing.assert_array_equal(by_path(p).worker, get_policy("fastest")(p).worker)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        get_policy("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_policy("serif_dask.policies.baseline:missing")


def _one_deadline_problem(eu: np.ndarray, infer: np.ndarray, n_workers: int = 2):
    """R requests of one app due together (sla 1 s), M models warm on idle workers."""
    from serif_dask.policies import PlanProblem

    r, m = eu.shape
    now = 100.0
    return PlanProblem(
        now=now, app=np.zeros(r, int), group=np.arange(r), arrival=np.full(r, now),
        sla=np.ones(r), eu=eu, eu_prior=eu, miss_utility=np.zeros(r),
        source=np.zeros(r, int), fetch=np.zeros((1, m, n_workers)), model_app=np.zeros(m, int),
        infer=np.tile(np.asarray(infer, float)[:, None], (1, n_workers)),
        switch=np.zeros((m, n_workers)), backlog=np.zeros(n_workers),
        warm=np.ones((n_workers, m), bool), rng=np.random.default_rng(0),
    )


@pytest.mark.parametrize("aware", [True, False])
def test_sneakpeek_model_mix_is_near_the_knapsack_optimum(aware: bool) -> None:
    """The chosen mix earns within one request of the LP optimum of the model-choice
    knapsack (max Σ gain s.t. the pooled work fits before the deadline), and fits."""
    from scipy.optimize import linprog

    from serif_dask.policies._common import Planner
    from serif_dask.policies.sneakpeek import SneakPeekPolicy

    rng = np.random.default_rng(7)
    r, infer = 300, np.array([0.002, 0.01, 0.03])
    if aware:  # SneakPeek-like: most requests look clearly negative, some do not
        big_gain = np.where(rng.random(r) < 0.15, rng.uniform(0.3, 1.0, r), 0.05)
    else:  # the prior only: every request alike
        big_gain = np.full(r, 0.2)
    eu = np.stack([0.4 * big_gain, 0.7 * big_gain, big_gain], axis=1)
    p = _one_deadline_problem(eu, infer)
    planner = Planner(p, cache_aware=True)
    order = np.arange(r)
    choice, served, _ = SneakPeekPolicy().choose_models(p, planner, order)
    cost = infer / 2  # two identical workers: pooled seconds per request
    used = cost[choice[served]].sum()
    got = eu[served, choice[served]].sum()
    # LP: x[r, m] >= 0, Σ_m x[r, m] <= 1, Σ x[r, m] cost[m] <= 1 s (the deadline).
    a_ub = np.vstack([np.kron(np.eye(r), np.ones(3)), np.tile(cost, r)[None, :]])
    lp = linprog(-eu.ravel(), A_ub=a_ub, b_ub=np.r_[np.ones(r), 1.0], bounds=(0, 1),
                 method="highs")
    assert lp.success
    assert used <= 1.0 + 1e-9
    assert got >= -lp.fun - eu.max() - 1e-9
    # Neither everything cheap nor everything accurate: a genuine mix fills the budget.
    assert len(set(choice[served].tolist())) >= 2
    assert used >= 1.0 - cost.max() - 1e-9


@pytest.mark.parametrize("cache_aware", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_best_finish_value_is_the_best_over_every_worker(cache_aware: bool, seed: int) -> None:
    # The planner prices a request's best worker for each model from the earliest (or, for a
    # negative expected utility, the latest) finish; brute force over every worker agrees,
    # also once part of the plan is committed (tails, open and closed batches).
    from serif_dask.policies._common import Planner, always

    rng = np.random.default_rng(seed)
    p = make_problem(300, n_ticks=3, seed=seed, load=3.0)
    p = dataclasses.replace(p, eu=p.eu - rng.uniform(0, 0.6, (p.n_requests, 1)))  # some < 0
    planner = Planner(p, cache_aware=cache_aware)
    first = rng.choice(p.n_requests, 40, replace=False)
    for m in np.unique(np.flatnonzero(planner.feasible.any(axis=1))[:2]):
        planner.place(first[first % 2 == m % 2], planner.model_worker_rows(int(m)), always)
    idx = np.setdiff1d(np.arange(p.n_requests), first)
    value, *_ = planner.best_finish_value(idx)
    open_ = planner.open_mask()
    start = p.now + planner.base() + planner.infer
    fetch = planner.fetch[planner.source[idx]] if cache_aware else 0.0
    f = timeliness(start[None] + fetch - planner.arrival[idx, None, None],
                   planner.sla[idx, None, None])
    eu = planner.eu[idx]
    ok = open_[None] & np.isfinite(eu)[:, :, None]
    brute = np.where(ok, f * np.where(np.isfinite(eu), eu, 0.0)[:, :, None], -np.inf).max(axis=2)
    assert (np.isfinite(eu) & (eu < 0)).any() and (~np.isfinite(brute)).any()
    np.testing.assert_array_equal(value, brute)


@pytest.mark.parametrize("kind", ["continuous", "few values", "rounded", "empty", "one"])
def test_stable_argsort_equals_numpy_stable(kind: str) -> None:
    from serif_dask.policies._common import stable_argsort

    rng = np.random.default_rng(len(kind))
    n = {"empty": 0, "one": 1}.get(kind, 5000)
    values = {
        "few values": rng.integers(0, 5, n).astype(float),
        "rounded": np.round(rng.random(n), 2),
    }.get(kind, rng.random(n))
    np.testing.assert_array_equal(stable_argsort(values), np.argsort(values, kind="stable"))
