"""The worker's model cache against a real redis-server: LRU by bytes, reload after eviction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serif_dask import dataplane
from serif_dask.config import load_config
from serif_dask.store import WeightStore
from serif_dask.worker import ModelCache, SerifWorkerPlugin
from tests.conftest import ROOT

pytest_plugins = ["redis_fixtures"]

DIGITS = ROOT / "configs" / "digits"


@pytest.fixture
def worker_state(redis_server):
    """A worker plugin's state for the digits run, its weights pushed to a real server."""
    config = load_config([DIGITS])
    app = config.apps[0]
    client = redis_server.client()
    store = WeightStore(client)
    for p in app.model_profiles:
        store.push(p.redis_key, p.weights)
    plugin = SerifWorkerPlugin()
    plugin.redis_info = {"nodes": [list(redis_server.address)], "password": None}
    return plugin, app, store


def test_evicted_model_reloads_from_redis(worker_state) -> None:
    plugin, app, store = worker_state
    linear, mlp, cnn = app.model_profiles
    first, cold = dataplane.load_model(plugin, app, linear)
    assert cold
    # Room for the biggest model alone: loading another evicts the least recently used.
    plugin.models = ModelCache(capacity_bytes=first.nbytes + 1)
    plugin.models.put(f"{app.name}/{linear.name}", first, first.nbytes)
    again, cold = dataplane.load_model(plugin, app, linear)
    assert again is first and not cold
    dataplane.load_model(plugin, app, mlp)
    assert f"{app.name}/{linear.name}" not in plugin.models
    assert plugin.models.evictions >= 1
    reloaded, cold = dataplane.load_model(plugin, app, linear)
    assert cold and reloaded is not first
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(reloaded.forward(x), first.forward(x))
    plugin._end_run()


def test_corrupted_weights_are_refused(worker_state) -> None:
    plugin, app, store = worker_state
    linear = app.model_profiles[0]
    meta = store.meta(linear.redis_key)
    assert meta is not None
    chunk_keys = [store._k(linear.redis_key, meta.seq, i) for i in range(meta.chunks)]
    for key in chunk_keys:
        data = bytearray(store.client.get(key))
        data[len(data) // 2] ^= 0xFF
        store.client.set(key, bytes(data))
    with pytest.raises(Exception, match="(?i)corrupt|sha256|mismatch"):
        dataplane.load_model(plugin, app, linear)
    plugin._end_run()


def test_weights_push_command(redis_server, tmp_path) -> None:
    import json
    import shutil

    from tests.conftest import run_cli

    target = tmp_path / "digits"
    shutil.copytree(DIGITS, target)
    system = json.loads((target / "system.json").read_text())
    host, port = redis_server.address
    system["redis-nodes"] = [{"ip-address": host, "ports": [port]}]
    (target / "system.json").write_text(json.dumps(system))
    first = run_cli("weights", "push", str(target))
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("pushed") == 3
    again = run_cli("weights", "push", str(target))
    assert again.returncode == 0 and again.stdout.count("up to date") == 3
    store = WeightStore(redis_server.client())
    config = load_config([target])
    for p in config.apps[0].model_profiles:
        assert store.fetch(p.redis_key) == Path(p.weights).read_bytes()
