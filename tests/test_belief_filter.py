"""SneakPeek's forward filter, answers from the peek and joint plans: numbers by hand."""

from __future__ import annotations

import numpy as np
import pytest

from serif_dask.planning import join, peek_answer
from serif_dask.policies import DROP, PlanProblem
from serif_dask.policies.sneakpeek import SneakPeekPolicy
from serif_dask.sneakpeek import (
    ForwardBeliefs,
    GroupBeliefs,
    make_beliefs,
    persistence_from_labels,
    single_look,
)


def test_filter_matches_a_hand_computed_two_tick_posterior() -> None:
    prior = np.array([0.8, 0.2])
    # Scores are posteriors under score_prior [0.5, 0.5]: the likelihood is scores / 0.5.
    b = ForwardBeliefs(prior, n_groups=2, persistence=0.9, score_prior=[0.5, 0.5])
    b.observe(np.array([0, 1]), np.array([[0.3, 0.7], [np.nan, np.nan]]))
    # Tick 1, group 0: predict 0.9·[0.8, 0.2] + 0.1·[0.8, 0.2] = [0.8, 0.2];
    # update ∝ [0.8·0.6, 0.2·1.4] = [0.48, 0.28] → [0.631579, 0.368421].
    np.testing.assert_allclose(b.pi([0])[0], [0.48 / 0.76, 0.28 / 0.76])
    np.testing.assert_allclose(b.pi([1])[0], prior)  # predicted, no look: stays the prior
    b.observe(np.array([0]), np.array([[0.3, 0.7]]))
    # Tick 2: predict 0.9·[0.631579, 0.368421] + 0.1·[0.8, 0.2] = [0.648421, 0.351579];
    # update ∝ [0.648421·0.6, 0.351579·1.4] = [0.389053, 0.492211] → [0.441472, 0.558528].
    predicted = 0.9 * np.array([0.48, 0.28]) / 0.76 + 0.1 * prior
    post = predicted * np.array([0.6, 1.4])
    np.testing.assert_allclose(b.pi([0])[0], post / post.sum())
    np.testing.assert_allclose(b.pi([0])[0], [0.441472, 0.558528], atol=1e-6)


def test_filter_compounds_where_one_look_saturates() -> None:
    prior = np.array([0.9, 0.1])
    look = np.array([[0.6, 0.4]])  # each look mildly points at the rare class
    b = ForwardBeliefs(prior, 1, persistence=0.95)
    d = GroupBeliefs(prior, 1)
    history = []
    for _ in range(8):
        b.observe(np.array([0]), look)
        d.observe(np.array([0]), look)
        history.append(b.pi([0])[0, 1])
    single = single_look(prior, look)[0, 1]
    assert history[0] == pytest.approx(single)
    assert np.all(np.diff(history) > 0)  # evidence compounds, tick after tick
    assert history[-1] > 0.5 > single  # ... to beyond what any one look says
    assert d.pi([0])[0, 1] < 0.5  # the additive belief saturates near one look's score


def test_strength_tempers_the_likelihood() -> None:
    prior = np.array([0.5, 0.5])
    strong = ForwardBeliefs(prior, 1, persistence=0.0, strength=1.0)
    weak = ForwardBeliefs(prior, 1, persistence=0.0, strength=0.5)
    for b in (strong, weak):
        b.observe(np.array([0]), np.array([[0.2, 0.8]]))
    np.testing.assert_allclose(strong.pi([0])[0], [0.2, 0.8])
    np.testing.assert_allclose(weak.pi([0])[0], np.sqrt([0.2, 0.8]) / np.sqrt([0.2, 0.8]).sum())


def test_persistence_is_estimated_from_a_labelled_sequence() -> None:
    prior = np.array([0.7, 0.3])
    rng = np.random.default_rng(1)
    labels = [0]
    for _ in range(20000):  # the persistence chain with ρ = 0.8
        labels.append(labels[-1] if rng.random() < 0.8 else int(rng.random() < prior[1]))
    assert persistence_from_labels(np.asarray(labels), prior) == pytest.approx(0.8, abs=0.02)
    assert persistence_from_labels(np.asarray([0, 1, 0]), prior) is None  # too short


@pytest.mark.parametrize("kwargs", [{"persistence": 1.5}, {"persistence": -0.1},
                                    {"strength": -1.0}])
def test_filter_rejects_bad_settings(kwargs) -> None:
    with pytest.raises(ValueError):
        ForwardBeliefs([0.5, 0.5], 2, **kwargs)


def test_make_beliefs_picks_the_configured_kind() -> None:
    from serif_dask.config import Application

    base = {"name": "a", "sla-latency": 1, "sample-duration": 1,
            "utility-matrix": [[1, 0], [0, 1]],
            "model-profiles": [{"name": "m", "modality": "x", "use-profile": True,
                                "cmat": [[1, 0], [0, 1]], "latencies": {"n": [0.01, 0.1]}}]}
    filt = make_beliefs(Application.model_validate(base), 3, persistence=0.7)
    assert isinstance(filt, ForwardBeliefs) and filt.persistence == 0.7
    old = make_beliefs(Application.model_validate({**base, "sneakpeek": {"belief": "dirichlet"}}),
                       3, persistence=0.7)
    assert isinstance(old, GroupBeliefs)


def test_peek_answer_is_the_bayes_decision() -> None:
    u = np.array([[0.05, -0.05], [-1.0, 1.0]])
    pi = np.array([[0.99, 0.01], [0.9, 0.1], [0.3, 0.7]])
    value, pred = peek_answer(pi, u)
    # predict 1 when π1·1 − 0.05·π0 > −π1 + 0.05·π0, i.e. π1 > 0.0476
    np.testing.assert_array_equal(pred, [0, 1, 1])
    np.testing.assert_allclose(value, [0.99 * 0.05 - 0.01, 0.1 - 0.045, 0.7 - 0.015])


def _problem(app: int, n: int, gain: float, infer: float, *, peek: float = -np.inf,
             n_models: int = 2) -> PlanProblem:
    """n requests of application ``app`` (model ``app`` is its only model), one worker."""
    now = 10.0
    eu = np.full((n, n_models), -np.inf)
    eu[:, app] = gain
    return PlanProblem(
        now=now, app=np.full(n, app), group=np.arange(n), arrival=np.full(n, now),
        sla=np.ones(n), eu=eu, eu_prior=eu, miss_utility=np.zeros(n),
        source=np.zeros(n, int), fetch=np.zeros((1, n_models, 1)),
        model_app=np.arange(n_models),
        infer=np.full((n_models, 1), infer), switch=np.zeros((n_models, 1)),
        backlog=np.zeros(1), warm=np.ones((1, n_models), bool),
        rng=np.random.default_rng(0), peek_utility=np.full(n, peek),
    )


def test_joint_plan_prefers_the_more_valuable_application() -> None:
    """One worker, one second to the deadline, 0.03 s a request: 33 of 40 requests fit.
    Planned one application at a time, the first planned (the cheap one) takes all it wants
    and the valuable one is left the rest; planned jointly, every valuable request is served
    and the cheap application gets what time is left."""
    cheap = _problem(0, 20, gain=0.1, infer=0.03)
    dear = _problem(1, 20, gain=1.0, infer=0.03)
    first = SneakPeekPolicy()(cheap)
    assert (first.model != DROP).all()  # alone, the cheap app takes 0.6 s of the second
    after = SneakPeekPolicy()(PlanProblem(**{**dear.__dict__, "backlog": np.array([0.6])}))
    assert (after.model != DROP).sum() <= 14  # ... and the valuable one gets what is left
    joint = join([cheap, dear], np.random.default_rng(0))
    assert joint.n_requests == 40 and joint.app.tolist() == [0] * 20 + [1] * 20
    plan = SneakPeekPolicy()(joint)
    served = plan.model != DROP
    assert served[20:].all()  # every valuable request
    assert 10 <= served[:20].sum() <= 14  # what time is left goes to the cheap ones
    assert np.nanmax(plan.finish[20:]) <= 11.0 + 1e-9  # the valuable ones in time


def test_policy_leaves_a_request_to_the_peek_when_a_model_adds_nothing() -> None:
    """A confident look earns as much as the model: the GPU is kept for the others."""
    p = _problem(0, 30, gain=0.5, infer=0.05, peek=0.5)
    peek = np.full(30, 0.5)
    peek[:5] = 0.0  # these five the look cannot answer
    p = PlanProblem(**{**p.__dict__, "peek_utility": peek})
    plan = SneakPeekPolicy()(p)
    np.testing.assert_array_equal(plan.model != DROP, np.arange(30) < 5)
    np.testing.assert_allclose(p.drop_utility, np.maximum(0.0, peek))


def test_measured_drift_scales_the_planned_inference_time() -> None:
    """Where measured batch times disagree with the profile, plans use the measured ratio."""
    from serif_dask.config import load_config
    from serif_dask.planning import ModelTable, WorkerView, build_problem
    from tests.conftest import HOSPITAL

    table = ModelTable.from_config(load_config([HOSPITAL]))
    app = table.apps[0]
    w = 2
    drift = np.ones((table.n_models, w))
    drift[app.models[-1], 1] = 3.0  # the big model runs 3x its profile on worker 1
    views = [WorkerView(addresses=("a", "b"), node_index=np.array([0, 1]),
                        host_node=("a", "b"), backlog=np.zeros(w),
                        warm=np.zeros((w, table.n_models), bool), drift=d)
             for d in (None, drift)]
    problems = [build_problem(table, app, np.arange(3), np.zeros(3), np.tile(app.prior, (3, 1)),
                              {}, v, 0.0, np.random.default_rng(0)) for v in views]
    np.testing.assert_allclose(problems[1].infer, problems[0].infer * drift)
