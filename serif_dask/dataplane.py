"""Worker-side data plane: inputs through shared memory or Redis, weights from Redis.

Samples read on a node are written once into that node's shared-memory cache; a score
task on the same node reads them zero-copy, one on another node gets them through Redis
(an *export* task on the data worker puts them there). Model weights come from Redis,
verified by hash, and load into the worker's LRU model cache. Nothing here runs on the
scheduler.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from serif_dask import datapath
from serif_dask.config import Application, ModelProfile, SerifConfig

logger = logging.getLogger("serif_dask.dataplane")


class InputUnavailable(RuntimeError):
    """A request's input cannot be had any more (slot reused, key expired)."""


def shm_cache(plugin: Any, config: SerifConfig, modality: str, server: str) -> Any:
    """The shared-memory cache this data worker writes for ``modality`` (created once)."""
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


def put_samples(
    plugin: Any, config: SerifConfig, modality: str, server: str, samples: np.ndarray,
    groups: np.ndarray, errors: dict[int, str],
) -> list[Any]:
    """Write each good sample to the node's cache; a too-large input fails its group."""
    cache = shm_cache(plugin, config, modality, server)
    refs: list[Any] = []
    for i, group in enumerate(groups):
        if int(group) in errors:
            refs.append(None)
            continue
        try:
            refs.append(cache.put(samples[i]))
        except datapath.InputTooLarge as exc:
            errors[int(group)] = f"input-too-large: {exc}"
            refs.append(None)
    return refs


def redis_client(plugin: Any) -> Any:
    """This worker's Redis client for the current run (connected on first use)."""
    if plugin.redis is None:
        from serif_dask.store import connect

        info = plugin.redis_info
        if not info:
            raise RuntimeError("this run has no Redis (no model needs one)")
        plugin.redis = connect([tuple(n) for n in info["nodes"]], info.get("password"))
    return plugin.redis


def export_inputs(plugin: Any, read: Any, groups: list[int], ttl_s: float) -> dict[int, str]:
    """Copy some groups' samples from this node's cache to Redis, for another node."""
    from serif_dask.store import InputStore

    store = InputStore(redis_client(plugin))
    index = {int(g): i for i, g in enumerate(read.groups)}
    keys: dict[int, str] = {}
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
        keys[group] = key
    return keys


def gather_inputs(
    plugin: Any, groups: np.ndarray, reads: list[Any], exports: list[dict[int, str]],
    errors: dict[int, str],
) -> tuple[np.ndarray | None, float]:
    """The batch's samples, stacked; groups whose input is gone get an error instead.

    Returns (samples or None when nothing is left, seconds spent fetching remote inputs).
    """
    remote: dict[int, str] = {}
    for e in exports:
        remote.update(e)
    rows: list[np.ndarray | None] = [None] * len(groups)
    fetch_s = 0.0
    for read in reads:
        if read.refs is None:
            continue
        index = {int(g): i for i, g in enumerate(read.groups)}
        local = read.node == plugin.node
        for r, group in enumerate(groups):
            g = int(group)
            if g in errors or g not in index:
                continue
            if local:
                ref = read.refs[index[g]]
                if ref is None:
                    continue
                try:
                    rows[r] = datapath.read(ref, copy=True)
                except datapath.StaleSlot:
                    errors[g] = "input-stale: its cache slot was reused (raise cache-entries)"
            elif g in remote:
                from serif_dask.store import InputMissing, InputStore

                try:
                    sample, seconds = InputStore(redis_client(plugin)).get_timed(remote[g])
                except InputMissing:
                    errors[g] = "input-missing: its Redis copy expired"
                    continue
                rows[r] = sample
                fetch_s += seconds
    for r, group in enumerate(groups):
        if rows[r] is None and int(group) not in errors:
            errors[int(group)] = "input-unavailable"
    good = [row for row in rows if row is not None]
    if not good:
        return None, fetch_s
    shape = good[0].shape
    batch = np.zeros((len(groups), *shape), dtype=np.float32)
    for r, row in enumerate(rows):
        if row is not None:
            batch[r] = row
    return batch, fetch_s


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

    from serif_dask.worker import _import_torch

    _import_torch()
    cls = getattr(importlib.import_module(module_name), attr)
    t0 = time.perf_counter()
    data = WeightStore(redis_client(plugin)).fetch(profile.redis_key or profile.name)
    state = torch_state_dict_from_bytes(data)
    model = cls()
    model.load(state, device())
    nbytes = int(getattr(model, "nbytes", 0) or len(data))
    with plugin.lock:
        plugin.models.put(name, model, nbytes)
    logger.info("serif: loaded %s (%d bytes) in %.3f s", name, nbytes, time.perf_counter() - t0)
    plugin.report_warm()
    return model, True


def forward(model: Any, samples: np.ndarray) -> np.ndarray:
    """One batched forward pass, without autograd."""
    import torch

    with torch.inference_mode():
        pred = model.forward(samples)
    return np.asarray(pred, dtype=np.int64).reshape(len(samples))
