"""Live reconfiguration: what a new config changes in a running run, and what it may not.

``serif-dask reconfigure`` and :meth:`serif_dask.Serif.reconfigure` send a new config, a
policy or data-awareness to the scheduler plugin's ``serif_reconfigure`` handler, which
makes it the run's next config *version*; the driver applies it at its next tick
boundary, and every record carries the version it was served under. What a live run
cannot take (its layout of compute nodes and data servers, its applications, what its
SneakPeek estimators were fitted on) is refused in one line, and the run goes on as it
was. :func:`diff` is that judgement, a pure function of two configs, run by the plugin;
:func:`reconfigure_async` is the client side: load and check the new config, push the
weights of new real models into the run's Redis, ask for the version, and wait until the
driver applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serif_dask.config import Application, ConfigError, ModelProfile, SerifConfig, load_config
from serif_dask.errors import ReconfigureRefused, RunFailed

logger = logging.getLogger("serif_dask.reconfigure")

#: System fields a live run cannot take: the cluster's layout, its Redis and what was
#: fixed when it started. ``scheduler-type`` and ``data-aware`` change the policy.
FIXED_SYSTEM = {
    "compute_nodes": "compute-nodes",
    "redis_nodes": "redis-nodes",
    "redis": "redis",
    "results_stream": "results-stream",
    "seed": "seed",
    "duration_in_secs": "duration-in-secs",
}
#: Application fields that change live (the others are fixed at the run's start: the
#: classes, the prior the beliefs start from, the SneakPeek estimator and beliefs).
LIVE_APP = {
    "sla_latency": "sla-latency",
    "sample_duration": "sample-duration",
    "utility_matrix": "utility-matrix",
    "miss_utility": "miss-utility",
}
#: SneakPeek settings that change live; the rest shaped the fitted estimator or beliefs.
LIVE_SNEAKPEEK = {"answer"}
#: Modality fields fixed for a live run: what its samples are (the fitted estimators and
#: the shared-memory input caches, sized at the start, depend on them).
FIXED_MODALITY = {
    "use_synthetic_data": "use-synthetic-data",
    "synthetic_shape": "synthetic-shape",
    "dtype": "dtype",
    "impl": "impl",
    "cache_entry_size": "cache-entry-size",
}


@dataclass(frozen=True)
class Change:
    """One difference between the run's newest config version and the proposed one."""

    path: str  # e.g. "policy", "applications[wakeword].sla-latency"
    old: Any
    new: Any

    def __str__(self) -> str:
        if self.old is None:
            return f"{self.path}: added"
        if self.new is None:
            return f"{self.path}: removed"
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class Proposal:
    """What a new config version would be: its changes, policy and data-awareness, and
    the real models (``app/model``) whose weights must be in the run's Redis first."""

    changes: tuple[Change, ...]
    policy: str
    policy_obj: Any = field(repr=False, compare=False)
    data_aware: bool
    push: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reconfigured:
    """The result of a live reconfiguration: the run's version afterwards, what changed
    (empty: nothing did, and the version stayed), and whether the driver applied it."""

    version: int
    changes: tuple[str, ...]
    applied: bool
    applied_at: float | None = None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _refuse(what: str) -> ReconfigureRefused:
    return ReconfigureRefused(f"reconfigure refused, the run goes on unchanged: {what}")


def diff(
    live: SerifConfig, new: SerifConfig, *, live_policy: str, live_data_aware: bool,
    policy: str | None = None, data_aware: bool | None = None, has_redis: bool = True,
) -> Proposal:
    """What ``new`` changes in a run under ``live``, or :class:`ReconfigureRefused`.

    ``policy``/``data_aware`` (the command line's) win; else a changed ``scheduler-type``
    or ``data-aware`` of the system config changes them, and an unchanged one keeps what
    the run uses (which may have come from the command line that started it).
    """
    from serif_dask.policies import get_policy

    changes: list[Change] = []
    if policy is None:
        changed = new.system.scheduler_type != live.system.scheduler_type
        policy = new.system.scheduler_type if changed else live_policy
    if data_aware is None:
        changed = new.system.data_aware != live.system.data_aware
        data_aware = new.system.data_aware if changed else live_data_aware
    try:
        policy_obj = get_policy(policy)
    except Exception as exc:
        raise _refuse(f"--policy {policy}: {exc}".splitlines()[0]) from None
    if policy != live_policy:
        changes.append(Change("policy", live_policy, policy))
    if bool(data_aware) != bool(live_data_aware):
        changes.append(Change("data-aware", bool(live_data_aware), bool(data_aware)))
    for attr, key in FIXED_SYSTEM.items():
        if getattr(live.system, attr) != getattr(new.system, attr):
            raise _refuse(f"system.json: {key} cannot change in a live run (the cluster "
                          "and what the run fixed at its start); start a new run")
    changes += _data_changes(live, new)
    push: list[str] = []
    live_apps = {a.name: a for a in live.apps}
    new_apps = {a.name: a for a in new.apps}
    if set(live_apps) != set(new_apps):
        added = sorted(set(new_apps) - set(live_apps))
        removed = sorted(set(live_apps) - set(new_apps))
        what = ", ".join([*(f"{a} added" for a in added), *(f"{a} removed" for a in removed)])
        raise _refuse(f"application.json: applications cannot be added or removed live "
                      f"({what}); start a new run")
    for name, old_app in live_apps.items():
        app_changes, app_push = _app_changes(live, new, old_app, new_apps[name], has_redis)
        changes += app_changes
        push += app_push
    return Proposal(changes=tuple(changes), policy=policy, policy_obj=policy_obj,
                    data_aware=bool(data_aware), push=tuple(push))


def _data_changes(live: SerifConfig, new: SerifConfig) -> list[Change]:
    changes = []
    old_data, new_data = live.data, new.data
    if old_data.server_names != new_data.server_names or any(
            a.model_copy(update={"streams": None}) != b.model_copy(update={"streams": None})
            for a, b in zip(old_data.servers, new_data.servers, strict=True)):
        raise _refuse("data.json: servers cannot change in a live run (their data workers "
                      "and input caches); start a new run")
    if old_data.num_groups != new_data.num_groups:
        changes.append(Change("num-groups", old_data.num_groups, new_data.num_groups))
    for old_s, new_s in zip(old_data.servers, new_data.servers, strict=True):
        if old_s.streams != new_s.streams:
            changes.append(Change(f"servers[{old_s.name}].streams", "...", "..."))
    old_mods = {m.name: m for m in old_data.data_modalities}
    new_mods = {m.name: m for m in new_data.data_modalities}
    for name in sorted(set(old_mods) | set(new_mods)):
        before, after = old_mods.get(name), new_mods.get(name)
        if before != after:
            path = f"data-modalities[{name}]"
            if before is None or after is None:
                changes.append(Change(path, before and name, after and name))
                continue
            for attr, key in FIXED_MODALITY.items():
                if getattr(before, attr) != getattr(after, attr):
                    raise _refuse(f"data.json: {path}.{key} cannot change in a live run "
                                  "(what its samples are); start a new run")
            changes.append(Change(path, "...", "changed"))
    return changes


def _app_changes(live: SerifConfig, new: SerifConfig, old: Application, app: Application,
                 has_redis: bool) -> tuple[list[Change], list[str]]:
    at = f"applications[{app.name}]"
    if old.k != app.k:
        raise _refuse(f"application.json: {at} has {app.k} classes, the run {old.k}; "
                      "start a new run")
    if old.prior != app.prior:
        raise _refuse(f"application.json: {at}.prior cannot change live (the beliefs start "
                      "from it); start a new run")
    for key, value in old.sneakpeek.model_dump().items():
        if key not in LIVE_SNEAKPEEK and getattr(app.sneakpeek, key) != value:
            raise _refuse(f"application.json: {at}.sneakpeek.{key} cannot change live (the "
                          "run's SneakPeek estimator and beliefs were made with it); start a "
                          "new run")
    if live.peek_modality(old) != new.peek_modality(app):
        raise _refuse(f"application.json: {at}: SneakPeek would look at "
                      f"{new.peek_modality(app)!r} instead of {live.peek_modality(old)!r}, "
                      "which its estimator was fitted on; start a new run")
    changes = [Change(f"{at}.{key}", getattr(old, attr), getattr(app, attr))
               for attr, key in LIVE_APP.items() if getattr(old, attr) != getattr(app, attr)]
    if old.sneakpeek.answer != app.sneakpeek.answer:
        changes.append(Change(f"{at}.sneakpeek.answer", old.sneakpeek.answer,
                              app.sneakpeek.answer))
    old_models = {m.name: m for m in old.model_profiles}
    push = []
    for profile in app.model_profiles:
        before = old_models.get(profile.name)
        if before == profile:
            continue
        path = f"{at}.model-profiles[{profile.name}]"
        changes.append(Change(path, None, "added") if before is None
                       else Change(path, "...", "changed"))
        if not profile.use_profile and (before is None or _weights(before) != _weights(profile)):
            if not has_redis:
                raise _refuse(f"{path} is a real model, and the run has no Redis for its "
                              "weights (start it with redis-nodes, or with a real model)")
            push.append(f"{app.name}/{profile.name}")
    for name in old_models:
        if name not in app.model_names:
            changes.append(Change(f"{at}.model-profiles[{name}]", name, None))
    return changes, push


def _weights(profile: ModelProfile) -> tuple[Any, ...]:
    return (profile.use_profile, profile.weights, profile.redis_key, profile.impl)


def real_models_changed(live: SerifConfig, new: SerifConfig) -> list[str]:
    """Real models (``app/model``) of ``new`` that ``live`` lacks or loads otherwise."""
    old = {(a.name, p.name): p for a in live.apps for p in a.model_profiles}
    return [f"{a.name}/{p.name}" for a in new.apps for p in a.model_profiles
            if not p.use_profile and ((a.name, p.name) not in old
                                      or _weights(old[(a.name, p.name)]) != _weights(p))]


def check_models(config: SerifConfig, names: Sequence[str]) -> None:
    """Every real model in ``names`` (``app/model``) names a class that imports here."""
    for name in names:
        app, _, model = name.partition("/")
        profile = config.model(app, model)
        module, _, attr = (profile.impl or "").partition(":")
        try:
            if not module or not attr:
                raise ValueError("no impl (package.module:Class)")
            getattr(importlib.import_module(module), attr)
        except Exception as exc:
            raise _refuse(f"applications[{app}].model-profiles[{model}]: unknown model "
                          f"{profile.impl!r}: {type(exc).__name__}: {exc}".splitlines()[0]
                          ) from None


def push_weights(config: SerifConfig, names: Sequence[str], redis: dict[str, Any]) -> None:
    """Push the weights of the real models ``names`` into the run's Redis (``redis``: the
    plugin's ``{"nodes": ...}``; the password and TLS from ``config``)."""
    from serif_dask.redis_server import tls_options
    from serif_dask.store import WeightStore, connect

    client = None
    try:
        client = connect([tuple(n) for n in redis["nodes"]], config.system.redis.password,
                         **tls_options(config.system))
        store = WeightStore(client, replicas=None)
        for name in names:
            app, _, model = name.partition("/")
            profile = config.model(app, model)
            assert profile.weights is not None
            _, pushed = store.push_if_changed(profile.redis_key or profile.name,
                                              Path(profile.weights))
            logger.info("serif: weights of %s %s", name, "pushed" if pushed else "up to date")
    except ReconfigureRefused:
        raise
    except Exception as exc:
        raise _refuse(f"cannot push the weights of {', '.join(names)} into the run's Redis: "
                      f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def load_new_config(config: SerifConfig | str | Path | Sequence[str | Path],
                    simulate: bool = False) -> SerifConfig:
    """The proposed config; a bad one is refused with its one line."""
    if isinstance(config, SerifConfig):
        return config
    paths = [config] if isinstance(config, str | Path) else list(config)
    try:
        return load_config([Path(p) for p in paths], simulate=simulate)
    except ConfigError as exc:
        raise _refuse(str(exc)) from None


async def reconfigure_async(
    client: Any,
    config: SerifConfig | str | Path | Sequence[str | Path] | None = None,
    *,
    policy: str | None = None,
    data_aware: bool | None = None,
    wait: bool = True,
    timeout: float = 60.0,
    simulate: bool = False,
) -> Reconfigured:
    """Change the live run on ``client``'s scheduler; see the module docstring.

    Raises :class:`ReconfigureRefused` (the run unchanged) or, when ``wait`` and the
    driver does not apply the version within ``timeout`` seconds, :class:`RunFailed`.
    """
    loop = asyncio.get_running_loop()
    try:
        current = await client.scheduler.serif_get_config()
    except Exception as exc:  # no serif plugin on that scheduler: no handler
        raise _refuse(f"the scheduler has no serif run ({type(exc).__name__}: {exc})"
                      .splitlines()[0]) from None
    if not current.get("live") or current.get("config") is None:
        raise _refuse("the scheduler serves no live run")
    run_id = current["run_id"]
    new = None
    payload = None
    if config is not None:
        from distributed.protocol.pickle import dumps, loads

        new = await loop.run_in_executor(None, load_new_config, config, simulate)
        live: SerifConfig = loads(current["config"])
        await loop.run_in_executor(None, check_models, new, real_models_changed(live, new))
        payload = dumps(new.without_secrets())
    ask = {"run_id": run_id, "config": payload, "policy": policy, "data_aware": data_aware}
    checked = await client.scheduler.serif_reconfigure(**ask, dry_run=True)
    if checked.get("refused"):
        raise ReconfigureRefused(checked["refused"])
    if checked.get("push"):
        assert new is not None  # only a new config adds real models
        await loop.run_in_executor(None, push_weights, new, checked["push"],
                                   current.get("redis") or {})
    if not checked.get("changes"):
        return Reconfigured(version=int(checked["version"]), changes=(), applied=True)
    reply = await client.scheduler.serif_reconfigure(**ask)
    if reply.get("refused"):
        raise ReconfigureRefused(reply["refused"])
    version, changes = int(reply["version"]), tuple(reply["changes"])
    if not wait:
        return Reconfigured(version=version, changes=changes, applied=False)
    deadline = time.monotonic() + timeout
    while True:
        state = await client.scheduler.serif_state()
        if state.get("run_id") != run_id or state.get("live_run") != run_id:
            raise RunFailed(f"run {run_id} ended before it applied config version {version}")
        if (state.get("applied_version") or 0) >= version:
            at = next((v["applied_at"] for v in state.get("versions", [])
                       if v["version"] == version), None)
            return Reconfigured(version=version, changes=changes, applied=True,
                                applied_at=at)
        if time.monotonic() > deadline:
            raise RunFailed(f"config version {version} was accepted but its driver did not "
                            f"apply it within {timeout:g} s")
        await asyncio.sleep(0.2)
