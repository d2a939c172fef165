"""What a Dask worker is to serif-dask, from its name and resources.

``GPU`` workers are compute nodes, named after the config's ``compute-nodes``; ``DATA``
workers are data servers, named ``data@<server>`` (or just ``<server>``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("serif_dask.scheduler")

#: A data worker may be named ``data@<server>`` or just ``<server>``.
DATA_PREFIX = "data@"


def worker_role(name: str, resources: dict[str, float]) -> tuple[str, str]:
    """Map a Dask worker to (role, config name) from its resources and name."""
    name = str(name)
    if resources.get("GPU", 0) > 0 and resources.get("DATA", 0) > 0:
        logger.error("worker %s has both GPU and DATA resources; serving it as compute", name)
    if resources.get("GPU", 0) > 0:
        return "compute", name
    if resources.get("DATA", 0) > 0:
        return "data", name.removeprefix(DATA_PREFIX)
    return "other", name
