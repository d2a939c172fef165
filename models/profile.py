"""Profile mode: a model simulated from its profile (SERIF's ``use-profile: true``).

It takes the profiled time and answers by sampling its confusion-matrix row for the true
label. Draws are a pure function of (seed, app, model, group, tick), so a request gets the
same prediction whichever batch or worker serves it.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def request_uniforms(seed: int, stream: int, groups: np.ndarray, tick: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per group, reproducible from their identifiers alone."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(groups.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
        h = _splitmix64(h ^ np.uint64(stream & 0xFFFFFFFFFFFFFFFF))
        h = _splitmix64(h ^ np.uint64(tick & 0xFFFFFFFFFFFFFFFF))
        h = _splitmix64(h ^ groups.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ProfileModel:
    """Predictions sampled from a row-normalised confusion matrix ``P[true]``."""

    def __init__(self, confusion: np.ndarray, prior: np.ndarray, stream: int):
        self.confusion = confusion / confusion.sum(axis=1, keepdims=True)
        self.cumulative = np.cumsum(self.confusion, axis=1)
        # An unknown label (-1) is drawn from the prior: the model's answer marginalised.
        self.marginal = np.cumsum(prior @ self.confusion)
        self.stream = stream

    def predict(self, labels: np.ndarray, groups: np.ndarray, tick: int, seed: int) -> np.ndarray:
        u = request_uniforms(seed, self.stream, groups, tick)
        known = labels >= 0
        cdf = np.where(known[:, None], self.cumulative[np.maximum(labels, 0)], self.marginal)
        pred = (u[:, None] >= cdf).sum(axis=1)
        return np.minimum(pred, self.confusion.shape[1] - 1).astype(np.int64)
