"""File readers: each group's stream is a file cut into windows, one window per tick.

Tick ``t`` reads window ``t mod W`` of a file holding W windows (a recording loops), so a
stream never runs dry. Every window must have the modality's ``synthetic-shape``; a file
that does not is an error for that group only, naming the group and the file.

* ``.npy`` (:class:`NpyReader`): an array ``(W, *shape)``, one window read per tick; labels from an
  optional sidecar ``<stem>.labels.npy`` of W integers.
* ``.wav`` (:class:`WavReader`): PCM (8/16/32-bit) read with the standard library;
  shape ``[T]`` (mono) or ``[channels, T]``; window i is frames ``i·T .. (i+1)·T``,
  scaled to [-1, 1]; labels from the same kind of sidecar.
* ``.csv`` (:class:`CsvReader`): rows are time steps, columns channels (an optional header
  row names them); shape ``[channels, T]``; an optional ``label`` column labels rows and a
  window takes its most frequent row label.

Labels ``-1`` mean unknown. Calibration samples are the labelled windows of the reader's
streams, in a seeded order; with none, :class:`NoCalibrationData` is raised and SneakPeek
uses the prior. (They are the same windows that are later served: for an honest quality
number, label only part of the data, or calibrate on separate files via an ``impl``.)
"""

from __future__ import annotations

import os
import wave
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from serif_dask.readers import NoCalibrationData, Reader, ReaderError, ReadResult, stream_paths

__all__ = ["CsvReader", "NpyReader", "WavReader", "WindowSource"]


class WindowSource:
    """One opened stream: ``n_windows``, ``window(i)`` (float32) and ``labels`` (W,)."""

    n_windows: int
    labels: np.ndarray

    @abstractmethod
    def window(self, i: int) -> np.ndarray: ...


def _sidecar_labels(path: Path, n_windows: int, k: int) -> np.ndarray:
    side = path.with_name(path.name[: -len(path.suffix)] + ".labels.npy")
    if not side.exists():
        return np.full(n_windows, -1, dtype=np.int64)
    labels = np.load(side, allow_pickle=False)
    if labels.ndim != 1 or labels.shape[0] != n_windows:
        raise ValueError(
            f"{side.name}: expected {n_windows} labels (one per window), "
            f"got shape {list(labels.shape)}"
        )
    return _check_labels(labels, k, side.name)


def _check_labels(labels: np.ndarray, k: int, where: str) -> np.ndarray:
    is_int = np.issubdtype(labels.dtype, np.integer)
    if not is_int and not (np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))):
        raise ValueError(f"{where}: labels must be integers")
    labels = labels.astype(np.int64)
    bad = (labels < -1) | (labels >= k)
    if bad.any():
        raise ValueError(f"{where}: label {labels[bad][0]} outside -1 .. {k - 1}")
    return labels


class _NpySource(WindowSource):
    """A ``.npy`` stream read one window at a time with ordinary file reads.

    Not a memory map: a file truncated while mapped kills the reading worker with SIGBUS,
    whereas a read just comes up short and fails that group's request with a reason. A
    file deleted mid-run fails on the next read too, instead of being served from a map.
    """

    def __init__(self, path: Path, shape: tuple[int, ...] | None, k: int) -> None:
        self.path = path
        self.array: np.ndarray | None = None  # only for layouts read whole (see below)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                full, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                full, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # rare layouts: load the whole array once
                full, fortran, dtype = (), True, None
            self.offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        if fortran or dtype is None:
            self.array = np.load(path, allow_pickle=False)
            full, dtype = self.array.shape, self.array.dtype
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ValueError(f"holds {dtype} values, expected numbers")
        got = tuple(full[1:])
        if shape is not None and got != shape:
            raise ValueError(
                f"holds windows of shape {list(got)} (array {list(full)}), "
                f"expected (W, *synthetic-shape) with synthetic-shape {list(shape)}"
            )
        if len(full) < 2 or full[0] == 0:
            raise ValueError(f"array of shape {list(full)} holds no windows")
        self.dtype, self.window_shape = dtype, got
        self.window_bytes = int(np.prod(got)) * dtype.itemsize
        self.n_windows = int(full[0])
        if self.array is None and size < self.offset + self.n_windows * self.window_bytes:
            raise ValueError(
                f"truncated: {size} bytes, its header promises "
                f"{self.offset + self.n_windows * self.window_bytes}"
            )
        self.labels = _sidecar_labels(path, self.n_windows, k)

    def window(self, i: int) -> np.ndarray:
        if self.array is not None:
            return np.asarray(self.array[i], dtype=np.float32)
        with open(self.path, "rb") as f:
            f.seek(self.offset + i * self.window_bytes)
            raw = f.read(self.window_bytes)
        if len(raw) < self.window_bytes:
            raise ValueError(f"truncated: window {i} has {len(raw)} bytes of {self.window_bytes}")
        x = np.frombuffer(raw, dtype=self.dtype).reshape(self.window_shape)
        return x.astype(np.float32)


_WAV_DTYPES = {1: np.dtype("u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}


class _WavSource(WindowSource):
    def __init__(self, path: Path, shape: tuple[int, ...], k: int) -> None:
        self.path = path
        with wave.open(str(path), "rb") as w:
            self.channels, width, n_frames = w.getnchannels(), w.getsampwidth(), w.getnframes()
        if width not in _WAV_DTYPES:
            raise ValueError(f"{8 * width}-bit samples are not supported (8, 16 or 32-bit PCM)")
        self.dtype = _WAV_DTYPES[width]
        want = 1 if len(shape) == 1 else shape[0]
        if len(shape) > 2 or self.channels != want:
            raise ValueError(
                f"has {self.channels} channel(s); synthetic-shape {list(shape)} needs "
                f"{want} ([T] is mono, [channels, T] multi-channel)"
            )
        self.shape, self.frames = shape, shape[-1]
        self.n_windows = n_frames // self.frames
        if self.n_windows == 0:
            raise ValueError(f"has {n_frames} frames, shorter than one window of {self.frames}")
        self.labels = _sidecar_labels(path, self.n_windows, k)

    def window(self, i: int) -> np.ndarray:
        with wave.open(str(self.path), "rb") as w:
            w.setpos(i * self.frames)
            raw = w.readframes(self.frames)
        count = self.frames * self.channels
        if len(raw) < count * self.dtype.itemsize:
            raise ValueError(
                f"truncated: window {i} has {len(raw)} bytes of {count * self.dtype.itemsize}"
            )
        x = np.frombuffer(raw, dtype=self.dtype, count=count).astype(np.float32)
        if self.dtype.itemsize == 1:  # unsigned 8-bit, centred on 128
            x = (x - 128.0) / 128.0
        else:
            x /= float(2 ** (8 * self.dtype.itemsize - 1))
        return x.reshape(self.frames, self.channels).T.reshape(self.shape)


class _CsvSource(WindowSource):
    def __init__(self, path: Path, shape: tuple[int, ...], k: int) -> None:
        if len(shape) != 2:
            raise ValueError(f"CSV windows need synthetic-shape [channels, T], got {list(shape)}")
        with open(path) as f:
            first = f.readline()
        tokens = [t.strip() for t in first.split(",")]
        header = not all(_is_number(t) for t in tokens)
        names = [t.lower() for t in tokens] if header else []
        data = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2, dtype=np.float64)
        label_col = names.index("label") if "label" in names else None
        channels = [c for c in range(data.shape[1]) if c != label_col]
        if len(channels) != shape[0]:
            raise ValueError(
                f"has {len(channels)} channel column(s), synthetic-shape {list(shape)} "
                f"needs {shape[0]}"
            )
        self.frames = shape[1]
        self.n_windows = data.shape[0] // self.frames
        if self.n_windows == 0:
            raise ValueError(f"has {data.shape[0]} rows, shorter than one window of {self.frames}")
        rows = self.n_windows * self.frames
        # (W, channels, T), contiguous per window.
        self.data = np.ascontiguousarray(
            data[:rows, channels]
            .T.reshape(len(channels), self.n_windows, self.frames)
            .transpose(1, 0, 2),
            dtype=np.float32,
        )
        if label_col is None:
            self.labels = np.full(self.n_windows, -1, dtype=np.int64)
        else:
            row_labels = _check_labels(data[:rows, label_col], k, f"{path.name}: column 'label'")
            self.labels = np.array(
                [_mode(w) for w in row_labels.reshape(self.n_windows, self.frames)], dtype=np.int64
            )

    def window(self, i: int) -> np.ndarray:
        return self.data[i]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _mode(values: np.ndarray) -> int:
    """Most frequent value (ties: the smallest); -1 only when all rows are unknown."""
    known = values[values >= 0]
    if known.size == 0:
        return -1
    return int(np.argmax(np.bincount(known)))


class FileReader(Reader):
    """Windows from per-group files; a group that fails never fails the batch."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        super().__init__(modality, app, server, seed)
        self.paths = stream_paths(modality, server)
        self.shape = self.declared_shape
        self._sources: dict[int, WindowSource] = {}
        self._calibration_index: list[tuple[int, int]] | None = None

    @abstractmethod
    def open(self, path: Path) -> WindowSource:
        """Open one stream file (raise with a short reason on any problem)."""

    def _need_shape(self) -> tuple[int, ...]:
        if self.shape is None:
            raise ReaderError(
                f"modality {self.modality.name!r}: {type(self).__name__} needs synthetic-shape"
            )
        return self.shape

    def source(self, group: int) -> WindowSource:
        src = self._sources.get(group)
        if src is None:
            path = self.paths.get(group)
            if path is None:
                raise LookupError(f"group {group}: no {self.modality.name!r} stream on this server")
            src = self.open(Path(path))
            if self.shape is None:  # no synthetic-shape: the first file decides
                self.shape = tuple(src.window(0).shape)
            self._sources[group] = src
        return src

    def read(self, groups: np.ndarray, tick: int) -> ReadResult:
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        n = groups.size
        labels = np.full(n, -1, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        errors: dict[int, str] = {}
        windows: list[tuple[int, np.ndarray]] = []
        for i, g in enumerate(groups.tolist()):
            try:
                src = self.source(g)
                w = int(tick) % src.n_windows
                x = src.window(w)
                if self.shape is not None and x.shape != self.shape:
                    raise ValueError(
                        f"group {g}: window shape {list(x.shape)} != {list(self.shape)}"
                    )
                windows.append((i, x))
                labels[i] = src.labels[w]
                ok[i] = True
            except Exception as exc:  # isolate the group: the caller marks it failed
                self._sources.pop(g, None)  # retry the file next tick
                errors[g] = _reason(exc, g, self.paths.get(g))
        samples = np.zeros((n, *(self.shape or ())), dtype=np.float32)
        for i, x in windows:
            samples[i] = x
        return ReadResult(samples, labels, ok, errors)

    def calibration(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` labelled windows (every stream's, in a seeded shuffle)."""
        index = self._labelled_windows()
        if not index:
            raise NoCalibrationData(
                f"modality {self.modality.name!r}: no labelled calibration data in "
                f"{len(self.paths)} stream(s) (add .labels.npy sidecars or a label column)"
            )
        picked = index[start : start + n]
        samples = np.zeros((len(picked), *(self.shape or ())), dtype=np.float32)
        labels = np.empty(len(picked), dtype=np.int64)
        for j, (g, w) in enumerate(picked):
            src = self.source(g)
            samples[j], labels[j] = src.window(w), src.labels[w]
        return samples, labels

    def _labelled_windows(self) -> list[tuple[int, int]]:
        if self._calibration_index is None:
            index = []
            for g in sorted(self.paths):
                try:
                    src = self.source(g)
                except Exception:  # a broken stream just contributes nothing
                    continue
                index += [(g, int(w)) for w in np.flatnonzero(src.labels >= 0)]
            order = np.random.default_rng([self.seed, 0xCA11B]).permutation(len(index))
            self._calibration_index = [index[i] for i in order]
        return self._calibration_index

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sources"] = {}  # open files and memory maps stay in their process
        return state


def _reason(exc: BaseException, group: int, path: str | None) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        text = f"group {group}: {path}: file not found"
    elif not text.startswith(f"group {group}:"):
        text = f"group {group}: {path}: {text}"
    return f"{type(exc).__name__}: {text}"


class NpyReader(FileReader):
    """``.npy`` streams of shape ``(W, *synthetic-shape)``, read window by window."""

    def open(self, path: Path) -> WindowSource:
        return _NpySource(path, self.shape, self.k)


class WavReader(FileReader):
    """``.wav`` PCM streams, windows of ``synthetic-shape[-1]`` frames in [-1, 1]."""

    def open(self, path: Path) -> WindowSource:
        return _WavSource(path, self._need_shape(), self.k)


class CsvReader(FileReader):
    """CSV sensor streams: rows = time, columns = channels, windows ``[channels, T]``."""

    def open(self, path: Path) -> WindowSource:
        return _CsvSource(path, self._need_shape(), self.k)
