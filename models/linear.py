"""A linear classifier over the flattened sample: the smallest real model.

Useful as a baseline next to bigger networks, and as the model the engine's own tests
score with: its answer is a pure function of its weights and the exact input, so a test
can tell whether the right group's sample reached it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serif_dask.models import ModelImpl, input_tensor


class LinearClassifier(ModelImpl):
    """``argmax(W · x + b)``; weights ``weight`` (K, D) and ``bias`` (K,)."""

    def __init__(self) -> None:
        self.layer: Any = None
        self.device = "cpu"

    def load(self, state_dict: dict[str, Any], device: str) -> None:
        import torch

        missing = {"weight", "bias"} - set(state_dict)
        if missing:
            raise ValueError(f"LinearClassifier weights lack {sorted(missing)}")
        weight, bias = state_dict["weight"], state_dict["bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"LinearClassifier weights have shapes {tuple(weight.shape)} and "
                f"{tuple(bias.shape)}; expected (K, D) and (K,)"
            )
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": bias})
        self.layer = layer.to(device).eval()
        self.device = device
        self.nbytes = int(weight.numel() + bias.numel()) * weight.element_size()

    def forward(self, batch: np.ndarray) -> np.ndarray:

        x = input_tensor(batch).reshape(len(batch), -1).to(self.device)
        return self.layer(x).argmax(dim=1).cpu().numpy()
