"""The functions a tick graph runs on workers: read, fit, peek and score.

They are module-level functions so Dask pickles them by reference. Each returns small
plain objects: samples stay on the node that read them (see :mod:`serif_dask.inputs`),
and only labels, class scores, predictions and timings travel through Dask.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from serif_dask.config import Application, SerifConfig
from serif_dask.worker import current_plugin

logger = logging.getLogger("serif_dask.tasks")

T = TypeVar("T")


@dataclass(frozen=True)
class ReadResult:
    """One (server, modality) read of a tick: who holds the samples, and the labels."""

    app: str
    modality: str
    server: str
    tick: int
    worker: str  # address of the data worker holding the samples
    node: str  # its shared-memory node
    groups: np.ndarray  # int (n,)
    labels: np.ndarray  # int (n,), -1 unknown
    errors: dict[int, str] = field(default_factory=dict)  # group -> reason
    input_key: str | None = None  # samples kept in the data worker's memory, for peeks
    refs: tuple | None = None  # per group: SlotRef in the node's shared-memory cache
    #: The samples themselves, rows aligned with ``groups``: an ad-hoc request carries
    #: its input in the score task instead of a cache slot.
    samples: np.ndarray | None = None


def _app(config: SerifConfig, name: str) -> Application:
    for app in config.apps:
        if app.name == name:
            return app
    raise KeyError(name)


#: Readers kept per (app, modality, server): one per config they were opened from, so that
#: an older version's late read and the newest version's reads do not reopen in turn.
READERS_KEPT = 2


def _reader(plugin: Any, config: SerifConfig, app: str, modality: str, server: str) -> Any:
    """The reader of (app, modality, server) under ``config``; opened again when a config
    version changed what it is opened from (the modality, the application, the server or
    the number of groups)."""
    from serif_dask.readers import get_reader

    key = (app, modality, server)
    app_cfg = _app(config, app)
    server_cfg = next((s for s in config.data.servers if s.name == server), None)
    source = (config.modality(modality), app_cfg.model_copy(update={"model_profiles": ()}),
              server_cfg, config.data.num_groups)
    with plugin.lock:
        opened = plugin.readers.setdefault(key, [])
        for made_from, reader in opened:
            if made_from == source:
                return reader
    reader = get_reader(config.modality(modality), app_cfg, server_cfg, plugin.seed)
    with plugin.lock:
        opened = plugin.readers.setdefault(key, [])
        opened.append((source, reader))
        del opened[:-READERS_KEPT]
    return reader


def isolate(
    call: Callable[[np.ndarray], T], n: int, first: Exception, budget: int | None = None
) -> tuple[list[tuple[np.ndarray, T]], dict[int, Exception]]:
    """After ``call(all n positions)`` raised ``first``, bisect to the positions that raise.

    One bad request in a batch should fail alone, not take the batch down. Bisection finds
    b bad positions in about ``2·b·log2(n)`` calls; the budget (default ``4·log2(n)``)
    bounds the cost when everything raises, and a sub-batch still failing when it runs out
    fails whole. Returns ``([(positions, result), ...], {position: exception})``.
    """
    if budget is None:
        budget = 4 * max(1, math.ceil(math.log2(max(n, 2))))
    done: list[tuple[np.ndarray, T]] = []
    failed: dict[int, Exception] = {}
    todo: list[tuple[np.ndarray, Exception]] = [(np.arange(n), first)]
    while todo:
        idx, exc = todo.pop()
        if idx.size <= 1 or budget < 2:
            failed.update(dict.fromkeys(idx.tolist(), exc))
            continue
        for half in np.array_split(idx, 2):
            budget -= 1
            try:
                done.append((half, call(half)))
            except Exception as sub:
                todo.append((half, sub))
    return done, failed


def _contract_problem(
    samples: Any, labels: Any, n: int, shape: tuple[int, ...] | None, with_samples: bool
) -> str | None:
    """Why a reader's output for ``n`` groups breaks the reader contract (None: it does not)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        return f"reader gave labels of shape {list(labels.shape)} for {n} groups"
    if labels.dtype.kind not in "iu" and not (
        labels.dtype.kind == "f" and np.all(np.isfinite(labels))
        and np.all(labels == np.round(labels))
    ):
        return f"reader gave labels of type {labels.dtype}, expected integers"
    if not with_samples:
        return None
    samples = np.asarray(samples)
    if samples.dtype.kind not in "biuf":
        return f"reader gave samples of type {samples.dtype}, expected numbers"
    if samples.ndim < 1 or samples.shape[0] != n:
        return f"reader gave samples of shape {list(samples.shape)} for {n} groups"
    if shape is not None and tuple(samples.shape[1:]) != shape:
        return (f"sample shape {list(samples.shape[1:])} from the reader, expected "
                f"{list(shape)} (synthetic-shape)")
    return None


def _call_reader(
    reader: Any, groups: np.ndarray, tick: int, with_samples: bool,
    shape: tuple[int, ...] | None, k: int, out: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
    """Read through the reader contract; per-group failures come back in ``errors``.

    A reader that raises is bisected (:func:`isolate`), so a group that makes it raise fails
    alone; output that breaks the contract (shape, labels) fails its groups ``bad-input``.
    With ``out`` (reserved shared-memory slots, one row per group) the reader writes its
    samples straight into it and ``out`` is returned as the samples: no copy.
    """
    n = len(groups)
    use_labels = not with_samples and hasattr(reader, "labels")

    def call(idx: np.ndarray) -> tuple[Any, Any, dict[Any, Any]]:
        if use_labels:
            return None, reader.labels(groups[idx], tick), {}
        if out is None:
            res = reader.read(groups[idx], tick)
        else:  # bisection halves are runs of positions: a slice of the rows
            res = reader.read(groups[idx], tick, out=out[idx[0] : idx[-1] + 1])
        return res.samples, res.labels, dict(res.errors)

    try:
        parts, failed = [(np.arange(n), call(np.arange(n)))], {}
    except Exception as exc:
        parts, failed = isolate(call, n, exc)
    labels = np.full(n, -1, dtype=np.int64)
    errors = {int(groups[i]): _reason(exc) for i, exc in failed.items()}
    samples: np.ndarray | None = None
    want = with_samples and not use_labels
    for idx, (part, part_labels, part_errors) in parts:
        problem = _contract_problem(part, part_labels, idx.size, shape, want)
        if problem is None and want:
            part = np.asarray(part, dtype=np.float32)
            if samples is None:  # the reader's own array when one call read them all
                samples = out if out is not None else part if idx.size == n else np.zeros(
                    (n, *part.shape[1:]), dtype=np.float32)
            if samples.shape[1:] != part.shape[1:]:
                problem = f"sample shapes {list(samples.shape[1:])} and {list(part.shape[1:])} mix"
            elif not _same_memory(part, samples[idx[0] : idx[-1] + 1]):
                samples[idx] = part
        if problem is not None:
            errors.update(dict.fromkeys(groups[idx].tolist(), f"bad-input: {problem}"))
            continue
        part_labels = np.asarray(part_labels).astype(np.int64)
        out_of_range = (part_labels < -1) | (part_labels >= k)
        for g, label in zip(groups[idx][out_of_range].tolist(),
                            part_labels[out_of_range].tolist(), strict=True):
            errors[int(g)] = f"bad-input: label {label} outside -1 .. {k - 1}"
        labels[idx] = np.where(out_of_range, -1, part_labels)
        errors.update({int(g): _group_reason(r) for g, r in part_errors.items()})
    if want and samples is None:
        samples = out if out is not None else np.zeros((n, *(shape or ())), dtype=np.float32)
    return samples, labels, errors


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` is ``b``'s very memory (a reader that filled ``out`` and returned it)."""
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _nonfinite_rows(samples: np.ndarray) -> np.ndarray:
    """Rows holding a NaN or inf, in one pass without a temporary: a row whose sum is
    finite has neither, and only rows with a non-finite sum (or an overflow) are checked
    element by element."""
    flat = samples.reshape(len(samples), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = ~np.isfinite(flat.sum(axis=1))
    bad = np.zeros(len(samples), dtype=bool)
    if suspect.any():
        bad[suspect] = ~np.isfinite(flat[suspect]).all(axis=1)
    return bad


def _reason(exc: BaseException) -> str:
    return f"reader-error: {type(exc).__name__}: {exc}".splitlines()[0][:200]


#: A failure reason already starts with its kind (``bad-input: ...``); see INTERNALS.md.
_KIND = re.compile(r"^[a-z]+(?:-[a-z]+)*:")


def _group_reason(reason: object) -> str:
    """A reader's own reason for a group, filed under ``reader-error`` unless it has a kind."""
    text = " ".join(str(reason).split()) or "read failed"
    if not _KIND.match(text):
        text = f"reader-error: {text}"
    return text[:200]


def read_task(
    run_id: str, app: str, modality: str, server: str, groups: list[int], tick: int,
    peek: bool, share: bool, version: int | None = None,
) -> ReadResult:
    """Read one sample per group; keep samples for the peek, share them for scoring."""
    from serif_dask import dataplane

    plugin = current_plugin()
    config = plugin.ensure_run(run_id, version)
    reader = _reader(plugin, config, app, modality, server)
    group_arr = np.asarray(groups, dtype=np.int64)
    shape = config.modality(modality).synthetic_shape
    # A reader that takes out= renders straight into reserved shared-memory slots.
    reservation = None
    if share:
        cache = dataplane.shm_cache(plugin, config, modality, server)
        reservation = dataplane.reserve_samples(cache, reader, len(group_arr))
    input_key = refs = None
    try:
        samples, labels, errors = _call_reader(
            reader, group_arr, tick, peek or share, tuple(shape) if shape else None,
            len(_app(config, app).prior), out=reservation.array if reservation else None,
        )
        if samples is not None:
            for g in group_arr[_nonfinite_rows(samples)]:
                errors.setdefault(int(g), "bad-input: sample holds NaN or inf")
            if peek:  # a view of the slots when reserved: peek_task re-checks them
                input_key = plugin.inputs.put((run_id, app, modality, server, tick), samples)
            if share:
                refs = tuple(dataplane.put_samples(
                    plugin, config, modality, server, samples, group_arr, errors, reservation))
    finally:
        if reservation is not None:
            reservation.abort()  # no-op once committed
    return ReadResult(
        app=app, modality=modality, server=server, tick=tick,
        worker=plugin.worker.address if plugin.worker else "", node=plugin.node,
        groups=group_arr, labels=labels, errors=errors, input_key=input_key, refs=refs,
    )


def export_task(read: ReadResult, groups: list[int], ttl_s: float) -> dict[int, str]:
    """On the data worker: put inputs bound for another node into Redis."""
    from serif_dask import dataplane

    return dataplane.export_inputs(current_plugin(), read, groups, ttl_s)


def fit_task(run_id: str, app: str, modality: str, server: str, n: int = 256) -> Any:
    """Fit the application's SneakPeek estimator (a
    :class:`~serif_dask.sneakpeek.CalibratedEstimator`) on labelled calibration data: from
    the reader named in ``sneakpeek.calibration``, else the modality's own reader.

    Without such data it is the prior, whose ``reason`` the driver prints (the warning is
    not repeated from the worker)."""
    from serif_dask import sneakpeek
    from serif_dask.readers import reader_class

    plugin = current_plugin()
    config = plugin.ensure_run(run_id)
    app_cfg = _app(config, app)
    source = app_cfg.sneakpeek.calibration
    if source:
        server_cfg = next((s for s in config.data.servers if s.name == server), None)
        reader = reader_class(source)(config.modality(modality), app_cfg, server_cfg,
                                      plugin.seed)
    else:
        reader = _reader(plugin, config, app, modality, server)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*SneakPeek uses the prior")
        return sneakpeek.calibrate(app_cfg, reader, n)


def warm_data_task(
    run_id: str, app: str, server: str, first_group: dict[str, int],
    estimator: Any = None, peek_modality: str | None = None, version: int | None = None,
) -> list[str]:
    """Before the first tick: open this server's readers and peek once.

    A reader's first read pays for its imports and data set loading (seconds for a real
    data set), the estimator's first call for its own; paid here, they are not paid by the
    first tick's requests. Nothing is kept: the sample read is thrown away. Returns the
    steps done.
    """
    plugin = current_plugin()
    config = plugin.ensure_run(run_id, version)
    app_cfg = _app(config, app)
    done = []
    for modality, group in first_group.items():
        reader = _reader(plugin, config, app, modality, server)
        shape = config.modality(modality).synthetic_shape
        samples, _, errors = _call_reader(
            reader, np.asarray([group], dtype=np.int64), 0, True,
            tuple(shape) if shape else None, len(app_cfg.prior),
        )
        done.append(f"read {modality}")
        if estimator is not None and modality == peek_modality and not errors:
            estimator.scores(samples)
            done.append(f"peek {modality}")
    return done


def warm_models_task(run_id: str, version: int | None = None,
                     only: list[str] | None = None) -> list[str]:
    """Before the first tick: load every real model of the run into this worker's cache
    (as far as ``model-cache-bytes`` allows) and run one forward on zeros.

    Returns the models warm here afterwards, for the driver to report to the scheduler
    plugin before the first plan (so that plans do not depend on when a report lands).
    """
    from serif_dask import dataplane

    plugin = current_plugin()
    config = plugin.ensure_run(run_id, version)
    for app in config.apps:
        for profile in app.model_profiles:
            if profile.use_profile or (only is not None
                                       and f"{app.name}/{profile.name}" not in only):
                continue
            model, _ = dataplane.load_model(plugin, app, profile)
            shape = config.modality(profile.modality).synthetic_shape
            dataplane.forward(model, np.zeros((1, *shape), dtype=np.float32))
    with plugin.lock:
        return plugin.models.names()


def peek_task(read: ReadResult, estimator: Any, k: int) -> dict[str, Any]:
    """Class scores for every group read, from the samples kept on this node."""
    plugin = current_plugin()
    samples = plugin.inputs.pop(read.input_key) if read.input_key else None
    ok = np.asarray([int(g) not in read.errors for g in read.groups], dtype=bool)
    scores = np.full((len(read.groups), k), np.nan)
    if samples is not None and ok.any():
        scores[ok] = estimator.scores(samples if ok.all() else samples[ok])
        # Samples shared in place are views of cache slots: a slot reused meanwhile held
        # another group's data, so that estimate is dropped (the plan uses the prior).
        from serif_dask import dataplane

        stale = dataplane.stale_rows(plugin, read)
        ok &= ~stale
        scores[stale] = np.nan
    return {"groups": read.groups, "scores": scores, "ok": ok, "labels": read.labels,
            "errors": dict(read.errors)}


def score_task(
    run_id: str, app: str, model: str, groups: list[int], reads: list[ReadResult],
    tick: int, exports: list[dict[int, str]] | None = None, version: int | None = None,
) -> dict[str, Any]:
    """Run one model over its batch of groups on this (GPU) worker, in profile mode or real."""
    from serif_dask.models.profile import ProfileModel

    plugin = current_plugin()
    config = plugin.ensure_run(run_id, version)
    app_cfg = _app(config, app)
    profile = next(p for p in app_cfg.model_profiles if p.name == model)
    worker_name = str(plugin.worker.name) if plugin.worker else ""
    group_arr = np.asarray(groups, dtype=np.int64)
    started = time.time()

    labels = np.full(len(group_arr), -1, dtype=np.int64)
    errors: dict[int, str] = {}
    remote = False
    for read in reads:
        pos = np.searchsorted(read.groups, group_arr)
        pos = np.minimum(pos, max(len(read.groups) - 1, 0))
        hit = (read.groups[pos] == group_arr) if len(read.groups) else np.zeros(0, bool)
        labels[hit] = read.labels[pos[hit]]
        remote |= bool(hit.any()) and read.node != plugin.node
        for g in group_arr[hit]:
            if int(g) in read.errors:
                errors[int(g)] = read.errors[int(g)]

    if not profile.use_profile:
        return _score_real(plugin, app_cfg, profile, group_arr, labels, errors, reads,
                           exports or [], started, worker_name)
    latency = profile.latencies.get(worker_name)
    if latency is None:
        raise RuntimeError(f"serif: model {model} has no latency profile for node {worker_name}")
    t_infer, t_switch = latency
    cache_name = f"{app}/{model}"
    setup = 0.0
    if cache_name not in plugin.models:
        setup += t_switch
    if remote:
        setup += config.modality(profile.modality).retrieval_latencies.get(worker_name, 0.0)
    ok = np.asarray([int(g) not in errors for g in group_arr], dtype=bool)
    # The profile's latency is per request: request k of the batch is done after the
    # shared set-up (context switch, retrieval) and k + 1 inferences.
    done_after = setup + t_infer * np.cumsum(ok)
    delay = float(done_after[-1]) if len(done_after) else 0.0
    if delay > 0:
        time.sleep(delay)
    if cache_name not in plugin.models:
        plugin.report_warm(cold=plugin.models.put(cache_name, "profile", 0))
    else:
        plugin.models.get(cache_name)

    app_index = [a.name for a in config.apps].index(app)
    model_index = [p.name for p in app_cfg.model_profiles].index(model)
    simulator = ProfileModel(
        np.asarray(profile.cmat, dtype=float), np.asarray(app_cfg.prior, dtype=float),
        stream=app_index * 1009 + model_index,
    )
    pred = simulator.predict(labels, group_arr, tick, plugin.seed)
    pred[~ok] = -1
    finished = started + done_after
    return {
        "groups": group_arr,
        "pred": pred,
        "labels": labels,
        "ok": ok,
        "errors": errors,
        "start": started,
        "finish": finished,
        "worker": worker_name,
        "model": model,
    }


def _score_real(
    plugin: Any, app_cfg: Application, profile: Any, groups: np.ndarray, labels: np.ndarray,
    errors: dict[int, str], reads: list[ReadResult], exports: list[dict[int, str]],
    started: float, worker_name: str,
) -> dict[str, Any]:
    """A real model: inputs from shared memory (or Redis), one batched forward."""
    from serif_dask import dataplane

    inputs = dataplane.gather_inputs(plugin, groups, reads, exports, errors)
    ok = np.asarray([int(g) not in errors for g in groups], dtype=bool)
    pred = np.full(len(groups), -1, dtype=np.int64)
    served_by = profile  # a warm fallback when this model's weights cannot be loaded
    try:
        if inputs.samples is not None and ok.any():
            try:
                model, served_by = dataplane.load_or_fallback(plugin, app_cfg, profile)
            except Exception as exc:  # Redis down, weights missing or corrupted
                reason = f"weights-unavailable: {type(exc).__name__}: {exc}"
                errors.update({int(g): reason.splitlines()[0][:200] for g in groups[ok]})
            else:
                _forward_isolating(dataplane, model, inputs.samples, groups, ok, pred, errors,
                                   len(app_cfg.prior))
            # inputs read zero-copy are valid only if their slot was not reused meanwhile
            for r in inputs.stale():
                errors[int(groups[r])] = dataplane.STALE
                pred[r] = -1
            ok = np.asarray([int(g) not in errors for g in groups], dtype=bool)
    finally:
        inputs.release()
    fetch_s = inputs.fetch_s
    return {
        "groups": groups,
        "pred": pred,
        "labels": labels,
        "ok": ok,
        "errors": errors,
        "start": started,
        "finish": time.time(),
        "worker": worker_name,
        "model": served_by.name,
        "retrieval_s": fetch_s,
    }


def _forward_isolating(
    dataplane: Any, model: Any, samples: np.ndarray, groups: np.ndarray, ok: np.ndarray,
    pred: np.ndarray, errors: dict[int, str], k: int,
) -> None:
    """One batched forward; when it raises, bisect so that only the requests that make it
    raise fail ``model-error``. Predictions outside ``0 .. k-1`` fail their request too."""
    rows = np.flatnonzero(ok)

    def call(idx: np.ndarray) -> np.ndarray:
        if idx.size == len(samples):  # the whole batch: no gathering copy
            return dataplane.forward(model, samples)
        return dataplane.forward(model, samples[rows[idx]])

    try:
        parts, failed = [(np.arange(rows.size), call(np.arange(rows.size)))], {}
    except Exception as exc:
        parts, failed = isolate(call, rows.size, exc)
    for i, exc in failed.items():
        reason = f"model-error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        errors[int(groups[rows[i]])] = reason
    for idx, out in parts:
        pred[rows[idx]] = out
        bad = (out < 0) | (out >= k)
        for r, p in zip(rows[idx][bad].tolist(), out[bad].tolist(), strict=True):
            errors[int(groups[r])] = f"model-error: prediction {p} outside 0 .. {k - 1}"
