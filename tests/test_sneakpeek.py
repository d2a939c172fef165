"""SneakPeek: Dirichlet beliefs against hand-computed posteriors, estimator quality."""

from __future__ import annotations

import pickle
import types

import numpy as np
import pytest

from serif_dask.readers import NoCalibrationData, Reader, ReadResult, get_reader
from serif_dask.sneakpeek import (
    Estimator,
    GroupBeliefs,
    NearestMeanEstimator,
    PriorEstimator,
    accuracy,
    brier,
    build_estimator,
    fit_from_reader,
    load_estimator,
)


def make_app(prior, name="app", **sneakpeek):
    return types.SimpleNamespace(
        name=name, prior=tuple(prior), sneakpeek=types.SimpleNamespace(impl=None, **sneakpeek)
    )


def make_modality(shape, name="sensor", snr=1.0, persistence=0.9):
    return types.SimpleNamespace(
        name=name,
        use_synthetic_data=True,
        synthetic_shape=tuple(shape),
        impl=None,
        synthetic_snr=snr,
        label_persistence=persistence,
    )


# ------------------------------------------------------------------ GroupBeliefs
PRIOR = np.array([0.8, 0.2])
S1 = np.array([0.3, 0.7])
S2 = np.array([0.9, 0.1])
S3 = np.array([0.4, 0.6])


@pytest.mark.parametrize("memory", [0.0, 0.5, 1.0])
def test_dirichlet_update_matches_hand_computation(memory):
    # s0 = 2, strength = 3: α0 = [1.6, 0.4]; α ← α0 + m (α − α0) + 3 s.
    b = GroupBeliefs(PRIOR, n_groups=3, memory=memory, strength=3.0, s0=2.0)
    a0 = np.array([1.6, 0.4])
    np.testing.assert_allclose(b.pi([0, 1, 2]), np.tile(PRIOR, (3, 1)))
    expected = a0.copy()
    for s in (S1, S2, S3):
        b.observe(np.array([1]), s[None, :])
        expected = a0 + memory * (expected - a0) + 3.0 * s
        np.testing.assert_allclose(b.alpha[1], expected)
        np.testing.assert_allclose(b.pi([1])[0], expected / expected.sum())
    # Unobserved groups keep the prior.
    np.testing.assert_allclose(b.pi([0, 2]), np.tile(PRIOR, (2, 1)))


def test_dirichlet_hand_numbers():
    # memory 0.5, strength 1, s0 1; written out by hand.
    b = GroupBeliefs([0.5, 0.5], n_groups=1, memory=0.5, strength=1.0, s0=1.0)
    b.observe([0], [[1.0, 0.0]])  # α = [0.5, 0.5] + [1, 0] = [1.5, 0.5]
    np.testing.assert_allclose(b.pi([0]), [[0.75, 0.25]])
    b.observe([0], [[1.0, 0.0]])  # α = [0.5,0.5] + 0.5·[1, 0] + [1, 0] = [2.0, 0.5]
    np.testing.assert_allclose(b.pi([0]), [[0.8, 0.2]])
    b.observe([0], [[0.0, 1.0]])  # α = [0.5,0.5] + 0.5·[1.5, 0] + [0, 1] = [1.25, 1.5]
    np.testing.assert_allclose(b.pi([0]), [[1.25 / 2.75, 1.5 / 2.75]])


def test_memory_one_accumulates_all_evidence():
    b = GroupBeliefs(PRIOR, n_groups=1, memory=1.0, strength=1.0, s0=1.0)
    for s in (S1, S2, S3):
        b.observe([0], [s])
    np.testing.assert_allclose(b.alpha[0], PRIOR + S1 + S2 + S3)


def test_repeated_groups_in_one_call_decay_once_and_add_all():
    b = GroupBeliefs(PRIOR, n_groups=2, memory=0.5, strength=1.0, s0=1.0)
    b.observe([0], [S1])
    b.observe(np.array([0, 1, 0]), np.stack([S2, S3, S3]))
    a0 = PRIOR
    np.testing.assert_allclose(b.alpha[0], a0 + 0.5 * S1 + S2 + S3)
    np.testing.assert_allclose(b.alpha[1], a0 + S3)


def test_pi_rows_sum_to_one_and_vectorised():
    rng = np.random.default_rng(0)
    b = GroupBeliefs([0.6, 0.3, 0.1], n_groups=50, memory=0.7, strength=2.0)
    for _ in range(5):
        groups = rng.integers(0, 50, size=80)
        b.observe(groups, rng.dirichlet(np.ones(3), size=80))
    pi = b.pi()
    assert pi.shape == (50, 3)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    np.testing.assert_allclose(b.pi(np.array([3, 3, 7])), pi[[3, 3, 7]])


def test_non_finite_scores_are_ignored_and_reset():
    b = GroupBeliefs(PRIOR, n_groups=2)
    b.observe([0, 1], [[np.nan, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(b.pi([0])[0], PRIOR)
    assert b.pi([1])[0, 0] > PRIOR[0]
    b.reset([1])
    np.testing.assert_allclose(b.pi(), np.tile(PRIOR, (2, 1)))


def test_beliefs_pickle_and_from_app():
    app = make_app([0.9, 0.1], memory=0.25, strength=2.0)
    b = GroupBeliefs.from_app(app, 4)
    assert (b.memory, b.strength) == (0.25, 2.0)
    b.observe([2], [[0.0, 1.0]])
    c = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(c.pi(), b.pi())


@pytest.mark.parametrize("kwargs", [{"memory": 1.5}, {"strength": -1}, {"s0": 0}])
def test_beliefs_reject_bad_settings(kwargs):
    with pytest.raises(ValueError):
        GroupBeliefs(PRIOR, 2, **kwargs)


# ------------------------------------------------------------------ quality helpers
def test_brier_and_accuracy_ignore_unknown_labels():
    pi = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 0, -1])
    assert accuracy(pi, labels) == 0.5
    assert brier(pi, labels) == pytest.approx(((0.1**2 + 0.1**2) + (0.8**2 + 0.8**2)) / 2)
    assert np.isnan(accuracy(pi, np.full(3, -1)))
    assert np.isnan(brier(pi, np.full(3, -1)))


# ------------------------------------------------------------------ estimators
@pytest.fixture(scope="module")
def balanced_sensor():
    app = make_app([0.5, 0.5])
    reader = get_reader(make_modality([9, 200]), app, None, seed=3)
    return app, reader


def test_estimator_beats_prior_but_is_not_perfect(balanced_sensor):
    app, reader = balanced_sensor
    est = build_estimator(app, reader, n_calibration=512)
    assert isinstance(est, NearestMeanEstimator)
    test = reader.read(np.arange(3000), tick=5)  # held out: live groups, not calibration
    scores = est.scores(test.samples)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    acc = accuracy(scores, test.labels)
    majority = max(np.mean(test.labels == 0), np.mean(test.labels == 1))
    assert acc > majority + 0.15
    assert acc < 0.9  # default snr is realistic: Bayes limit Φ(1/√2) = 0.76
    assert brier(scores, test.labels) < brier(np.tile(est.prior, (3000, 1)), test.labels) - 0.1


def test_estimator_improves_brier_on_skewed_prior():
    app = make_app([0.9, 0.1])
    reader = get_reader(make_modality([16000], name="audio"), app, None, seed=1)
    est = build_estimator(app, reader, n_calibration=512)
    test = reader.read(np.arange(3000), tick=2)
    scores = est.scores(test.samples)
    prior_scores = PriorEstimator(app.prior).scores(test.samples)
    assert brier(scores, test.labels) < brier(prior_scores, test.labels) - 0.015
    assert accuracy(scores, test.labels) >= accuracy(prior_scores, test.labels)


def test_estimator_scores_three_classes():
    app = make_app([0.6, 0.3, 0.1])
    reader = get_reader(make_modality([9, 200]), app, None, seed=2)
    est = build_estimator(app, reader, n_calibration=600)
    test = reader.read(np.arange(2000), tick=1)
    scores = est.scores(test.samples)
    assert scores.shape == (2000, 3)
    assert accuracy(scores, test.labels) > 0.6 + 0.05


def test_video_features_use_a_strided_view():
    est = NearestMeanEstimator([0.5, 0.5])
    clip = np.zeros((2, 3, 16, 320, 568), dtype=np.float32)
    feats = est.features(clip)
    assert feats.shape[0] == 2 and feats.shape[1] <= est.max_features


def test_estimator_missing_class_falls_back_to_prior_for_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 10)).astype(np.float32)
    est = NearestMeanEstimator([0.5, 0.3, 0.2]).fit(x, np.array([0, 1] * 20))
    s = est.scores(x)
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    assert np.all(s[:, 2] > 0)


def test_fit_in_chunks_matches_fit_at_once(balanced_sensor):
    app, reader = balanced_sensor
    whole = NearestMeanEstimator(app.prior).fit(*reader.calibration(300))
    chunked = fit_from_reader(NearestMeanEstimator(app.prior), reader, 300, max_bytes=7200 * 64)
    x = reader.read(np.arange(50), 3).samples
    np.testing.assert_allclose(chunked.scores(x), whole.scores(x), rtol=1e-6, atol=1e-9)
    assert pickle.loads(pickle.dumps(chunked)).scores(x).shape == (50, 2)


def test_prior_estimator_and_fallback_without_calibration():
    class Unlabelled(Reader):
        declared_shape = (4,)

        def read(self, groups, tick):
            n = len(groups)
            return ReadResult(np.zeros((n, 4), np.float32), np.full(n, -1), np.ones(n, bool), {})

        def calibration(self, n, start=0):
            raise NoCalibrationData("no labelled calibration data")

    app = make_app([0.7, 0.3])
    reader = Unlabelled(make_modality([4]), app)
    with pytest.warns(UserWarning, match="prior"):
        est = build_estimator(app, reader)
    assert isinstance(est, PriorEstimator)
    np.testing.assert_allclose(est.scores(np.zeros((3, 4))), [[0.7, 0.3]] * 3)


class ConstantEstimator(Estimator):
    def __init__(self, prior):
        self.prior = np.asarray(prior)

    def fit(self, samples, labels):
        return self

    def scores(self, samples):
        return np.tile([0.0, 1.0], (len(samples), 1))


def test_load_user_estimator(balanced_sensor):
    app, reader = balanced_sensor
    est = load_estimator(f"{__name__}:ConstantEstimator", app.prior)
    assert isinstance(est, ConstantEstimator)
    app2 = make_app([0.5, 0.5])
    app2.sneakpeek.impl = f"{__name__}:ConstantEstimator"
    assert isinstance(build_estimator(app2, reader, 16), ConstantEstimator)
    with pytest.raises(ValueError, match="cannot import"):
        load_estimator("no_such_module_xyz:Thing", app.prior)
    with pytest.raises(ValueError, match="package.module:Class"):
        load_estimator("nocolon", app.prior)


@pytest.mark.parametrize("shape", [(9, 200), (3, 5, 70, 90)])
def test_one_matmul_scores_equal_thumbnail_discriminant(shape):
    app = make_app([0.7, 0.3])
    reader = get_reader(make_modality(shape, name=f"m{len(shape)}"), app, None, seed=4)
    est = NearestMeanEstimator(app.prior, max_elements=4096).fit(*reader.calibration(64))
    x = reader.read(np.arange(20), 1).samples
    logit = (est.features(x) @ est.weights + est.bias) / est.temperature + np.log(est.prior)
    p = np.exp(logit - logit.max(axis=1, keepdims=True))
    np.testing.assert_allclose(est.scores(x), p / p.sum(axis=1, keepdims=True), atol=1e-4)
    with pytest.raises(ValueError, match="fitted on shape"):
        est.scores(np.zeros((1, 7), np.float32))


def test_with_real_config_objects():
    config = pytest.importorskip("serif_dask.config")
    modality = config.Modality.model_validate(
        {
            "name": "sensor",
            "use-synthetic-data": True,
            "synthetic-shape": [9, 200],
            "cache-entry-size": 7200,
            "retrieval-latencies": {},
        }
    )
    app = config.Application.model_validate(
        {
            "name": "hospital",
            "sla-latency": 1.0,
            "sample-duration": 1.0,
            "utility-matrix": [[1, 0], [0, 1]],
            "prior": [0.5, 0.5],
            "model-profiles": [
                {
                    "name": "m",
                    "use-profile": True,
                    "modality": "sensor",
                    "cmat": [[9, 1], [1, 9]],
                    "latencies": {"n": [0.01, 0.01]},
                }
            ],
        }
    )
    reader = get_reader(modality, app, None, seed=0)
    est = build_estimator(app, reader, n_calibration=256)
    beliefs = GroupBeliefs.from_app(app, n_groups=100)
    groups = np.arange(100)
    for tick in range(3):
        res = reader.read(groups, tick)
        beliefs.observe(groups[res.ok], est.scores(res.samples[res.ok]))
    pi = beliefs.pi(groups)
    np.testing.assert_allclose(pi.sum(axis=1), 1.0)
    assert accuracy(pi, reader.labels(groups, 2)) > 0.6


def test_memory_pays_when_conditions_persist(balanced_sensor):
    app, reader = balanced_sensor
    est = build_estimator(app, reader, n_calibration=256)
    groups = np.arange(600)
    reads = [reader.read(groups, t) for t in range(12)]
    scores = [est.scores(r.samples) for r in reads]

    def late_accuracy(memory):
        b = GroupBeliefs(app.prior, len(groups), memory=memory, strength=1.0)
        accs = []
        for t, (r, s) in enumerate(zip(reads, scores, strict=True)):
            b.observe(groups, s)
            if t >= 6:
                accs.append(accuracy(b.pi(groups), r.labels))
        return np.mean(accs)

    assert late_accuracy(0.5) > late_accuracy(0.0) + 0.03
