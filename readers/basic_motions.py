"""Real sensor windows: the BasicMotions smart-watch recordings (UEA archive, via sktime).

BasicMotions (Bagnall et al., *The UEA multivariate time series classification archive*,
2018) holds 80 recordings of four students wearing a smart watch while standing, walking,
running or playing badminton: a 3-D accelerometer and a 3-D gyroscope sampled at 10 Hz for
10 s, i.e. six channels of 100 values. The archive states no licence of its own, so the
repository does not copy the data: it is read from the ``sktime`` wheel, which ships it
(``sktime/datasets/data/BasicMotions/*.ts``) and is a dependency of this project.

Splits. The archive's ``TRAIN`` half (10 recordings per class) is ``train``, what the
models of :mod:`serif_dask.models.motions` learn from. Its ``TEST`` half is split once per
class with a fixed seed into ``calibration`` (4 per class: SneakPeek and the profiler's
confusion matrices) and ``test`` (6 per class: what the groups stream). Neither is ever
trained on, so accuracies measured on them are held-out numbers.

Samples are *windows*: the last :data:`WINDOW_S` seconds a watch would report, six
channels by :data:`WINDOW` steps (float32, raw sensor units), cut at one of the 51
offsets of a recording. A split's windows are all (recording, offset) pairs.

Labels. A group's activity follows the application's Markov chain (it keeps its class with
probability ``label-persistence``, else redraws it from the prior), the same chain as a
synthetic modality of the application. Each tick the group shows a window of a ``test``
recording of its current activity, the recording and the offset picked by a hash of
(seed, app, modality, group, tick): deterministic, batch- and order-independent.

Streams. Every group needs one (``use-synthetic-data: false``) named ``"sktime:basic-motions"``;
a group whose stream names anything else fails alone, with a reason. The modality's
``synthetic-shape`` must be ``[6, 50]`` and the application needs the four classes in
:data:`CLASSES` order.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from serif_dask.readers import Reader, ReaderError, ReadResult, stream_paths
from serif_dask.readers.synthetic import SyntheticReader, _mix, _uniform, stable_key

__all__ = [
    "CLASSES",
    "SERIES_LENGTH",
    "SPLITS",
    "STREAM_ID",
    "WINDOW",
    "BasicMotionsReader",
    "data_files",
    "load_recordings",
    "load_split",
    "windows",
]

#: The stream identifier of a group that streams the held-out recordings.
STREAM_ID = "sktime:basic-motions"
#: Class order of the application (least to most exertion); the archive's names, lowercased.
CLASSES = ("standing", "walking", "running", "badminton")
CHANNELS = 6
SERIES_LENGTH = 100  # 10 s at 10 Hz
RATE_HZ = 10
WINDOW_S = 5
WINDOW = WINDOW_S * RATE_HZ
OFFSETS = SERIES_LENGTH - WINDOW + 1
SPLITS = ("train", "calibration", "test")
#: Recordings per class of the archive's TEST half that go to calibration (the rest: test).
CALIBRATION_PER_CLASS = 4
_SPLIT_SEED = 20261201
_PICK = 12  # domain tag of the window-choice hash (digits.py uses 11)


def data_files() -> dict[str, Path]:
    """The archive's ``TRAIN``/``TEST`` files inside the installed sktime package.

    Found without importing sktime (its import takes seconds and pulls in pandas; every
    process that builds this reader would pay it).
    """
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise ReaderError(
            "BasicMotions is read from the sktime package, which is not installed; "
            "install it with: pip install 'sktime>=1.2,<2'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/BasicMotions"
    files = {part: folder / f"BasicMotions_{part}.ts" for part in ("TRAIN", "TEST")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ReaderError(f"this sktime build lacks the BasicMotions data: {', '.join(missing)}")
    return files


def _parse_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 (n, 6, 100), y int64 (n,))`` from an equal-length ``.ts`` file.

    The format: ``#`` comments and ``@`` headers, then one case per line, its channels
    separated by ``:`` (values by ``,``) and the class label last. tests/ check this
    against sktime's own loader.
    """
    xs, ys = [], []
    data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not data:
            data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        xs.append([np.asarray(c.split(","), dtype=np.float64) for c in channels])
        ys.append(CLASSES.index(label.strip().lower()))
    x = np.asarray(xs, dtype=np.float32)
    if x.shape[1:] != (CHANNELS, SERIES_LENGTH):
        raise ReaderError(f"{path}: expected cases of shape [6, 100], got {list(x.shape[1:])}")
    return x, np.asarray(ys, dtype=np.int64)


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = data_files()
    train = _parse_ts(files["TRAIN"])
    x, y = _parse_ts(files["TEST"])
    rng = np.random.default_rng(_SPLIT_SEED)
    calib, test = [], []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(y == c))
        calib.append(idx[:CALIBRATION_PER_CLASS])
        test.append(idx[CALIBRATION_PER_CLASS:])
    out = {"train": train}
    for name, chunks in (("calibration", calib), ("test", test)):
        idx = np.sort(np.concatenate(chunks))
        out[name] = (x[idx], y[idx])
    for xs, ys in out.values():
        xs.setflags(write=False)
        ys.setflags(write=False)
    return out


def load_recordings(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only whole recordings ``(x float32 (n, 6, 100), y int64 (n,))`` of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return _splits()[split]


def windows(x: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Windows ``(n, 6, WINDOW)`` of recordings ``x`` at ``offsets`` (default: every
    recording at every offset, recording-major: ``(n·51, 6, WINDOW)``)."""
    view = np.lib.stride_tricks.sliding_window_view(x, WINDOW, axis=2)  # (n, 6, 51, W)
    if offsets is None:
        return np.ascontiguousarray(view.transpose(0, 2, 1, 3)).reshape(-1, CHANNELS, WINDOW)
    return np.ascontiguousarray(view[np.arange(len(x)), :, offsets])


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every window of a split, with its label: ``(float32 (n·51, 6, 50), int64 (n·51,))``."""
    x, y = load_recordings(split)
    return windows(x), np.repeat(y, OFFSETS)


class BasicMotionsReader(Reader):
    """Groups stream held-out watch windows of their current, persistent activity."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        super().__init__(modality, app, server, seed)
        if self.k != len(CLASSES):
            raise ReaderError(
                f"modality {modality.name!r}: BasicMotions has {len(CLASSES)} classes "
                f"({', '.join(CLASSES)}), but application {app.name!r} has {self.k}"
            )
        shape = self.declared_shape or (CHANNELS, WINDOW)
        if tuple(shape) != (CHANNELS, WINDOW):
            raise ReaderError(
                f"modality {modality.name!r}: synthetic-shape {list(shape)} is not a BasicMotions "
                f"window; use [{CHANNELS}, {WINDOW}] (6 channels, {WINDOW_S} s at {RATE_HZ} Hz)"
            )
        data_files()  # a missing package is a configuration problem: say so now
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
        """Test recordings sorted by class, with each class's first index and count."""
        x, y = load_recordings("test")
        order = np.argsort(y, kind="stable")
        counts = np.bincount(y, minlength=len(CLASSES))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return x[order], starts, counts

    @property
    def calibration_size(self) -> int:
        """Distinct calibration windows; :meth:`calibration` cycles after that many."""
        return int(load_recordings("calibration")[1].size * OFFSETS)

    def labels(self, groups: np.ndarray, tick: int) -> np.ndarray:
        """True activity of each group at ``tick`` (int64, an index into :data:`CLASSES`)."""
        return self._chain.labels(groups, tick)

    def read(self, groups: np.ndarray, tick: int) -> ReadResult:
        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        labels = self.labels(g, tick)
        recordings, starts, counts = self._test
        u = _uniform(_mix(self.seed, *self._key, g.astype(np.uint64), int(tick), _PICK))
        # One uniform picks both: the recording (coarse part) and the offset (fine part).
        slot = np.minimum((u * counts[labels] * OFFSETS).astype(np.int64),
                          counts[labels] * OFFSETS - 1)
        samples = windows(recordings[starts[labels] + slot // OFFSETS], slot % OFFSETS)
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
        """The calibration windows in a seeded order (classes balanced), cycling once
        exhausted; labels are not a sequence, so they say nothing about persistence."""
        x, y = load_split("calibration")
        order = np.random.default_rng([self.seed, *self._key]).permutation(y.size)
        idx = order[np.arange(start, start + n, dtype=np.int64) % y.size]
        return x[idx], y[idx].copy()
