"""Synthetic streams that carry real, persistent class signal.

Labels. Each group's true class follows a Markov chain whose stationary distribution is
the application's prior: every tick the group keeps its class with probability ρ
(``label-persistence``) and otherwise redraws it from the prior, i.e. the transition
matrix is ``P = ρ·I + (1-ρ)·1·priorᵀ``. So ``P(same class next tick) = ρ + (1-ρ)·Σ prior²``
and the mean hold time is ``1/(1-ρ)`` ticks. Labels depend on (seed, app, group, tick)
only, so every modality of an application sees the same patient condition.

Samples. A sample of class c is ``expand(snr·q_c + z) + ε``: ``q_c`` are orthonormal
per-class patterns on a coarse grid of cells (≤ 4 per axis, deterministic from
seed/app/modality), ``z ~ N(0, I)`` is per-sample nuisance on the same grid, ``expand``
repeats each cell over its block of the full ``synthetic-shape``, and ``ε`` is unit white
noise per element. Class means are ``snr·√2`` apart in units of the nuisance, so the Bayes
accuracy on a balanced 2-class problem is ``Φ(snr/√2)`` whatever the shape (0.76 at the
default snr 1.0) and a cheap look at a thumbnail sees as much as the full sample.

Everything is counter-based (a vectorised splitmix64 hash of the keys), not a stateful
RNG: a sample or label does not depend on which other groups are in the batch nor on the
order ticks are asked in, and no per-group state is kept. The label of (group, tick) is
found by walking back to the group's last redraw (expected ``1/(1-ρ)`` steps, done for
all groups at once in windows of 64 ticks).

Cost (measured on the shared 2-core machine): sensor [9, 200] ~5 µs per group, audio
[16000] ~20 µs per group, labels for 10,000 groups ~12 ms. Video [3, 16, 320, 568]
(35 MB) ~10 ms per group, most of it page-faulting the fresh output; the work itself is
two memory passes (~7 ms) because ``ε`` is copied from a 4 MB block of pre-drawn
normals at hashed offsets instead of being drawn fresh. Pass ``out=`` to reuse a buffer.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from serif_dask.readers import (
    DEFAULT_LABEL_PERSISTENCE,
    DEFAULT_SNR,
    Reader,
    ReaderError,
    ReadResult,
)

__all__ = ["SyntheticReader", "coarse_grid", "stable_key"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))
_TO_UNIT = 2.0**-53

# Domain tags keep the hashed streams independent.
_KEEP, _DRAW, _SAMPLE, _CALIB, _Z1, _Z2, _NOISE = range(1, 8)

_NOISE_BLOCK = 1 << 20  # pre-drawn normals: 4 MB of float32
_LABEL_WINDOW = 64  # ticks examined per step of the walk back


def stable_key(text: str) -> int:
    """A 64-bit key for a name that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _mix(*keys: Any) -> np.ndarray:
    """splitmix64 of the keys, broadcast against each other (uint64 array)."""
    with np.errstate(over="ignore"):
        h = np.atleast_1d(np.uint64(0x243F6A8885A308D3))
        for key in keys:
            x = h ^ np.asarray(key, dtype=np.uint64)
            x = x + _GOLDEN
            x = (x ^ (x >> _S30)) * _M1
            x = (x ^ (x >> _S27)) * _M2
            h = x ^ (x >> _S31)
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from hashes."""
    return (h >> _S11).astype(np.float64) * _TO_UNIT


def _normal(*keys: Any) -> np.ndarray:
    """Standard normals from hashes (Box-Muller)."""
    u1 = 1.0 - _uniform(_mix(*keys, _Z1))  # (0, 1]
    u2 = _uniform(_mix(*keys, _Z2))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def coarse_grid(
    shape: tuple[int, ...], k: int, per_axis: int = 4, total: int = 16
) -> tuple[int, ...]:
    """Cells per axis: the largest divisor of each length ≤ ``per_axis``, coarsened until
    there are at most ``total`` cells, then refined until there are at least ``k``
    (orthonormal patterns need ``k`` dimensions)."""

    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    cells = [max(d for d in divisors(n) if d <= per_axis) for n in shape]
    while math.prod(cells) > total:
        i = int(np.argmax(cells))
        cells[i] = max(d for d in divisors(shape[i]) if d < cells[i])
    while math.prod(cells) < k:
        growable = [i for i, n in enumerate(shape) if cells[i] < n]
        if not growable:
            raise ReaderError(
                f"shape {list(shape)} has fewer than {k} elements: cannot hold {k} classes"
            )
        i = max(growable, key=lambda j: shape[j] // cells[j])
        cells[i] = min(d for d in divisors(shape[i]) if d > cells[i])
    return tuple(cells)


def _no_copy(a: np.ndarray, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """``a`` reshaped as a view, never a copy: ``out`` may be rows of a shared-memory
    cache spaced wider than a row, and a silent copy would drop the writes."""
    v = a.view()
    v.shape = tuple(shape)  # raises where reshape would copy
    return v


class SyntheticReader(Reader):
    """Class-conditional samples with persistent per-group labels (module docstring)."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        super().__init__(modality, app, server, seed)
        shape = self.declared_shape
        if not shape or any(s <= 0 for s in shape):
            raise ReaderError(
                f"modality {modality.name!r}: synthetic data needs a positive synthetic-shape"
            )
        self.shape: tuple[int, ...] = shape
        snr = getattr(modality, "synthetic_snr", None)
        rho = getattr(modality, "label_persistence", None)
        self.snr = float(DEFAULT_SNR if snr is None else snr)
        self.persistence = float(DEFAULT_LABEL_PERSISTENCE if rho is None else rho)
        if self.snr < 0 or not 0.0 <= self.persistence <= 1.0:
            raise ReaderError(
                f"modality {modality.name!r}: need synthetic-snr >= 0 and 0 <= "
                f"label-persistence <= 1, got {self.snr} and {self.persistence}"
            )
        prior = np.asarray(app.prior, dtype=np.float64)
        self.prior = prior / prior.sum()
        self._cdf = np.cumsum(self.prior)
        self._app_key = stable_key(app.name)
        self._mod_key = stable_key(modality.name)
        self.cells = coarse_grid(shape, self.k)
        # Orthonormal class patterns on the coarse grid, scaled by the snr: (K, C).
        rng = np.random.default_rng([self.seed, self._app_key, self._mod_key])
        q, _ = np.linalg.qr(rng.standard_normal((math.prod(self.cells), self.k)))
        self.patterns = (self.snr * q.T).astype(np.float32)
        self._block: np.ndarray | None = None

    # -------------------------------------------------------------------- labels
    def labels(self, groups: np.ndarray, tick: int) -> np.ndarray:
        """True class of each group at ``tick`` (int64), shared by all modalities."""
        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        tick = int(tick)
        if tick < 0:
            raise ValueError(f"tick must be >= 0, got {tick}")
        if self.persistence >= 1.0:
            last = np.zeros(g.shape, dtype=np.int64)
        elif self.persistence <= 0.0:
            last = np.full(g.shape, tick, dtype=np.int64)
        else:
            last = self._last_redraw(g, tick)
        u = _uniform(_mix(self.seed, self._app_key, g.astype(np.uint64), last, _DRAW))
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), self.k - 1).astype(np.int64)

    def _last_redraw(self, g: np.ndarray, tick: int) -> np.ndarray:
        """Latest τ <= tick at which each group redrew its class (τ = 0 always does)."""
        last = np.empty(g.shape, dtype=np.int64)
        pending = np.arange(g.size)
        hi = tick
        while pending.size:
            ticks = np.arange(hi, max(hi - _LABEL_WINDOW, -1), -1, dtype=np.int64)
            u = _uniform(
                _mix(self.seed, self._app_key, g[pending, None].astype(np.uint64), ticks, _KEEP)
            )
            redraw = (u >= self.persistence) | (ticks == 0)
            found = redraw.any(axis=1)
            last[pending[found]] = ticks[redraw[found].argmax(axis=1)]
            pending = pending[~found]
            hi -= _LABEL_WINDOW
        return last

    # -------------------------------------------------------------------- samples
    def read(self, groups: np.ndarray, tick: int, *, out: np.ndarray | None = None) -> ReadResult:
        """Samples of ``groups`` at ``tick``; ``out`` (float32 (n, *shape) with C-contiguous
        rows, e.g. reserved shared-memory slots or a reused buffer) is filled in place and
        returned, which saves a copy and page-faulting a fresh allocation (most of the
        cost for video)."""
        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        labels = self.labels(g, tick)
        keys = _mix(self.seed, self._app_key, self._mod_key, g.astype(np.uint64), tick, _SAMPLE)
        samples = self.render(keys, labels, out=out)
        return ReadResult(samples, labels, np.ones(g.size, dtype=bool), {})

    def calibration(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Fresh samples (not from any group) whose classes over-represent rare ones: half
        the prior, half uniform, on a low-discrepancy sequence so every prefix is balanced.
        Estimators apply the app's prior themselves."""
        idx = np.arange(start, start + n, dtype=np.int64)
        target = 0.5 * self.prior + 0.5 / self.k
        u = (0.5 + idx * 0.6180339887498949) % 1.0
        labels = np.minimum(np.searchsorted(np.cumsum(target), u, side="right"), self.k - 1)
        labels = labels.astype(np.int64)
        keys = _mix(self.seed, self._app_key, self._mod_key, idx.astype(np.uint64), _CALIB)
        return self.render(keys, labels), labels

    def _noise_block(self) -> np.ndarray:
        if self._block is None:
            rng = np.random.default_rng([self.seed, self._mod_key, _NOISE])
            self._block = rng.standard_normal(_NOISE_BLOCK, dtype=np.float32)
        return self._block

    def render(
        self, keys: np.ndarray, labels: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Samples (n, *shape) float32 for per-sample hash ``keys`` and classes ``labels``."""
        n = keys.size
        if out is None:
            out = np.empty((n, *self.shape), dtype=np.float32)
        elif (out.shape != (n, *self.shape) or out.dtype != np.float32
              or not out.flags.writeable or (n and not out[0].flags.c_contiguous)):
            raise ValueError(
                f"out must be a writable float32 array of shape {(n, *self.shape)} with "
                "C-contiguous rows"
            )
        if n == 0:
            return out
        flat = _no_copy(out, (n, -1))
        size = flat.shape[1]
        block = self._noise_block()
        chunk = min(size, _NOISE_BLOCK // 2)
        n_chunks = -(-size // chunk)
        span = np.uint64(_NOISE_BLOCK - chunk + 1)
        offsets = _mix(keys[:, None], np.arange(n_chunks, dtype=np.uint64), _NOISE) % span
        offsets = offsets.astype(np.int64)
        for i in range(n):
            row = flat[i]
            for j in range(n_chunks):
                lo = j * chunk
                hi = min(lo + chunk, size)
                o = offsets[i, j]
                row[lo:hi] = block[o : o + hi - lo]
        n_cells = self.patterns.shape[1]
        coarse = self.patterns[labels] + _normal(
            keys[:, None], np.arange(n_cells, dtype=np.uint64)
        ).astype(np.float32)
        # Add each cell's value to its block: split every axis into (cells, block length).
        split: list[int] = [n]
        spread: list[int] = [n]
        for length, c in zip(self.shape, self.cells, strict=True):
            split += [c, length // c]
            spread += [c, 1]
        _no_copy(out, split)[...] += coarse.reshape(spread)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_block"] = None  # 4 MB, cheap to redraw on the other side
        return state
