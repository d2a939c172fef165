"""The Python API: ``Serif(client, config)`` on any Dask cluster.

>>> from distributed import Client                      # doctest: +SKIP
>>> serif = Serif(client, "configs/hospital")           # doctest: +SKIP
>>> summary = serif.run(duration=10)                    # doctest: +SKIP
>>> record = serif.submit("wakeword", 3, audio).result()  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distributed import Client, Future
from distributed.protocol.pickle import loads

from serif_dask.adaptive import SerifAdaptive, check_range, compute_pool
from serif_dask.config import ResultsStream, SerifConfig, load_config
from serif_dask.driver import Driver, RunOptions
from serif_dask.memory import report_memory
from serif_dask.prepare import data_workers
from serif_dask.reconfigure import Reconfigured, reconfigure_async
from serif_dask.records import Rotation
from serif_dask.scheduler import install as install_scheduler_plugin
from serif_dask.service import keep_task_groups
from serif_dask.submit import check_request, submit_task
from serif_dask.waiting import settled
from serif_dask.worker import SerifWorkerPlugin

logger = logging.getLogger("serif_dask")


def push_weights(config: SerifConfig, client: Any) -> list[str]:
    """Put each real model's weights file into Redis unless the same bytes are there."""
    from serif_dask.store import WeightStore

    # A push returns once the master's replicas hold it: losing a master loses no weights.
    store = WeightStore(client, replicas=None)
    pushed = []
    for app in config.apps:
        for profile in app.model_profiles:
            if profile.use_profile or not profile.weights:
                continue
            key = profile.redis_key or profile.name
            _, changed = store.push_if_changed(key, Path(profile.weights))
            if changed:
                pushed.append(key)
                logger.info("pushed weights of %s/%s to Redis key %s", app.name, profile.name, key)
    return pushed


def resolve_seed(seed: int | None, config: SerifConfig) -> int:
    """SERIF's rule: seed 0 means "seed from the clock"; the chosen seed is reported."""
    seed = config.system.seed if seed is None else seed
    return int(seed) if seed else int(time.time()) & 0x7FFFFFFF


class Serif:
    """serif-dask on the cluster behind ``client``: installs the plugins, runs the ticks.

    ``adaptive=(MIN, MAX)`` with ``cluster=`` (the cluster object: a ``LocalCluster``, a
    dask-jobqueue or dask-kubernetes cluster) scales its compute workers between MIN and
    MAX during :meth:`run` with Dask's adaptive machinery, on the planner's demand
    (:class:`serif_dask.adaptive.SerifAdaptive`); the config gains the compute nodes new
    workers are named after (:func:`serif_dask.adaptive.compute_pool`).

    ``results_stream`` names a Redis stream that receives every record of a run (it
    overrides the key of the system config's ``results-stream``); ``records_rotation``
    rotates the ``records`` file (:class:`serif_dask.records.Rotation`).
    """

    def __init__(
        self,
        client: Client,
        config: SerifConfig | str | Path | Sequence[str | Path],
        *,
        policy: str | None = None,
        data_aware: bool | None = None,
        seed: int | None = None,
        records: str | Path | None = None,
        records_rotation: Rotation | None = None,
        on_records: Callable[[list[dict[str, Any]]], None] | None = None,
        results_stream: str | None = None,
        replace: bool = False,
        warm_models: bool = True,
        cluster: Any = None,
        adaptive: tuple[int, int] | None = None,
    ):
        if not isinstance(config, SerifConfig):
            paths = [config] if isinstance(config, str | Path) else list(config)
            config = load_config(paths)
        #: ``(MIN, MAX)`` compute workers, scaled by :class:`SerifAdaptive` during a run.
        self.adaptive = check_range(*adaptive) if adaptive is not None else None
        if self.adaptive is not None:
            if cluster is None:
                raise ValueError("adaptive=(MIN, MAX) needs the cluster object "
                                 "(cluster=...): a client alone cannot start workers")
            config = compute_pool(config, self.adaptive[1])
        self.cluster = cluster
        self._adaptive: SerifAdaptive | None = None
        self.client = client
        self.config = config
        self.policy = policy or config.system.scheduler_type
        self.data_aware = config.system.data_aware if data_aware is None else data_aware
        self.seed = resolve_seed(seed, config)
        self.records = Path(records) if records else None
        self.records_rotation = records_rotation
        self.on_records = on_records
        self.replace = replace  # end another live run on the scheduler rather than refuse
        self.warm_models = warm_models  # load real models before the first tick
        self.results_stream: ResultsStream | None = config.system.results_stream
        if results_stream:
            base = self.results_stream or ResultsStream()
            self.results_stream = base.model_copy(update={"key": results_stream})
        self.driver: Driver | None = None
        self._adhoc: Driver | None = None  # a configured run for submit() when none ran
        self._adhoc_lock = threading.Lock()
        self._adhoc_owned = False  # this object configured the ad-hoc run (not joined it)
        self._summary: dict[str, Any] | None = None
        self._redis: Any = None  # RedisHandle, when this run needs Redis
        if not client.asynchronous:
            self.client.sync(self.install)

    async def install(self) -> None:
        """Install the scheduler and worker plugins (idempotent)."""
        await self.client.run_on_scheduler(install_scheduler_plugin)
        await self.client.register_plugin(SerifWorkerPlugin())

    @property
    def needs_redis(self) -> bool:
        """Real models keep their weights (and cross-node inputs) in Redis; so does a
        results stream, and live inputs come from there."""
        from serif_dask.config import LIVE_READER

        return self.results_stream is not None or any(
            not p.use_profile for a in self.config.apps for p in a.model_profiles
        ) or any(m.impl == LIVE_READER for m in self.config.data.data_modalities)

    def prepare_redis(self) -> dict[str, Any] | None:
        """Reach (or start, embedded) the run's Redis and push any weights it lacks."""
        if not self.needs_redis:
            return None
        if self._redis is None:
            from serif_dask.redis_server import ensure_redis

            self._redis = ensure_redis(self.config.system)
        push_weights(self.config, self._redis.connect())
        return {"nodes": [list(n) for n in self._redis.nodes], "password": self._redis.password}

    def close(self) -> None:
        """Stop what this object started: the ad-hoc run it configured for :meth:`submit`
        (so that the scheduler can serve another at once) and an embedded redis-server."""
        adhoc, self._adhoc = self._adhoc, None
        if (adhoc is not None and self._adhoc_owned and not self.client.asynchronous
                and self.client.status == "running"):
            with contextlib.suppress(Exception):
                self.client.sync(self.client.scheduler.serif_end, run_id=adhoc.run_id)
        self._adhoc_owned = False
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> Serif:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def options(
        self, duration: float, stop_grace_s: float = 3.0, redis: dict[str, Any] | None = None
    ) -> RunOptions:
        return RunOptions(
            redis=redis,
            duration=float(duration),
            policy=self.policy,
            data_aware=bool(self.data_aware),
            seed=self.seed,
            records_path=self.records,
            records_rotation=self.records_rotation,
            on_records=self.on_records,
            stop_grace_s=stop_grace_s,
            replace=self.replace,
            warm_models=self.warm_models,
        )

    async def run_async(self, duration: float | None = None, progress: Any = None) -> dict:
        """Run for ``duration`` seconds (default: the config's); return the summary."""
        if duration is None:
            duration = self.config.system.duration_in_secs
        await self.install()
        loop = asyncio.get_running_loop()
        redis = await loop.run_in_executor(None, self.prepare_redis)
        options = self.options(duration, redis=redis)
        sink = self._sink()
        if sink is not None:
            options = dataclasses.replace(options, on_records=_both(sink.put, self.on_records))
        self._adhoc = None  # this run replaces any ad-hoc one on the scheduler
        self.driver = Driver(self.client, self.config, options)
        # Held for the run: Dask then keeps one task group per kind of tick task, instead
        # of a new one per tick kept for ever (serif_dask.service).
        anchors = keep_task_groups(self.client, self.driver.run_id)
        reporter = asyncio.create_task(report_memory(self.client, self.driver.run_id))
        self._start_adaptive()
        try:
            self._summary = await self.driver.run(progress)
        finally:
            if self._adaptive is not None:
                self._adaptive.stop(reason="serif-run-ended")
                self._adaptive = None
            reporter.cancel()
            for anchor in anchors:
                anchor.release()
            if sink is not None:
                await loop.run_in_executor(None, sink.close)
        return self._summary

    def _start_adaptive(self) -> None:
        """Dask's adaptive scaling of the compute workers, on the planner's signal."""
        if self.adaptive is None:
            return
        low, high = self.adaptive
        self._adaptive = self.cluster.adapt(
            Adaptive=SerifAdaptive, minimum=low, maximum=high,
            pool=self.config.system.node_names,
        )

    def _sink(self) -> Any:
        """The run's results stream writer, when one is configured."""
        if self.results_stream is None or self._redis is None:
            return None
        from serif_dask.sink import StreamSink

        handle = self._redis
        return StreamSink(lambda: handle.connect(socket_timeout=5.0),
                          self.results_stream.key, self.results_stream.maxlen,
                          max_age_s=self.results_stream.max_age_s)

    def run(self, duration: float | None = None) -> dict:
        """Blocking form of :meth:`run_async`."""
        return self.client.sync(self.run_async, duration)

    # -- ad-hoc requests ---------------------------------------------------------------------
    async def open_async(self) -> str:
        """Make :meth:`submit` possible without :meth:`run`; returns the run id it uses.

        A run of this object, active or finished, is used as it is. Else, when the scheduler
        plugin serves a live run of the same config (another process's ``serif-dask run``,
        say), requests join it; otherwise this object's config, policy and seed are configured as
        a new run (refused with ``ValueError`` while another config's run is live, unless
        ``replace=True``). Either way each
        application's SneakPeek estimator is fitted once. With a synchronous client
        ``submit`` calls this itself.
        """
        session = self.driver or self._adhoc
        if session is not None:
            return session.run_id
        await self.install()
        loop = asyncio.get_running_loop()
        redis = await loop.run_in_executor(None, self.prepare_redis)
        driver = Driver(self.client, self.config, self.options(0, redis=redis))
        current = await self.client.scheduler.serif_get_config()
        live = current.get("live")
        if live and current.get("config") is not None and (
                loads(current["config"]) == self.config.without_secrets()):
            driver.join(current["run_id"])
            await self._fit_estimators(driver)
        elif live and not self.replace:
            raise ValueError(f"the scheduler serves live run {current['run_id']} of another "
                             "config; pass replace=True to end it")
        else:
            await driver.configure()
            self._adhoc_owned = True
        self._adhoc = driver
        return driver.run_id

    async def _fit_estimators(self, driver: Driver) -> None:
        """Fit SneakPeek for a run configured by someone else (its own fits are theirs)."""
        fits = driver.estimators.fit(await data_workers(self.client))
        await asyncio.gather(*(settled(f) for f in fits.values()), return_exceptions=True)

    def open(self) -> str:
        """Blocking form of :meth:`open_async`."""
        with self._adhoc_lock:
            return self.client.sync(self.open_async)

    def submit(self, app: str, group: int, sample: Any, *, label: int | None = None) -> Future:
        """Send one ad-hoc request through peek → plan → score; a Future of its record.

        ``sample`` is one input of the application's modality (its ``synthetic-shape``), or
        ``{modality: sample}`` when it reads several; ``label``, when known, scores the
        record's utility and accuracy. Bad input raises ``ValueError`` here; whatever goes
        wrong later gives a record with outcome ``failed`` and a ``reason``. The record has
        the JSONL fields (``tick`` is None), its ``request`` id and ``pi``, the group's class
        estimate after the peek. Ad-hoc requests are not counted in a run's summary.
        """
        _, group, samples, label_ = check_request(self.config, app, group, sample, label)
        session = self.driver or self._adhoc
        if session is None:
            if self.client.asynchronous:
                raise RuntimeError("with an asynchronous client, await serif.open_async() "
                                   "before the first submit outside a run")
            self.open()
            session = self.driver or self._adhoc
            assert session is not None
        estimator = session.estimators.fitted(app)
        request = uuid.uuid4().hex
        return self.client.submit(
            submit_task, session.run_id, app, group, samples, label_, time.time(), estimator,
            request, key=f"serif-submit-{request}", pure=False,
        )

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()

    # -- live reconfiguration ----------------------------------------------------------------
    async def reconfigure_async(
        self,
        config: SerifConfig | str | Path | Sequence[str | Path] | None = None,
        *,
        policy: str | None = None,
        data_aware: bool | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> Reconfigured:
        """Change the live run the scheduler serves (this object's, or another process's)
        without stopping it: the whole new ``config`` and/or ``policy``/``data_aware``.

        It becomes the run's next config version, applied from the driver's next tick;
        every record carries the version it was served under. New real models' weights
        are pushed into the run's Redis first. A change that cannot apply raises
        :class:`serif_dask.errors.ReconfigureRefused` and the run goes on unchanged; with
        ``wait`` this returns once the driver applied it (else
        :class:`serif_dask.errors.RunFailed` after ``timeout`` seconds).
        """
        result = await reconfigure_async(self.client, config, policy=policy,
                                         data_aware=data_aware, wait=wait, timeout=timeout)
        if result.changes:  # later ad-hoc requests are checked against the new config
            current = await self.client.scheduler.serif_get_config(version=result.version)
            if current.get("config") is not None:
                # The system config cannot change live (and the plugin's has no secrets).
                live = loads(current["config"])
                self.config = self.config.model_copy(update={"apps": live.apps,
                                                             "data": live.data})
                self.policy = current["policy"]
                self.data_aware = bool(current["data_aware"])
        return result

    def reconfigure(
        self,
        config: SerifConfig | str | Path | Sequence[str | Path] | None = None,
        *,
        policy: str | None = None,
        data_aware: bool | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> Reconfigured:
        """Blocking form of :meth:`reconfigure_async`."""
        return self.client.sync(self.reconfigure_async, config, policy=policy,
                                data_aware=data_aware, wait=wait, timeout=timeout)

    def report(self) -> dict[str, Any]:
        """The summary of the last run (or of what has been recorded so far)."""
        if self._summary is not None:
            return self._summary
        if self.driver is not None:
            return self.driver.summary()
        raise RuntimeError("nothing has run yet")


def _both(
    first: Callable[[list[dict[str, Any]]], None],
    second: Callable[[list[dict[str, Any]]], None] | None,
) -> Callable[[list[dict[str, Any]]], None]:
    """One ``on_records`` callback that feeds the results stream, then the user's."""

    def on_records(records: list[dict[str, Any]]) -> None:
        first(records)
        if second is not None:
            second(records)

    return on_records
