"""Sustained throughput at 10,000 groups, one tick per second, on a LocalCluster.

Workload: ``configs/hospital`` with ``num-groups`` 10,000, both applications ticking every
second (20,000 requests a second), profile mode with near-zero model time (``--infer``
seconds per request, default 10 µs, no context switch or retrieval cost) so every request
goes the whole way: read, peek, plan, score, record. Samples are shrunk to thumbnails
(video [3, 2, 4, 4], audio [64]); full-size clips for 10,000 groups a second would measure
memory bandwidth and, on a 2-core machine with little free memory, exhaust it.

``tick_ms`` splits a tick's time by step (read, peek, plan, score, record; p50 and p95
over ticks, see ``serif_dask.accounting.StageTimes``), so the next bottleneck is visible;
``peak_rss_mb`` is the peak resident memory of the whole run: this process (scheduler,
driver) and every child (workers, Redis), sampled every 0.25 s.

``ticks_late`` is the driver's count of ticks started more than half a period (at most
0.5 s) after they were due. The run *keeps up* when no tick was late, no request failed and
the p99 request latency stays below the tick period, so work does not pile up from one tick
to the next. ``requests_per_s`` is requests accounted for (completed, dropped or failed)
over the run's wall time (at least its duration). The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRss, derive, emit, machine  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402

SHAPES = {"video": [3, 2, 4, 4], "audio": [64]}
PERIOD_S = 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 15 s run (< 2 minutes)")
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--policy", default="sneakpeek")
    parser.add_argument("--infer", type=float, default=1e-5, help="model s per request")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    duration = args.duration or (15.0 if args.quick else 60.0)

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="serif-bench-scale-") as tmp:
        config = load_config([
            derive(Path(tmp) / "scale", num_groups=args.groups, shapes=SHAPES, retrieval=0.0,
                   sample_duration=PERIOD_S, latency=lambda _i, _s: (args.infer, 0.0))
        ])
        with PeakRss() as rss, local_cluster(config) as cluster, Client(cluster) as client:
            s = Serif(client, config, policy=args.policy, data_aware=True,
                      seed=args.seed).run(duration)

    p99_s = (s["latency_ms"]["p99"] or 0.0) / 1e3
    keeps_up = s["ticks_late"] == 0 and s["failed"] == 0 and p99_s < PERIOD_S
    result = {
        "groups": args.groups,
        "duration_s": duration,
        "requests_per_s": round(s["requests"] / max(s["wall_s"], duration), 1),
        "wall_s": round(s["wall_s"], 2),
        "offered_per_s": args.groups * len(config.apps) / PERIOD_S,
        "ticks": s["ticks"],
        "ticks_late": s["ticks_late"],
        "keeps_up": keeps_up,
        "requests": s["requests"],
        "completed": s["completed"],
        "dropped": s["dropped"],
        "failed": s["failed"],
        "failures_by_reason": s.get("failures_by_reason", {}),
        "latency_ms": s["latency_ms"],
        "decision_ms": s["decision_ms"],
        "tick_ms": s["tick_ms"],
        "peak_rss_mb": rss.peak_mb,
        "deadline_met": s["deadline_met"],
        "policy": args.policy,
        "infer_s": args.infer,
        "shapes": SHAPES,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
