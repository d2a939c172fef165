import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serif_dask.utility import expected_utility, realised_utility, row_normalise, timeliness

slas = st.floats(0.01, 100.0)
fractions = st.floats(0.0, 3.0)


def test_row_normalise():
    P = row_normalise([[3, 1], [0, 2]])
    np.testing.assert_allclose(P, [[0.75, 0.25], [0, 1]])
    np.testing.assert_allclose(row_normalise(np.ones((4, 3, 3))).sum(-1), 1)


@pytest.mark.parametrize("bad", [[[1, 0], [0, 0]], [[1, 2, 3]], [[-1, 2], [1, 1]]])
def test_row_normalise_rejects(bad):
    with pytest.raises(ValueError):
        row_normalise(bad)


@given(slas, fractions)
def test_timeliness_range(d, x):
    f = timeliness(x * d, d)
    assert 0.0 <= f <= 1.0


@given(slas)
def test_timeliness_landmarks(d):
    np.testing.assert_allclose(timeliness([0.0, d, 1.5 * d, 2 * d, 5 * d], d), [1, 1, 0.5, 0, 0])


@given(slas, fractions, fractions)
def test_timeliness_monotone(d, a, b):
    lo, hi = sorted((a, b))
    assert timeliness(lo * d, d) >= timeliness(hi * d, d)


@given(slas, st.floats(0.0, 2.0))
def test_timeliness_continuous(d, x):
    eps = 1e-7
    assert abs(timeliness(x * d, d) - timeliness((x + eps) * d, d)) < 1e-4


def test_timeliness_broadcasts():
    f = timeliness(np.linspace(0, 3, 7)[:, None], np.array([1.0, 2.0]))
    assert f.shape == (7, 2)
    assert f[2, 0] == 1.0 and f[3, 0] == 0.5 and f[4, 0] == 0.0


@st.composite
def eu_inputs(draw):
    k = draw(st.integers(2, 4))
    m = draw(st.integers(1, 4))
    r = draw(st.integers(1, 5))
    pos = st.floats(0.01, 1.0)
    pi = draw(hnp.arrays(float, (r, k), elements=pos))
    pi /= pi.sum(1, keepdims=True)
    P = row_normalise(draw(hnp.arrays(float, (m, k, k), elements=pos)))
    U = draw(hnp.arrays(float, (k, k), elements=st.floats(-1, 1)))
    return pi, P, U


@settings(max_examples=50)
@given(eu_inputs())
def test_expected_utility_matches_loops(args):
    pi, P, U = args
    eu = expected_utility(pi, P, U)
    r, k = pi.shape
    brute = np.zeros((r, P.shape[0]))
    for i, m, c, j in itertools.product(range(r), range(P.shape[0]), range(k), range(k)):
        brute[i, m] += pi[i, c] * P[m, c, j] * U[c, j]
    np.testing.assert_allclose(eu, brute, atol=1e-12)
    assert np.all(eu >= U.min() - 1e-12) and np.all(eu <= U.max() + 1e-12)


@settings(max_examples=30)
@given(eu_inputs(), st.data())
def test_expected_utility_one_hot(args, data):
    _, P, U = args
    k = U.shape[0]
    c = data.draw(st.integers(0, k - 1))
    eu = expected_utility(np.eye(k)[c], P, U)
    np.testing.assert_allclose(eu, (P[:, c, :] * U[c]).sum(-1))


def test_expected_utility_shape_errors():
    with pytest.raises(ValueError):
        expected_utility(np.ones((2, 3)) / 3, np.ones((1, 2, 2)) / 2, np.eye(2))


def test_realised_utility():
    U = np.array([[0.1, -0.1], [-1.0, 1.0]])
    u = realised_utility(
        latency=[0.5, 1.5, 0.5, 0.5, 9.0],
        sla=1.0,
        U=U,
        true=[1, 1, 0, 1, 1],
        pred=[1, 1, 1, 0, 1],
        completed=[True, True, True, True, False],
        miss_utility=-0.25,
    )
    np.testing.assert_allclose(u, [1.0, 0.5, -0.1, -1.0, -0.25])


def test_realised_utility_unknown_label():
    U = np.eye(2)
    kw = dict(latency=[1.5], sla=1.0, U=U, true=[-1], pred=[0], completed=[True])
    with pytest.raises(ValueError, match="unknown label"):
        realised_utility(**kw)
    np.testing.assert_allclose(realised_utility(**kw, expected=[0.8]), [0.4])
    # a dropped request with unknown label needs nothing
    assert realised_utility([0.0], 1.0, U, [-1], [0], [False], 0.0)[0] == 0.0
