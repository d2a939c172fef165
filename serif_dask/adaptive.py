"""GPU workers that follow the planner: Dask's ``Adaptive``, driven by serif's signal.

Dask's own adaptive target counts queued tasks per worker; a serif tick is a handful of
batched tasks whatever its load, so that count says little. :class:`SerifAdaptive` keeps
Dask's machinery (``cluster.adapt``, ``recommendations``, ``wait_count``, graceful
``retire_workers``) and takes its target from the scheduler plugin's ``serif_capacity``:
the model seconds per second its plans booked on compute workers, the work they left
unserved for lack of capacity (dropped, or answered from the peek although a model would
have earned more) and the time since the last plan. Only compute workers (``GPU``) are
scaled; data workers stay as they are.

A worker is removed in three steps, so that no batch is lost: the plugin stops booking it
(``serif_retire``), its queued batches finish, then Dask retires it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from distributed.deploy import Adaptive
from distributed.deploy.spec import SpecCluster

from serif_dask.config import ComputeNode, FrozenDict, SerifConfig
from serif_dask.scheduler import CAPACITY_WINDOW_S

logger = logging.getLogger("serif_dask.adaptive")

#: Grow when the demand (booked + unmet model seconds per second) needs more than this
#: share of every worker: a real cluster needs headroom for dispatch and start-up, as
#: ``serif-dask plan``'s ``--max-busy`` assumes.
HIGH_BUSY = 0.8
#: Shrink when the demand would keep one worker fewer under this share.
LOW_BUSY = 0.4
#: Work left unserved for lack of capacity on this share of requests asks for a worker
#: more even when the booked seconds alone fit (the planner then books short of a full
#: worker because every other request's deadline was already out of reach).
UNMET_SHARE = 0.01
#: Longest wait for a retiring worker's queued batches before Dask retires it anyway
#: (the driver then re-plans what was left, as after a lost worker).
RETIRE_TIMEOUT_S = 30.0


def parse_range(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` (or one number for both) as ``(MIN, MAX)``, with 1 <= MIN <= MAX."""
    lo, sep, hi = str(text).partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"{text!r} is not MIN:MAX (two whole numbers)") from None
    return check_range(low, high)


def check_range(low: int, high: int) -> tuple[int, int]:
    """A run needs a compute worker to plan on, and MAX bounds the pool of node names."""
    if low < 1:
        raise ValueError(f"adaptive minimum {low} < 1: a run needs a compute worker")
    if high < low:
        raise ValueError(f"adaptive maximum {high} < minimum {low}")
    return int(low), int(high)


def compute_pool(config: SerifConfig, size: int) -> SerifConfig:
    """``config`` with at least ``size`` compute nodes: the nodes workers may be named after.

    The config's own nodes come first; then copies of the cheapest type's first node,
    named ``<node>-2``, ``<node>-3`` ... (as ``serif-dask plan`` names them), with its type
    and its latency profile (model latencies, retrieval latencies). The planner's model
    table then knows every worker adaptive scaling may start, and a worker that has not
    started is simply not in a plan's view.
    """
    system = config.system
    nodes = list(system.compute_nodes)
    if len(nodes) >= size:
        return config
    costs: dict[str, float] = {}
    for node in nodes:
        costs.setdefault(node.node_type, 1.0 if node.cost is None else float(node.cost))
    cheapest = min(costs, key=lambda t: (costs[t], list(costs).index(t)))
    template = next(n for n in nodes if n.node_type == cheapest)
    taken = set(system.node_names) | set(config.server_names)
    added: list[ComputeNode] = []
    k = 2
    while len(nodes) + len(added) < size:
        name = f"{template.name}-{k}"
        k += 1
        if name not in taken:
            taken.add(name)
            added.append(template.model_copy(update={"name": name, "type": cheapest}))

    def extend(table: Any) -> FrozenDict:
        entries = dict(table)
        if template.name in entries:
            entries.update({node.name: entries[template.name] for node in added})
        return FrozenDict(entries)

    apps = tuple(
        app.model_copy(update={"model_profiles": tuple(
            p.model_copy(update={"latencies": extend(p.latencies)}) for p in app.model_profiles
        )})
        for app in config.apps
    )
    data = config.data.model_copy(update={"data_modalities": tuple(
        m.model_copy(update={"retrieval_latencies": extend(m.retrieval_latencies)})
        for m in config.data.data_modalities
    )})
    data._listed = config.data._listed
    system = system.model_copy(update={"compute_nodes": (*nodes, *added)})
    return config.model_copy(update={"system": system, "apps": apps, "data": data})


def target_workers(signal: dict[str, Any], current: int, *, high: float = HIGH_BUSY,
                   low: float = LOW_BUSY, idle_after: float = CAPACITY_WINDOW_S) -> int:
    """Compute workers the planner's demand asks for, given ``current`` (before Dask's
    minimum and maximum). Hysteresis between ``low`` and ``high`` keeps it from flapping.

    No live run, or no plan yet (the run is still warming up): keep ``current``. No plan
    for ``idle_after`` seconds: none needed (Dask's minimum then holds).
    """
    if not signal.get("live") or not signal.get("planned"):
        return current
    if signal.get("idle_s", 0.0) > idle_after:
        return 0
    demand = float(signal.get("booked", 0.0)) + float(signal.get("unmet", 0.0))
    needed = math.ceil(demand / high - 1e-9) if demand > 0 else 0
    if signal.get("unmet_share", 0.0) > UNMET_SHARE and needed <= current:
        needed = current + 1
    if needed > current:
        return needed
    if current > 1 and demand / (current - 1) <= low:
        return min(needed, current - 1)
    return current


class SerifAdaptive(Adaptive):
    """``Adaptive`` whose target is the serif planner's demand on compute workers.

    Use it as Dask's own: ``cluster.adapt(Adaptive=SerifAdaptive, minimum=1, maximum=4,
    pool=[...])``; ``minimum``/``maximum`` count compute workers only. ``pool`` names the
    compute nodes of the run's config (:func:`compute_pool`) in the order new workers take
    them: on a ``SpecCluster`` (``LocalCluster`` included) a new worker is the spec of an
    existing compute worker under the next free name, with ``SERIF_NODE`` set to it; other
    cluster managers (dask-jobqueue, dask-kubernetes) start theirs with ``cluster.scale``,
    and must name them after pool nodes with ``--resources GPU=1``.
    """

    def __init__(
        self, cluster: Any, *, pool: Sequence[str] = (), interval: str | float = "1s",
        high: float = HIGH_BUSY, low: float = LOW_BUSY, window: float = CAPACITY_WINDOW_S,
        retire_timeout: float = RETIRE_TIMEOUT_S, **kwargs: Any,
    ) -> None:
        self.pool = tuple(pool)
        self.high, self.low, self.window = high, low, window
        self.retire_timeout = retire_timeout
        self.last_signal: dict[str, Any] | None = None
        super().__init__(cluster, interval=interval, **kwargs)

    # -- the adaptive pool is the compute workers --------------------------------------
    def _is_compute(self, name: Any) -> bool:
        spec = getattr(self.cluster, "worker_spec", {}).get(name)
        if spec is not None:
            resources = spec.get("options", {}).get("resources") or {}
            return resources.get("GPU", 0) > 0
        for info in (self.cluster.scheduler_info or {}).get("workers", {}).values():
            if info.get("name") == name:
                return (info.get("resources") or {}).get("GPU", 0) > 0
        return True  # a worker the cluster manager is still starting: one of ours

    @property
    def plan(self) -> set:
        return {n for n in self.cluster.plan if self._is_compute(n)}

    @property
    def requested(self) -> set:
        return {n for n in self.cluster.requested if self._is_compute(n)}

    @property
    def observed(self) -> set:
        return {n for n in self.cluster.observed if self._is_compute(n)}

    # -- the target ----------------------------------------------------------------------
    async def target(self) -> int:
        signal = await self.scheduler.serif_capacity(window=self.window)
        self.last_signal = signal
        current = len(self.plan)
        return target_workers(signal, current, high=self.high, low=self.low,
                              idle_after=self.window)

    async def workers_to_close(self, target: int) -> list[str]:
        """The compute workers with the fewest queued batches, the newest pool names
        first among equals: the config's own nodes are the last to go."""
        observed = self.observed
        n = len(self.plan) - target
        queued = {w["name"]: w["pending"] for w in (self.last_signal or {}).get("compute", [])}
        order = {name: i for i, name in enumerate(self.pool)}
        ranked = sorted(observed, key=lambda name: (queued.get(str(name), 0),
                                                    -order.get(str(name), len(order))))
        return [str(name) for name in ranked[:max(0, n)]]

    # -- scaling -------------------------------------------------------------------------
    async def scale_up(self, n: int) -> None:
        cluster = self.cluster
        if isinstance(cluster, SpecCluster) and self.pool:
            free = [name for name in self.pool if name not in cluster.worker_spec]
            for name in free[:max(0, n - len(self.plan))]:
                cluster.worker_spec[name] = self._spec(name)
                logger.info("serif: adaptive: starting compute worker %s", name)
            await cluster
            return
        others = len(cluster.plan) - len(self.plan)
        await super().scale_up(n + others)

    def _spec(self, name: str) -> dict[str, Any]:
        """A new compute worker: an existing one's spec under ``name`` (its own node)."""
        cluster = self.cluster
        template = next((spec for spec in cluster.worker_spec.values()
                         if (spec.get("options", {}).get("resources") or {}).get("GPU")), None)
        if template is None:
            template = {"cls": cluster.new_spec["cls"],
                        "options": {**cluster.new_spec["options"], "resources": {"GPU": 1},
                                    "nthreads": 1}}
        options = dict(template["options"])
        options["name"] = name
        options["env"] = {**(options.get("env") or {}), "SERIF_NODE": name}
        return {"cls": template["cls"], "options": options}

    async def scale_down(self, workers: Iterable[str]) -> None:
        """Stop booking ``workers``, let their queued batches finish, then retire them."""
        workers = [str(w) for w in workers]
        if not workers:
            return
        await self.scheduler.serif_retire(workers=workers)
        deadline = time.monotonic() + self.retire_timeout
        while True:
            signal = await self.scheduler.serif_capacity(window=self.window)
            queued = {w["name"]: w["pending"] for w in signal["compute"] if w["retiring"]}
            busy = [w for w in workers if queued.get(w, 0) > 0]
            if not busy:
                break
            if time.monotonic() > deadline:
                logger.warning("serif: adaptive: retiring %s with batches still queued",
                               ", ".join(busy))
                break
            await asyncio.sleep(0.2)
        logger.info("serif: adaptive: retiring compute workers %s", ", ".join(workers))
        await super().scale_down(workers)
