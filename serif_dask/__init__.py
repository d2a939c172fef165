"""serif-dask: real-time inference over many monitored groups, on Dask.

The public surface is small: :class:`Serif` (run a deployment on a Dask client),
:func:`load_config` and :class:`ConfigError`. Plugins are in
:mod:`serif_dask.scheduler` and :mod:`serif_dask.worker` (``--preload`` targets).
"""

from serif_dask.api import Serif
from serif_dask.cluster import local_cluster
from serif_dask.config import ConfigError, SerifConfig, load_config

__all__ = ["ConfigError", "Serif", "SerifConfig", "load_config", "local_cluster"]
__version__ = "0.1.0"
