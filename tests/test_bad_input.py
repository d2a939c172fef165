"""Bad input at runtime, on a real LocalCluster with a real redis-server.

One run holds every fault at once, each on its own application or group, so the test can
check that exactly the affected requests fail (each with its reason), that every other
request is served, and that every request is accounted for:

* ``wake``: a user reader (``impl``) that raises whenever group 1 is in the batch, gives
  NaN for group 2 and inf for group 3, and a huge (finite) value for group 0, which the
  user model (``impl``) refuses by raising in ``forward``;
* ``shape``: a user reader whose samples have the wrong shape;
* ``vitals``: ``.npy`` streams; group 5's file has the wrong window shape from the start,
  group 6's file is deleted and group 7's truncated while the run goes on;
* ``corrupt``: a real model whose weight chunk in Redis has a flipped byte.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from serif_dask.store import WeightStore
from tests.test_run import check_summary

torch = pytest.importorskip("torch")
pytest_plugins = ["redis_fixtures"]

GROUPS = 8
NODES = ("bay-a", "bay-b")

HELPERS = '''
"""User code for tests/test_bad_input.py: a flaky reader, a bad-shape reader, a picky model."""
import numpy as np

from serif_dask.models.linear import LinearClassifier
from serif_dask.readers.synthetic import SyntheticReader


class FlakyReader(SyntheticReader):
    def read(self, groups, tick):
        groups = np.asarray(groups)
        if 1 in groups:
            raise OSError("sensor of group 1 unplugged")
        out = super().read(groups, tick)
        samples = out.samples.copy()
        samples[groups == 2] = np.nan
        samples[groups == 3, 0] = np.inf
        samples[groups == 0, 0] = 1e6
        return out._replace(samples=samples)


class WrongShapeReader(SyntheticReader):
    def read(self, groups, tick):
        out = super().read(groups, tick)
        return out._replace(samples=out.samples[:, :-1])


class PickyLinear(LinearClassifier):
    def forward(self, batch):
        if np.abs(batch).max() > 1e5:
            raise RuntimeError("input out of the range this model was trained on")
        return super().forward(batch)
'''


def _weights(path: Path, dim: int, seed: int) -> Path:
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    save_file({"weight": torch.from_numpy(rng.normal(size=(2, dim)).astype(np.float32)),
               "bias": torch.zeros(2)}, str(path))
    return path


def _modality(name: str, shape: list[int], **extra: object) -> dict:
    return {"name": name, "use-synthetic-data": True, "synthetic-shape": shape,
            "cache-entry-size": 4096, "retrieval-latencies": dict.fromkeys(NODES, 0.001),
            **extra}


def _app(name: str, model: dict) -> dict:
    return {"name": name, "sla-latency": 1.0, "sample-duration": 0.5,
            "utility-matrix": [[1.0, -1.0], [-1.0, 1.0]], "prior": [0.7, 0.3],
            "model-profiles": [{"cmat": [[90.0, 10.0], [10.0, 90.0]],
                                "latencies": {n: [0.001, 0.01] for n in NODES}, **model}]}


def _real(name: str, modality: str, weights: Path, key: str, impl: str) -> dict:
    return {"name": name, "use-profile": False, "modality": modality,
            "model-weights": str(weights), "redis-key": key, "impl": impl}


@pytest.fixture
def ward(tmp_path: Path, redis_server, monkeypatch) -> tuple[Path, dict[int, Path]]:
    """The config directory, and the ``.npy`` stream of each vitals group."""
    (tmp_path / "serif_badinput.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))  # workers are spawned with this sys.path
    streams = {}
    for g in range(GROUPS):
        window = [17] if g == 5 else [16]
        streams[g] = tmp_path / f"vitals-{g}.npy"
        np.save(streams[g], np.random.default_rng(g).normal(size=(4, *window)).astype("f4"))
    host, port = redis_server.address
    system = {"seed": 3, "duration-in-secs": 6, "scheduler-sleep": 0.1, "data-aware": True,
              "scheduler-type": "fastest",
              "compute-nodes": [{"name": n, "ip-address": "127.0.0.1", "server-port": 0}
                                for n in NODES],
              "redis-nodes": [{"ip-address": host, "ports": [port]}]}
    data = {"num-groups": GROUPS, "data-modalities": [
        _modality("audio", [64], impl="serif_badinput:FlakyReader"),
        _modality("wide", [64], impl="serif_badinput:WrongShapeReader"),
        {**_modality("sensor", [16]), "use-synthetic-data": False},
        _modality("pulse", [8]),
    ], "servers": [{"name": "bay-a", "ip-address": "127.0.0.1", "port": 0, "workers": 1,
                    "cache-entries-per-modality": {"default": 64},
                    "streams": {"sensor": {str(g): str(p) for g, p in streams.items()}}}]}
    linear = "serif_dask.models.linear:LinearClassifier"
    apps = {"applications": [
        _app("wake", _real("picky", "audio", _weights(tmp_path / "w64.safetensors", 64, 1),
                           "t-picky", "serif_badinput:PickyLinear")),
        _app("shape", {"name": "sim", "use-profile": True, "modality": "wide"}),
        _app("vitals", _real("lin16", "sensor", _weights(tmp_path / "w16.safetensors", 16, 2),
                             "t-lin16", linear)),
        _app("corrupt", _real("lin8", "pulse", _weights(tmp_path / "w8.safetensors", 8, 3),
                              "t-lin8", linear)),
    ]}
    target = tmp_path / "ward"
    target.mkdir()
    for name, doc in (("system", system), ("application", apps), ("data", data)):
        (target / f"{name}.json").write_text(json.dumps(doc))
    # The weights are pushed now and one chunk is corrupted; the run finds the same
    # sha256 and size in the metadata and leaves them be, so loading must refuse them.
    store = WeightStore(redis_server.client())
    meta = store.push("t-lin8", tmp_path / "w8.safetensors")
    key = store._k("t-lin8", meta.seq, 0)
    chunk = bytearray(store.client.get(key))
    chunk[len(chunk) // 2] ^= 0xFF
    store.client.set(key, bytes(chunk))
    return target, streams


def test_bad_input_fails_only_the_affected_requests(ward, tmp_path: Path) -> None:
    path, streams = ward
    config = load_config([path])
    mutated: list[int] = []

    def sabotage(rows: list[dict]) -> None:
        """Once group 6 and 7 have been served, delete one stream and truncate the other."""
        if mutated or not any(r["app"] == "vitals" and r["outcome"] == "completed"
                              and r["group"] in (6, 7) for r in rows):
            return
        mutated.append(rows[0]["tick"])
        streams[6].unlink()
        raw = streams[7].read_bytes()
        streams[7].write_bytes(raw[: 128 + 16 * 4 + 10])  # header, one window and a bit

    records_path = tmp_path / "records.jsonl"
    with (
        local_cluster(config) as cluster,
        Client(cluster) as client,
        Serif(client, config, records=records_path, on_records=sabotage) as serif,
    ):
        summary = serif.run(6)
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    check_summary(summary, records)
    assert mutated, "the vitals streams were never served"

    ticks = summary["ticks"] // len(config.apps)
    for app in ("wake", "shape", "vitals", "corrupt"):
        assert summary["per_app"][app]["requests"] == ticks * GROUPS, app
    reasons = Counter((r["reason"] or "").split(":", 1)[0] for r in records
                      if r["outcome"] != "completed")
    assert summary["failures_by_reason"] == dict(reasons)

    def outcomes(app: str, group: int) -> list[dict]:
        return [r for r in records if r["app"] == app and r["group"] == group]

    def failed_with(app: str, group: int, prefix: str) -> list[dict]:
        return [r for r in outcomes(app, group)
                if r["outcome"] == "failed" and r["reason"].startswith(prefix)]

    # wake: each bad group fails with its own reason, every tick; the others are served.
    assert len(failed_with("wake", 1, "reader-error")) == ticks
    assert "unplugged" in failed_with("wake", 1, "reader-error")[0]["reason"]
    for g in (2, 3):
        assert len(failed_with("wake", g, "bad-input")) == ticks
        assert "NaN or inf" in failed_with("wake", g, "bad-input")[0]["reason"]
    assert len(failed_with("wake", 0, "model-error")) == ticks
    assert "trained on" in failed_with("wake", 0, "model-error")[0]["reason"]
    for g in range(4, GROUPS):
        assert all(r["outcome"] != "failed" for r in outcomes("wake", g))
    assert summary["per_app"]["wake"]["completed"] > 0

    # shape: every sample has the wrong shape, so every request fails bad-input.
    shape = [r for r in records if r["app"] == "shape"]
    assert all(r["outcome"] == "failed" and r["reason"].startswith("bad-input") for r in shape)
    assert "expected [64]" in shape[0]["reason"]

    # vitals: group 5 never reads; 6 and 7 serve until their files break, then fail.
    assert len(failed_with("vitals", 5, "reader-error")) == ticks
    assert "[17]" in failed_with("vitals", 5, "reader-error")[0]["reason"]
    for g, words in ((6, "not found"), (7, "truncated")):
        broken = failed_with("vitals", g, "reader-error")
        assert broken and all(words in r["reason"] for r in broken), g
        assert any(r["outcome"] == "completed" for r in outcomes("vitals", g)), g
    for g in range(5):
        assert all(r["outcome"] != "failed" for r in outcomes("vitals", g))
    last = max(r["tick"] for r in records if r["app"] == "vitals")
    assert any(r["outcome"] == "completed" for r in records
               if r["app"] == "vitals" and r["tick"] == last), "the run did not go on"

    # corrupt: the weights fail their sha256 check; nothing is ever loaded from them.
    corrupt = [r for r in records if r["app"] == "corrupt"]
    assert all(r["outcome"] == "failed" and r["reason"].startswith("weights-unavailable")
               for r in corrupt)
    assert "corrupt" in corrupt[0]["reason"].lower()
