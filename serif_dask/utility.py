"""The one definition of utility used by planning, scoring and reporting (see DESIGN.md).

Everything is vectorised numpy: expected utility over requests × models in one ``einsum``,
timeliness elementwise with broadcasting, so a policy never needs a Python loop to price
its options.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "expected_utility",
    "realised_utility",
    "row_normalise",
    "timeliness",
]


def row_normalise(cmat: ArrayLike) -> np.ndarray:
    """Turn a confusion matrix (counts or rates, ``C[true][pred]``) into ``P[c][k]``.

    Works on a stack ``(..., K, K)``. A row without any mass says nothing about how the
    model behaves on that class, so it is an error rather than a silent uniform row.
    """
    c = np.asarray(cmat, dtype=float)
    if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
        raise ValueError(f"confusion matrix must be square (..., K, K), got shape {c.shape}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("confusion matrix entries must be finite and non-negative")
    totals = c.sum(axis=-1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("confusion matrix has an all-zero row")
    return c / totals


def timeliness(latency: ArrayLike, sla: ArrayLike) -> np.ndarray:
    """Deadline decay ``f(L)``: 1 up to the SLA ``d``, a cubic sigmoid to 0 at ``2d``.

    With ``x = (L - d) / d`` the middle part is ``1 - x³ / (x³ + (1 - x)³)``, which is
    smooth, symmetric about ``1.5d`` (where it is 0.5) and flat at both ends.
    """
    lat = np.asarray(latency, dtype=float)
    d = np.asarray(sla, dtype=float)
    x = np.clip((lat - d) / d, 0.0, 1.0)
    y = 1.0 - x
    x3 = x * x * x  # products, not ``**``: numpy's pow is ten times slower, and planning
    # evaluates this for every (request, model) it prices.
    # The denominator is >= 1/4 on [0, 1], so this never divides by zero.
    f = 1.0 - x3 / (x3 + y * y * y)
    return np.where(np.isnan(lat), 0.0, f)


def expected_utility(pi: ArrayLike, P: ArrayLike, U: ArrayLike) -> np.ndarray:
    """``EU[r, m] = Σ_c π[r, c] Σ_k P[m, c, k] U[c, k]`` for class estimates ``pi (R, K)``.

    ``pi`` may also be a single estimate ``(K,)``, giving ``(M,)``. ``P`` is the stack of
    row-normalised confusion matrices ``(M, K, K)``, ``U`` the utility matrix ``U[true][pred]``.
    """
    pi = np.asarray(pi, dtype=float)
    P = np.asarray(P, dtype=float)
    U = np.asarray(U, dtype=float)
    if P.ndim == 2:
        P = P[None]
    k = U.shape[0]
    if U.shape != (k, k) or P.shape[1:] != (k, k) or pi.shape[-1] != k:
        raise ValueError(
            f"shape mismatch: pi {pi.shape}, P {P.shape}, U {U.shape} (expected (..., K), "
            f"(M, K, K), (K, K))"
        )
    return np.einsum("...c,mck,ck->...m", pi, P, U)


def realised_utility(
    latency: ArrayLike,
    sla: ArrayLike,
    U: ArrayLike,
    true: ArrayLike,
    pred: ArrayLike,
    completed: ArrayLike,
    miss_utility: ArrayLike = 0.0,
    expected: ArrayLike | None = None,
) -> np.ndarray:
    """Utility each request earned: ``f(L) · U[true][pred]`` if completed, else ``miss_utility``.

    ``completed`` is False for dropped and failed requests. A completed request whose true
    label is unknown (``-1``, e.g. a live stream) cannot be scored against the truth; it is
    credited ``f(L) · expected``, the expected accuracy utility the planner assumed for it
    (``PlanProblem.eu[r, model]``), so a run without labels still reports a utility that is
    the planner's own estimate rather than a made-up number. Unknown labels without
    ``expected`` are an error.
    """
    U = np.asarray(U, dtype=float)
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    done = np.asarray(completed, dtype=bool)
    shape = np.broadcast_shapes(true.shape, pred.shape, done.shape, np.shape(latency))
    true, pred, done = (np.broadcast_to(a, shape) for a in (true, pred, done))
    unknown = done & (true < 0)
    if np.any(unknown) and expected is None:
        raise ValueError("requests with unknown label (-1) need `expected` utility")
    k = U.shape[0]
    if np.any(done & ((true >= k) | (pred < 0) | (pred >= k))):
        raise ValueError(f"labels and predictions must lie in [0, {k})")
    accuracy_utility = U[np.clip(true, 0, k - 1), np.clip(pred, 0, k - 1)]
    if expected is not None:
        accuracy_utility = np.where(unknown, np.broadcast_to(expected, shape), accuracy_utility)
    f = timeliness(np.where(done, latency, 0.0), sla)
    miss = np.broadcast_to(np.asarray(miss_utility, dtype=float), shape)
    return np.where(done, f * accuracy_utility, miss)
