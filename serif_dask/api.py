"""The Python API: ``Serif(client, config)`` on any Dask cluster.

>>> from distributed import Client                      # doctest: +SKIP
>>> serif = Serif(client, "configs/hospital")           # doctest: +SKIP
>>> summary = serif.run(duration=10)                    # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distributed import Client

from serif_dask.config import SerifConfig, load_config
from serif_dask.driver import Driver, RunOptions
from serif_dask.scheduler import install as install_scheduler_plugin
from serif_dask.worker import SerifWorkerPlugin

logger = logging.getLogger("serif_dask")


def push_weights(config: SerifConfig, client: Any) -> list[str]:
    """Put each real model's weights file into Redis unless the same bytes are there."""
    from serif_dask.store import WeightStore

    store = WeightStore(client)
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
    """serif-dask on the cluster behind ``client``: installs the plugins, runs the ticks."""

    def __init__(
        self,
        client: Client,
        config: SerifConfig | str | Path | Sequence[str | Path],
        *,
        policy: str | None = None,
        data_aware: bool | None = None,
        seed: int | None = None,
        records: str | Path | None = None,
        on_records: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        if not isinstance(config, SerifConfig):
            paths = [config] if isinstance(config, str | Path) else list(config)
            config = load_config(paths)
        self.client = client
        self.config = config
        self.policy = policy or config.system.scheduler_type
        self.data_aware = config.system.data_aware if data_aware is None else data_aware
        self.seed = resolve_seed(seed, config)
        self.records = Path(records) if records else None
        self.on_records = on_records
        self.driver: Driver | None = None
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
        """Real models keep their weights (and cross-node inputs) in Redis."""
        return any(not p.use_profile for a in self.config.apps for p in a.model_profiles)

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
        """Stop what this object started (an embedded redis-server)."""
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
            on_records=self.on_records,
            stop_grace_s=stop_grace_s,
        )

    async def run_async(self, duration: float | None = None, progress: Any = None) -> dict:
        """Run for ``duration`` seconds (default: the config's); return the summary."""
        if duration is None:
            duration = self.config.system.duration_in_secs
        await self.install()
        loop = asyncio.get_running_loop()
        redis = await loop.run_in_executor(None, self.prepare_redis)
        self.driver = Driver(self.client, self.config, self.options(duration, redis=redis))
        self._summary = await self.driver.run(progress)
        return self._summary

    def run(self, duration: float | None = None) -> dict:
        """Blocking form of :meth:`run_async`."""
        return self.client.sync(self.run_async, duration)

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()

    def report(self) -> dict[str, Any]:
        """The summary of the last run (or of what has been recorded so far)."""
        if self._summary is not None:
            return self._summary
        if self.driver is not None:
            return self.driver.summary()
        raise RuntimeError("nothing has run yet")
