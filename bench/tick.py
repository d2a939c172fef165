"""Tasks per tick and tick overhead at 10, 100 and 1000 groups on a LocalCluster.

The workload is ``configs/hospital`` (2 applications, 3 models each, 3 GPU workers, 2 data
servers) in profile mode with near-zero model time: every model's inference takes
``--infer`` seconds per request (default 10 µs), context switches and input retrieval take
nothing. Samples are shrunk to thumbnails (video [3, 2, 8, 8], audio [256]): the synthetic
signal does not depend on the shape (see ``readers/synthetic.py``), and full-size clips
would measure memory bandwidth rather than the engine.

Definitions, per (application, tick), over that tick's completed requests:

* tasks per tick: the Dask tasks whose keys carry that application and tick
  (``serif-read-``, ``serif-peek-``, ``serif-score-``), counted from the task stream.
* tick wall time: the last request's finish minus the tick's arrival (the moment the
  driver's clock made the tick due).
* model time: the profiled work of the *critical worker* (the one that finished the last
  request): its requests in this tick × its model's per-request inference time.
* tick overhead: wall time minus model time; everything that is not the model running:
  reading, peeking, planning, Dask scheduling and transfers, recording.

The first tick of each application is left out (it fits SneakPeek and warms models). The
JSON reports the median over ticks. One cluster serves all group counts (its shape does not
depend on them). The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, get_task_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import derive, emit, machine, parse_key  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402

SIZES = (10, 100, 1000)
SHAPES = {"video": [3, 2, 8, 8], "audio": [256]}


def run_once(
    client: Client, config_dir: Path, *, duration: float, policy: str, seed: int, infer: float
) -> dict[str, Any]:
    """One run; returns tasks per tick and overhead per (app, tick)."""
    config = load_config([config_dir])
    apps = tuple(a.name for a in config.apps)
    rows: list[dict[str, Any]] = []
    serif = Serif(client, config, policy=policy, data_aware=True, seed=seed,
                  on_records=rows.extend)
    with get_task_stream(client) as ts:
        summary = serif.run(duration)
    run_id = summary["run_id"]

    tasks: Counter[tuple[str, int]] = Counter()
    kinds: dict[str, Counter[tuple[str, int]]] = defaultdict(Counter)
    for item in ts.data:
        parsed = parse_key(item["key"], apps)
        if parsed is None or parsed[1] != run_id:
            continue
        kind, _, app, tick = parsed
        tasks[app, tick] += 1
        kinds[kind][app, tick] += 1

    by_tick: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["outcome"] == "completed":
            by_tick[row["app"], row["tick"]].append(row)
    overhead, wall = [], []
    for (_app, tick), done in sorted(by_tick.items()):
        if tick == 0:
            continue
        last = max(done, key=lambda r: r["finish"])
        t_wall = last["finish"] - last["arrival"]
        model_s = infer * sum(r["worker"] == last["worker"] for r in done)
        wall.append(t_wall)
        overhead.append(t_wall - model_s)

    steady = [k for k in tasks if k[1] > 0]
    counts = [tasks[k] for k in steady]
    return {
        "tasks_per_tick": statistics.median(counts) if counts else 0,
        "tasks_per_tick_range": [min(counts, default=0), max(counts, default=0)],
        "tasks_by_kind": {
            kind: statistics.median([c[k] for k in steady]) for kind, c in sorted(kinds.items())
        },
        "tick_overhead_ms": _ms(overhead),
        "tick_wall_ms": _ms(wall),
        "requests": summary["requests"],
        "completed": summary["completed"],
        "dropped": summary["dropped"],
        "failed": summary["failed"],
        "ticks": summary["ticks"],
        "ticks_late": summary["ticks_late"],
        "decision_ms_p50": summary["decision_ms"]["p50"],
    }


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {
        "p50": round(1e3 * float(np.percentile(values, 50)), 2),
        "p95": round(1e3 * float(np.percentile(values, 95)), 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (< 2 minutes)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per size")
    parser.add_argument("--policy", default="sneakpeek")
    parser.add_argument("--infer", type=float, default=1e-5, help="model s per request")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = parser.parse_args(argv)
    duration = args.duration or (6.0 if args.quick else 20.0)

    started = time.time()
    per_size: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="serif-bench-tick-") as tmp:
        dirs = {
            n: derive(Path(tmp) / str(n), num_groups=n, shapes=SHAPES, retrieval=0.0,
                      latency=lambda _i, _s: (args.infer, 0.0))
            for n in args.sizes
        }
        first = load_config([dirs[args.sizes[0]]])
        with local_cluster(first) as cluster, Client(cluster) as client:
            for n in args.sizes:
                per_size[str(n)] = run_once(
                    client, dirs[n], duration=duration, policy=args.policy, seed=args.seed,
                    infer=args.infer,
                )
                print(f"groups {n:5d}: {per_size[str(n)]}", flush=True)

    overhead = {n: r["tick_overhead_ms"]["p50"] for n, r in per_size.items()}
    lo, hi = str(min(args.sizes)), str(max(args.sizes))
    ratio = (overhead[hi] / overhead[lo]) if overhead.get(lo) and overhead.get(hi) else None
    tasks = {n: r["tasks_per_tick"] for n, r in per_size.items()}
    result = {
        "tasks_per_tick": tasks,
        "tick_overhead_ms": overhead,
        "overhead_ratio": None if ratio is None else round(ratio, 2),
        "targets": {
            "tasks_per_tick_identical": len(set(tasks.values())) == 1,
            "overhead_ratio_le_3": ratio is not None and ratio <= 3.0,
        },
        "per_size": per_size,
        "policy": args.policy,
        "duration_s": duration,
        "infer_s": args.infer,
        "shapes": SHAPES,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
