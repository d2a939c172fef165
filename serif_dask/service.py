"""What a run that never ends needs from Dask: bounded settings and stable task groups.

Dask's defaults suit batch jobs, where a cluster lives for hours: some of its logs are
sized for rich post-mortems rather than for weeks of small ticks. :data:`SETTINGS` are the
values serif-dask uses for the clusters it starts (``serif-dask run``,
:func:`serif_dask.local_cluster`); they are plain Dask config keys, so a ``dask scheduler``
/ ``dask worker`` deployment sets them the usual way (a YAML file in ``~/.config/dask``,
``DASK_*`` environment variables; see the README's "Running for days"). A value the
user's Dask config already sets to something other than Dask's default is left alone.

:func:`keep_task_groups` holds one never-running task per task group of the tick graph
for the whole run. Dask deletes a ``TaskGroup`` once its last task is forgotten and makes a new
one for the next task of that name, and every group a span (or a ``Computation``) ever
saw is kept for the scheduler's lifetime (dask/distributed#7977): with ticks that
release all their tasks, that was one or more new groups per tick, kept for ever, plus
a new default span whenever the cluster went idle between ticks, and on every worker
new fine-performance-metric entries per span. With the groups alive, every tick's tasks
join the same groups and the same span, and that state stays constant.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, Future

#: Dask config values for a long-running service (key: value, Dask's default in comments).
SETTINGS: dict[str, Any] = {
    # The dashboard's task stream keeps this many task records once a page shows it
    # (Dask: 100000, ~1 KB each): 10000 is minutes of a busy run.
    "distributed.scheduler.dashboard.tasks.task-stream-length": 10_000,
    # The statistical profiler keeps one call tree per second for the last
    # low-level-log-length (1000) seconds on every worker (0.3-1.1 KB each pickled on
    # the hospital ward, so MBs once full, growing for the first 17 minutes), and
    # samples every 10 ms on a thread of its own: off for serving.
    "distributed.worker.profile.enabled": False,
}

#: Key prefixes (Dask task groups) of the tick graph; see :mod:`serif_dask.tick`.
TICK_GROUPS = ("serif-read", "serif-peek", "serif-score", "serif-export")
#: A resource no worker has: an anchor waits in ``no-worker`` and never runs anywhere.
ANCHOR_RESOURCE = "serif-anchor"


def _defaults() -> dict[str, Any]:
    return dask.config.merge(*dask.config.defaults)


def service_settings() -> dict[str, Any]:
    """:data:`SETTINGS`, except keys the user's Dask config sets to a value of its own."""
    defaults = _defaults()
    out = {}
    for key, value in SETTINGS.items():
        current = dask.config.get(key, None)
        if current == dask.config.get(key, None, config=defaults):
            out[key] = value
    return out


@contextlib.contextmanager
def service_config() -> Iterator[dict[str, Any]]:
    """Dask config with :func:`service_settings` applied, for as long as the block runs."""
    settings = service_settings()
    with dask.config.set(settings):
        yield settings


def worker_config() -> dict[str, Any]:
    """The ``config`` option of a Nanny: its worker process gets the service settings.

    A Nanny replaces top-level sections of its own config with this (a shallow merge),
    so the whole current ``distributed`` section goes, with the settings applied.
    """
    with service_config():  # a copy: leaving the block restores the live dicts in place
        return {"distributed": copy.deepcopy(dask.config.get("distributed"))}


def _anchor() -> None:
    """Never runs: only its key matters (see :func:`keep_task_groups`)."""


def keep_task_groups(client: Client, run_id: str) -> list[Future]:
    """One task per tick-graph task group, to hold (and release) for the whole run.

    Each asks for a resource no worker has, so it waits (``no-worker``) and never takes a
    worker's time or changes when a tick's tasks run; waiting, it keeps its group alive
    and not done, so the run's tasks also stay in one span.
    """
    return [
        client.submit(_anchor, key=f"{group}-{run_id}-anchor", pure=False,
                      resources={ANCHOR_RESOURCE: 1})
        for group in TICK_GROUPS
    ]


#: Seconds between clearings of Dask's per-process key caches (see :func:`clear_key_caches`).
KEY_CACHE_CLEAR_S = 60.0


def clear_key_caches() -> int:
    """Empty ``dask.utils.key_split``'s LRU cache; returns the entries it held.

    Dask caches the prefix of every key it sees, up to 100,000 keys per process. A batch
    job reuses few; serif-dask makes new keys every tick (read, peek, score per tick and
    server), so each scheduler and worker process grew by about 25 MB over hours (at the
    hospital ward's rate: 84 new keys a second on the scheduler) before the cache levelled
    off. Cleared every few minutes, it stays small; a miss only recomputes a string split.
    """
    from dask.utils import key_split

    held = key_split.cache_info().currsize
    key_split.cache_clear()
    return held


#: Collection entries each Dask span keeps in its metadata (see :func:`trim_span_metadata`).
SPAN_COLLECTIONS_KEPT = 100


def trim_span_metadata(scheduler: Any, keep: int = SPAN_COLLECTIONS_KEPT) -> int:
    """Keep the newest ``keep`` entries of each span's collection list; returns how many
    went.

    Every graph a client sends (each ``client.submit`` is one) appends a
    ``{"type": "Future"}`` entry to the metadata of the span its tasks join, for the span's
    lifetime. A batch job has few submissions per span; a run that never ends sends
    several a tick into one span (kept single by :func:`keep_task_groups`): at eight
    times the hospital ward's rate that was 5,000 entries a minute, about 1 MB a minute
    on the scheduler, for ever. The list only describes what was computed; nothing in
    Dask reads more than its newest entries.
    """
    ext = scheduler.extensions.get("spans")
    if ext is None:
        return 0
    dropped = 0
    for span in list(ext.spans.values()):
        collections = (span.metadata or {}).get("collections")
        if collections is not None and len(collections) > keep:
            dropped += len(collections) - keep
            del collections[:-keep]
    return dropped


def _every(server: Any, name: str, seconds: float, callback: Any) -> None:
    """Run ``callback`` every ``seconds`` from ``server``'s own periodic callbacks (started
    and stopped with the Dask Scheduler or Worker)."""
    from tornado.ioloop import PeriodicCallback

    if name in server.periodic_callbacks:
        return
    pc = PeriodicCallback(callback, seconds * 1000)
    server.periodic_callbacks[name] = pc
    if server.status.name == "running":
        pc.start()


def keep_key_caches_small(server: Any, name: str = "serif-key-caches") -> None:
    """Clear the key caches every ``KEY_CACHE_CLEAR_S`` in ``server``'s process (a Dask
    Scheduler or Worker)."""
    _every(server, name, KEY_CACHE_CLEAR_S, clear_key_caches)


def keep_span_metadata_small(scheduler: Any, name: str = "serif-span-metadata") -> None:
    """Trim the scheduler's span metadata every ``KEY_CACHE_CLEAR_S`` (a list slice per
    span: microseconds on the event loop)."""
    _every(scheduler, name, KEY_CACHE_CLEAR_S, lambda: trim_span_metadata(scheduler))

