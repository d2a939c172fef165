"""Real torch models: weights through Redis, inputs through shared memory or Redis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from serif_dask import load_config
from serif_dask.readers import get_reader
from tests.conftest import run_cli

torch = pytest.importorskip("torch")


def redis_servers() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"}


@pytest.fixture
def linear_config(config_dir, tmp_path: Path):
    """The hospital ward, its wake-word app served by one real linear model."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    weights = tmp_path / "linear.safetensors"
    save_file(
        {"weight": torch.from_numpy(rng.normal(size=(2, 4000)).astype(np.float32)),
         "bias": torch.zeros(2)},
        str(weights),
    )

    def real_wakeword(doc: dict) -> None:
        app = doc["applications"][1]
        app["model-profiles"] = [{
            "name": "linear", "use-profile": False, "modality": "audio",
            "cmat": [[80.0, 20.0], [20.0, 80.0]],
            "latencies": {n: [0.001, 0.01] for n in ("bay-a", "bay-b", "bay-c")},
            "model-weights": str(weights), "redis-key": "test-linear",
            "impl": "serif_dask.models.linear:LinearClassifier",
        }]

    return config_dir(application=real_wakeword), weights


def test_real_model_scores_the_right_inputs(linear_config, tmp_path: Path) -> None:
    path, weights = linear_config
    before = redis_servers()
    out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
    proc = run_cli("run", str(path), "--duration", "4", "--policy", "fastest", "--seed", "9",
                   "--json", str(out), "--records", str(rec))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    wake = [r for r in records if r["app"] == "wakeword"]
    done = [r for r in wake if r["outcome"] == "completed"]
    assert len(done) > 0.9 * len(wake), summary.get("failures_by_reason")
    assert all(r["model"] == "linear" for r in done)

    # Recompute each scored sample from the (deterministic) reader and the weights: the
    # prediction must be the model's answer on exactly that group's input at that tick.
    from safetensors.torch import load_file

    config = load_config([path])
    app = config.app("wakeword")
    state = load_file(str(weights))
    w, b = state["weight"].numpy(), state["bias"].numpy()
    readers = {
        s.name: get_reader(config.modality("audio"), app, s, 9) for s in config.data.servers
    }
    for r in done:
        server = config.group_server(r["group"], "audio")
        sample = readers[server].read(np.asarray([r["group"]]), r["tick"]).samples[0]
        assert int(np.argmax(w @ sample.ravel() + b)) == r["prediction"], r
    assert len({r["worker"] for r in done}) >= 2
    assert redis_servers() <= before, "the embedded redis-server outlived the run"


def test_tampered_weights_fail_their_requests_only(linear_config, tmp_path: Path) -> None:
    path, weights = linear_config
    weights.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "s.json"
    proc = run_cli("run", str(path), "--duration", "3", "--policy", "fastest",
                   "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    wake, fall = summary["per_app"]["wakeword"], summary["per_app"]["falldetection"]
    assert wake["failed"] == wake["requests"] > 0
    assert "weights-unavailable" in wake["failures_by_reason"]
    assert fall["completed"] == fall["requests"] > 0
