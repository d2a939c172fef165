"""Worker-side data plane: inputs through shared memory or Redis, weights from Redis.

Samples read on a node land once in that node's shared-memory cache: a reader that takes
``out=`` renders straight into reserved slots, any other is copied in once. A score task
on the same node reads its batch as one zero-copy view when the slots are adjacent (and
copies once, into a reused buffer, when they are not); one on another node gets them
through Redis (an *export* task on the data worker puts them there). Zero-copy rows are
re-checked after use, so a slot reused meanwhile fails its request ``input-stale``.
Model weights come from Redis, verified by hash, and load into the worker's LRU model
cache. Nothing here runs on the scheduler.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serif_dask import datapath
from serif_dask.config import Application, ModelProfile, SerifConfig

logger = logging.getLogger("serif_dask.dataplane")


class InputUnavailable(RuntimeError):
    """A request's input cannot be had any more (slot reused, key expired)."""


def import_torch() -> None:
    """Import torch once per worker process, sized for several workers per node."""
    import torch

    # One intra-op thread per worker: several workers share a node's cores, and oversized
    # thread pools made small batches stall for tens of milliseconds.
    torch.set_num_threads(1)



def shm_cache(plugin: Any, config: SerifConfig, modality: str, server: str) -> Any:
    """The shared-memory cache this data worker writes for ``modality``: created on first
    use and kept (mapped, pages faulted in) for the whole run."""
    with plugin.lock:  # the worker plugin may be creating it ahead of the first tick
        cache = plugin.shm.get(modality)
        if cache is None:
            mod = config.modality(modality)
            server_cfg = next(s for s in config.data.servers if s.name == server)
            cache = datapath.ShmCache.create(
                plugin.run_id, plugin.node, modality,
                entries=server_cfg.cache_entries(modality), entry_size=mod.cache_entry_size,
            )
            plugin.shm[modality] = cache
    return cache


@functools.lru_cache(maxsize=64)
def _takes_out(read: Any) -> bool:
    try:
        return "out" in inspect.signature(read).parameters
    except (TypeError, ValueError):
        return False


def reserve_samples(cache: datapath.ShmCache, reader: Any, n: int,
                    ) -> datapath.Reservation | None:
    """Slots for ``reader`` to fill in place (``reader.read(..., out=res.array)``), or None
    when it cannot: no ``out`` parameter, shape unknown until read, too large, or more
    groups than slots. The caller then reads normally and :func:`share_samples` copies."""
    shape = getattr(reader, "shape", None) or getattr(reader, "declared_shape", None)
    if not shape or not 0 < n <= cache.entries or not _takes_out(type(reader).read):
        return None
    try:
        return cache.reserve(n, tuple(shape), np.float32)
    except datapath.InputTooLarge:
        return None  # share_samples fails each group with the clear message


def share_samples(
    cache: datapath.ShmCache, samples: np.ndarray | None, groups: np.ndarray,
    errors: dict[int, str], reservation: datapath.Reservation | None = None,
) -> list[datapath.SlotRef | None]:
    """Publish each good sample in the cache (refs aligned with ``groups``, None for a
    failed group); a too-large input fails its group ``input-too-large``.

    With a ``reservation`` the reader normally wrote into it already and this only
    commits; a reader that ignored ``out`` is copied in once.
    """
    ok = [int(g) not in errors for g in groups]
    if reservation is not None and samples is not None:
        try:
            if samples is not reservation.array:
                reservation.array[...] = samples
            return reservation.commit(ok)
        except ValueError:  # the reader's shape differs from the declared one
            pass
    if reservation is not None:
        reservation.abort()
    refs: list[datapath.SlotRef | None] = []
    for i, group in enumerate(groups):
        if samples is None or not ok[i]:
            refs.append(None)
            continue
        try:
            refs.append(cache.put(samples[i]))
        except datapath.InputTooLarge as exc:
            errors[int(group)] = f"input-too-large: {exc}"
            refs.append(None)
    return refs


def put_samples(
    plugin: Any, config: SerifConfig, modality: str, server: str, samples: np.ndarray | None,
    groups: np.ndarray, errors: dict[int, str],
    reservation: datapath.Reservation | None = None,
) -> list[Any]:
    """:func:`share_samples` into this data worker's cache for ``modality``."""
    cache = shm_cache(plugin, config, modality, server)
    return share_samples(cache, samples, groups, errors, reservation)


def redis_client(plugin: Any) -> Any:
    """This worker's Redis client for the current run (connected on first use)."""
    if plugin.redis is None:
        from serif_dask.store import connect

        info = plugin.redis_info
        if not info:
            raise RuntimeError("this run has no Redis (no model needs one)")
        from serif_dask.redis_server import tls_options

        tls = tls_options(plugin.config.system) if plugin.config is not None else {}
        from serif_dask.credentials import redis_password

        plugin.redis = connect([tuple(n) for n in info["nodes"]], redis_password(), **tls)
    return plugin.redis


def export_inputs(plugin: Any, read: Any, groups: list[int], ttl_s: float) -> dict[int, str]:
    """Copy some groups' samples from this node's cache to Redis, for another node.

    With Redis down the groups not exported yet are left out: the score task fails just
    those ``input-unavailable`` and scores the rest of its batch.
    """
    from serif_dask.store import REDIS_ERRORS, InputStore

    index = {int(g): i for i, g in enumerate(read.groups)}
    keys: dict[int, str] = {}
    try:
        store = InputStore(redis_client(plugin))
        for group in groups:
            ref = read.refs[index[group]] if read.refs is not None else None
            if ref is None:
                continue
            try:
                sample = datapath.read(ref, copy=False)
            except datapath.StaleSlot:
                continue  # the score task reports it as input-stale
            key = f"{read.app}:{read.tick}:{read.modality}:{group}:{plugin.run_id}"
            store.put(key, sample, ttl_s)
            if not datapath.valid(ref):  # rewritten while it was being sent
                store.delete(key)
                continue
            keys[group] = key
    except REDIS_ERRORS as exc:
        logger.warning("serif: cannot export inputs to Redis: %s: %s", type(exc).__name__, exc)
    return keys


@dataclass
class Inputs:
    """A score task's batch: ``samples`` rows aligned with its groups (a failed group's
    row holds nothing meaningful), either one zero-copy view of the shared-memory slots
    or one copy in a reused buffer."""

    samples: np.ndarray | None
    fetch_s: float = 0.0  # spent fetching inputs of other nodes from Redis
    views: list[tuple[int, datapath.SlotRef]] = field(default_factory=list)
    buffer: np.ndarray | None = None

    def stale(self) -> list[int]:
        """Rows read zero-copy whose slot was reused while the batch was in use: their
        results are another group's and must be thrown away.  Call after the forward."""
        return [r for r, ref in self.views if not datapath.valid(ref)]

    def release(self) -> None:
        """Give the copy buffer back for the next batch (idempotent)."""
        if self.buffer is not None:
            datapath.release_buffer(self.buffer)
            self.buffer = None
        self.samples = None


def gather_inputs(
    plugin: Any, groups: np.ndarray, reads: list[Any], exports: list[dict[int, str]],
    errors: dict[int, str],
) -> Inputs:
    """The batch's samples; groups whose input is gone get an error instead.

    Local inputs that one read wrote into adjacent slots, in this order, become the batch
    without a copy (the common case: a score task scoring a read's groups); otherwise each
    row is copied once into a reused buffer, checked against slot reuse as it is copied.
    """
    for read in reads:
        if read.samples is not None and np.array_equal(read.groups, groups):
            return Inputs(np.asarray(read.samples, dtype=np.float32))
    remote: dict[int, str] = {}
    for e in exports:
        remote.update(e)
    local: list[datapath.SlotRef | None] = [None] * len(groups)
    keys: dict[int, str] = {}
    for read in reads:
        if read.refs is None:
            continue
        index = {int(g): i for i, g in enumerate(read.groups)}
        is_local = read.node == plugin.node
        for r, group in enumerate(groups):
            g = int(group)
            if g in errors or g not in index:
                continue
            if is_local:
                local[r] = read.refs[index[g]]
            elif g in remote:
                keys[r] = remote[g]
    for r, group in enumerate(groups):
        if local[r] is None and r not in keys and int(group) not in errors:
            errors[int(group)] = "input-unavailable"

    if not keys and any(ref is not None for ref in local):
        batch = _shared_view(local, groups, errors)
        if batch is not None:
            views = [(r, ref) for r, ref in enumerate(local) if ref is not None]
            return Inputs(batch, views=views)

    fetched: dict[int, np.ndarray] = {}
    fetch_s = 0.0
    if keys:
        from serif_dask.store import REDIS_ERRORS, InputMissing, InputStore

        down = ""  # once Redis fails, the batch's other remote inputs fail without a try
        for r, key in keys.items():
            if down:
                errors[int(groups[r])] = down
                continue
            try:
                fetched[r], seconds = InputStore(redis_client(plugin)).get_timed(key)
            except InputMissing:
                errors[int(groups[r])] = "input-missing: its Redis copy expired"
                continue
            except REDIS_ERRORS as exc:
                down = f"input-unavailable: Redis: {type(exc).__name__}: {exc}"[:200]
                errors[int(groups[r])] = down
                continue
            fetch_s += seconds
    shapes = [tuple(ref.shape) for r, ref in enumerate(local)
              if ref is not None and int(groups[r]) not in errors]
    shapes += [x.shape for x in fetched.values()]
    if not shapes:
        return Inputs(None, fetch_s)
    buffer = datapath.take_buffer(len(groups), shapes[0], np.float32)
    batch = buffer[: len(groups)]
    for r, group in enumerate(groups):
        ref = local[r]
        if int(group) in errors:
            continue
        if r in fetched:
            batch[r] = fetched[r]
        elif ref is not None:
            try:
                datapath.read(ref, out=batch[r])
            except datapath.StaleSlot:
                errors[int(group)] = STALE
    return Inputs(batch, fetch_s, buffer=buffer)


STALE = "input-stale: its cache slot was reused (raise cache-entries)"


def _shared_view(local: list[datapath.SlotRef | None], groups: np.ndarray,
                 errors: dict[int, str]) -> np.ndarray | None:
    """The zero-copy batch when every usable float32 ref lines up; None to copy instead."""
    refs = [ref if ref is not None and int(groups[r]) not in errors else None
            for r, ref in enumerate(local)]
    if any(ref is not None and np.dtype(ref.dtype) != np.float32 for ref in refs):
        return None
    try:
        return datapath.read_rows(refs)
    except datapath.StaleSlot:
        return None  # the copy path tells which rows are gone


def stale_rows(plugin: Any, read: Any) -> np.ndarray:
    """Which of ``read``'s groups had their cache slot reused already (bool per group);
    a peek that ran on a view of those slots saw another group's data."""
    stale = np.zeros(len(read.groups), dtype=bool)
    cache = plugin.shm.get(read.modality)
    if read.refs is None or cache is None:
        return stale
    for i, ref in enumerate(read.refs):
        stale[i] = ref is not None and not cache.valid(ref)
    return stale


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_or_fallback(
    plugin: Any, app: Application, profile: ModelProfile
) -> tuple[Any, ModelProfile]:
    """The planned model; if its weights cannot be had (Redis down, missing, corrupted),
    the warm model of the same application and modality with the best expected utility
    under the prior. Returns (model, the profile that will serve); raises when none is warm.

    A weaker answer in time earns utility; a failed request earns none.
    """
    try:
        return load_model(plugin, app, profile)[0], profile
    except Exception as exc:
        # The scheduler counted this model warm when it planned it.
        plugin.report_warm(cold=[f"{app.name}/{profile.name}"])
        warm = [
            p for p in app.model_profiles
            if p.name != profile.name and p.modality == profile.modality and not p.use_profile
            and f"{app.name}/{p.name}" in plugin.models
        ]
        if not warm:
            raise
        from serif_dask.utility import expected_utility, row_normalise

        eu = expected_utility(app.prior, np.stack([row_normalise(p.cmat) for p in warm]),
                              app.utility_matrix)
        fallback = warm[int(np.argmax(eu))]
        logger.warning("serif: %s/%s cannot load (%s: %s); served by warm %s instead",
                       app.name, profile.name, type(exc).__name__, exc, fallback.name)
        return load_model(plugin, app, fallback)[0], fallback


def load_model(plugin: Any, app: Application, profile: ModelProfile) -> tuple[Any, bool]:
    """The model from the worker's LRU cache, else from Redis; returns (model, was_cold)."""
    name = f"{app.name}/{profile.name}"
    with plugin.lock:
        model = plugin.models.get(name)
    if model is not None:
        return model, False
    from serif_dask.store import WeightStore, torch_state_dict_from_bytes

    if not profile.impl:
        raise RuntimeError(f"model {profile.name} has no impl (package.module:Class)")
    module_name, _, attr = profile.impl.partition(":")
    import importlib

    import_torch()
    cls = getattr(importlib.import_module(module_name), attr)
    t0 = time.perf_counter()
    data = WeightStore(redis_client(plugin)).fetch(profile.redis_key or profile.name)
    state = torch_state_dict_from_bytes(data)
    model = cls()
    model.load(state, device())
    nbytes = int(getattr(model, "nbytes", 0) or len(data))
    with plugin.lock:
        evicted = plugin.models.put(name, model, nbytes)
    logger.info("serif: loaded %s (%d bytes) in %.3f s", name, nbytes, time.perf_counter() - t0)
    plugin.report_warm(cold=evicted)
    return model, True


def forward(model: Any, samples: np.ndarray) -> np.ndarray:
    """One batched forward pass, without autograd."""
    import torch

    with torch.inference_mode():
        pred = model.forward(samples)
    return np.asarray(pred, dtype=np.int64).reshape(len(samples))
