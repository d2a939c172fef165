"""Models: what a score task runs over a batch.

A model class named by a profile's ``impl`` (``"package.module:Class"``) subclasses
:class:`ModelImpl`. Profile-mode models (``use-profile: true``) are simulated by
:class:`serif_dask.models.profile.ProfileModel` from the profile alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

__all__ = ["ModelImpl", "input_tensor"]


def input_tensor(batch: np.ndarray) -> Any:
    """A float32 CPU tensor over ``batch`` without copying it where possible.

    Score tasks hand models read-only views of the node's shared-memory cache. Torch warns
    about wrapping non-writable memory because a tensor could write through it; a forward
    under ``inference_mode`` never writes its input, so the warning is silenced here.
    """
    import warnings

    import torch

    array = np.ascontiguousarray(batch, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class ModelImpl(ABC):
    """A real model: weights arrive as a ``state_dict`` read without unpickling."""

    #: Bytes this model occupies once loaded (RAM or CUDA memory), for the LRU cache.
    nbytes: int = 0

    @abstractmethod
    def load(self, state_dict: dict[str, Any], device: str) -> None:
        """Build the network and load ``state_dict`` onto ``device``."""

    @abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Class predictions (int, shape (n,)) for a batch of samples (n, *shape)."""
