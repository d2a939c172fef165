"""Three torch models for the digits example (``configs/digits``), small to large.

They read the 8×8 images of :mod:`serif_dask.readers.digits` and differ clearly in size,
speed and accuracy, which is what gives a scheduler something to choose between:

=================  =======================================  ============
``LinearDigits``   2×2 average pool → 4×4 → linear          170 params
``MLPDigits``      64 → 64 → 10, ReLU                       4.8 k params
``CNNDigits``      3×3 convolutions (16, 32), pool → 64 → 10  38 k params
=================  =======================================  ============

The engine builds one with no arguments, calls :meth:`DigitsModel.load` with a
``state_dict`` that was read without unpickling (safetensors), and then
:meth:`DigitsModel.forward` on whole batches. Training is in
:mod:`serif_dask.models.train_digits`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from serif_dask.models import ModelImpl, input_tensor

__all__ = [
    "MODELS",
    "CNNDigits",
    "DigitsModel",
    "LinearDigits",
    "MLPDigits",
    "StateDictMismatch",
    "check_state_dict",
]

IMAGE_SHAPE = (1, 8, 8)
N_CLASSES = 10


class StateDictMismatch(ValueError):
    """The weights do not fit the network (another model's, truncated, or tampered with)."""


class DigitsModel(ModelImpl):
    """A digits classifier: ``load`` a state_dict once, then ``forward`` numpy batches."""

    #: Name used for the weights file and the model profile.
    name: ClassVar[str]

    def __init__(self) -> None:
        self.net: nn.Module | None = None
        self.device = torch.device("cpu")
        self.nbytes = 0

    @classmethod
    def network(cls) -> nn.Module:
        """A freshly initialised network (for training, or to load weights into)."""
        raise NotImplementedError

    def load(self, state_dict: dict[str, Any], device: str) -> None:
        net = self.network()
        check_state_dict(net, state_dict, type(self).__name__)
        net.load_state_dict(state_dict, strict=True)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.nbytes = sum(t.numel() * t.element_size() for t in self.net.state_dict().values())

    def logits(self, batch: np.ndarray) -> torch.Tensor:
        """Class scores (n, 10) for images (n, 1, 8, 8), (n, 8, 8) or (n, 64)."""
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__}: call load() before forward()")
        batch = np.asarray(batch)
        if batch.ndim == 0 or batch.size != batch.shape[0] * 64:
            raise ValueError(
                f"{type(self).__name__}: expected a batch of 8x8 images, got shape "
                f"{list(batch.shape)}"
            )
        x = input_tensor(batch).reshape(-1, *IMAGE_SHAPE).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.net(x)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.empty(0, dtype=np.int64)
        pred = self.logits(batch).argmax(dim=1)
        return pred.to("cpu").numpy().astype(np.int64, copy=False)


def check_state_dict(net: nn.Module, state: dict[str, Any], owner: str) -> None:
    """Raise one clear :class:`StateDictMismatch` unless ``state`` fits ``net`` exactly.

    torch's own message is many lines and passes NaN weights; a wrong model's or a
    tampered file must fail at load time, naming what is wrong, not at the first batch.
    """
    expected = net.state_dict()
    if not isinstance(state, dict):
        raise StateDictMismatch(f"{owner}: expected a state_dict, got {type(state).__name__}")
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(map(str, unexpected)))
    for key, ref in expected.items():
        t = state.get(key)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{key} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != tuple(ref.shape):
            problems.append(f"{key} has shape {list(t.shape)}, expected {list(ref.shape)}")
        elif not t.is_floating_point():
            problems.append(f"{key} has dtype {t.dtype}, expected a floating type")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{key} holds NaN or infinite values")
    if problems:
        raise StateDictMismatch(f"{owner}: weights do not fit: " + "; ".join(problems))


class LinearDigits(DigitsModel):
    """Logistic regression on a 4×4 thumbnail: tiny, fast, and confuses similar digits."""

    name = "digits-linear"

    @classmethod
    def network(cls) -> nn.Module:
        return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, N_CLASSES))


class MLPDigits(DigitsModel):
    """One hidden layer on all 64 pixels."""

    name = "digits-mlp"

    @classmethod
    def network(cls) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, N_CLASSES)
        )


class CNNDigits(DigitsModel):
    """Two 3×3 convolutions and a pooled dense head: the most accurate and the slowest."""

    name = "digits-cnn"

    @classmethod
    def network(cls) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, N_CLASSES),
        )


#: The example's models, smallest first.
MODELS: tuple[type[DigitsModel], ...] = (LinearDigits, MLPDigits, CNNDigits)
