"""Decision time of every registered policy for 10, 100, 1000 and 10000 pending requests.

The problems come from ``serif_dask.policies._testing.make_problem``: two applications with
3-4 models each, 4 workers, some infeasible pairs and warm models, two ticks pending. The
last line of output is one JSON object:
``{"decision_ms_p50": {policy: {"10": ms, ...}}, "targets": {...}, "machine": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from serif_dask.policies import builtin_policies, get_policy
from serif_dask.policies._testing import make_problem

SIZES = (10, 100, 1000, 10000)


def measure(policy, problem, repeats: int) -> float:
    policy(problem)  # warm up imports and caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy(problem)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--policies", nargs="*", default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 21)
    names = args.policies or list(builtin_policies())

    result: dict[str, dict[str, float]] = {}
    for name in names:
        policy = get_policy(name)
        row = {}
        for n in SIZES:
            problem = make_problem(n, n_workers=args.workers, n_ticks=2, seed=n)
            reps = max(3, repeats // 4) if n >= 10000 else repeats
            row[str(n)] = round(measure(policy, problem, reps), 3)
        result[name] = row
        print(f"{name:28s} " + "  ".join(f"{k:>5}: {v:8.2f} ms" for k, v in row.items()))
    at_1000 = {name: row["1000"] for name, row in result.items()}
    summary = {
        "decision_ms_p50": result,
        "targets": {
            "sneakpeek_1000_le_20ms": at_1000.get("sneakpeek", 0.0) <= 20.0,
            "all_1000_le_50ms": all(v <= 50.0 for v in at_1000.values()),
        },
        "models": len(make_problem(1).model_names),
        "workers": args.workers,
        "repeats": repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
