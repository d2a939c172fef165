"""Live inputs: one Redis stream per (group, modality), pushed by whoever produces samples.

The built-in reader ``redis-stream`` (a modality's ``"impl": "redis-stream"``) reads the
run's Redis (``redis-nodes``, one server or a cluster). A group's stream is the server's
``streams[modality][group]`` when given, else ``serif:in:<modality>:<group>``
(:func:`stream_key`). An entry's fields:

* ``x``: the sample, raw little-endian float32 bytes of the modality's ``synthetic-shape``
  in C order;
* ``label`` (optional): the true class, an integer (scores utility and accuracy);
* ``t`` (optional): the producer's clock when it made the sample, in seconds.

Each tick the reader takes, per group, the newest entry no older than one
``sample-duration`` by its entry id's time, i.e. by the Redis server's clock, so the
producers' and the workers' clocks need not agree. A group without one fails
``no-sample``, a malformed entry ``bad-input``. All groups of a tick are read in one
pipeline (one round trip per Redis node), never one per group; the same pipeline trims
each stream to the last ``TRIM_TICKS`` sample-durations, so a producer that never trims
cannot fill Redis.

Calibration (for SneakPeek) comes from the labelled stream ``serif:calib:<modality>:<app>``
(:func:`calibration_key`), which ``serif-dask feed --calibration N`` fills. Unlike the
other readers a live one is not a function of (seed, group, tick): it sees what was pushed.
The reader finds the run's Redis through the worker plugin; set :attr:`client` to use it
elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from serif_dask.readers import NoCalibrationData, Reader, ReaderError, ReadResult, stream_paths

__all__ = ["CALIB_PREFIX", "IN_PREFIX", "RedisStreamReader", "calibration_key", "decode_entry",
           "encode_sample", "stream_key"]

IN_PREFIX = "serif:in"
CALIB_PREFIX = "serif:calib"
#: The reader trims entries older than this many sample-durations (by the server's clock).
TRIM_TICKS = 10


def stream_key(modality: str, group: int, server: Any = None) -> str:
    """The Redis key of ``group``'s ``modality`` stream: the server's ``streams`` entry, else
    ``serif:in:<modality>:<group>``."""
    streams = getattr(server, "streams", None) or {}
    named = (streams.get(modality) or {}).get(int(group))
    return str(named) if named else f"{IN_PREFIX}:{modality}:{int(group)}"


def calibration_key(modality: str, app: str) -> str:
    """The labelled calibration stream of ``app``'s estimator on ``modality``."""
    return f"{CALIB_PREFIX}:{modality}:{app}"


def encode_sample(sample: np.ndarray, label: int | None = None,
                  t: float | None = None) -> dict[str, bytes | str]:
    """The fields of one entry (what a producer XADDs)."""
    fields: dict[str, bytes | str] = {"x": np.ascontiguousarray(sample, dtype="<f4").tobytes()}
    if label is not None and label >= 0:
        fields["label"] = str(int(label))
    if t is not None:
        fields["t"] = repr(float(t))
    return fields


def _field(fields: dict[Any, Any], name: str) -> Any:
    return fields.get(name.encode(), fields.get(name))


def decode_entry(fields: dict[Any, Any], shape: tuple[int, ...],
                 ) -> tuple[np.ndarray, int]:
    """``(sample, label)`` of one entry (label -1 when absent); ``ValueError`` with the
    reason when the entry is malformed."""
    x = _field(fields, "x")
    if x is None:
        raise ValueError("entry has no field 'x'")
    if isinstance(x, str):
        x = x.encode("latin-1")
    want = 4 * math.prod(shape)
    if len(x) != want:
        raise ValueError(f"field 'x' has {len(x)} bytes, expected {want} "
                         f"(float32 {list(shape)})")
    sample = np.frombuffer(x, dtype="<f4").reshape(shape)
    label = _field(fields, "label")
    try:
        value = -1 if label is None else int(label)
    except ValueError:
        raise ValueError(f"field 'label' is not an integer: {label[:32]!r}") from None
    t = _field(fields, "t")
    if t is not None:
        try:
            if not math.isfinite(float(t)):
                raise ValueError
        except ValueError:
            raise ValueError(f"field 't' is not a finite number: {t[:32]!r}") from None
    return sample, value


def entry_ms(entry_id: Any) -> int:
    """The server time (ms since the epoch) in a stream entry id ``<ms>-<seq>``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


class RedisStreamReader(Reader):
    """Newest fresh entry per group from the group's Redis stream (module docstring)."""

    def __init__(self, modality: Any, app: Any, server: Any = None, seed: int = 0) -> None:
        super().__init__(modality, app, server, seed)
        shape = self.declared_shape
        if not shape:
            raise ReaderError(f"modality {modality.name!r}: redis-stream needs a synthetic-shape")
        self.shape: tuple[int, ...] = shape
        self.max_age_ms = int(round(1000 * float(app.sample_duration)))
        self.client: Any = None  # a redis client; None = the run's, from the worker plugin
        self._named = stream_paths(modality, server)
        self._last_now_ms: int | None = None
        self._calib: tuple[int, str] = (0, "-")  # (next index, XRANGE start from there)

    def key(self, group: int) -> str:
        return stream_key(self.modality.name, group, self.server)

    def _redis(self) -> Any:
        if self.client is not None:
            return self.client
        from serif_dask.dataplane import redis_client
        from serif_dask.worker import current_plugin

        try:
            plugin = current_plugin()
        except ValueError:  # not on a worker
            raise ReaderError("redis-stream: no Redis client (not on a serif worker; "
                              "set reader.client)") from None
        return redis_client(plugin)

    def _server_ms(self, client: Any) -> int | None:
        """The server's clock, for a cluster (a pipeline there cannot carry TIME)."""
        from redis.cluster import RedisCluster

        if not isinstance(client, RedisCluster):
            return None
        sec, usec = client.time()
        return int(sec) * 1000 + int(usec) // 1000

    def read(self, groups: np.ndarray, tick: int, *, out: np.ndarray | None = None,
             ) -> ReadResult:
        """One pipeline: the server's time, then per group its newest entry (and a trim)."""
        from serif_dask.store import REDIS_ERRORS

        g = np.asarray(groups, dtype=np.int64).reshape(-1)
        n = g.size
        samples = out if out is not None else np.zeros((n, *self.shape), dtype=np.float32)
        labels = np.full(n, -1, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        errors: dict[int, str] = {}
        if n == 0:
            return ReadResult(samples, labels, ok, errors)
        keys = [self.key(int(group)) for group in g.tolist()]
        try:
            client = self._redis()
            now_ms = self._server_ms(client)
            pipe = client.pipeline(transaction=False)
            if now_ms is None:
                pipe.time()
            for key in keys:
                pipe.xrevrange(key, count=1)
            if self._last_now_ms is not None:
                cut = f"{max(self._last_now_ms - TRIM_TICKS * self.max_age_ms, 0)}-0"
                for key in keys:
                    pipe.xtrim(key, minid=cut, approximate=False)
            replies = pipe.execute(raise_on_error=False)
        except (ReaderError, *REDIS_ERRORS) as exc:
            reason = f"reader-error: Redis: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            samples[...] = 0.0
            return ReadResult(samples, labels, ok, dict.fromkeys(g.tolist(), reason))
        if now_ms is None:
            head = replies[0]
            if isinstance(head, Exception):
                reason = f"reader-error: Redis TIME failed: {head}"[:200]
                samples[...] = 0.0
                return ReadResult(samples, labels, ok, dict.fromkeys(g.tolist(), reason))
            now_ms = int(head[0]) * 1000 + int(head[1]) // 1000
            replies = replies[1:]
        self._last_now_ms = now_ms
        for i, (group, key, reply) in enumerate(zip(g.tolist(), keys, replies[:n], strict=True)):
            if isinstance(reply, Exception):
                errors[group] = f"bad-input: {key}: {reply}".splitlines()[0][:200]
                continue
            if not reply:
                errors[group] = f"no-sample: stream {key} is empty"
                continue
            entry_id, fields = reply[0]
            age = now_ms - entry_ms(entry_id)
            if age > self.max_age_ms:
                errors[group] = (f"no-sample: newest entry of {key} is {age / 1000:.3f} s old "
                                 f"(> sample-duration {self.max_age_ms / 1000:g} s)")
                continue
            try:
                sample, label = decode_entry(fields, self.shape)
            except ValueError as exc:
                errors[group] = f"bad-input: {key} entry {_text(entry_id)}: {exc}"[:200]
                continue
            samples[i] = sample
            labels[i] = label
            ok[i] = True
        samples[~ok] = 0.0
        return ReadResult(samples, labels, ok, errors)

    def calibration(self, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Labelled entries ``start .. start + n`` of the calibration stream (fewer when it
        holds fewer); entries without a label are skipped."""
        from serif_dask.store import REDIS_ERRORS

        key = calibration_key(self.modality.name, self.app.name)
        try:
            client = self._redis()
            index, after = self._calib
            if start == index:  # the next chunk of a sequential fit
                entries = client.xrange(key, min=after, count=n)
            else:
                entries = client.xrange(key, count=start + n)[start:]
        except (ReaderError, *REDIS_ERRORS) as exc:
            raise NoCalibrationData(f"cannot read calibration stream {key}: "
                                    f"{type(exc).__name__}: {exc}") from None
        if entries:
            self._calib = (start + len(entries), f"({_text(entries[-1][0])}")
        xs, ys = [], []
        for entry_id, fields in entries:
            try:
                sample, label = decode_entry(fields, self.shape)
            except ValueError as exc:
                raise ReaderError(f"calibration stream {key} entry {_text(entry_id)}: "
                                  f"{exc}") from None
            if 0 <= label < self.k:
                xs.append(sample)
                ys.append(label)
        if not ys and start == 0:
            raise NoCalibrationData(
                f"no labelled entries in calibration stream {key} (fill it with `serif-dask "
                "feed --calibration N`, or name a data set in sneakpeek.calibration)"
            )
        shape = (0, *self.shape)
        return (np.stack(xs) if xs else np.zeros(shape, np.float32),
                np.asarray(ys, dtype=np.int64))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
