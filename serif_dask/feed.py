"""The input producer for live runs (``serif-dask feed``): samples into Redis streams.

A live modality (``"impl": "redis-stream"``) reads, each tick, the newest entry of every
group's stream (see ``readers/redis_stream.py``). The feeder is what a fleet of monitors
would be: at a rate, it pushes one sample per group and live modality, each labelled with
its true class, taken from the modality's synthetic generator or from a data set reader
(``--from digits``, any ``package.module:Class``). Rates may be steady, bursty or ramped,
for load experiments. One pipeline carries a whole beat (every group and modality), and
every XADD trims its stream (``MAXLEN ~``).

When several applications read one live modality, its samples follow the first one's
classes; calibration streams are per (modality, application).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from serif_dask.config import LIVE_READER, Application, SerifConfig
from serif_dask.readers import Reader, reader_class
from serif_dask.readers.redis_stream import calibration_key, encode_sample, stream_key

logger = logging.getLogger("serif_dask.feed")

#: Entries a stream keeps (approximately): the reader needs only the newest.
DEFAULT_MAXLEN = 100


@dataclass(frozen=True)
class Schedule:
    """Samples per second (per group and modality) as a function of time since start.

    ``burst = (factor, on_s, every_s)`` multiplies the rate by ``factor`` for the first
    ``on_s`` seconds of every ``every_s``; ``ramp_to`` rises linearly from ``rate`` to it
    over ``duration``.
    """

    rate: float
    duration: float | None = None
    burst: tuple[float, float, float] | None = None
    ramp_to: float | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.ramp_to is not None and (not self.duration or self.ramp_to <= 0):
            raise ValueError("a ramp needs a duration and a target rate > 0")
        if self.burst is not None:
            factor, on, every = self.burst
            if not (factor > 0 and 0 < on <= every):
                raise ValueError("burst needs FACTOR > 0 and 0 < ON <= EVERY seconds")

    def at(self, t: float) -> float:
        rate = self.rate
        if self.ramp_to is not None and self.duration:
            rate += (self.ramp_to - self.rate) * min(max(t / self.duration, 0.0), 1.0)
        if self.burst is not None:
            factor, on, every = self.burst
            if t % every < on:
                rate *= factor
        return rate

    def in_burst(self, t: float) -> bool:
        return self.burst is not None and t % self.burst[2] < self.burst[1]


def parse_burst(text: str) -> tuple[float, float, float]:
    """``"FACTOR,ON,EVERY"`` (e.g. ``"4,2,10"``: ×4 for 2 s of every 10 s)."""
    try:
        factor, on, every = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"expected FACTOR,ON,EVERY (like 4,2,10), got {text!r}") from None
    return factor, on, every


@dataclass
class FeedStats:
    beats: int = 0
    entries: int = 0
    late_beats: int = 0  # beats skipped because pushing fell behind the schedule
    calibration: int = 0
    failed_beats: int = 0  # a Redis error lost the beat
    seconds: float = 0.0


@dataclass(frozen=True)
class _Target:
    modality: str
    app: Application
    reader: Reader
    groups: np.ndarray
    keys: tuple[str, ...]


def live_modalities(config: SerifConfig) -> list[str]:
    return [m.name for m in config.data.data_modalities if m.impl == LIVE_READER]


def _source_reader(config: SerifConfig, modality: str, app: Application, source: str,
                   seed: int) -> Reader:
    """The generator of a live modality's samples: ``synthetic`` or a data set reader."""
    mod = config.modality(modality)
    # server=None: the source serves every group, whatever the config's stream names say
    return reader_class(source)(mod, app, None, seed)


class Feeder:
    """Pushes samples of every live modality of ``config`` into ``client`` (a redis client)."""

    def __init__(self, config: SerifConfig, client: Any, *, source: str = "synthetic",
                 seed: int | None = None, maxlen: int = DEFAULT_MAXLEN,
                 groups: np.ndarray | None = None) -> None:
        self.config = config
        self.client = client
        self.source = source
        self.seed = config.system.effective_seed if seed is None else int(seed)
        self.maxlen = int(maxlen)
        self.targets: list[_Target] = []
        for name in live_modalities(config):
            app = next((a for a in config.apps if name in a.modalities), None)
            if app is None:
                continue  # no model reads it
            all_groups = np.arange(config.data.num_groups) if groups is None else groups
            servers = {s.name: s for s in config.data.servers}
            keys = tuple(stream_key(name, int(g), servers[config.group_server(int(g), name)])
                         for g in all_groups.tolist())
            reader = _source_reader(config, name, app, source, self.seed)
            reader.read(np.asarray(all_groups[:1]), 0)  # imports, data set: not on the clock
            self.targets.append(_Target(name, app, reader, np.asarray(all_groups), keys))
        if not self.targets:
            raise ValueError(f"no modality read by a model has impl {LIVE_READER!r}: "
                             "nothing to feed")

    @property
    def streams(self) -> int:
        return sum(len(t.keys) for t in self.targets)

    @property
    def sample_duration(self) -> float:
        """The shortest tick period of the applications fed."""
        return min(t.app.sample_duration for t in self.targets)

    def calibrate(self, n: int) -> int:
        """Fill each application's calibration stream on its live peek modality with ``n``
        labelled samples of the source (replacing what it held); returns entries added."""
        added = 0
        for app in self.config.apps:
            modality = self.config.peek_modality(app)
            if modality not in live_modalities(self.config):
                continue
            reader = _source_reader(self.config, modality, app, self.source, self.seed)
            key = calibration_key(modality, app.name)
            self.client.delete(key)
            for start in range(0, n, 256):
                x, y = reader.calibration(min(256, n - start), start=start)
                pipe = self.client.pipeline(transaction=False)
                for sample, label in zip(x, y.tolist(), strict=True):
                    pipe.xadd(key, encode_sample(sample, label))
                pipe.execute()
                added += len(y)
        return added

    def push(self, tick: int) -> int:
        """One beat: a sample of every group and live modality, in one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        now = time.time()
        count = 0
        for target in self.targets:
            result = target.reader.read(target.groups, tick)
            for i in np.flatnonzero(result.ok).tolist():
                fields = encode_sample(result.samples[i], int(result.labels[i]), now)
                pipe.xadd(target.keys[i], fields, maxlen=self.maxlen, approximate=True)
                count += 1
        pipe.execute()
        return count

    def run(self, schedule: Schedule, stop: threading.Event | None = None,
            on_beat: Callable[[FeedStats], None] | None = None) -> FeedStats:
        """Push beats on ``schedule`` until its duration ends or ``stop`` is set."""
        from serif_dask.store import REDIS_ERRORS

        stop = stop or threading.Event()
        stats = FeedStats()
        start = time.monotonic()
        due = 0.0  # seconds since start of the next beat
        period = self.sample_duration
        while not stop.is_set():
            elapsed = time.monotonic() - start
            if schedule.duration is not None and due >= schedule.duration:
                break
            if due > elapsed and stop.wait(due - elapsed):
                break
            try:
                stats.entries += self.push(int(due // period))
            except REDIS_ERRORS as exc:
                stats.failed_beats += 1
                logger.warning("serif feed: beat lost: %s: %s", type(exc).__name__, exc)
            stats.beats += 1
            if on_beat is not None:
                on_beat(stats)
            step = 1.0 / schedule.at(due)
            due += step
            behind = time.monotonic() - start - due
            if behind > step:  # fell behind: skip the beats that are already too old
                skipped = math.floor(behind / step)
                stats.late_beats += skipped
                due += skipped * step
        stats.seconds = time.monotonic() - start
        return stats
