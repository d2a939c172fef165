"""Two torch models for the real-data ward (``configs/real-ward``): a glance and a full look.

Both read the six-channel, 5 s watch windows of :mod:`serif_dask.readers.basic_motions`
(float32 ``(n, 6, 50)``, raw sensor units) and differ by how much of the window they see,
which is what makes one cheap and the other accurate:

=================  ==================================================  =============
``GlanceMotion``   the last 0.5 s (5 steps) → linear                   124 params
``FCNMotion``      the whole 5 s: three 1-D convolutions (256, 512,     1.06 M params
                   256 channels), global average pool → linear
=================  ==================================================  =============

Half a second of wrist motion tells standing from the rest, but walking, running and a
badminton rally look alike within one stride; five seconds separate them. Both start with
a fixed signed-log compression of the raw values (running spans ±20 units, standing
±0.5), so no fitted input statistics travel with the weights.

The engine builds a model with no arguments, calls :meth:`MotionModel.load` with a
``state_dict`` read without unpickling (safetensors) and then :meth:`MotionModel.forward`
on whole batches. Training is in :mod:`serif_dask.models.train_motions`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from serif_dask.models import ModelImpl, input_tensor
from serif_dask.models.digits import check_state_dict

__all__ = ["MODELS", "FCNMotion", "GlanceMotion", "MotionModel"]

CHANNELS, WINDOW, N_CLASSES = 6, 50, 4


class SignedLog(nn.Module):
    """``sign(x)·log(1 + |x|)``: a fixed compression of the sensors' dynamic range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.log1p(x.abs())


class LastSteps(nn.Module):
    """Keep the most recent ``n`` time steps of ``(n, channels, time)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., -self.n:]


class MotionModel(ModelImpl):
    """An activity classifier: ``load`` a state_dict once, then ``forward`` numpy batches."""

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
        """Class scores (n, 4) for windows (n, 6, 50)."""
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__}: call load() before forward()")
        batch = np.asarray(batch)
        if batch.ndim == 0 or batch.size != batch.shape[0] * CHANNELS * WINDOW:
            raise ValueError(
                f"{type(self).__name__}: expected a batch of [{CHANNELS}, {WINDOW}] windows, "
                f"got shape {list(batch.shape)}"
            )
        x = input_tensor(batch).reshape(-1, CHANNELS, WINDOW).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.net(x)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.empty(0, dtype=np.int64)
        pred = self.logits(batch).argmax(dim=1)
        return pred.to("cpu").numpy().astype(np.int64, copy=False)


class GlanceMotion(MotionModel):
    """A linear read of the last half second: tiny and fast, confuses the moving activities."""

    name = "motion-glance"

    @classmethod
    def network(cls) -> nn.Module:
        return nn.Sequential(
            SignedLog(), LastSteps(5), nn.Flatten(), nn.Linear(CHANNELS * 5, N_CLASSES)
        )


class FCNMotion(MotionModel):
    """A fully convolutional network over the whole window: accurate, and ~1000x the cost."""

    name = "motion-fcn"

    @classmethod
    def network(cls) -> nn.Module:
        return nn.Sequential(
            SignedLog(),
            nn.Conv1d(CHANNELS, 256, 7, padding=3),
            nn.ReLU(),
            nn.Conv1d(256, 512, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(512, 256, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(256, N_CLASSES),
        )


#: The ward's models, cheapest first.
MODELS: tuple[type[MotionModel], ...] = (GlanceMotion, FCNMotion)
