"""One run from the command line: cluster, plugins, driver, signals, clean-up.

Everything started here is stopped here, on success, on failure and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from distributed import Client
from distributed.security import Security

from serif_dask.api import Serif
from serif_dask.config import SerifConfig
from serif_dask.driver import RunStats
from serif_dask.errors import RunFailed, RunRefused
from serif_dask.records import RecordLog, Rotation
from serif_dask.service import service_config

logger = logging.getLogger("serif_dask.runner")


class _Progress:
    """A live line on a terminal: ticks, requests, utility, misses (rich, not escape codes)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=True)

    def __enter__(self) -> _Progress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def __call__(self, stats: RunStats, log: RecordLog) -> None:
        totals = log.totals
        n, done = totals.requests, totals.outcomes["completed"]
        utility, missed = totals.utility, n - totals.deadline_met
        self.live.update(
            f"ticks {stats.ticks} (late {stats.ticks_late})  requests {n}  completed {done}  "
            f"utility {utility:.1f}  deadline misses {missed}"
        )


async def run_deployment(
    config: SerifConfig,
    *,
    duration: float | None,
    policy: str | None,
    data_aware: bool | None,
    seed: int | None,
    records: Path | None,
    records_rotation: Rotation | None = None,
    results_stream: str | None = None,
    scheduler_address: str | None,
    dashboard_address: str | None,
    progress: bool,
    replace: bool = False,
    warm_models: bool = True,
    security: Security | None = None,
    scheduler_file: Path | None = None,
    adaptive: tuple[int, int] | None = None,
) -> tuple[dict[str, Any] | None, int]:
    """Run ``config``; return (summary, exit status).

    ``scheduler_file``: join the scheduler it names when it exists (as Dask's
    ``--scheduler-file`` does), else write the local cluster's address there (Dask's
    format, removed at the end), so that other commands (``serif-dask reconfigure
    --scheduler-file``) can find the run.

    ``adaptive=(MIN, MAX)``: the local cluster starts MIN compute workers and Dask's
    adaptive machinery scales them up to MAX on the planner's demand; refused on a
    scheduler serif-dask did not start (it has no cluster object to start workers with).
    """
    if scheduler_file is not None and scheduler_address is None and scheduler_file.exists():
        scheduler_address = read_scheduler_file(scheduler_file)
    if adaptive is not None and scheduler_address:
        raise RunRefused("--adaptive scales the workers of a cluster serif-dask starts; with "
                         "--scheduler-address (or an existing --scheduler-file) there is no "
                         "cluster object to start workers with (use Serif(client, config, "
                         "cluster=..., adaptive=...) from Python)")
    written: Path | None = None
    if not logger.isEnabledFor(logging.INFO):
        # The local scheduler lives in this process: keep Dask's chatter off the terminal.
        logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = None
    client: Client | None = None
    serif: Serif | None = None
    stopped: dict[int, int] = {}
    status = 0
    # A service: Dask's long-running settings hold for this whole process (the local
    # scheduler reads some of them only when first used, e.g. the dashboard's task stream).
    settings = contextlib.ExitStack()
    settings.enter_context(service_config())
    try:
        stopped = install_signal_handlers(lambda: serif.stop() if serif else None)
        if scheduler_address:
            from serif_dask.cluster import uses_tls

            if scheduler_address.startswith("tls://") and not uses_tls(security):
                raise RunFailed(f"cannot reach scheduler {scheduler_address}: it speaks TLS; "
                                "pass --tls-ca-file and --tls-cert (or set Dask's "
                                "distributed.comm.tls config)")
            pending = Client(scheduler_address, asynchronous=True, timeout="20s",
                             security=security)
            try:
                client = await pending
            except (OSError, TimeoutError) as exc:
                with contextlib.suppress(Exception):
                    await pending.close()
                reason = str(exc) or type(exc).__name__
                raise RunFailed(f"cannot reach scheduler {scheduler_address}: {reason}") from None
        else:
            from serif_dask.cluster import start_local_cluster

            compute_workers = None
            if adaptive is not None:
                from serif_dask.adaptive import compute_pool

                config = compute_pool(config, adaptive[1])
                compute_workers = adaptive[0]
            cluster = await start_local_cluster(config, dashboard_address=dashboard_address,
                                                security=security,
                                                compute_workers=compute_workers)
            client = await Client(cluster, asynchronous=True, security=cluster.security)
            host = cluster.scheduler.address
            if scheduler_file is not None:
                write_scheduler_file(scheduler_file, host)
                written = scheduler_file
            logger.info("local cluster at %s, dashboard %s", host, cluster.dashboard_link)
        if stopped:
            return None, _signal_status(stopped)
        serif = Serif(
            client, config, policy=policy, data_aware=data_aware, seed=seed, records=records,
            records_rotation=records_rotation, results_stream=results_stream,
            replace=replace, warm_models=warm_models,
            cluster=cluster if adaptive is not None else None, adaptive=adaptive,
        )
        await serif.install()
        bar = _Progress() if progress else None
        with bar if bar is not None else contextlib.nullcontext():
            summary = await serif.run_async(duration, progress=bar)
        if serif.driver is not None and serif.driver.replaced_by:
            print(f"error: run {serif.driver.run_id} was replaced by run "
                  f"{serif.driver.replaced_by}; summary holds what was recorded",
                  file=sys.stderr)
            status = 1
        elif serif.driver is not None and serif.driver.scheduler_lost:
            print("error: lost the Dask scheduler; summary holds what was recorded",
                  file=sys.stderr)
            if not logger.isEnabledFor(logging.INFO):
                # The client's failed reconnect and its cancellation at close would add
                # tracebacks to the one line that says what happened.
                for name in ("distributed", "distributed.client"):  # the client has its own
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            status = 1
        if stopped:
            status = _signal_status(stopped)
        return summary, status
    finally:
        if serif is not None:
            with contextlib.suppress(Exception):
                serif.close()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cluster.close(), timeout=20)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        settings.close()
        if written is not None:
            with contextlib.suppress(OSError):
                written.unlink()


def read_scheduler_file(path: Path) -> str:
    """The scheduler address in a Dask scheduler file (``{"address": ...}``)."""
    try:
        address = json.loads(path.read_text())["address"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunFailed(f"cannot read the scheduler address in {path}: {exc}") from None
    if not isinstance(address, str):
        raise RunFailed(f"cannot read the scheduler address in {path}: not a string")
    return address


def write_scheduler_file(path: Path, address: str) -> None:
    """Write ``address`` in Dask's scheduler-file format, whole or not at all."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"type": "Scheduler", "address": address}) + "\n")
    partial.replace(path)


def _signal_status(stopped: dict[int, int]) -> int:
    return 143 if signal.SIGTERM in stopped else 130


def install_signal_handlers(stop: Any) -> dict[int, int]:
    """SIGINT/SIGTERM stop the run gracefully; returns a dict filled with what arrived."""
    got: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        def handler(sig: int = sig) -> None:
            got[sig] = got.get(sig, 0) + 1
            stop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handler)
    return got
