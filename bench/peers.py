"""serif-dask next to what one would otherwise pick: Ray Serve and plain Dask futures.

Same machine, same real models (``configs/digits``: three torch classifiers of the bundled
8x8 digits), same stream of requests (``groups`` groups, one image each per tick at
``hz`` ticks per second: the images serif-dask's own reader shows, by (seed, group, tick)),
same SLA (the application's 0.5 s) and the same utility (timeliness × U[true][pred]):

* ``serif``: ``Serif(...).run`` on a LocalCluster with the config's workers (2 compute
  nodes, 2 data servers); it picks a model per request (SneakPeek, data-aware).
* ``ray_serve``: one deployment, 2 replicas, ``@serve.batch``, requests through a
  ``DeploymentHandle``; needs the optional extra ``serif-dask[peers]`` (``ray[serve]``).
* ``dask_futures``: a LocalCluster of 2 single-thread worker processes, one
  ``client.submit`` per request.

A peer serves one fixed model: the one with the highest expected utility (under the prior,
from the profiles' confusion matrices) whose profiled compute fits the rate on 2 workers
(``model`` and ``model_why`` say which). Peers get arrivals as tick bursts (every group at
each tick, as serif-dask works) and uniformly spread over the tick; serif-dask ticks.

Per system: ``goodput`` (completed within SLA per second), ``p99_ms`` (completed),
``mean_utility``, ``accuracy`` (completed), ``cpu_s`` (user + system seconds of every
process of that system, this one included, over the serving window; start-up excluded).
The top-level ``serif``, ``ray_serve``, ``dask_futures`` hold the overloaded rate, with
tick-burst arrivals at the top and ``uniform`` inside; ``normal`` holds the same at the
normal rate. Nothing is installed here: a missing Ray is one line in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_docs, machine, write_config  # noqa: E402
from _live import DIGITS  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402
from serif_dask.readers import get_reader  # noqa: E402
from serif_dask.utility import timeliness  # noqa: E402

SEED = 3
WARMUP_S = 2.0
RAY_MISSING = "ray[serve] is not installed (pip install 'serif-dask[peers]'); Ray Serve skipped"


# ------------------------------------------------------------------ workload
def digits_config(tmp: Path, groups: int, hz: float) -> Any:
    docs = copy.deepcopy(load_docs(DIGITS))
    docs["system"]["seed"] = SEED
    docs["data"]["num-groups"] = groups
    servers = docs["data"]["servers"]
    for i, server in enumerate(servers):
        server["streams"] = {"image": {str(g): "sklearn:digits"
                                       for g in range(i, groups, len(servers))}}
    for app in docs["application"]["applications"]:
        app["sample-duration"] = 1.0 / hz
        for p in app["model-profiles"]:
            p["model-weights"] = str(DIGITS / p["model-weights"])
    return load_config(write_config(docs, tmp / f"digits-{groups}-{hz:g}"))


def requests(config: Any, ticks: int) -> dict[str, np.ndarray]:
    """The samples and labels serif-dask's reader gives each (group, tick), in tick order."""
    app = config.apps[0]
    reader = get_reader(config.modality("image"), app, None, config.system.effective_seed)
    groups = np.arange(config.data.num_groups)
    xs, ys = [], []
    for tick in range(ticks):
        res = reader.read(groups, tick)
        xs.append(res.samples)
        ys.append(res.labels)
    return {"x": np.concatenate(xs), "y": np.concatenate(ys),
            "tick": np.repeat(np.arange(ticks), groups.size),
            "group": np.tile(groups, ticks)}


def arrivals(stream: dict[str, np.ndarray], groups: int, hz: float, spread: bool) -> np.ndarray:
    """Seconds after start: all groups at their tick, or uniformly spread within it."""
    t = stream["tick"].astype(float)
    if spread:
        t = t + (stream["group"] + 0.5) / groups
    return t / hz


def fixed_model(config: Any, rps: float) -> tuple[Any, str]:
    """The profile with the highest prior expected utility whose compute fits ``rps``."""
    app = config.apps[0]
    prior = np.asarray(app.prior)
    u = np.asarray(app.utility_matrix)
    nodes = len(config.system.compute_nodes)
    best, why = None, ""
    for p in app.model_profiles:
        cm = np.asarray(p.cmat, dtype=float)
        eu = float(prior @ ((cm / cm.sum(axis=1, keepdims=True)) * u).sum(axis=1))
        infer = max(v[0] for v in p.latencies.values())
        if rps * infer <= nodes and (best is None or eu > best[1]):
            best, why = (p, eu), (f"highest expected utility {eu:.3f} whose profiled "
                                  f"{infer * 1e3:.3f} ms/request fits {rps:g}/s on {nodes}")
    if best is None:
        p = min(app.model_profiles, key=lambda q: max(v[0] for v in q.latencies.values()))
        return p, "no model fits the rate; the fastest"
    return best[0], why


def score(stream: dict[str, np.ndarray], done: np.ndarray, pred: np.ndarray,
          arrive: np.ndarray, config: Any, seconds: float) -> dict[str, Any]:
    """serif-dask's definitions, applied to a peer's answers (NaN done = no answer)."""
    app = config.apps[0]
    u = np.asarray(app.utility_matrix)
    ok = np.isfinite(done) & (pred >= 0)
    latency = np.where(ok, done - arrive, np.inf)
    util = np.where(ok, timeliness(np.where(ok, latency, 0.0), app.sla_latency)
                    * u[stream["y"], np.clip(pred, 0, None)], app.miss_utility)
    lat = latency[ok]
    return {
        "requests": int(done.size),
        "completed": int(ok.sum()),
        "goodput": round(float((latency <= app.sla_latency).sum()) / seconds, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1) if lat.size else None,
        "mean_utility": round(float(util.mean()), 4),
        "accuracy": round(float((pred[ok] == stream["y"][ok]).mean()), 4) if ok.any() else None,
    }


class CPU:
    """User + system CPU seconds of this process and all its descendants."""

    @staticmethod
    def now() -> float:
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total


# ------------------------------------------------------------------ serif-dask
def run_serif(config: Any, duration: float) -> dict[str, Any]:
    from distributed import Client

    with tempfile.TemporaryDirectory(prefix="serif-peers-") as tmp, \
            local_cluster(config) as cluster, Client(cluster) as client:
        records = Path(tmp) / "records.jsonl"
        # warm, as the peers are: worker processes import torch and load the models
        Serif(client, config, seed=SEED).run(WARMUP_S)
        serif = Serif(client, config, records=records, seed=SEED)
        cpu0 = CPU.now()
        summary = serif.run(duration)
        cpu = CPU.now() - cpu0
        serif.close()
        rows = [json.loads(line) for line in records.read_text().splitlines()]
    sla = config.apps[0].sla_latency
    good = sum(1 for r in rows if r["outcome"] == "completed" and r["latency"] <= sla)
    models: dict[str, int] = {}
    for r in rows:
        if r["outcome"] == "completed":
            models[r["model"]] = models.get(r["model"], 0) + 1
    return {
        "requests": summary["requests"], "completed": summary["completed"],
        "goodput": round(good / duration, 2), "p99_ms": summary["latency_ms"]["p99"],
        "mean_utility": round(summary["mean_utility"], 4),
        "accuracy": None if summary["accuracy"] is None else round(summary["accuracy"], 4),
        "cpu_s": round(cpu, 2), "models_used": models, "arrivals": "tick_bursts",
    }


# ------------------------------------------------------------------ plain Dask futures
def _predict(impl: str, path: str, sample: np.ndarray) -> int:
    """On a Dask worker: the model is loaded once per worker process and kept there."""
    from distributed import get_worker

    worker = get_worker()
    model = getattr(worker, "_peer_model", None)
    if model is None:
        model = _load(impl, path)
        worker._peer_model = model
    return int(model.forward(sample[None])[0])


def _load(impl: str, path: str) -> Any:
    import importlib

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    module, _, name = impl.partition(":")
    model = getattr(importlib.import_module(module), name)()
    model.load(load_file(path), "cpu")
    return model


def run_dask(config: Any, profile: Any, stream: dict[str, np.ndarray],
             patterns: dict[str, np.ndarray], seconds: float) -> dict[str, dict[str, Any]]:
    from distributed import Client, LocalCluster

    out = {}
    with LocalCluster(n_workers=len(config.system.compute_nodes), threads_per_worker=1,
                      processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.gather([client.submit(_predict, profile.impl, profile.weights, stream["x"][0],
                                     pure=False, workers=[w])
                       for w in client.scheduler_info()["workers"]])  # warm: models loaded
        for name, arrive in patterns.items():
            n = arrive.size
            done = np.full(n, np.nan)
            pred = np.full(n, -1, dtype=np.int64)

            def finished(fut: Any, i: int, done: np.ndarray = done) -> None:
                done[i] = time.time()  # the scheduler told the client: the task is done

            cpu0 = CPU.now()
            t0 = time.time() + 0.2
            order = np.argsort(arrive, kind="stable").tolist()
            futs = []
            for i in order:
                delay = t0 + arrive[i] - time.time()
                if delay > 0:
                    time.sleep(delay)
                fut = client.submit(_predict, profile.impl, profile.weights, stream["x"][i],
                                    pure=False)
                fut.add_done_callback(lambda f, i=i: finished(f, i))
                futs.append(fut)
            answers = client.gather(futs, errors="skip")
            if len(answers) == len(futs):
                pred[order] = answers
            time.sleep(0.05)  # the last callbacks
            cpu = CPU.now() - cpu0
            m = score(stream, done, pred, t0 + arrive, config, seconds)
            m["cpu_s"] = round(cpu, 2)
            out[name] = m
            client.cancel(futs)
    return out


# ------------------------------------------------------------------ Ray Serve
def ray_available() -> bool:
    return (importlib.util.find_spec("ray") is not None
            and importlib.util.find_spec("ray.serve") is not None)


def run_ray(jobs: dict[str, tuple[Any, Any, dict[str, np.ndarray], dict[str, np.ndarray]]],
            seconds: float) -> dict[str, dict[str, dict[str, Any]]]:
    """One local Ray instance; per rate, a deployment of that rate's fixed model, then each
    arrival pattern in turn. ``jobs``: rate -> (config, profile, stream, patterns)."""
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    class Digits:
        def __init__(self, impl: str, path: str, max_batch: int) -> None:
            self.model = _load(impl, path)
            self.__call__.set_max_batch_size(max_batch)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
        async def __call__(self, samples: list[np.ndarray]) -> list[int]:
            return self.model.forward(np.stack(samples)).tolist()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        serve.start(http_options={"location": "NoServer"})
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for rate, (config, profile, stream, patterns) in jobs.items():
            replicas = len(config.system.compute_nodes)
            app = Digits.options(num_replicas=replicas).bind(
                profile.impl, profile.weights, config.data.num_groups)
            handle = serve.run(app, name="digits", route_prefix=None)
            for _ in range(4 * replicas):  # warm: every replica has its model loaded
                handle.remote(stream["x"][0]).result()
            out[rate] = {}
            for name, arrive in patterns.items():
                cpu0 = CPU.now()
                done, pred, t0 = asyncio.run(_drive_ray(handle, stream, arrive))
                cpu = CPU.now() - cpu0
                m = score(stream, done, pred, t0 + arrive, config, seconds)
                m["cpu_s"] = round(cpu, 2)
                out[rate][name] = m
        return out
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


async def _drive_ray(handle: Any, stream: dict[str, np.ndarray], arrive: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, float]:
    n = arrive.size
    done = np.full(n, np.nan)
    pred = np.full(n, -1, dtype=np.int64)

    async def one(i: int) -> None:
        try:
            pred[i] = await handle.remote(stream["x"][i])
        finally:
            done[i] = time.time()

    t0 = time.time() + 0.2
    tasks = []
    for i in np.argsort(arrive, kind="stable").tolist():
        delay = t0 + arrive[i] - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.wait(tasks, timeout=60)
    return done, pred, t0


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (~2 minutes)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run")
    parser.add_argument("--normal", default="32x2", help="GROUPSxHZ at the normal rate")
    parser.add_argument("--overloaded", default="64x8", help="GROUPSxHZ, overloaded")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray Serve")
    args = parser.parse_args(argv)
    duration = args.duration or (5.0 if args.quick else 20.0)
    rates = {}
    for name, text in (("normal", args.normal), ("overloaded", args.overloaded)):
        groups, hz = text.lower().split("x")
        rates[name] = {"groups": int(groups), "hz": float(hz),
                       "rps": int(groups) * float(hz)}
    started = time.time()
    load0 = round(os.getloadavg()[0], 2)  # a shared machine: say how busy it was
    result: dict[str, Any] = {"normal": {}}
    with tempfile.TemporaryDirectory(prefix="serif-bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        configs, streams, patterns, models = {}, {}, {}, {}
        for name, r in rates.items():
            cfg = digits_config(tmp, r["groups"], r["hz"])
            ticks = int(round(duration * r["hz"]))
            configs[name] = cfg
            streams[name] = requests(cfg, ticks)
            patterns[name] = {p: arrivals(streams[name], r["groups"], r["hz"], p == "uniform")
                              for p in ("tick_bursts", "uniform")}
            models[name] = fixed_model(cfg, r["rps"])
        systems: dict[str, dict[str, Any]] = {"serif": {}, "dask_futures": {}, "ray_serve": {}}
        for name in rates:
            systems["serif"][name] = run_serif(configs[name], duration)
        for name in rates:
            profile, why = models[name]
            per = run_dask(configs[name], profile, streams[name], patterns[name], duration)
            systems["dask_futures"][name] = {**per["tick_bursts"], "uniform": per["uniform"],
                                             "model": profile.name, "model_why": why}
        if args.no_ray or not ray_available():
            missing = "skipped (--no-ray)" if args.no_ray else RAY_MISSING
            systems["ray_serve"] = {name: {"missing": missing} for name in rates}
        else:
            per_rate = run_ray({name: (configs[name], models[name][0], streams[name],
                                       patterns[name]) for name in rates}, duration)
            for name, per in per_rate.items():
                profile, why = models[name]
                systems["ray_serve"][name] = {**per["tick_bursts"], "uniform": per["uniform"],
                                              "model": profile.name, "model_why": why}
    for system, per in systems.items():
        result[system] = per["overloaded"]
        result["normal"][system] = per["normal"]
    result.update({
        "rates": rates, "sla_s": configs["normal"].apps[0].sla_latency,
        "duration_s": duration, "quick": args.quick,
        "bench_wall_s": round(time.time() - started, 1), **machine(),
        "load_avg_1m": {"start": load0, "end": round(os.getloadavg()[0], 2)},
    })
    emit(result)
    return result


if __name__ == "__main__":
    main()
