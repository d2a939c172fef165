"""Load and validate SERIF's three configuration files into frozen, picklable objects.

SERIF describes a deployment in three JSON files: *system* (compute nodes, Redis, the
scheduler), *application* (applications, their utility and model profiles) and *data*
(modalities, request-generating servers, streams). :func:`load_config` reads them unchanged
(hyphenated keys, ports as strings, ``model-data`` or ``model-weights``), checks everything a
user can get wrong, and returns one :class:`SerifConfig`.

Every problem is reported as a :class:`ConfigError` whose ``str()`` is a single line naming
the file and the JSON path, e.g.::

    application.json: applications[0].model-profiles[2].cmat: row 1 has 3 entries, expected 2

The objects are pydantic models with ``frozen=True``; containers are tuples and read-only
dicts, so a config is immutable, hashable and cheap to ship to the scheduler and workers.
Python attribute names are the snake_case spelling of SERIF's keys (``sla-latency`` ->
``sla_latency``); both spellings are accepted when building models in Python.

Extensions to SERIF's format are optional and documented on the fields below (``impl``,
``miss-utility``, ``sneakpeek``, ``redis``, ``synthetic-snr``, ...).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import numpy as np
from pydantic import (
    AfterValidator,
    AliasChoices,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

logger = logging.getLogger("serif_dask.config")

__all__ = [
    "SERIF_POLICIES",
    "Application",
    "ComputeNode",
    "ConfigError",
    "DataConfig",
    "FrozenDict",
    "Modality",
    "ModelProfile",
    "RedisNode",
    "RedisSettings",
    "ResultsStream",
    "SchedulerNode",
    "SerifConfig",
    "Server",
    "SneakPeekSettings",
    "SystemConfig",
    "load_config",
    "load_config_dicts",
]

#: Kinds of configuration file, in the order they are validated, and their usual names.
KINDS = ("system", "application", "data")
DEFAULT_FILE_NAMES = {kind: f"{kind}.json" for kind in KINDS}
#: The top-level key that identifies each kind of file when three paths are given.
_KIND_KEYS = {"compute-nodes": "system", "applications": "application", "data-modalities": "data"}

#: SERIF's scheduler names (and serif-dask's first additions). Always accepted as
#: ``scheduler-type``, even before the policy that implements them is registered.
SERIF_POLICIES = frozenset(
    {
        "random",
        "random-cache",
        "locally-optimal-edf",
        "locally-optimal-edf-cache",
        "grouped-priority",
        "fastest",
        "most-accurate",
        "sneakpeek",
    }
)

#: Slots per modality in a server's shared-memory cache when the config names neither the
#: modality nor a ``default``.
DEFAULT_CACHE_ENTRIES = 16
#: Sizes beyond these are a typo, not a ward: refused in one line, never an out-of-memory.
MAX_GROUPS = 10_000_000
MAX_SAMPLE_ELEMENTS = 10**9


def machine_memory() -> int:
    """Bytes of physical memory of this machine (a cache bigger than it cannot be meant)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no bound
        return 2**63


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

_TOP = "(top level)"


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration problem, printable as one line ``<file>: <json path>: <message>``.

    ``file`` is the file's name (``application.json``); ``source`` the full path when the
    config came from disk. The CLI prints ``str(err)`` and exits with status 2.
    """

    def __init__(self, file: str, path: str, message: str, source: Path | None = None):
        self.file = file
        self.path = path
        self.message = _one_line(message)
        self.source = source
        super().__init__(f"{file}: {path}: {self.message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their ``args``; ours has a different constructor.
        return (type(self), (self.file, self.path, self.message, self.source))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, *at: str | int, file: str | None = None) -> NoReturn:
    """Raise a validation error located at ``at`` below the model being validated.

    ``file`` (a kind: "system", "application", "data") is set by cross-file checks, whose
    ``at`` is then the full path from that file's root.
    """
    raise PydanticCustomError("serif", "{message}", {"message": message, "at": at, "file": file})


def _json_path(parts: Iterable[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_@-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or _TOP


def _show(value: Any) -> str:
    """A short rendering of an offending JSON value for an error message."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return type(value).__name__


_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "dict_type": "an object",
    "mapping_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _describe(err: Mapping[str, Any], *, secret: bool) -> str:
    """The message for one pydantic error, in the words of a JSON file's author."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = "a value" if secret else _show(err.get("input"))
    if kind == "serif":
        return str(ctx["message"])
    if kind == "missing":
        loc = err["loc"]
        return "too few entries" if loc and isinstance(loc[-1], int) else "missing key"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {value}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        limit = ctx[key]
        return f"must be {op} {limit:g}, got {value}"
    if kind == "finite_number":
        return f"expected a finite number, got {value}"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "too_short":
        return f"expected at least {ctx['min_length']} entries, got {ctx['actual_length']}"
    if kind == "too_long":
        return f"expected at most {ctx['max_length']} entries, got {ctx['actual_length']}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def _convert(
    exc: ValidationError, files: Mapping[str, str], default_kind: str, sources: Mapping[str, Path]
) -> ConfigError:
    """The first error of a pydantic ValidationError, as a one-line ConfigError."""
    err = exc.errors(include_url=False)[0]
    loc = list(err["loc"])
    key_error = bool(loc) and loc[-1] == "[key]"
    if key_error:
        loc.pop()
    if err["type"] == "missing" and loc and isinstance(loc[-1], int):
        loc.pop()  # a fixed-length list (a latency pair) that is too short
    message = _describe(err, secret="password" in loc)
    ctx = (err.get("ctx") or {}) if err["type"] == "serif" else {}
    kind = ctx.get("file") or default_kind
    # A cross-file check gives the full path from its file's root; others extend ``loc``.
    parts: tuple[str | int, ...] = (
        tuple(ctx.get("at", ())) if ctx.get("file") else (*loc, *ctx.get("at", ()))
    )
    if key_error:
        message = f"invalid key: {message}"
    file = files.get(kind, DEFAULT_FILE_NAMES.get(kind, kind))
    return ConfigError(file, _json_path(parts), message, sources.get(kind))


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------


class FrozenDict(dict):
    """A read-only, hashable dict. Pickles (unlike ``MappingProxyType``) and is a dict."""

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self  # values are immutable too


def _freeze(value: Mapping[Any, Any]) -> FrozenDict:
    return FrozenDict(value)


def _check_in_unit(value: float) -> float:
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"utility must be within [-1, 1], got {value:g}")
    return value


_IMPL_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _check_impl(value: str) -> str:
    if not _IMPL_RE.fullmatch(value):
        raise ValueError(f"expected 'package.module:Name', got {_show(value)}")
    return value


def _check_reader(value: str) -> str:
    from serif_dask.readers import builtin_reader_names

    names = builtin_reader_names()
    if value in names or _IMPL_RE.fullmatch(value):
        return value
    raise ValueError(f"expected a built-in reader ({', '.join(names)}) or "
                     f"'package.module:Name', got {_show(value)}")


#: The built-in reader of live inputs (Redis streams); see ``readers/redis_stream.py``.
LIVE_READER = "redis-stream"


def _port(value: Any) -> Any:
    # SERIF writes ports as strings ("2228"); accept those and ints, nothing else.
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a port number, got {_show(value)}")
    return value


def _check_dtype(value: str) -> str:
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ValueError(f"unknown dtype {_show(value)}") from None
    if dtype.kind not in "biuf":
        raise ValueError(f"expected a numeric dtype, got {_show(value)}")
    return dtype.name


Number = Annotated[float, Strict(), AllowInfNan(False)]
NonNegative = Annotated[Number, Field(ge=0)]
Positive = Annotated[Number, Field(gt=0)]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Bool = Annotated[bool, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1)]
Utility = Annotated[Number, AfterValidator(_check_in_unit)]
ImplPath = Annotated[str, Strict(), AfterValidator(_check_impl)]
ReaderImpl = Annotated[str, Strict(), AfterValidator(_check_reader)]
Port = Annotated[int, BeforeValidator(_port), Field(ge=0, le=65535)]
Matrix = tuple[tuple[Number, ...], ...]


def _frozen_dict(inner: Any) -> Any:
    return Annotated[inner, AfterValidator(_freeze)]


def _simulating(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("simulate"))


def _duplicates(names: Sequence[str]) -> Iterable[tuple[int, int]]:
    """(index, index of first occurrence) for each repeated name."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            yield i, first[name]
        else:
            first.setdefault(name, i)


def _gaps(present: Iterable[int], n: int, limit: int = 5) -> str:
    """The numbers in ``0..n-1`` missing from ``present``, as ranges: ``"1, 3-9, 12"``.

    Works from the gaps between present numbers, so a huge ``n`` costs nothing.
    """
    out: list[str] = []
    start = 0
    for p in [*sorted(set(present)), n]:
        if p > start:
            out.append(str(start) if p - 1 == start else f"{start}-{p - 1}")
        start = p + 1
    return ", ".join(out[:limit]) + (", ..." if len(out) > limit else "")


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        populate_by_name=True,
        extra="ignore",  # SERIF configs in the wild carry extra keys
        alias_generator=lambda name: name.replace("_", "-"),
    )


# --------------------------------------------------------------------------------------
# System configuration
# --------------------------------------------------------------------------------------


class ComputeNode(_Frozen):
    """A node that runs models: a Dask worker named ``name`` with ``resources={"GPU": 1}``.

    ``ip-address``/``server-port`` are accepted for SERIF compatibility and shown, but Dask
    does the addressing. ``model-cache-bytes`` (extension) bounds the worker's LRU cache of
    loaded models; ``None`` means no bound.
    """

    name: Name
    ip_address: str | None = None
    server_port: Port | None = None
    model_cache_bytes: PositiveInt | None = Field(
        None, description="Bytes of model weights a worker keeps loaded (LRU); None: unbounded."
    )
    type: Name | None = Field(
        None, description="Node type (hardware kind); latencies may be keyed by it. "
        "None: the node's name."
    )
    cost: NonNegative | None = Field(
        None, description="Cost of one node of this type, for `serif-dask plan`; None: 1."
    )

    @property
    def node_type(self) -> str:
        """The node's type: ``type``, else its name."""
        return self.type or self.name


class RedisNode(_Frozen):
    """One host of a Redis (Cluster) deployment; ``ports`` may be strings, as SERIF writes."""

    ip_address: Name
    ports: tuple[Port, ...] = Field(min_length=1)


class SchedulerNode(_Frozen):
    """SERIF's scheduler process address; kept for display (the Dask scheduler replaces it)."""

    ip_address: str | None = None
    port: Port | None = None


class RedisSettings(_Frozen):
    """Extension ``redis``: how to authenticate to Redis. The password never shows in repr."""

    password: str | None = Field(None, repr=False, description="Redis AUTH password.")
    tls: Bool = Field(False, description="Connect with TLS.")
    tls_ca_file: str | None = Field(None, description="CA bundle to verify the server.")
    tls_cert_file: str | None = Field(None, description="Client certificate (mutual TLS).")
    tls_key_file: str | None = Field(None, description="Client key (mutual TLS).")


class ResultsStream(_Frozen):
    """Extension ``results-stream``: every request record is also appended (``XADD``) to
    this Redis stream of the run's Redis, trimmed to about ``maxlen`` entries and, with
    ``max-age-s``, to the entries of that many seconds (the stream key itself expires
    that long after the last write)."""

    key: Name = Field("serif:results", description="Redis key of the stream.")
    maxlen: PositiveInt = Field(10000, description="Entries kept (approximate trimming).")
    max_age_s: Positive | None = Field(
        None, description="Entries older than this are trimmed; the key expires after it.")


def _known_policies() -> set[str]:
    names = set(SERIF_POLICIES)
    try:  # imported lazily: policies import numpy-heavy code and may not all exist yet
        from serif_dask.policies import available_policies
    except ImportError:
        return names
    names.update(available_policies())
    return names


class SystemConfig(_Frozen):
    """``system.json``: the run's seed, duration and scheduler, and the cluster's nodes.

    ``seed`` 0 means "seed from the clock" (SERIF's rule); the raw value is kept and
    :attr:`effective_seed` gives the seed to use, fixed when this object is built.
    ``scheduler-type`` is a policy name (SERIF's names always work) or a
    ``package.module:callable`` path. ``redis-nodes`` empty means an embedded Redis.
    """

    seed: Annotated[int, Strict(), Field(ge=0)]
    duration_in_secs: NonNegative = Field(description="0: run until stopped.")
    scheduler_sleep: NonNegative = Field(0.0, description="SERIF's polling period; optional.")
    data_aware: Bool
    scheduler_type: Name
    compute_nodes: tuple[ComputeNode, ...] = Field(min_length=1)
    redis_nodes: tuple[RedisNode, ...] = ()
    scheduler_node: SchedulerNode | None = None
    redis: RedisSettings = RedisSettings()
    results_stream: ResultsStream | None = None

    _clock_seed: int | None = PrivateAttr(None)

    def model_post_init(self, context: Any, /) -> None:
        if self.seed == 0:
            self._clock_seed = time.time_ns() // 1000 % (2**32 - 1) + 1

    @property
    def effective_seed(self) -> int:
        """``seed``, or for ``seed == 0`` a clock-derived seed drawn once, when loaded (so
        the driver and every worker that receives this object agree on it)."""
        return self.seed if self._clock_seed is None else self._clock_seed

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.compute_nodes)

    @property
    def node_types(self) -> tuple[str, ...]:
        """Compute-node types, in first-use order."""
        return tuple(dict.fromkeys(node.node_type for node in self.compute_nodes))

    @model_validator(mode="after")
    def _check(self) -> SystemConfig:
        for i, first in _duplicates(self.node_names):
            _fail(
                f"duplicate name {self.compute_nodes[i].name!r} (also compute-nodes[{first}])",
                "compute-nodes",
                i,
                "name",
            )
        memory = machine_memory()
        for i, node in enumerate(self.compute_nodes):
            if (node.model_cache_bytes or 0) > memory:
                _fail(f"{_gib(node.model_cache_bytes)} of models is more than this machine's "
                      f"{_gib(memory)}", "compute-nodes", i, "model-cache-bytes")
        by_name = {node.name: node for node in self.compute_nodes}
        costs: dict[str, tuple[int, float]] = {}
        for i, node in enumerate(self.compute_nodes):
            # A latency key names a node or a type: a type that is another type's node's
            # name would make that key mean two things.
            other = by_name.get(node.node_type)
            if other is not None and other.node_type != node.node_type:
                _fail(
                    f"{node.node_type!r} is the name of a compute node of another type "
                    f"({other.node_type!r})",
                    "compute-nodes", i, "type",
                )
            if node.cost is not None:
                first, cost = costs.setdefault(node.node_type, (i, node.cost))
                if cost != node.cost:
                    _fail(
                        f"{node.cost:g} differs from compute-nodes[{first}].cost ({cost:g}), "
                        f"of the same type {node.node_type!r}",
                        "compute-nodes", i, "cost",
                    )
        name = self.scheduler_type
        if ":" not in name:
            known = _known_policies()
            if name not in known:
                _fail(
                    f"unknown scheduler {name!r}; known: {', '.join(sorted(known))}, "
                    "or a 'package.module:callable' path",
                    "scheduler-type",
                )
        return self


# --------------------------------------------------------------------------------------
# Application configuration
# --------------------------------------------------------------------------------------


class ModelProfile(_Frozen):
    """One model an application may use: its accuracy (``cmat``) and per-node latencies.

    ``latencies`` maps a compute node to ``[inference, context-switch]`` seconds; a node
    without an entry cannot run the model. ``weights`` is read from ``model-weights`` or
    ``model-data`` (SERIF used both); it and ``redis-key`` are required unless
    ``use-profile`` is true. ``impl`` (extension) is the model class,
    ``"package.module:Class"``; ``None`` picks the default for the model's name.
    """

    name: Name
    use_profile: Bool
    modality: Name
    cmat: Matrix = Field(description="Confusion matrix, cmat[true][predicted], counts >= 0.")
    latencies: _frozen_dict(dict[str, tuple[NonNegative, NonNegative]])
    weights: str | None = Field(
        None,
        validation_alias=AliasChoices("model-weights", "model-data", "weights"),
        serialization_alias="model-weights",
    )
    redis_key: str | None = None
    impl: ImplPath | None = Field(None, description="Model class, 'package.module:Class'.")

    @model_validator(mode="before")
    @classmethod
    def _one_weights_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            given = [k for k in ("model-weights", "model-data") if data.get(k) is not None]
            if len(given) == 2 and data[given[0]] != data[given[1]]:
                _fail("conflicts with model-weights; give only one", "model-data")
        return data

    @field_validator("use_profile")
    @classmethod
    def _simulate(cls, value: bool, info: ValidationInfo) -> bool:
        return True if _simulating(info) else value

    @model_validator(mode="after")
    def _check(self) -> ModelProfile:
        for i, row in enumerate(self.cmat):
            if row and any(v < 0 for v in row):
                j = next(j for j, v in enumerate(row) if v < 0)
                _fail(f"must be >= 0, got {row[j]:g}", "cmat", i, j)
            if row and not any(row):
                _fail(f"row {i} is all zeros, so it cannot be normalised", "cmat")
        if not self.latencies:
            _fail("no compute node has a latency for this model", "latencies")
        if not self.use_profile:
            if not self.weights:
                _fail("required when use-profile is false (or use --simulate)", "model-weights")
            if not self.redis_key:
                _fail("required when use-profile is false (or use --simulate)", "redis-key")
        return self

    @property
    def nodes(self) -> tuple[str, ...]:
        """Compute nodes that can run this model."""
        return tuple(self.latencies)


class SneakPeekSettings(_Frozen):
    """Extension ``sneakpeek`` of an application: how its class estimate π is formed.

    ``belief``: ``"filter"`` (default), a Bayesian forward filter per group, or
    ``"dirichlet"``, the older additive belief. ``persistence`` in [0, 1]: the filter's
    chance that a group keeps its class from one tick to the next (default: estimated from
    the calibration labels when they form a sequence, else the peeked modality's
    ``label-persistence``). ``strength`` > 0: the filter's likelihood exponent (1 trusts
    the calibrated classifier as it is; below 1 discounts each look), or the Dirichlet
    belief's pseudo-counts per look. ``memory`` in [0, 1]: the Dirichlet belief's share of
    evidence kept from tick to tick (the filter ignores it). ``answer``: a request the
    cluster cannot serve in time is answered from the estimate itself, at no GPU cost,
    when that earns more than ``miss-utility`` (data-aware runs only). ``impl``: an
    estimator class ``"package.module:Class"``; ``modality``: which input the estimator
    peeks at (default: the application's smallest input). ``calibration``: a reader (a
    built-in name such as ``digits``, or ``package.module:Class``) whose labelled data fits
    the estimator instead of the peeked modality's own reader (for live inputs, whose
    reader has only what a feeder pushed).
    """

    belief: Literal["filter", "dirichlet"] = "filter"
    persistence: Annotated[Number, Field(ge=0, le=1)] | None = None
    memory: Annotated[Number, Field(ge=0, le=1)] = 0.5
    strength: Positive = 1.0
    answer: Bool = True
    impl: ImplPath | None = None
    modality: Name | None = None
    calibration: ReaderImpl | None = None


class Application(_Frozen):
    """``application.json`` ``applications[i]``: one inference task over every group.

    K classes: ``utility-matrix`` is K×K (``U[true][pred]``, within [-1, 1]); ``prior`` has
    K entries summing to 1 (optional, as in SERIF: default uniform); every model's ``cmat``
    is K×K. ``miss-utility`` (extension, default 0) is the utility of a dropped or failed
    request; ``sneakpeek`` (extension) tunes the data-aware estimate.
    """

    name: Name
    sla_latency: Positive
    sample_duration: Positive
    utility_matrix: tuple[tuple[Utility, ...], ...] = Field(min_length=1)
    prior: tuple[NonNegative, ...] | None = Field(None, min_length=1)
    model_profiles: tuple[ModelProfile, ...] = Field(min_length=1)
    miss_utility: Utility = Field(0.0, description="Utility of a dropped or failed request.")
    sneakpeek: SneakPeekSettings = SneakPeekSettings()

    @property
    def k(self) -> int:
        """Number of classes."""
        return len(self.utility_matrix)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.model_profiles)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities the application's models read, in first-use order."""
        return tuple(dict.fromkeys(m.modality for m in self.model_profiles))

    @model_validator(mode="after")
    def _check(self) -> Application:
        k = len(self.utility_matrix)
        for i, row in enumerate(self.utility_matrix):
            if len(row) != k:
                _fail(
                    f"row {i} has {len(row)} entries, expected {k} (the matrix must be square)",
                    "utility-matrix",
                )
        if self.prior is not None:
            if len(self.prior) != k:
                _fail(f"has {len(self.prior)} entries, but utility-matrix is {k}x{k}", "prior")
            total = math.fsum(self.prior)
            if abs(total - 1.0) > 1e-6:
                _fail(f"must sum to 1, sums to {total:.6g}", "prior")
        for j, model in enumerate(self.model_profiles):
            if len(model.cmat) != k:
                _fail(
                    f"has {len(model.cmat)} rows, expected {k} (one per class)",
                    "model-profiles",
                    j,
                    "cmat",
                )
            for i, row in enumerate(model.cmat):
                if len(row) != k:
                    _fail(
                        f"row {i} has {len(row)} entries, expected {k}", "model-profiles", j, "cmat"
                    )
        for j, first in _duplicates(self.model_names):
            _fail(
                f"duplicate name {self.model_profiles[j].name!r} (also model-profiles[{first}])",
                "model-profiles",
                j,
                "name",
            )
        peek = self.sneakpeek.modality
        if peek is not None and peek not in self.modalities:
            _fail(
                f"no model of this application reads modality {peek!r} "
                f"(they read: {', '.join(self.modalities)})",
                "sneakpeek",
                "modality",
            )
        # Fill in the defaults that depend on other fields. ``object.__setattr__`` because the
        # model is frozen, and a returned copy would be ignored when built via ``__init__``.
        if self.prior is None:
            object.__setattr__(self, "prior", (1.0 / k,) * k)
        if peek is None:
            modality = self.model_profiles[0].modality
            object.__setattr__(
                self, "sneakpeek", self.sneakpeek.model_copy(update={"modality": modality})
            )
        return self


class _ApplicationFile(_Frozen):
    applications: tuple[Application, ...] = Field(min_length=1)


# --------------------------------------------------------------------------------------
# Data configuration
# --------------------------------------------------------------------------------------


class Modality(_Frozen):
    """``data.json`` ``data-modalities[i]``: one kind of input and where it comes from.

    ``retrieval-latencies`` maps compute nodes to the seconds it takes to fetch one input of
    this modality there; it must cover every node on which some model of this modality
    runs. Extensions: ``impl`` (reader: ``"package.module:Class"`` or a built-in name, e.g.
    ``redis-stream`` for live inputs, which needs ``redis-nodes``), ``synthetic-snr``
    (> 0, class signal to noise of synthetic samples), ``label-persistence`` (in [0, 1),
    chance a group keeps its synthetic label from one tick to the next), ``dtype`` of
    samples (default ``float32``).
    """

    name: Name
    use_synthetic_data: Bool
    synthetic_shape: tuple[PositiveInt, ...] = Field(min_length=1)
    cache_entry_size: PositiveInt
    retrieval_latencies: _frozen_dict(dict[str, NonNegative])
    impl: ReaderImpl | None = Field(
        None, description="Reader: a built-in name or 'package.module:Class'.")
    synthetic_snr: Positive = 1.0
    label_persistence: Annotated[Number, Field(ge=0, lt=1)] = 0.9
    dtype: Annotated[str, Strict(), AfterValidator(_check_dtype)] = "float32"

    @field_validator("use_synthetic_data")
    @classmethod
    def _simulate(cls, value: bool, info: ValidationInfo) -> bool:
        return True if _simulating(info) else value

    @field_validator("synthetic_shape")
    @classmethod
    def _bounded_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(value) > MAX_SAMPLE_ELEMENTS:
            raise PydanticCustomError("serif", "{message}", {"message": (
                f"a sample of shape {list(value)} has {math.prod(value):,} elements, above "
                f"the {MAX_SAMPLE_ELEMENTS:,} serif-dask supports")})
        return value


class Server(_Frozen):
    """``data.json`` ``servers[i]``: a request-generating node (a Dask worker, ``DATA=1``).

    ``streams[modality][group]`` names the input of one group (a file, or whatever the
    modality's reader understands; keys are group ids, as strings in JSON).
    ``cache-entries-per-modality`` sizes the node's shared-memory cache; see
    :meth:`cache_entries`.
    """

    name: Name
    ip_address: str | None = None
    port: Port | None = None
    workers: PositiveInt = 1
    cache_entries_per_modality: _frozen_dict(dict[str, PositiveInt]) = FrozenDict()
    streams: _frozen_dict(dict[str, _frozen_dict(dict[int, Name])]) = FrozenDict()

    def cache_entries(self, modality: str) -> int:
        """Cache slots for ``modality``: its own entry, else ``default``, else 16."""
        entries = self.cache_entries_per_modality
        return entries.get(modality, entries.get("default", DEFAULT_CACHE_ENTRIES))


class DataConfig(_Frozen):
    """``data.json``: the groups, the input modalities and the servers that read them.

    Groups are ``0 .. num-groups - 1``. A group is read, per modality, by the server whose
    ``streams`` list it, else by server ``group % len(servers)``. A modality with real data
    (``use-synthetic-data: false``) needs a stream for every group.
    """

    num_groups: PositiveInt
    data_modalities: tuple[Modality, ...] = Field(min_length=1)
    servers: tuple[Server, ...] = Field(min_length=1)

    # modality -> {group: server index} for groups that some server's ``streams`` list.
    # Derived from the fields when validated (so equal configs compare equal); not updated
    # by ``model_copy(update=...)``, which skips validation.
    _listed: dict[str, dict[int, int]] = PrivateAttr(default_factory=dict)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.data_modalities)

    @property
    def server_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.servers)

    def reader_index(self, group: int, modality: str) -> int:
        """Index in ``servers`` of the server that reads ``group``'s ``modality``."""
        if modality not in self._listed:
            raise KeyError(f"unknown modality {modality!r}")
        if not 0 <= group < self.num_groups:
            raise KeyError(f"group {group} is out of range (num-groups {self.num_groups})")
        return self._listed[modality].get(group, group % len(self.servers))

    def reader_indices(self, modality: str) -> np.ndarray:
        """int array (num_groups,): for each group, the index of the server reading it."""
        if modality not in self._listed:
            raise KeyError(f"unknown modality {modality!r}")
        owners = np.arange(self.num_groups) % len(self.servers)
        listed = self._listed[modality]
        if listed:
            owners[np.fromiter(listed, int, len(listed))] = np.fromiter(
                listed.values(), int, len(listed)
            )
        return owners

    @field_validator("num_groups")
    @classmethod
    def _bounded_groups(cls, value: int) -> int:
        if value > MAX_GROUPS:
            raise PydanticCustomError("serif", "{message}", {"message": (
                f"{value:,} groups is above the {MAX_GROUPS:,} serif-dask supports")})
        return value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        for i, first in _duplicates(self.modality_names):
            _fail(
                f"duplicate name {self.data_modalities[i].name!r} (also data-modalities[{first}])",
                "data-modalities",
                i,
                "name",
            )
        for i, first in _duplicates(self.server_names):
            _fail(
                f"duplicate name {self.servers[i].name!r} (also servers[{first}])",
                "servers",
                i,
                "name",
            )
        known = set(self.modality_names)
        memory = machine_memory()
        for s, server in enumerate(self.servers):
            cache = sum(server.cache_entries(m.name) * m.cache_entry_size
                        for m in self.data_modalities)
            if cache > memory:
                _fail(f"the shared-memory input cache would take {_gib(cache)}, more than "
                      f"this machine's {_gib(memory)}", "servers", s,
                      "cache-entries-per-modality")
        owners: dict[tuple[str, int], int] = {}
        for s, server in enumerate(self.servers):
            for key in server.cache_entries_per_modality:
                if key != "default" and key not in known:
                    _fail(
                        f"unknown modality {key!r}", "servers", s, "cache-entries-per-modality", key
                    )
            for modality, streams in server.streams.items():
                if modality not in known:
                    _fail(f"unknown modality {modality!r}", "servers", s, "streams", modality)
                for group in streams:
                    if not 0 <= group < self.num_groups:
                        _fail(
                            f"group {group} is out of range: num-groups is {self.num_groups}",
                            "servers",
                            s,
                            "streams",
                            modality,
                            str(group),
                        )
                    other = owners.setdefault((modality, group), s)
                    if other != s:
                        _fail(
                            f"group {group} is also read by servers[{other}] "
                            f"({self.servers[other].name!r})",
                            "servers",
                            s,
                            "streams",
                            modality,
                            str(group),
                        )
        self._listed = {m: {} for m in self.modality_names}
        for (modality, group), s in owners.items():
            self._listed[modality][group] = s
        for i, modality in enumerate(self.data_modalities):
            if modality.use_synthetic_data or modality.impl == LIVE_READER:
                continue  # live streams have default keys (serif:in:<modality>:<group>)
            listed = self._listed[modality.name]
            if len(listed) < self.num_groups:
                _fail(
                    "is false, but no server has a stream for group(s) "
                    f"{_gaps(listed, self.num_groups)} "
                    f"under streams.{modality.name}",
                    "data-modalities",
                    i,
                    "use-synthetic-data",
                )
        return self


# --------------------------------------------------------------------------------------
# The whole configuration
# --------------------------------------------------------------------------------------


class SerifConfig(_Frozen):
    """The three files, validated against each other. Build it with :func:`load_config`.

    ``sources`` maps "system"/"application"/"data" to the file each came from (empty when
    built from dicts).
    """

    system: SystemConfig
    apps: tuple[Application, ...] = Field(min_length=1)
    data: DataConfig
    sources: _frozen_dict(dict[str, Path]) = FrozenDict()

    # -- lookups ---------------------------------------------------------------------------

    def app(self, name: str) -> Application:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(f"unknown application {name!r}")

    def model(self, app_name: str, model_name: str) -> ModelProfile:
        for model in self.app(app_name).model_profiles:
            if model.name == model_name:
                return model
        raise KeyError(f"application {app_name!r} has no model {model_name!r}")

    def peek_modality(self, app: Application) -> str:
        """The modality SneakPeek looks at: configured, else the app's smallest input."""
        if app.sneakpeek.modality:
            return app.sneakpeek.modality
        return min(sorted(app.modalities),
                   key=lambda m: math.prod(self.modality(m).synthetic_shape))

    def modality(self, name: str) -> Modality:
        for modality in self.data.data_modalities:
            if modality.name == name:
                return modality
        raise KeyError(f"unknown modality {name!r}")

    def server(self, name: str) -> Server:
        for server in self.data.servers:
            if server.name == name:
                return server
        raise KeyError(f"unknown server {name!r}")

    @property
    def node_names(self) -> tuple[str, ...]:
        """Compute nodes, in config order (the Dask workers that run models)."""
        return self.system.node_names

    @property
    def server_names(self) -> tuple[str, ...]:
        """Request-generating servers, in config order (the Dask workers that read data)."""
        return self.data.server_names

    @property
    def groups(self) -> range:
        return range(self.data.num_groups)

    def group_server(self, group: int, modality: str) -> str:
        """The server that reads ``group``'s input of ``modality``."""
        return self.data.servers[self.data.reader_index(group, modality)].name

    def groups_of(self, server: str, modality: str) -> tuple[int, ...]:
        """The groups whose ``modality`` input ``server`` reads, ascending."""
        if server not in self.server_names:
            raise KeyError(f"unknown server {server!r}")
        owners = self.data.reader_indices(modality)
        return tuple(np.flatnonzero(owners == self.server_names.index(server)).tolist())

    def to_json_dicts(self, *, include_secrets: bool = False) -> dict[str, dict[str, Any]]:
        """The three files as JSON-ready dicts with SERIF's keys (loadable again).

        The Redis password is left out unless ``include_secrets``.
        """
        system = self.system.model_dump(mode="json", by_alias=True)
        if not include_secrets:
            system["redis"].pop("password", None)
        return {
            "system": system,
            "application": {
                "applications": [a.model_dump(mode="json", by_alias=True) for a in self.apps]
            },
            "data": self.data.model_dump(mode="json", by_alias=True),
        }

    def without_secrets(self) -> SerifConfig:
        """This config with no Redis password: what the scheduler (and any client that asks
        it) may hold. Workers get the password in their ``RedisCredentials`` plugin."""
        redis = self.system.redis
        if redis is None or redis.password is None:
            return self
        system = self.system.model_copy(update={"redis": redis.model_copy(
            update={"password": None})})
        return self.model_copy(update={"system": system})

    # -- cross-file checks -----------------------------------------------------------------

    @model_validator(mode="after")
    def _check(self) -> SerifConfig:
        modalities = self.data.modality_names
        for i, first in _duplicates([a.name for a in self.apps]):
            _fail(
                f"duplicate name {self.apps[i].name!r} (also applications[{first}])",
                "applications",
                i,
                "name",
                file="application",
            )
        runs_on: dict[str, dict[str, str]] = {
            m: {} for m in modalities
        }  # modality -> node -> model
        apps = []
        for a, app in enumerate(self.apps):
            profiles = []
            for j, model in enumerate(app.model_profiles):
                at = ("applications", a, "model-profiles", j)
                if model.modality not in modalities:
                    _fail(
                        f"unknown modality {model.modality!r}; data.json defines: "
                        f"{', '.join(modalities)}",
                        *at,
                        "modality",
                        file="application",
                    )
                latencies = self._by_node(model.latencies, (*at, "latencies"), "application")
                for node in latencies:
                    runs_on[model.modality].setdefault(node, f"{app.name}/{model.name}")
                profiles.append(model.model_copy(update={"latencies": latencies}))
            apps.append(app.model_copy(update={"model_profiles": tuple(profiles)}))
        data_modalities = []
        for i, modality in enumerate(self.data.data_modalities):
            at = ("data-modalities", i, "retrieval-latencies")
            retrieval = self._by_node(modality.retrieval_latencies, at, "data")
            for node, model in runs_on[modality.name].items():
                if node not in retrieval:
                    _fail(
                        f"missing compute node {node!r} (model {model} runs there)",
                        *at,
                        file="data",
                    )
            if modality.use_synthetic_data and modality.impl is None:
                classes = max((app.k for app in self.apps
                               if modality.name in {p.modality for p in app.model_profiles}),
                              default=0)
                if math.prod(modality.synthetic_shape) < classes:
                    _fail(f"synthetic samples of shape {list(modality.synthetic_shape)} cannot "
                          f"hold {classes} classes (fewer elements than classes)",
                          "data-modalities", i, "synthetic-shape", file="data")
            if modality.impl == LIVE_READER and not self.system.redis_nodes:
                _fail(
                    f"modality {modality.name!r} reads live Redis streams, which needs "
                    "redis-nodes in system.json (the embedded Redis has no producer)",
                    "data-modalities",
                    i,
                    "impl",
                    file="data",
                )
            data_modalities.append(modality.model_copy(update={"retrieval_latencies": retrieval}))
        # Latencies keyed by node type hold, once loaded, one entry per node of that type
        # (a frozen model: ``object.__setattr__``, as Application fills in its defaults).
        object.__setattr__(self, "apps", tuple(apps))
        data = self.data.model_copy(update={"data_modalities": tuple(data_modalities)})
        data._listed = self.data._listed
        object.__setattr__(self, "data", data)
        return self

    def _by_node(self, entries: Mapping[str, Any], at: tuple[str | int, ...],
                 file: str) -> FrozenDict:
        """``entries`` keyed by node name or node type, as one entry per compute node.

        A node takes the entry under its own name, else the one under its type.
        """
        system = self.system
        names, types = set(system.node_names), set(system.node_types)
        for key in entries:
            if key not in names and key not in types:
                known = ", ".join(system.node_names)
                extra = sorted(types - names)
                if extra:
                    known += f" (types: {', '.join(extra)})"
                _fail(f"unknown compute node {key!r}; system.json defines: {known}",
                      *at, key, file=file)
        out = {}
        for node in system.compute_nodes:
            if node.name in entries:
                out[node.name] = entries[node.name]
            elif node.node_type in entries:
                out[node.name] = entries[node.node_type]
        return FrozenDict(out)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _read_json(path: Path, file: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(file, _TOP, f"file not found: {path}", path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, _TOP, f"not UTF-8 text ({exc.reason})", path) from None
    except OSError as exc:
        raise ConfigError(file, _TOP, f"cannot read {path}: {exc.strerror}", path) from None
    return _parse_json(text, file, path)


def _parse_json(text: str, file: str, source: Path | None = None) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ConfigError(file, where, f"invalid JSON: {exc.msg}", source) from None
    if not isinstance(raw, dict):
        raise ConfigError(file, _TOP, f"expected a JSON object, got {_show(raw)}", source)
    return raw


def _kind_of(raw: Mapping[str, Any], file: str, source: Path) -> str:
    kinds = {kind for key, kind in _KIND_KEYS.items() if key in raw}
    if len(kinds) != 1:
        keys = ", ".join(f"{key!r} ({kind})" for key, kind in _KIND_KEYS.items())
        what = "several" if kinds else "none"
        raise ConfigError(
            file,
            _TOP,
            f"cannot tell which config this is: it has {what} of the keys {keys}",
            source,
        )
    return kinds.pop()


def _locate(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    """Map each kind to its file: one directory, or three files recognised by content."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    items = [Path(p) for p in items]
    if len(items) == 1 and not items[0].exists():
        raise ConfigError(str(items[0]), _TOP, "no such file or directory", items[0])
    if len(items) == 1 and items[0].is_dir():
        folder = items[0]
        standard = {kind: folder / name for kind, name in DEFAULT_FILE_NAMES.items()}
        if all(p.is_file() for p in standard.values()):
            return standard
        candidates = sorted(folder.glob("*.json"))
        if len(candidates) != 3:
            missing = next(p for p in standard.values() if not p.is_file())
            raise ConfigError(
                missing.name,
                _TOP,
                f"file not found in {folder} (expected "
                "system.json, application.json and data.json)",
                missing,
            )
        items = candidates
    if len(items) != 3:
        raise ConfigError(
            ", ".join(str(p) for p in items) or "(no paths)",
            _TOP,
            "expected a directory or three files (system, application, data)",
        )
    found: dict[str, Path] = {}
    for path in items:
        kind = _kind_of(_read_json(path, path.name), path.name, path)
        if kind in found:
            raise ConfigError(
                path.name, _TOP, f"a second {kind} config (the first is {found[kind]})", path
            )
        found[kind] = path
    return found


def load_config(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    simulate: bool = False,
    check_files: bool = True,
) -> SerifConfig:
    """Read and validate a SERIF configuration.

    ``paths`` is a directory holding ``system.json``, ``application.json`` and ``data.json``
    (or exactly three ``*.json`` files of any names), or the three files in any order.

    ``simulate`` turns every model into profile mode and every modality into synthetic data,
    so weights, Redis keys and streams are neither needed nor checked. ``check_files``
    checks that weights, stream and TLS files exist; relative paths in the config are taken
    relative to the file that names them and returned absolute.

    Raises :class:`ConfigError` (one line: file, JSON path, message) on any problem.
    """
    files = _locate(paths)
    raws = {kind: _read_json(path, path.name) for kind, path in files.items()}
    return load_config_dicts(
        raws["system"],
        raws["application"],
        raws["data"],
        simulate=simulate,
        check_files=check_files,
        sources=files,
    )


def load_config_dicts(
    system: Mapping[str, Any],
    application: Mapping[str, Any],
    data: Mapping[str, Any],
    *,
    simulate: bool = False,
    check_files: bool = False,
    sources: Mapping[str, Path] | None = None,
) -> SerifConfig:
    """Validate already-parsed config dicts (as from ``json.load``) into a SerifConfig.

    ``sources`` ("system"/"application"/"data" -> Path) names the files in errors and
    anchors relative paths; without it, errors say ``system.json`` etc. and relative paths
    are kept as they are.
    """
    sources = dict(sources or {})
    names = {
        kind: sources[kind].name if kind in sources else DEFAULT_FILE_NAMES[kind] for kind in KINDS
    }
    context = {"simulate": simulate}
    raws = {"system": system, "application": application, "data": data}
    for kind, raw in raws.items():
        if not isinstance(raw, Mapping):
            raise ConfigError(
                names[kind], _TOP, f"expected a JSON object, got {_show(raw)}", sources.get(kind)
            )
    kind = "system"
    try:
        system_cfg = SystemConfig.model_validate(system, context=context)
        kind = "application"
        apps = _ApplicationFile.model_validate(application, context=context).applications
        kind = "data"
        data_cfg = DataConfig.model_validate(data, context=context)
        kind = "config"
        config = SerifConfig(system=system_cfg, apps=apps, data=data_cfg, sources=sources)
    except ValidationError as exc:
        raise _convert(exc, names, kind, sources) from None
    config = _anchor_paths(config, sources)
    if check_files:
        _check_files(config, raws, names, sources)
    for i, app in enumerate(config.apps):
        if app.sneakpeek.belief == "filter" and "memory" in app.sneakpeek.model_fields_set:
            logger.warning(
                "%s: applications[%d].sneakpeek.memory: ignored: it applies to belief "
                "\"dirichlet\" only; the forward filter carries beliefs by persistence",
                names["application"], i)
    return config


def _is_url(value: str) -> bool:
    return "://" in value


def _anchor(value: str | None, source: Path | None) -> str | None:
    if value is None or source is None or _is_url(value) or os.path.isabs(value):
        return value
    return str((source.parent / os.path.expanduser(value)).resolve())


def _file_streams(modality: Modality) -> bool:
    # A custom reader defines what its stream identifiers mean; the default readers read files.
    return modality.impl is None


def _anchor_paths(config: SerifConfig, sources: Mapping[str, Path]) -> SerifConfig:
    """Make relative file paths absolute, relative to the file that names them."""
    if not sources:
        return config
    app_src, data_src, sys_src = (sources.get(k) for k in ("application", "data", "system"))
    apps = tuple(
        app.model_copy(
            update={
                "model_profiles": tuple(
                    m.model_copy(update={"weights": _anchor(m.weights, app_src)})
                    for m in app.model_profiles
                )
            }
        )
        for app in config.apps
    )
    file_modalities = {m.name for m in config.data.data_modalities if _file_streams(m)}
    servers = tuple(
        s.model_copy(
            update={
                "streams": FrozenDict(
                    {
                        modality: FrozenDict({g: _anchor(p, data_src) for g, p in groups.items()})
                        if modality in file_modalities
                        else groups
                        for modality, groups in s.streams.items()
                    }
                )
            }
        )
        for s in config.data.servers
    )
    redis = config.system.redis
    redis = redis.model_copy(
        update={
            key: _anchor(getattr(redis, key), sys_src)
            for key in ("tls_ca_file", "tls_cert_file", "tls_key_file")
        }
    )
    return config.model_copy(
        update={
            "apps": apps,
            "data": config.data.model_copy(update={"servers": servers}),
            "system": config.system.model_copy(update={"redis": redis}),
        }
    )


def _check_files(
    config: SerifConfig,
    raws: Mapping[str, Mapping[str, Any]],
    names: Mapping[str, str],
    sources: Mapping[str, Path],
) -> None:
    """Weights of non-profile models, streams of real-data modalities, TLS files must exist."""

    def missing(value: str) -> bool:
        return not _is_url(value) and not Path(value).expanduser().exists()

    redis = config.system.redis
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(redis, key)
        if value and missing(value):
            raise ConfigError(
                names["system"],
                f"redis.{key.replace('_', '-')}",
                f"file not found: {value}",
                sources.get("system"),
            )
    for a, app in enumerate(config.apps):
        for j, model in enumerate(app.model_profiles):
            if model.use_profile or not model.weights or not missing(model.weights):
                continue
            raw = raws["application"]["applications"][a]["model-profiles"][j]
            key = next(
                (k for k in ("model-weights", "model-data", "weights") if k in raw), "model-weights"
            )
            path = _json_path(("applications", a, "model-profiles", j, key))
            raise ConfigError(
                names["application"],
                path,
                f"file not found: {model.weights}",
                sources.get("application"),
            )
    real = {
        m.name for m in config.data.data_modalities if not m.use_synthetic_data and _file_streams(m)
    }
    seen: set[str] = set()
    for s, server in enumerate(config.data.servers):
        for modality, streams in server.streams.items():
            if modality not in real:
                continue
            for group, value in streams.items():
                if value in seen:
                    continue
                if missing(value):
                    path = _json_path(("servers", s, "streams", modality, str(group)))
                    raise ConfigError(
                        names["data"], path, f"file not found: {value}", sources.get("data")
                    )
                seen.add(value)
