"""Arrays on the wire between the driver and the scheduler plugin's handlers.

Handler messages travel as msgpack, which carries lists of Python numbers one object at a
time; a tick's per-request columns (groups, input placements, latencies) go as one pickled
numpy buffer each instead, and stay arrays on both sides. Every reader also takes a plain
list, so that ad-hoc callers and older drivers keep working.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from distributed.protocol.pickle import dumps, loads


def pack(values: Any, dtype: Any = None) -> bytes:
    """One array as bytes, for a handler argument or reply."""
    return dumps(np.ascontiguousarray(np.asarray(values, dtype=dtype)))


def unpack(value: Any, dtype: Any) -> np.ndarray:
    """What :func:`pack` made, or a plain list (or None: empty), as an array of ``dtype``."""
    if value is None:
        return np.zeros(0, dtype=dtype)
    if isinstance(value, bytes | bytearray | memoryview):
        value = loads(value)
    return np.asarray(value, dtype=dtype)


def pack_nodes(names: list[str], codes: np.ndarray) -> dict[str, Any]:
    """Per request, the shared-memory node holding its input: a code into ``names``."""
    return {"names": list(names), "codes": pack(codes, np.int32)}


def unpack_nodes(value: Any) -> tuple[tuple[str, ...], np.ndarray] | np.ndarray:
    """(names, codes) from :func:`pack_nodes`, or one node name per request (a list)."""
    if isinstance(value, dict):
        return tuple(value["names"]), unpack(value["codes"], np.int64)
    return np.asarray(value, dtype=object)
