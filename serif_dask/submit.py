"""Ad-hoc requests: one sample through the same peek → plan → score path as a tick.

:meth:`serif_dask.Serif.submit` checks the request on the client (:func:`check_request`)
and submits :func:`submit_task`, an ordinary Dask task, so the caller holds a real
``Future`` of the request's record. On a worker that task peeks at the sample with the
application's fitted SneakPeek estimator, asks the scheduler plugin's ``serif_plan`` handler
for a model and a worker (the plugin's policy, beliefs and worker bookings, as for a tick),
submits the tick path's own :func:`~serif_dask.tasks.score_task` pinned to that GPU
worker, with the sample carried inline, and returns the record, built by the same
:mod:`serif_dask.accounting` functions as a tick's. Every outcome is a record
(completed, dropped or failed with a reason); nothing waits without a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from distributed import wait, worker_client
from distributed.protocol.pickle import dumps, loads

from serif_dask.accounting import answered, missed, scored
from serif_dask.config import Application, SerifConfig
from serif_dask.records import Chunk
from serif_dask.tasks import ReadResult, _app, score_task
from serif_dask.wire import unpack
from serif_dask.worker import current_plugin

logger = logging.getLogger("serif_dask.submit")

#: Seconds past a request's last useful moment (2 × sla) its score task may still take.
GRACE_S = 30.0
#: How often a waiting request checks that its score worker is still there.
POLL_S = 1.0


def request_modalities(config: SerifConfig, app: Application) -> tuple[str, ...]:
    """The inputs a request of ``app`` carries: its models' modalities and the peeked one."""
    return tuple(sorted({p.modality for p in app.model_profiles} | {config.peek_modality(app)}))


def check_request(
    config: SerifConfig, app: str, group: Any, sample: Any, label: Any = None
) -> tuple[Application, int, dict[str, np.ndarray], int]:
    """Validate an ad-hoc request on the client; raise ``ValueError`` naming the problem.

    ``sample`` is one array, or a ``{modality: array}`` mapping when the application reads
    several modalities; each must have its modality's ``synthetic-shape`` and finite values.
    Returns (application, group, float32 samples per modality, label or -1).
    """
    names = [a.name for a in config.apps]
    if app not in names:
        raise ValueError(f"unknown application {app!r}; known: {', '.join(names)}")
    app_cfg = config.app(app)
    n = config.data.num_groups
    if isinstance(group, bool) or not isinstance(group, int | np.integer):
        raise ValueError(f"group must be an integer, got {type(group).__name__}")
    if not 0 <= int(group) < n:
        raise ValueError(f"group {int(group)} is out of range 0 .. {n - 1}")
    if label is None:
        label = -1
    elif isinstance(label, bool) or not isinstance(label, int | np.integer) or not (
        0 <= int(label) < app_cfg.k
    ):
        raise ValueError(f"label must be an integer in 0 .. {app_cfg.k - 1} or None, got {label!r}")
    mods = request_modalities(config, app_cfg)
    if isinstance(sample, Mapping):
        given = dict(sample)
        missing = [m for m in mods if m not in given]
        extra = [m for m in given if m not in mods]
        if missing or extra:
            raise ValueError(
                f"{app} takes samples of {', '.join(mods)}; "
                + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}")
            )
    elif len(mods) == 1:
        given = {mods[0]: sample}
    else:
        raise ValueError(f"{app} reads several modalities: give {{modality: sample}} for "
                         f"{', '.join(mods)}")
    samples = {}
    for mod, value in given.items():
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{mod} sample is not numeric") from None
        shape = tuple(config.modality(mod).synthetic_shape)
        if arr.shape != shape:
            raise ValueError(f"{mod} sample has shape {list(arr.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{mod} sample holds NaN or inf")
        samples[mod] = arr
    return app_cfg, int(group), samples, int(label)


def submit_task(
    run_id: str, app: str, group: int, samples: dict[str, np.ndarray], label: int,
    arrival: float, estimator: Any, request: str,
) -> dict[str, Any]:
    """Peek, plan and score one request; return its record (never raises for the request)."""
    plugin = current_plugin()
    tick = int(request[:7], 16)  # a fresh, reproducible draw for profile-mode predictions
    try:
        config = plugin.ensure_run(run_id)
        app_cfg = _app(config, app)
    except Exception as exc:  # the scheduler moved on to another run
        logger.warning("serif: ad-hoc request %s: %s", request, exc)
        return _unconfigured(app, group, label, arrival,
                             f"run-changed: {exc}".splitlines()[0][:200], request)
    groups, labels = np.asarray([group], dtype=np.int64), np.asarray([label], dtype=np.int64)
    version = plugin.version  # the run's config version; the plan says which it used

    def miss(outcome: str, reason: str, model: str = "", worker: str = "",
             pi: bytes | None = None) -> dict[str, Any]:
        return _record(missed(app_cfg, -1, groups, arrival, outcome, reason, model, worker,
                              labels, version=version), request, pi)

    scores = np.full((1, app_cfg.k), np.nan)
    if estimator is not None:
        try:
            peeked = samples[config.peek_modality(app_cfg)][None]
            scores[0] = np.asarray(estimator.scores(peeked), dtype=float)[0]
        except Exception:  # the plan falls back to the group's belief, as for a failed peek
            logger.warning("serif: peek of ad-hoc request %s failed", request, exc_info=True)

    with worker_client() as client:
        try:
            plan = client.sync(
                client.scheduler.serif_plan, app=app, tick=tick, groups=[group],
                arrival=[arrival], scores=dumps(scores),
                input_node={m: [plugin.node] for m in samples}, request=request, run_id=run_id,
            )
        except Exception as exc:
            reason = str(exc) if str(exc).startswith("run-changed") else f"submit-error: {exc}"
            return miss("failed", reason.splitlines()[0][:200])
        pi = plan["pi"]
        version = int(plan.get("version", version))
        if version != plugin.version:
            config = plugin.ensure_run(run_id, version)
            app_cfg = _app(config, app)
        if unpack(plan["dropped"], np.int64).size:
            return miss("dropped", plan["drop_reason"], pi=pi)
        if unpack(plan["answered"]["groups"], np.int64).size:  # from the peek, no GPU time
            prediction = unpack(plan["answered"]["prediction"], np.int64)[:1]
            return _record(answered(app_cfg, -1, arrival, time.time(), groups, labels,
                                    prediction, version), request, pi)
        batch = plan["batches"][0]
        profile = next(p for p in app_cfg.model_profiles if p.name == batch["model"])
        # The tick's own score task, with the sample carried inline instead of in a slot.
        read = ReadResult(
            app=app, modality=profile.modality, server="", tick=tick, worker="",
            node=plugin.node, groups=groups, labels=labels,
            samples=samples[profile.modality][None],
        )
        future = client.submit(
            score_task, run_id, app, batch["model"], [group], [read], tick, None, version,
            key=batch["key"], workers=[batch["worker"]], allow_other_workers=False,
            resources={"GPU": 1}, priority=int(round(batch["priority"] * 1000)), pure=False,
        )
        result, reason = _wait(client, future, batch["worker"],
                               time.time() + 2 * app_cfg.sla_latency + GRACE_S)
    if result is None:
        return miss("failed", reason, batch["model"], batch["worker"], pi)
    chunk, errors = scored(app_cfg, -1, arrival, result, version)
    if chunk is None:
        return miss("failed", errors.get(group, "model-error"), result["model"],
                    result["worker"], pi)
    return _record(chunk, request, pi)


def _wait(client: Any, future: Any, worker: str, deadline: float) -> tuple[Any, str]:
    """The score result, or (None, reason) when it erred, its worker left or time ran out."""
    while True:
        # Wait for the task's state, never with a timed-out gather: a gather given up
        # cancels the client's shared gather for every caller (see waiting.gathered).
        with contextlib.suppress(TimeoutError):
            wait(future, timeout=POLL_S)
        if future.done():
            try:
                return future.result(), ""
            except (Exception, asyncio.CancelledError) as exc:
                return None, f"model-error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        if worker not in client.nthreads():
            reason = "worker-lost"
        elif time.time() > deadline:
            reason = "submit-error: no result from the score task in time"
        else:
            continue
        future.cancel()
        return None, reason


def _record(chunk: Chunk, request: str, pi: bytes | None = None) -> dict[str, Any]:
    """The request's record: the JSONL fields (``tick`` is None), ``request`` and ``pi``."""
    record = next(chunk.rows())
    record["tick"] = None
    record["request"] = request
    if pi is not None:
        record["pi"] = [float(x) for x in np.asarray(loads(pi), dtype=float)[0]]
    return record


def _unconfigured(app: str, group: int, label: int, arrival: float, reason: str,
                  request: str) -> dict[str, Any]:
    """A failed request whose run (and so its application's config) is gone."""
    nan = np.asarray([np.nan])
    return _record(Chunk(
        app=app, tick=-1, model="", worker="", outcome="failed", group=np.asarray([group]),
        arrival=np.asarray([arrival]), finish=nan, prediction=np.asarray([-1]),
        label=np.asarray([label]), utility=np.zeros(1), deadline_met=np.zeros(1, bool),
        reason=[reason],
    ), request)
