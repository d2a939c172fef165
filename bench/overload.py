"""Overload: offered work far above what the GPUs can do, for a long run.

Workload: ``configs/hospital`` (2 applications, 3 GPU workers, 2 data servers) in profile
mode with ``--groups`` groups per application ticking every ``--period`` seconds. Every
model's profiled inference time is scaled by one factor so that the *offered load* is
``--load`` (default 10×): the seconds of GPU time asked for per second, using each
application's cheapest model, over the number of GPU workers::

    offered_load = Σ_app groups · min_model mean_node(infer) / sample_duration / n_gpus

So even the cheapest plan needs ``offered_load`` times the cluster's capacity; the policy
has to drop what cannot earn utility, and nothing may pile up. Samples are thumbnails
(video [3, 2, 4, 4], audio [64]); the models only sleep, so the machine's two cores go to
the engine itself.

What is measured, sampled every ``--every`` seconds from a thread beside the run:

* ``peak_rss_mb``: the highest total resident memory of this process (driver and the
  LocalCluster's scheduler) plus every child process (nannies, workers);
  ``rss_mb`` the samples; ``rss_growth_mb`` the last quarter's mean minus the second
  quarter's (the first quarter is warm-up: imports, first fits, page faults).
* ``scheduler_tasks``: ``len(scheduler.tasks)`` over time (max, last, and the growth
  between the same quarters): a backlog would show as a rising count.
* ``ticks_late``: the driver's count of ticks started more than half a period (at most
  0.5 s) after they were due; a clock that drifts under load shows here.
* ``lost``: requests the ticks asked for (ticks × groups per application) minus records
  in the JSONL file (each request recorded once: completed, dropped or failed). Must be 0.

``--quick`` runs 45 s, the default 180 s. The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import derive, emit, load_docs, machine  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402

SHAPES = {"video": [3, 2, 4, 4], "audio": [64]}


def base_load(groups: int, period: float) -> float:
    """Offered load of the hospital ward at ``groups`` and ``period`` with its own latencies."""
    docs = load_docs()
    n_gpus = len(docs["system"]["compute-nodes"])
    work = 0.0
    for app in docs["application"]["applications"]:
        cheapest = min(
            statistics.fmean(float(v[0]) for v in p["latencies"].values())
            for p in app["model-profiles"]
        )
        work += groups * cheapest / period
    return work / n_gpus


class Sampler(threading.Thread):
    """Total RSS of this process tree and the scheduler's task count, every few seconds."""

    def __init__(self, scheduler: Any, every: float) -> None:
        super().__init__(daemon=True, name="overload-sampler")
        self.scheduler = scheduler
        self.every = every
        self.rss_mb: list[float] = []
        self.tasks: list[int] = []
        self.halt = threading.Event()

    def sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a process that just ended
                continue
        self.rss_mb.append(total / 2**20)
        self.tasks.append(len(self.scheduler.tasks))

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()


def growth(values: list[float]) -> float:
    """Mean of the last quarter minus mean of the second quarter (0 with too few samples)."""
    q = len(values) // 4
    if q == 0:
        return 0.0
    return statistics.fmean(values[-q:]) - statistics.fmean(values[q : 2 * q])


def count_records(path: Path) -> tuple[int, int]:
    """(records, distinct (app, group, tick) keys) of a JSONL records file."""
    n, keys = 0, set()
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            keys.add((rec["app"], rec["group"], rec["tick"]))
            n += 1
    return n, len(keys)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 45 s run")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--period", type=float, default=0.5, help="sample-duration, s")
    parser.add_argument("--load", type=float, default=10.0, help="offered load (× capacity)")
    parser.add_argument("--policy", default="sneakpeek")
    parser.add_argument("--every", type=float, default=1.0, help="sampling interval, s")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    duration = args.duration or (45.0 if args.quick else 180.0)
    scale = args.load / base_load(args.groups, args.period)

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="serif-bench-overload-") as tmp:
        config = load_config([
            derive(Path(tmp) / "overload", num_groups=args.groups, shapes=SHAPES,
                   sample_duration=args.period, latency=lambda i, s: (i * scale, s))
        ])
        records = Path(tmp) / "records.jsonl"
        with local_cluster(config) as cluster, Client(cluster) as client:
            sampler = Sampler(cluster.scheduler, args.every)
            sampler.sample()
            sampler.start()
            try:
                s = Serif(client, config, policy=args.policy, data_aware=True,
                          seed=args.seed, records=records).run(duration)
            finally:
                sampler.halt.set()
                sampler.join()
            sampler.sample()
        n_records, n_keys = count_records(records)

    ticks = {a.name: math.ceil(duration / a.sample_duration - 1e-9) for a in config.apps}
    expected = sum(ticks.values()) * args.groups
    result = {
        "offered_load": round(args.load, 2),
        "duration_s": duration,
        "peak_rss_mb": round(max(sampler.rss_mb), 1),
        "ticks_late": s["ticks_late"],
        "requests": s["requests"],
        "dropped": s["dropped"],
        "lost": expected - n_records,
        "completed": s["completed"],
        "failed": s["failed"],
        "requests_expected": expected,
        "records": n_records,
        "duplicate_records": n_records - n_keys,
        "failures_by_reason": s.get("failures_by_reason", {}),
        "ticks": s["ticks"],
        "ticks_expected": sum(ticks.values()),
        "rss_mb": {"first": round(sampler.rss_mb[0], 1), "last": round(sampler.rss_mb[-1], 1),
                   "growth": round(growth(sampler.rss_mb), 1)},
        "scheduler_tasks": {"max": max(sampler.tasks), "last": sampler.tasks[-1],
                            "growth": round(growth([float(t) for t in sampler.tasks]), 1)},
        "utility": round(s["utility"], 2),
        "deadline_met": s["deadline_met"],
        "latency_ms": s["latency_ms"],
        "decision_ms": s["decision_ms"],
        "groups": args.groups,
        "period_s": args.period,
        "latency_scale": round(scale, 3),
        "policy": args.policy,
        "wall_s": round(s["wall_s"], 1),
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
