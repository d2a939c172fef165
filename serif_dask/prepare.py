"""Before the clock starts: SneakPeek fitted, readers opened, real models loaded.

Every one-off cost is paid here, so the first tick is like any other. A step that fails
is one line naming it; a step still running after ``PREPARE_WARN_S`` is named in one line
(which worker, which step), and after ``PREPARE_LIMIT_S`` the run starts without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from distributed import Client, Future

from serif_dask.config import SerifConfig
from serif_dask.membership import membership
from serif_dask.tasks import fit_task, warm_data_task, warm_models_task
from serif_dask.waiting import gathered, live_workers, settled

logger = logging.getLogger("serif_dask.prepare")

#: Preparation still running after this many seconds is named in one line; after the
#: second bound the run starts without it.
PREPARE_WARN_S = 60.0
PREPARE_LIMIT_S = 600.0


async def data_workers(client: Client) -> dict[str, str]:
    """Data workers: server name -> address."""
    return {w["node"]: w["address"] for w in await live_workers(client) if w["role"] == "data"}


class Estimators:
    """Each application's fitted SneakPeek estimator, as a future on a data worker.

    The driver also keeps the (small) fitted value: the fit task is pinned to one data
    worker, and if every worker holding its result dies, Dask would recompute it there and
    wait in ``no-worker`` for ever, holding every peek back. :meth:`current` scatters the
    kept value again instead.
    """

    def __init__(self, client: Client, config: SerifConfig, run_id: str) -> None:
        self.client, self.config, self.run_id = client, config, run_id
        self.futures: dict[str, Future] = {}
        self.values: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.futures)

    def fit(self, data: dict[str, str]) -> dict[str, Future]:
        """Submit one fit per application, on a data worker serving its peeked modality;
        returns them by what they do, for :func:`await_steps`."""
        steps = {}
        for app in self.config.apps:
            mod = self.config.peek_modality(app)
            server = next((s for s in self.config.server_names
                           if self.config.groups_of(s, mod) and s in data), None)
            if server is None:
                continue
            self.futures[app.name] = steps[f"fitting SneakPeek of {app.name} on {server}"] = (
                self.client.submit(
                    fit_task, self.run_id, app.name, mod, server,
                    key=f"serif-fit-{self.run_id}-{app.name}-{uuid.uuid4().hex[:8]}",
                    workers=[data[server]], allow_other_workers=False, pure=False,
                )
            )
        return steps

    async def keep(self) -> dict[str, Any]:
        """Keep the value of every finished fit; returns them by application."""
        for name, fut in self.futures.items():
            if fut.status == "finished" and name not in self.values:
                self.values[name] = (await gathered(self.client, [fut]))[0]
        return dict(self.values)

    def fitted(self, app: str) -> Future | None:
        """The estimator, when fitted: a fit pending or lost must not hold a request back
        (the plan then uses the group's belief as it stands)."""
        fut = self.futures.get(app)
        return fut if fut is not None and fut.status == "finished" else None

    async def current(self, app: str, timeout: float) -> Future | None:
        """The estimator for a tick: as it is, or scattered again when its future is lost."""
        fut = self.futures.get(app)
        if fut is None or fut.status == "finished":
            return fut
        value = self.values.get(app)
        live = [w["address"] for w in await live_workers(self.client) if w["role"] == "data"]
        if value is None or not live:
            return None
        with contextlib.suppress(Exception):
            await self.client.cancel([fut], asynchronous=True)
        logger.warning("serif: SneakPeek estimator of %s lost with its data worker; "
                       "scattering it again", app)
        try:  # bounded: a worker in the list may be dying too (this tick then peeks nothing)
            fut = await asyncio.wait_for(
                self.client.scatter(value, workers=live, broadcast=True, hash=False,
                                    asynchronous=True),
                timeout=timeout,
            )
        except Exception as exc:
            logger.warning("serif: could not scatter the estimator of %s: %r", app, exc)
            return None
        self.futures[app] = fut
        return fut


def data_steps(client: Client, config: SerifConfig, run_id: str, estimators: Estimators,
               data: dict[str, str], version: int | None = None) -> dict[str, Future]:
    """On each data worker (server -> address): open its readers (under config
    ``version``, None: the one it has) and peek once."""
    steps: dict[str, Future] = {}
    for app in config.apps:
        peek_mod = config.peek_modality(app)
        mods = sorted({p.modality for p in app.model_profiles} | {peek_mod})
        estimator = estimators.fitted(app.name)
        for server, address in data.items():
            first_group = {m: config.groups_of(server, m)[0] for m in mods
                           if config.groups_of(server, m)}
            if not first_group:
                continue
            steps[f"opening readers of {app.name} on data@{server}"] = client.submit(
                warm_data_task, run_id, app.name, server, first_group, estimator, peek_mod,
                version, key=f"serif-warm-{run_id}-{app.name}-{server}-{uuid.uuid4().hex[:8]}",
                workers=[address], allow_other_workers=False, pure=False,
            )
    return steps


async def warm_up(client: Client, config: SerifConfig, run_id: str, estimators: Estimators,
                  data: dict[str, str], warm_models_first: bool, stop: asyncio.Event) -> None:
    """Each data worker opens its readers and peeks once; each compute worker loads the
    run's real models and runs one forward (``warm_models``). Models loaded here are
    reported warm to the scheduler plugin before the first plan."""
    steps = data_steps(client, config, run_id, estimators, data)
    real = [f"{a.name}/{p.name}" for a in config.apps for p in a.model_profiles
            if not p.use_profile]
    try:
        await warm_models(client, run_id, steps, warm_models_first, stop, only=real)
    finally:
        for fut in steps.values():
            fut.release()


async def warm_models(client: Client, run_id: str, steps: dict[str, Future], enabled: bool,
                      stop: asyncio.Event, version: int | None = None,
                      only: list[str] | None = None) -> None:
    """Wait for ``steps``, and meanwhile load the real models ``only`` (``app/model``) of
    config ``version`` on every compute worker (when ``enabled``), reported warm to the
    scheduler plugin before the plans that follow. The caller releases ``steps``."""
    compute = {}
    if enabled and only:
        compute = {w["address"]: w["name"] for w in await live_workers(client)
                   if w["role"] == "compute"}
    models = {}
    for address, name in compute.items():
        models[address] = steps[f"loading models on {name}"] = client.submit(
            warm_models_task, run_id, version, only,
            key=f"serif-warm-{run_id}-{name}-{uuid.uuid4().hex[:8]}", workers=[address],
            allow_other_workers=False, resources={"GPU": 1}, pure=False,
        )
    await await_steps(steps, stop)
    for address, fut in models.items():
        if fut.status == "finished":
            warm = (await gathered(client, [fut]))[0]
            await client.scheduler.serif_warm(worker=address, node=None, warm=warm, cold=[])


class ReadyDataWorkers:
    """The data workers that take a tick's reads: those warmed before the first tick, and
    each one that joins later (a restarted worker) once its readers are open, so that a
    cold process's first read does not time out a tick. Until then its groups fail
    ``reader-lost`` at once instead of holding the tick."""

    def __init__(self, client: Client, config: SerifConfig, run_id: str,
                 estimators: Estimators) -> None:
        self.client, self.config, self.run_id = client, config, run_id
        self.version: int | None = None  # the config version ticks start under (None: 1)
        self.estimators = estimators
        self.ready: set[str] = set()
        self._warming: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def __contains__(self, address: object) -> bool:
        return address in self.ready

    async def begin(self) -> None:
        """Every data worker there now is ready: call once the run's warm-up is done."""
        view = await membership(self.client)
        self.ready |= {a for a, w in view.workers.items() if w["role"] == "data"}

    async def watch(self, stop: asyncio.Event) -> None:
        """From now on, warm every data worker that joins before it takes reads."""
        view = await membership(self.client)
        while not stop.is_set():
            change = view.changed()
            for address, w in list(view.workers.items()):
                if w["role"] == "data" and address not in self.ready | self._warming:
                    self._warming.add(address)
                    task = asyncio.ensure_future(self._warm(w["node"], address, stop))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            try:
                await change
            finally:
                change.cancel()

    async def _warm(self, server: str, address: str, stop: asyncio.Event) -> None:
        steps = data_steps(self.client, self.config, self.run_id, self.estimators,
                           {server: address}, self.version)
        try:
            await await_steps(steps, stop)
        finally:
            for fut in steps.values():
                fut.release()
            self._warming.discard(address)
        self.ready.add(address)
        logger.info("serif: data@%s (%s) joined and is warm", server, address)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def await_steps(steps: dict[str, Future], stop: asyncio.Event) -> None:
    """Wait for preparation steps; one line for each that fails, and one line naming those
    still running after ``PREPARE_WARN_S`` (then wait up to ``PREPARE_LIMIT_S``)."""
    if not steps:
        return
    waiting = {asyncio.ensure_future(settled(f)): what for what, f in steps.items()}
    started = time.monotonic()
    warned = False
    while waiting:
        left = PREPARE_LIMIT_S - (time.monotonic() - started)
        if left <= 0 or stop.is_set():
            break
        timeout = left if warned else min(left, PREPARE_WARN_S - (time.monotonic() - started))
        done, _ = await asyncio.wait(waiting, timeout=max(timeout, 0.0))
        for task in done:
            what = waiting.pop(task)
            error = task.result()
            if error is not None:
                logger.warning("serif: %s failed: %s", what, error)
        if waiting and not done and not warned:
            warned = True
            logger.warning("serif: still preparing after %.0f s: %s", PREPARE_WARN_S,
                           "; ".join(sorted(waiting.values())))
    for task, what in waiting.items():
        task.cancel()
        logger.warning("serif: %s did not finish in %.0f s; starting without it", what,
                       PREPARE_LIMIT_S)
