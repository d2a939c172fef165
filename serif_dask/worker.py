"""The worker side of serif-dask: the run's config, readers and the warm-model cache.

Install ahead of time with ``dask worker --preload serif_dask.worker``, or let
:class:`serif_dask.Serif` register it from a client. Tasks reach it through
:func:`current_plugin`; the config is pulled from the scheduler plugin on first use of a run,
so workers that join late, or restart, need no extra step.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.protocol.pickle import loads
from distributed.utils import sync
from distributed.worker import Worker

from serif_dask.config import SerifConfig

logger = logging.getLogger("serif_dask.worker")


class _ClosingHeartbeatFilter(logging.Filter):
    """Dask logs a failed heartbeat with a traceback even when the worker is closing and
    its own connection pool closed the heartbeat's comm: noise at every clean shutdown of
    a run, printed where a user expects one summary. Kept while any worker of the process
    is running, when it means a real lost scheduler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to communicate with scheduler during "
                                          "heartbeat"):
            return True
        from distributed.core import Status

        return any(w.status == Status.running for w in list(Worker._instances))


_HEARTBEAT_FILTER = _ClosingHeartbeatFilter()


def node_name() -> str:
    """The shared-memory node this process belongs to: ``$SERIF_NODE`` or the host name."""
    return os.environ.get("SERIF_NODE") or socket.gethostname()


class ModelCache:
    """An LRU of loaded models bounded by bytes (``model-cache-bytes``; None = unbounded)."""

    def __init__(self, capacity_bytes: int | None = None):
        self.capacity = capacity_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.evictions = 0

    def get(self, name: str) -> Any | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        self._entries.move_to_end(name)
        return entry[0]

    def put(self, name: str, model: Any, nbytes: int) -> list[str]:
        """Add a loaded model; returns the names evicted to make room for it."""
        self._entries[name] = (model, nbytes)
        self._entries.move_to_end(name)
        evicted: list[str] = []
        if self.capacity is None:
            return evicted
        while len(self._entries) > 1 and self.nbytes > self.capacity:
            evicted.append(self._entries.popitem(last=False)[0])
            self.evictions += 1
        return evicted

    def discard(self, name: str) -> None:
        self._entries.pop(name, None)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


class LocalInputs:
    """Samples kept in this worker's memory until its own peek task takes them.

    Bounded in bytes and in age: when peeks fall behind, the oldest reads go first (their
    peek then sees no samples and the plan uses the prior for those groups), and a read
    whose peek never came (cancelled with its tick) goes once it is ``max_age_s`` old,
    rather than sitting there until the bytes run out.
    """

    def __init__(self, capacity_bytes: int = 512 << 20, max_age_s: float = 60.0):
        self.capacity = capacity_bytes
        self.max_age_s = max_age_s
        self._items: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    def put(self, ident: tuple, samples: Any) -> str:
        key = "-".join(map(str, ident))
        now = time.monotonic()
        with self._lock:
            old, _ = self._items.pop(key, (None, 0.0))
            self._nbytes -= getattr(old, "nbytes", 0)
            self._items[key] = (samples, now)
            self._nbytes += getattr(samples, "nbytes", 0)
            while len(self._items) > 1 and (
                self._nbytes > self.capacity
                or next(iter(self._items.values()))[1] < now - self.max_age_s
            ):
                _, (dropped, _) = self._items.popitem(last=False)
                self._nbytes -= getattr(dropped, "nbytes", 0)
        return key

    def pop(self, key: str) -> Any | None:
        with self._lock:
            samples, _ = self._items.pop(key, (None, 0.0))
            self._nbytes -= getattr(samples, "nbytes", 0)
            return samples

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._nbytes


class SerifWorkerPlugin(WorkerPlugin):
    """Per-worker serif state: config of the current run, readers and warm models."""

    name = "serif"
    idempotent = True

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.node = node_name()
        self.run_id: str | None = None
        self.config: SerifConfig | None = None  # the newest version of the run installed
        self.version = 0  # its number (1: the run's start; live reconfiguration adds more)
        #: The run's config versions installed here: in-flight tasks of an older version
        #: finish under the config they started with.
        self.configs: OrderedDict[int, SerifConfig] = OrderedDict()
        #: (app, modality, server) -> [(what the reader was opened from, reader)], newest
        #: last: a version that changes a reader's config opens a new one.
        self.readers: dict[tuple[str, str, str], list[tuple[Any, Any]]] = {}
        self.models = ModelCache()
        self.inputs = LocalInputs()
        self.shm: dict[str, Any] = {}  # modality -> ShmCache this worker owns
        self.redis: Any = None
        self.redis_info: dict[str, Any] | None = None
        self.seed = 0
        self.lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # sent to workers empty; all state is built there

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        from serif_dask.service import keep_key_caches_small

        self.worker = worker
        keep_key_caches_small(worker)
        dask_worker_log = logging.getLogger("distributed.worker")
        if _HEARTBEAT_FILTER not in dask_worker_log.filters:
            dask_worker_log.addFilter(_HEARTBEAT_FILTER)
        worker.handlers["serif_describe"] = self.describe
        worker.handlers["serif_prepare"] = self.prepare

    def teardown(self, worker: Worker) -> None:
        worker.handlers.pop("serif_describe", None)
        worker.handlers.pop("serif_prepare", None)
        self._end_run()

    def _end_run(self) -> None:
        """Drop the previous run's readers, inputs, segments and connections."""
        from serif_dask import datapath

        self.readers.clear()
        self.configs.clear()
        self.version = 0
        self.inputs.clear()
        for cache in self.shm.values():
            try:
                cache.close()
            except Exception:
                logger.debug("serif: closing a shared-memory cache failed", exc_info=True)
        self.shm.clear()
        datapath.detach_all()
        if self.redis is not None:
            try:
                self.redis.close()
            except Exception:
                logger.debug("serif: closing Redis failed", exc_info=True)
        self.redis = None

    def describe(self) -> dict[str, Any]:
        return {"node": self.node, "warm": self.models.names(), "run_id": self.run_id,
                "version": self.version}

    async def prepare(self, run_id: str) -> None:
        """Pull a new run's config and import torch ahead of the first tick (off the loop).

        Models still load lazily, on the first score task that needs them; this only
        takes the one-off import and config fetch out of the first requests' latency.
        """
        import asyncio

        from serif_dask.dataplane import import_torch

        worker = self.worker
        if worker is None:
            return
        loop = asyncio.get_running_loop()
        reply = await worker.scheduler.serif_get_config(run_id=run_id)
        if reply.get("config") is None:
            return
        config = await loop.run_in_executor(None, self._install_run, run_id, reply)
        if any(not p.use_profile for a in config.apps for p in a.model_profiles):
            await loop.run_in_executor(None, import_torch)
            await loop.run_in_executor(None, self._create_input_caches, run_id, config)

    def _create_input_caches(self, run_id: str, config: SerifConfig) -> None:
        """On a data worker: create the run's shared-memory input caches now, so that the
        first tick does not pay for creating and faulting in the segments."""
        from serif_dask import dataplane
        from serif_dask.roles import worker_role

        if self.worker is None:
            return
        role, server = worker_role(self.worker.name, self.worker.state.total_resources)
        if role != "data" or server not in config.server_names:
            return
        for app in config.apps:
            for modality in sorted({p.modality for p in app.model_profiles if not p.use_profile}):
                if not config.groups_of(server, modality):
                    continue
                try:
                    with self.lock:
                        if self.run_id == run_id:
                            dataplane.shm_cache(self, config, modality, server)
                except Exception:  # the first read task reports it
                    logger.warning("serif: cannot create the %r input cache", modality,
                                   exc_info=True)

    # -- called from task threads -------------------------------------------------------
    def ensure_run(self, run_id: str, version: int | None = None) -> SerifConfig:
        """The config of ``run_id`` (of its ``version``; None: the newest installed here),
        pulled from the scheduler on first use."""
        with self.lock:
            if self.run_id == run_id and self.config is not None:
                if version is None:
                    return self.config
                if version in self.configs:
                    return self.configs[version]
            assert self.worker is not None
            reply = sync(self.worker.loop, self.worker.scheduler.serif_get_config,
                         run_id=run_id, version=version)
            if reply.get("config") is None:
                what = f"run {run_id}" if version is None else f"version {version} of run {run_id}"
                raise RuntimeError(f"serif: {what} is not configured on the scheduler")
            return self._install_run(run_id, reply)

    def _install_run(self, run_id: str, reply: dict[str, Any]) -> SerifConfig:
        version = int(reply.get("version") or 1)
        with self.lock:
            if self.run_id == run_id and version in self.configs:
                return self.configs[version]
            config: SerifConfig = loads(reply["config"])
            if self.run_id == run_id and self.config is not None:
                return self._install_version(version, config)
            self._end_run()
            self.config, self.run_id, self.version = config, run_id, version
            self.configs[version] = config
            self.seed = int(reply["seed"])
            self.redis_info = reply.get("redis")
            capacity = None
            for node in config.system.compute_nodes:
                if node.name == str(self.worker.name):
                    capacity = node.model_cache_bytes
            self.models = ModelCache(capacity)
            # A read's peek comes within 2 × sla of it, or its tick gave up on it.
            self.inputs.max_age_s = 2 * max(a.sla_latency for a in config.apps) + 30.0
            return config

    def _install_version(self, version: int, config: SerifConfig) -> SerifConfig:
        """Another config version of the current run (live reconfiguration).

        Models loaded from something else under it (weights, Redis key, class), or that it
        removed, are dropped from the cache and reported cold; readers are reopened on
        first use under a changed config (:func:`serif_dask.tasks._reader`). Nothing else
        of the run is reset: inputs in shared memory and in-flight tasks of the older
        version carry on.
        """
        self.configs[version] = config
        while len(self.configs) > CONFIGS_KEPT:
            self.configs.popitem(last=False)
        if version < self.version:
            return config  # a late task of an older version: the newest stays in force
        old, self.config, self.version = self.config, config, version
        if old is not None:
            cold = [name for name in self.models.names()
                    if _profile(old, name) != _profile(config, name)]
            for name in cold:
                self.models.discard(name)
            if cold:
                logger.info("serif: version %d drops models %s", version, ", ".join(cold))
                self.report_warm(cold=cold)
        self.inputs.max_age_s = max(self.inputs.max_age_s,
                                    2 * max(a.sla_latency for a in config.apps) + 30.0)
        return config

    def report_warm(self, cold: list[str] | tuple[str, ...] = ()) -> None:
        """Tell the scheduler plugin which models are warm here and which went cold
        (evicted, or failed to load); fire and forget."""
        worker = self.worker
        if worker is None:
            return
        warm = self.models.names()
        cold = [name for name in cold if name not in warm]

        async def _send() -> None:
            try:
                await worker.scheduler.serif_warm(
                    worker=worker.address, node=self.node, warm=warm, cold=cold
                )
            except Exception:  # the scheduler may be gone at shutdown
                logger.debug("serif: could not report warm models", exc_info=True)

        worker.loop.add_callback(_send)


#: Config versions of a run a worker keeps (a task of an older one pulls it again).
CONFIGS_KEPT = 4


def _profile(config: SerifConfig, cache_name: str) -> Any:
    """What a cached model (``app/model``) was loaded from under ``config`` (None: the
    config has no such model): a change of it makes the cached one stale."""
    app, _, model = cache_name.partition("/")
    try:
        profile = config.model(app, model)
    except KeyError:
        return None
    return (profile.use_profile, profile.weights, profile.redis_key, profile.impl)


def current_plugin() -> SerifWorkerPlugin:
    """The serif plugin of the worker running the current task (installed if missing)."""
    worker = get_worker()
    plugin = worker.plugins.get(SerifWorkerPlugin.name)
    if plugin is None:
        raise RuntimeError(
            "serif: the worker plugin is not installed on this worker; start workers with "
            "--preload serif_dask.worker or use serif_dask.Serif(client, config)"
        )
    return plugin  # type: ignore[return-value]


async def dask_setup(worker: Worker) -> None:
    """Entry point for ``dask worker --preload serif_dask.worker``."""
    await worker.plugin_add(SerifWorkerPlugin(), name=SerifWorkerPlugin.name)
