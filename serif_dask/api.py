"""The Python API: ``Serif(client, config)`` on any Dask cluster.

>>> from distributed import Client                      # doctest: +SKIP
>>> serif = Serif(client, "configs/hospital")           # doctest: +SKIP
>>> summary = serif.run(duration=10)                    # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distributed import Client

from serif_dask.config import SerifConfig, load_config
from serif_dask.driver import Driver, RunOptions
from serif_dask.scheduler import install as install_scheduler_plugin
from serif_dask.worker import SerifWorkerPlugin


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
        if not client.asynchronous:
            self.client.sync(self.install)

    async def install(self) -> None:
        """Install the scheduler and worker plugins (idempotent)."""
        await self.client.run_on_scheduler(install_scheduler_plugin)
        await self.client.register_plugin(SerifWorkerPlugin())

    def options(self, duration: float, stop_grace_s: float = 3.0) -> RunOptions:
        return RunOptions(
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
        self.driver = Driver(self.client, self.config, self.options(duration))
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
