"""Readers: turn a group's stream into one sample per tick.

A reader is built once per (modality, application, server) with
``Reader(modality, app, server, seed)`` and then asked, every tick, for the samples of a
batch of groups::

    result = reader.read(groups, tick)
    result.samples   # float32 (n, *shape); rows of failed groups are zeros
    result.labels    # int64 (n,): true class where known, -1 = unknown (and for failures)
    result.ok        # bool (n,): False where that group's read failed
    result.errors    # {group: "one-line reason"} for the failed groups

**Per-group failure.** A group whose stream cannot be read (missing, truncated or
malformed file ...) never takes the batch down: its row is marked ``ok=False``, its reason
is in ``errors`` and every other group is read normally. The caller turns such rows into
*failed* requests. Only errors that concern the whole reader (bad configuration) raise.

**Writing in place.** A reader may take ``read(groups, tick, *, out=None)``: ``out`` is a
writable float32 ``(n, *shape)`` array with C-contiguous rows (not necessarily adjacent:
reserved slots of the node's shared-memory cache) that it fills and returns as
``samples``, so the engine shares the samples without copying them. Without ``out`` a
reader returns a new array on every call.

``calibration(n, start=0)`` returns ``n`` labelled samples for fitting the SneakPeek
estimator (a deterministic sequence, so it may be fetched in chunks via ``start``); it
raises :class:`NoCalibrationData` when the reader has no labelled data, and the caller
then falls back to the prior.

Readers are deterministic functions of (seed, app, group, tick) and picklable, so they
can be shipped to data workers.

:func:`get_reader` picks the modality's ``impl`` (``"package.module:Class"``, a reader
registered with :func:`register_reader`, or a built-in name: ``synthetic``, ``digits``,
``redis-stream`` for live inputs), else the built-in default: ``synthetic`` when the
modality has ``use-synthetic-data``, else by the streams' file extension (``.npy``,
``.wav``, ``.csv``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_LABEL_PERSISTENCE",
    "DEFAULT_SNR",
    "NoCalibrationData",
    "ReadResult",
    "Reader",
    "ReaderError",
    "available_readers",
    "builtin_reader_names",
    "get_reader",
    "reader_class",
    "register_reader",
]

#: Default ``synthetic-snr`` (the config's default too): length of each class pattern in
#: units of the nuisance's standard deviation. On a balanced 2-class problem the Bayes
#: limit is Φ(snr/√2) = 0.76 and the default SneakPeek estimator reaches ~0.75: helpful,
#: far from perfect.
DEFAULT_SNR = 1.0
#: Default ``label-persistence`` ρ: each tick a group keeps its condition with probability
#: ρ, else redraws it from the prior (mean hold 1/(1-ρ) = 10 ticks).
DEFAULT_LABEL_PERSISTENCE = 0.9


class ReaderError(ValueError):
    """A reader cannot be built for this modality (configuration problem)."""


class NoCalibrationData(ReaderError):
    """The reader has no labelled samples; SneakPeek falls back to the prior."""


class ReadResult(NamedTuple):
    """One tick's batch, aligned with the ``groups`` asked for."""

    samples: np.ndarray  # float32 (n, *shape)
    labels: np.ndarray  # int64 (n,), -1 = unknown
    ok: np.ndarray  # bool (n,)
    errors: dict[int, str]  # group -> reason, for rows with ok == False


class Reader(ABC):
    """Base class of all readers; see the module docstring for the contract."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        self.modality = modality
        self.app = app
        self.server = server
        self.seed = int(seed)
        self.k = len(app.prior)

    @property
    def declared_shape(self) -> tuple[int, ...] | None:
        """The modality's ``synthetic-shape``, when the config gives one."""
        shape = getattr(self.modality, "synthetic_shape", None)
        return None if shape is None else tuple(int(s) for s in shape)

    @abstractmethod
    def read(self, groups: np.ndarray, tick: int) -> ReadResult:
        """Samples and labels of ``groups`` at ``tick``."""

    @abstractmethod
    def calibration(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Labelled samples ``start .. start + n`` of this reader's calibration sequence."""

    def __repr__(self) -> str:
        name = getattr(self.modality, "name", "?")
        return f"{type(self).__name__}(modality={name!r}, app={getattr(self.app, 'name', '?')!r})"


# --------------------------------------------------------------------------- registry
_BUILTINS: dict[str, str] = {
    "synthetic": "serif_dask.readers.synthetic:SyntheticReader",
    "digits": "serif_dask.readers.digits:DigitsReader",
    "basic-motions": "serif_dask.readers.basic_motions:BasicMotionsReader",
    "redis-stream": "serif_dask.readers.redis_stream:RedisStreamReader",
    ".npy": "serif_dask.readers.files:NpyReader",
    ".wav": "serif_dask.readers.files:WavReader",
    ".csv": "serif_dask.readers.files:CsvReader",
}
_REGISTERED: dict[str, type[Reader]] = {}


def builtin_reader_names() -> tuple[str, ...]:
    """Names a modality's ``impl`` (or ``sneakpeek.calibration``) may give instead of a
    ``package.module:Class`` path."""
    return tuple(sorted(name for name in _BUILTINS if not name.startswith(".")))


def register_reader(name: str, cls: type[Reader]) -> None:
    """Register a reader class under a name or a file extension (``".h5"``)."""
    _REGISTERED[name] = cls


def available_readers() -> list[str]:
    """Names and extensions :func:`get_reader` knows."""
    return sorted(set(_BUILTINS) | set(_REGISTERED))


def _import_path(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ReaderError(f"impl {path!r} is not of the form 'package.module:Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ReaderError(f"cannot import reader {path!r}: {exc}") from None


def _lookup(name: str) -> type[Reader]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    return _import_path(_BUILTINS[name])


def stream_paths(modality: Any, server: Any) -> dict[int, str]:
    """``{group: path}`` of the modality's streams on ``server`` (empty when none)."""
    streams = getattr(server, "streams", None) or {}
    paths = streams.get(modality.name) or {}
    return {int(g): str(p) for g, p in paths.items()}


def _extensions(paths: Iterable[str]) -> set[str]:
    return {Path(p).suffix.lower() for p in paths}


def reader_class(name: str) -> type[Reader]:
    """The reader class a name stands for: registered, built-in or ``package.module:Class``."""
    if name in _REGISTERED or name in _BUILTINS:
        return _lookup(name)
    return _import_path(name)


def get_reader(modality: Any, app: Any, server: Any = None, seed: int = 0) -> Reader:
    """Build the reader for ``modality`` of ``app`` on ``server``.

    Order: the modality's ``impl`` (a registered or built-in name such as
    ``redis-stream``, or ``package.module:Class``); ``synthetic`` when
    ``use-synthetic-data``; else the reader registered for the extension of the server's
    stream files.
    """
    impl = getattr(modality, "impl", None)
    if impl:
        cls = reader_class(impl)
    elif getattr(modality, "use_synthetic_data", False):
        cls = _lookup("synthetic")
    else:
        exts = _extensions(stream_paths(modality, server).values())
        if not exts:
            where = f"server {getattr(server, 'name', server)!r}" if server else "no server"
            raise ReaderError(
                f"modality {modality.name!r}: no streams on {where} and use-synthetic-data is "
                "false; give streams, set use-synthetic-data: true, or an impl"
            )
        if len(exts) > 1:
            raise ReaderError(
                f"modality {modality.name!r}: streams mix file types {sorted(exts)}; "
                "use one type per modality or an impl that reads them all"
            )
        (ext,) = exts
        known = [e for e in available_readers() if e.startswith(".")]
        if ext not in known:
            raise ReaderError(
                f"modality {modality.name!r}: no reader for {ext or 'extension-less'!r} "
                f"streams (known: {', '.join(known)}); convert the data, set "
                "use-synthetic-data: true, or give an impl"
            )
        cls = _lookup(ext)
    if not (isinstance(cls, type) and issubclass(cls, Reader)):
        raise ReaderError(f"modality {modality.name!r}: {cls!r} is not a Reader subclass")
    return cls(modality, app, server, seed)
