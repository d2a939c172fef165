"""Helpers for the benchmarks that serve live inputs: configs fed through Redis streams.

A bench config is one of the examples, edited in memory (``configs/hospital`` in profile
mode with thumbnail samples, or ``configs/digits`` with its real models), whose modalities
all read live Redis streams (``"impl": "redis-stream"``) from one embedded redis-server that
the bench starts; :func:`serve_live` runs serif-dask on it while a :class:`Feeder` pushes
the samples, and :func:`metrics` turns the records into goodput, p99 and utility.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, load_docs, write_config

from serif_dask import Serif, load_config
from serif_dask.feed import Feeder, Schedule

DIGITS = ROOT / "configs" / "digits"
#: Thumbnails: the profile-mode models only sleep, so samples need not be big.
SHAPES = {"video": [3, 2, 4, 4], "audio": [64]}


def profile_docs(groups: int, period: float, *, nodes: int | None = None,
                 latency_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """``configs/hospital`` in profile mode: ``groups`` groups ticking every ``period`` s,
    latencies scaled, and optionally ``nodes`` compute nodes (``gpu-0`` ...) with bay-a's
    latencies."""
    docs = copy.deepcopy(load_docs())
    docs["data"]["num-groups"] = int(groups)
    for mod in docs["data"]["data-modalities"]:
        mod["synthetic-shape"] = SHAPES[mod["name"]]
        mod["cache-entry-size"] = 1024
    first = docs["system"]["compute-nodes"][0]["name"]
    names = None
    if nodes is not None:
        names = [f"gpu-{i}" for i in range(nodes)]
        docs["system"]["compute-nodes"] = [
            {"name": n, "ip-address": "127.0.0.1", "server-port": 0} for n in names]
        for mod in docs["data"]["data-modalities"]:
            value = mod["retrieval-latencies"][first]
            mod["retrieval-latencies"] = dict.fromkeys(names, value)
    for app in docs["application"]["applications"]:
        app["sample-duration"] = period
        for p in app["model-profiles"]:
            base = p["latencies"][first] if names else None
            p["latencies"] = ({n: [base[0] * latency_scale, base[1]] for n in names} if names
                              else {n: [v[0] * latency_scale, v[1]]
                                    for n, v in p["latencies"].items()})
    return docs


def digits_docs(groups: int, period: float) -> dict[str, dict[str, Any]]:
    """``configs/digits`` (real models) with ``groups`` groups every ``period`` s; SneakPeek
    calibrates on the bundled digits' calibration split (``sneakpeek.calibration``)."""
    docs = copy.deepcopy(load_docs(DIGITS))
    docs["data"]["num-groups"] = int(groups)
    for server in docs["data"]["servers"]:
        server.pop("streams", None)  # live keys: serif:in:image:<group>
    for app in docs["application"]["applications"]:
        app["sample-duration"] = period
        app.setdefault("sneakpeek", {})["calibration"] = "digits"
        for p in app["model-profiles"]:
            p["model-weights"] = str(DIGITS / p["model-weights"])
    return docs


def live(docs: dict[str, dict[str, Any]], port: int) -> dict[str, dict[str, Any]]:
    """Every modality reads Redis streams on the server at ``port``."""
    docs = copy.deepcopy(docs)
    docs["system"]["redis-nodes"] = [{"ip-address": "127.0.0.1", "ports": [str(port)]}]
    for mod in docs["data"]["data-modalities"]:
        mod["impl"] = "redis-stream"
    return docs


def serve_live(client: Any, redis: Any, docs: dict[str, dict[str, Any]], target: Path,
               schedule: Schedule, duration: float, *, source: str = "synthetic",
               calibrate: int = 256, seed: int = 1, warmup: float = 0.0) -> dict[str, Any]:
    """One run of ``docs`` on the cluster of ``client`` while a feeder pushes on
    ``schedule``; returns the summary, records and when feeding started. ``warmup``
    seconds of an unrecorded run first let fresh workers import torch."""
    config = load_config(write_config(docs, target))
    if warmup:
        Serif(client, config, seed=seed).run(warmup)
    rc = redis.client()
    rc.flushdb()  # no entries (or stale weights) of an earlier point
    feeder = Feeder(config, rc, source=source, seed=seed)
    if calibrate and not any(a.sneakpeek.calibration for a in config.apps):
        feeder.calibrate(calibrate)
    stop = threading.Event()
    feed_start = time.time()
    thread = threading.Thread(target=feeder.run, args=(schedule, stop), daemon=True)
    thread.start()
    records = target / "records.jsonl"
    try:
        summary = Serif(client, config, seed=seed, records=records).run(duration)
    finally:
        stop.set()
        thread.join()
        rc.close()
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    return {"summary": summary, "rows": rows, "feed_start": feed_start, "config": config}


def metrics(rows: list[dict[str, Any]], sla: dict[str, float], seconds: float,
            ) -> dict[str, Any]:
    """Goodput (completed within SLA per second), p99 of completed latencies and mean
    utility of the requests that had an input (``no-sample`` ones are the feeder's)."""
    fed = [r for r in rows if not (r["reason"] or "").startswith("no-sample")]
    good = sum(1 for r in fed if r["outcome"] == "completed" and r["latency"] <= sla[r["app"]])
    lat = [r["latency"] for r in fed if r["outcome"] == "completed"]
    return {
        "requests": len(rows),
        "with_input": len(fed),
        "no_sample": len(rows) - len(fed),
        "completed": sum(1 for r in fed if r["outcome"] == "completed"),
        "dropped": sum(1 for r in fed if r["outcome"] == "dropped"),
        "goodput": round(good / seconds, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1) if lat else None,
        "mean_utility": round(float(np.mean([r["utility"] for r in fed])), 4) if fed else None,
    }
