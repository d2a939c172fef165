"""Real images: scikit-learn's bundled handwritten digits (no download).

The 1,797 images of ``sklearn.datasets.load_digits`` (8×8 pixels, 16 grey levels, classes
0-9) are split once, per class and with a fixed seed, into three disjoint parts:

* ``train`` (60 %): what the example models in :mod:`serif_dask.models.digits` learn from;
* ``calibration`` (15 %): labelled samples for SneakPeek and for the profiler's confusion
  matrices, never trained on, so both are honest held-out numbers;
* ``test`` (25 %): what the groups stream, seen by neither.

Labels. A group's digit follows the same Markov chain as a synthetic stream of the same
application (it keeps its class with probability ``label-persistence``, else redraws it from
the prior), so a digits modality and a synthetic one of one application agree on every
group's condition. Each tick the group shows a test image of its current digit, picked by a
hash of (seed, app, modality, group, tick): deterministic, batch- and order-independent.

Streams. Every group needs one (``use-synthetic-data: false``); the identifier is
``"sklearn:digits"``. A group whose stream names anything else fails alone, with a reason.
Samples are float32 in [0, 1], reshaped to the modality's ``synthetic-shape`` (any shape of
64 elements: ``[1, 8, 8]``, ``[8, 8]`` or ``[64]``). The application needs 10 classes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from serif_dask.readers import Reader, ReaderError, ReadResult, stream_paths
from serif_dask.readers.synthetic import SyntheticReader, _mix, _uniform, stable_key

__all__ = ["IMAGE_SHAPE", "N_CLASSES", "SPLITS", "STREAM_ID", "DigitsReader", "load_split"]

#: The stream identifier of a group that streams the bundled test images.
STREAM_ID = "sklearn:digits"
IMAGE_SHAPE = (1, 8, 8)
N_CLASSES = 10
#: Share of each class in each split; the split is fixed (a seed of its own), because the
#: committed weights were trained on ``train`` and must never see the other two.
SPLITS = {"train": 0.60, "calibration": 0.15, "test": 0.25}
_SPLIT_SEED = 20261101
_PICK = 11  # domain tag of the image-choice hash (synthetic.py uses 1-7)


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (np.asarray(data.images, dtype=np.float32) / 16.0).reshape(-1, *IMAGE_SHAPE)
    target = np.asarray(data.target, dtype=np.int64)
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(target == c))
        cuts = np.round(np.cumsum(list(SPLITS.values()))[:-1] * idx.size).astype(int)
        for name, chunk in zip(SPLITS, np.split(idx, cuts), strict=True):
            parts[name].append(chunk)
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        x, y = images[idx], target[idx]
        x.setflags(write=False)
        y.setflags(write=False)
        out[name] = (x, y)
    return out


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(images float32 (n, 1, 8, 8) in [0, 1], labels int64 (n,))`` of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return _splits()[split]


class DigitsReader(Reader):
    """Groups stream held-out digit images of their current, persistent class."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        super().__init__(modality, app, server, seed)
        if self.k != N_CLASSES:
            raise ReaderError(
                f"modality {modality.name!r}: digits have {N_CLASSES} classes, but application "
                f"{app.name!r} has {self.k}"
            )
        shape = self.declared_shape or IMAGE_SHAPE
        if int(np.prod(shape)) != int(np.prod(IMAGE_SHAPE)):
            raise ReaderError(
                f"modality {modality.name!r}: synthetic-shape {list(shape)} does not hold an "
                "8x8 image; use [1, 8, 8], [8, 8] or [64]"
            )
        self.shape: tuple[int, ...] = tuple(shape)
        # Labels come from the synthetic chain: same (seed, app, group, tick) -> same class.
        self._chain = SyntheticReader(modality, app, server, seed)
        self._key = (stable_key(app.name), stable_key(modality.name))
        self._bad = {
            g: f"stream {s!r} is not {STREAM_ID!r}"
            for g, s in stream_paths(modality, server).items()
            if s != STREAM_ID
        }

    @functools.cached_property
    def _test(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Test images sorted by class, with each class's first index and count."""
        x, y = load_split("test")
        order = np.argsort(y, kind="stable")
        counts = np.bincount(y, minlength=N_CLASSES)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return x[order].reshape(-1, *self.shape), starts, counts

    @property
    def calibration_size(self) -> int:
        """Distinct calibration images; :meth:`calibration` cycles after that many."""
        return int(load_split("calibration")[1].size)

    def labels(self, groups: np.ndarray, tick: int) -> np.ndarray:
        """True digit of each group at ``tick`` (int64)."""
        return self._chain.labels(groups, tick)

    def read(self, groups: np.ndarray, tick: int) -> ReadResult:
        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        labels = self.labels(g, tick)
        images, starts, counts = self._test
        u = _uniform(_mix(self.seed, *self._key, g.astype(np.uint64), int(tick), _PICK))
        pick = starts[labels] + np.minimum((u * counts[labels]).astype(np.int64),
                                           counts[labels] - 1)
        samples = images[pick]  # fancy indexing: a fresh, writable array
        ok = np.ones(g.size, dtype=bool)
        errors: dict[int, str] = {}
        if self._bad:
            for i, group in enumerate(g.tolist()):
                if group in self._bad:
                    ok[i] = False
                    errors[group] = self._bad[group]
            samples[~ok] = 0.0
            labels = np.where(ok, labels, -1)
        return ReadResult(samples, labels, ok, errors)

    def calibration(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The calibration split in a seeded order, cycling once exhausted."""
        x, y = load_split("calibration")
        order = np.random.default_rng([self.seed, *self._key]).permutation(y.size)
        idx = order[np.arange(start, start + n, dtype=np.int64) % y.size]
        return x[idx].reshape(-1, *self.shape), y[idx].copy()
