"""Measure real models and write their profiles, so nobody hand-writes ``latencies``/``cmat``.

For every model with ``use-profile: false`` :func:`profile_config` loads the weights file
the way a worker does (bytes → :func:`~serif_dask.store.torch_state_dict_from_bytes` → the
``impl`` class, built with no arguments → ``load(state, device)``) and measures, on this
machine's device (CUDA when available, else CPU):

* **inference**: median wall time of ``forward`` for each batch size b, fitted as
  ``t(b) = a + c·b``. The schedulers model a batch of n as ``n · infer`` seconds, so the
  profile's per-request ``infer`` is the amortised cost ``t(B)/B`` at a *reference batch*
  B (default: the groups spread evenly over the compute nodes, ``⌈groups/nodes⌉``);
* **context switch**: weight bytes → model on the device → its first single-image batch,
  minus a warm single-image batch: what a cold model adds to its first batch (the Redis
  fetch is not included);
* **confusion matrix** ``cmat[true][predicted]`` on labelled calibration samples of the
  model's modality, from its reader (held-out data for the bundled digits).

Timings run torch on one CPU thread by default, like the compute workers should (see
:func:`profile_config`).

:func:`updated_application` returns application.json with only those two fields of the
measured models replaced (every other key and model left as it was); the measurement is
used for each compute node the model already lists.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serif_dask.config import Application, ModelProfile, SerifConfig

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "ModelReport",
    "ProfileError",
    "measure_model",
    "profile_config",
    "updated_application",
    "write_profile",
]

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
#: Confusion matrices use at most this many calibration samples (fewer if the reader has
#: fewer distinct ones, see ``calibration_size``).
DEFAULT_SAMPLES = 2000
_TARGET_S = 0.01  # each timing repeat runs the call for about this long
_REPEATS = 7


class ProfileError(RuntimeError):
    """A model cannot be profiled; the message is one line naming the model."""


@dataclass(frozen=True)
class ModelReport:
    """What was measured for one model (all times in seconds)."""

    app: str
    model: str
    impl: str
    device: str
    nbytes: int
    batch_sizes: list[int]
    batch_s: list[float]  # median wall time of one forward per batch size
    intercept_s: float  # a of t(b) = a + c·b
    slope_s: float  # c
    reference_batch: int
    infer_s: float  # t(B)/B: the profile's per-request latency
    switch_s: float
    load_s: float  # bytes -> model on device alone
    accuracy: float | None
    cmat: list[list[float]] | None  # None: the reader has no labelled data
    n_samples: int


def import_impl(path: str) -> type:
    """The class named ``"package.module:Class"``."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn: Any, *, device: str = "cpu", repeats: int = _REPEATS) -> float:
    """Median seconds per call of ``fn()``, each repeat looping for about 10 ms."""
    fn()  # warm-up: lazy kernels, allocator
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(_TARGET_S / once)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def load_model(cls: type, data: bytes, device: str) -> Any:
    """Weights bytes → a loaded model, exactly as a worker's model cache does it."""
    from serif_dask.store import torch_state_dict_from_bytes

    model = cls()
    model.load(torch_state_dict_from_bytes(data), device)
    return model


def fit_line(b: Sequence[int], t: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``t ≈ a + c·b`` with a, c ≥ 0."""
    x, y = np.asarray(b, dtype=float), np.asarray(t, dtype=float)
    if x.size < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0
    c, a = np.polyfit(x, y, 1)
    if a < 0:  # a fit through the origin is then the better model
        return 0.0, float(x @ y / (x @ x))
    if c < 0:
        return float(y.mean()), 0.0
    return float(a), float(c)


def _reader_for(cfg: SerifConfig, app: Application, profile: ModelProfile) -> Any:
    from serif_dask.readers import get_reader

    modality = cfg.modality(profile.modality)
    server = cfg.server(cfg.group_server(0, modality.name))
    return get_reader(modality, app, server, seed=cfg.system.effective_seed)


def measure_model(
    cfg: SerifConfig,
    app: Application,
    profile: ModelProfile,
    *,
    device: str | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    reference_batch: int | None = None,
    samples: int | None = None,
) -> ModelReport:
    """Latencies and confusion matrix of one real model (module docstring)."""
    from serif_dask.readers import NoCalibrationData

    where = f"{app.name}/{profile.name}"
    if profile.use_profile:
        raise ProfileError(f"{where}: use-profile is true; there is no real model to measure")
    if not profile.impl:
        raise ProfileError(f"{where}: no impl ('package.module:Class') to build the model from")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ProfileError("batch sizes must be positive integers")
    device = device or default_device()
    try:
        cls = import_impl(profile.impl)
        data = Path(profile.weights or "").read_bytes()
        model = load_model(cls, data, device)
    except Exception as exc:  # any import/IO/load problem, reported on one line
        raise ProfileError(f"{where}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    reader = _reader_for(cfg, app, profile)
    k = app.k

    # Labelled samples: the confusion matrix, and realistic inputs for the timings.
    n = samples or min(DEFAULT_SAMPLES, getattr(reader, "calibration_size", DEFAULT_SAMPLES))
    try:
        x, y = reader.calibration(n)
    except NoCalibrationData:
        x, y = reader.read(np.arange(max(batch_sizes)) % cfg.data.num_groups, 0)[:2]
        cmat = None
    else:
        pred = np.concatenate([model.forward(x[i : i + 256]) for i in range(0, len(x), 256)])
        if pred.shape != y.shape or (pred.size and (pred.min() < 0 or pred.max() >= k)):
            raise ProfileError(f"{where}: forward gave predictions outside 0..{k - 1}")
        counts = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        cmat = counts.astype(float).tolist()

    sizes = sorted({int(b) for b in batch_sizes})
    pool = np.concatenate([x] * math.ceil(sizes[-1] / len(x)))
    batch_s = [time_call(lambda b=b: model.forward(pool[:b]), device=device) for b in sizes]
    a, c = fit_line(sizes, batch_s)
    if reference_batch is None:
        nodes = max(1, len(cfg.node_names))
        reference_batch = min(max(1, math.ceil(cfg.data.num_groups / nodes)), sizes[-1])
    infer = (a + c * reference_batch) / reference_batch

    def cold() -> None:
        load_model(cls, data, device).forward(pool[:1])

    load_s = time_call(lambda: load_model(cls, data, device), device=device, repeats=5)
    switch = max(time_call(cold, device=device, repeats=5) - batch_s[0], load_s)
    return ModelReport(
        app=app.name, model=profile.name, impl=profile.impl, device=device,
        nbytes=int(getattr(model, "nbytes", 0)), batch_sizes=sizes, batch_s=batch_s,
        intercept_s=a, slope_s=c, reference_batch=int(reference_batch), infer_s=infer,
        switch_s=switch, load_s=load_s,
        accuracy=None if cmat is None else float(np.trace(counts) / max(counts.sum(), 1)),
        cmat=cmat, n_samples=0 if cmat is None else int(len(y)),
    )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` threads inside the block (None: leave as is)."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_config(cfg: SerifConfig, *, threads: int | None = 1,
                   **options: Any) -> list[ModelReport]:
    """:func:`measure_model` for every model with ``use-profile: false``, in config order.

    ``threads``: torch CPU threads while measuring; it must match the compute workers'
    setting. One by default: with several worker processes per machine, a second
    intra-op thread that waits for a busy core stalls a batch by 10-100 ms (measured on
    the 2-core development machine), far more than the work itself.
    """
    with torch_threads(threads):
        return [
            measure_model(cfg, app, profile, **options)
            for app in cfg.apps
            for profile in app.model_profiles
            if not profile.use_profile
        ]


def _seconds(value: float) -> float:
    return float(f"{value:.3g}")


def updated_application(
    cfg: SerifConfig, reports: Sequence[ModelReport], out_dir: Path | None = None
) -> dict[str, Any]:
    """application.json with the measured ``latencies`` and ``cmat`` filled in.

    The rest of the file is kept as written. A relative weights path is rewritten relative
    to ``out_dir`` (default: the source file's folder), so the file works where it lands.
    """
    source = cfg.sources.get("application")
    if source is None:
        raise ProfileError("the config was not loaded from files; nothing to update")
    raw = json.loads(Path(source).read_text(encoding="utf-8"))
    out = copy.deepcopy(raw)
    found = {(r.app, r.model): r for r in reports}
    for a, app in enumerate(cfg.apps):
        for j, profile in enumerate(app.model_profiles):
            report = found.get((app.name, profile.name))
            if report is None:
                continue
            entry = out["applications"][a]["model-profiles"][j]
            entry["latencies"] = {
                node: [_seconds(report.infer_s), _seconds(report.switch_s)]
                for node in entry["latencies"]
            }
            if report.cmat is not None:
                entry["cmat"] = report.cmat
            for key in ("model-weights", "model-data", "weights"):
                value = entry.get(key)
                if value and not os.path.isabs(value) and out_dir is not None:
                    entry[key] = os.path.relpath(profile.weights, Path(out_dir).resolve())
    return out


_NUMBER_LIST = re.compile(r"\[(?:\s*-?[0-9][0-9.eE+-]*\s*,)*\s*-?[0-9][0-9.eE+-]*\s*\]")


def dumps(doc: Any) -> str:
    """JSON with ``indent=2`` but lists of numbers on one line: a 10×10 ``cmat`` stays
    ten readable rows instead of a hundred and twenty lines."""
    text = json.dumps(doc, indent=2)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(m[0][1:-1].split()).replace(",,", ",")
                            + "]", text) + "\n"


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


def write_profile(cfg: SerifConfig, reports: Sequence[ModelReport], out_dir: Path) -> Path:
    """Write ``application.json`` and the raw measurements ``profile.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "application.json"
    _write_json(target, updated_application(cfg, reports, out_dir))
    _write_json(out_dir / "profile.json", {"models": [asdict(r) for r in reports]})
    return target
