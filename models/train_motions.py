"""Train the real-data ward's models on the ``train`` windows, in about a minute on one core.

``serif-dask train-motions --out configs/real-ward/weights`` (or :func:`train_all`) writes
one safetensors file per model, ``<model name>.safetensors``, and returns each model's
accuracy and confusion matrix on the held-out ``calibration`` and ``test`` windows of
:mod:`serif_dask.readers.basic_motions`. Training is seeded and runs on one thread, so a
re-run gives the same weights on the same torch build.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from serif_dask.models.motions import MODELS, N_CLASSES, MotionModel
from serif_dask.models.train_digits import TrainResult, confusion_matrix
from serif_dask.readers.basic_motions import load_split

__all__ = ["evaluate", "train_all", "train_model"]

#: Epochs, learning rate and weight decay per model: enough to converge, no more.
HYPER: dict[str, tuple[int, float, float]] = {
    "motion-glance": (60, 1e-2, 1e-4),
    "motion-fcn": (4, 1e-3, 1e-4),
}


def evaluate(model: MotionModel, split: str) -> np.ndarray:
    """Confusion matrix ``cmat[true][predicted]`` of ``model`` on every window of ``split``."""
    x, y = load_split(split)
    return confusion_matrix(y, model.forward(x), N_CLASSES)


def train_model(cls: type[MotionModel], out: Path, *, seed: int = 0,
                batch_size: int = 64) -> TrainResult:
    """Train ``cls`` with Adam on the train windows and save its weights under ``out``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cls, Path(out), seed, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train(cls: type[MotionModel], out: Path, seed: int, batch_size: int) -> TrainResult:
    epochs, lr, decay = HYPER[cls.name]
    torch.manual_seed(seed)
    x, y = (torch.from_numpy(np.array(a)) for a in load_split("train"))
    net = cls.network()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cls.name}.safetensors"
    save_file(state, str(path), metadata={"model": f"{cls.__module__}:{cls.__qualname__}"})
    model = cls()
    model.load(state, "cpu")
    test = evaluate(model, "test")
    return TrainResult(
        name=cls.name,
        path=path,
        params=sum(p.numel() for p in net.parameters()),
        seconds=seconds,
        test_accuracy=float(np.trace(test) / test.sum()),
        test_cmat=test.tolist(),
        calibration_cmat=evaluate(model, "calibration").tolist(),
    )


def train_all(out: Path, *, seed: int = 0) -> list[TrainResult]:
    """Train every model of :data:`~serif_dask.models.motions.MODELS` into ``out``."""
    return [train_model(cls, Path(out), seed=seed) for cls in MODELS]
