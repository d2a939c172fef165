"""Utility earned by every policy, data-aware and not, at 0.5×, 1×, 2× and 4× capacity.

Workload: ``configs/hospital`` unchanged (utilities, priors, confusion matrices, latencies,
reader defaults: ``synthetic-snr`` 1.0, ``label-persistence`` 0.9) except ``num-groups``.

Capacity. Offered GPU work per second, if every request ran on its application's biggest
model (largest mean inference time over the nodes), is
``G · Σ_apps infer_big(app) / sample_duration(app)`` for G groups; capacity is the number of
GPU workers (seconds of GPU per second). Load ``L`` runs ``G = round(L · W / Σ_apps
infer_big / sample_duration)`` groups: for the hospital, capacity is 74 groups (its own 40
groups are 0.54×), so the loads are 37, 74, 148 and 297 groups. Context switches and
retrieval are not counted; they make the real capacity somewhat lower.

Every (policy, data-aware) pair runs with the same seed, so it sees the same samples and
labels. One LocalCluster serves every run. ``data_aware_gain`` is the mean utility of
data-aware ``sneakpeek`` over data-oblivious ``sneakpeek`` at 2× load. ``oracle_gain``
per load bounds that ratio from above (see :func:`oracle_gain`): what knowing each
request's true class could earn at that load's GPU budget over what the prior alone can.
The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HOSPITAL, derive, emit, machine  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402
from serif_dask.config import SerifConfig  # noqa: E402
from serif_dask.utility import row_normalise  # noqa: E402

POLICIES = (
    "random",
    "random-cache",
    "fastest",
    "most-accurate",
    "locally-optimal-edf",
    "locally-optimal-edf-cache",
    "grouped-priority",
    "sneakpeek",
)
LOADS = (0.5, 1.0, 2.0, 4.0)
QUICK_POLICIES = ("sneakpeek", "most-accurate")
QUICK_LOADS = (1.0, 2.0)


def capacity_groups(config: SerifConfig) -> float:
    """Groups whose requests, all on the biggest models, keep every GPU exactly busy."""
    per_group = 0.0  # GPU seconds per second per group
    for app in config.apps:
        big = max(float(np.mean([v[0] for v in p.latencies.values()])) for p in app.model_profiles)
        per_group += big / app.sample_duration
    return len(config.system.compute_nodes) / per_group


def _best_mix(value: np.ndarray, cost: np.ndarray, weight: np.ndarray, budget: float) -> float:
    """max Σ_c w_c Σ_m x_cm v_mc  s.t. Σ_m x_cm = 1, Σ_c w_c Σ_m x_cm cost_m <= budget.

    ``value`` is (M, C): one column per kind of request the chooser can tell apart.
    """
    m, c = value.shape
    eq = np.kron(np.eye(c), np.ones(m))  # rows: Σ_m x_cm = 1
    ub = np.kron(weight, cost)[None, :]
    res = linprog(-(value.T * weight[:, None]).ravel(), A_ub=ub, b_ub=[budget],
                  A_eq=eq, b_eq=np.ones(c), bounds=(0, 1), method="highs")
    return float(-res.fun) if res.success else float("nan")


def oracle_gain(config: SerifConfig, load: float) -> dict[str, float]:
    """Upper bound on the data-aware gain at ``load``: a chooser that knows every request's
    true class, over one that knows only the prior, each spending on average the GPU time
    per request that capacity allows (``infer_big / load``; dropping is free and earns the
    miss utility). Ignores deadlines, switches and batching: a bound, not a prediction."""
    out, num, den = {}, 0.0, 0.0
    for app in config.apps:
        u = np.asarray(app.utility_matrix, dtype=float)
        prior = np.asarray(app.prior, dtype=float)
        per_class = np.stack(
            [(row_normalise(np.asarray(p.cmat, dtype=float)) * u).sum(axis=1)
             for p in app.model_profiles]
            + [np.full(len(prior), app.miss_utility)]
        )  # (M + 1, K): utility of model m (last: a drop) when the true class is c
        cost = np.asarray(
            [np.mean([v[0] for v in p.latencies.values()]) for p in app.model_profiles] + [0.0]
        )
        budget = cost.max() / load
        aware = _best_mix(per_class, cost, prior, budget)
        oblivious = _best_mix((per_class @ prior)[:, None], cost, np.ones(1), budget)
        weight = 1.0 / app.sample_duration
        out[app.name] = round(aware / oblivious, 3)
        num, den = num + weight * aware, den + weight * oblivious
    out["all"] = round(num / den, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"policies {QUICK_POLICIES}, loads {QUICK_LOADS} (< 2 minutes)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--policies", nargs="*", default=None)
    parser.add_argument("--loads", type=float, nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--config", type=Path, default=HOSPITAL)
    args = parser.parse_args(argv)
    policies = args.policies or (QUICK_POLICIES if args.quick else POLICIES)
    loads = args.loads or (QUICK_LOADS if args.quick else LOADS)

    started = time.time()
    base = load_config([args.config])
    cap = capacity_groups(base)
    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="serif-bench-quality-") as tmp,
        local_cluster(base) as cluster,
        Client(cluster) as client,
    ):
        for load in loads:
            groups = max(1, round(load * cap))
            config = load_config([derive(Path(tmp) / f"load-{load}", num_groups=groups,
                                         base=args.config)])
            for policy in policies:
                for aware in (True, False):
                    s = Serif(client, config, policy=policy, data_aware=aware,
                              seed=args.seed).run(args.duration)
                    row = {
                        "policy": policy,
                        "data_aware": aware,
                        "load": load,
                        "groups": groups,
                        "mean_utility": round(s["mean_utility"], 4),
                        "deadline_met": round(s["deadline_met"], 4),
                        "dropped": s["dropped"],
                        "failed": s["failed"],
                        "requests": s["requests"],
                        "accuracy": None if s["accuracy"] is None else round(s["accuracy"], 4),
                        "per_app_mean_utility": {
                            a: round(v["mean_utility"], 4) for a, v in s["per_app"].items()
                        },
                    }
                    results.append(row)
                    print(row, flush=True)

    def mean_utility(policy: str, aware: bool, load: float) -> float | None:
        for r in results:
            if (r["policy"], r["data_aware"], r["load"]) == (policy, aware, load):
                return r["mean_utility"]
        return None

    on, off = mean_utility("sneakpeek", True, 2.0), mean_utility("sneakpeek", False, 2.0)
    gain = None if on is None or not off or off <= 0 else round(on / off, 3)
    result = {
        "results": results,
        "data_aware_gain": gain,
        "target_gain": 1.6,
        "oracle_gain": {str(load): oracle_gain(base, load) for load in loads},
        "capacity_groups": round(cap, 1),
        "duration_s": args.duration,
        "seed": args.seed,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
