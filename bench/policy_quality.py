"""Utility earned by every policy, data-aware and not, at 0.5×, 1×, 2× and 4× capacity.

Two workloads, each its example config unchanged (utilities, priors, confusion matrices,
latencies, reader defaults: ``synthetic-snr`` 1.0, ``label-persistence`` 0.9) except
``num-groups``:

- ``hospital`` (``configs/hospital``): SERIF's fall detection and wake word. A correct
  "nothing happening" earns as much as a caught event and every model is good at it, so
  knowing the class cannot buy much: its oracle bound is about 1.01 at 2× load.
- ``ward-busy`` (``configs/ward-busy``): rare falls whose detection is worth fifty cleared
  patients and a cheap model that misses half of them; the triage case SneakPeek is for.

Capacity. Offered GPU work per second, if every request ran on its application's biggest
model (largest mean inference time over the nodes), is
``G · Σ_apps infer_big(app) / sample_duration(app)`` for G groups; capacity is the number of
GPU workers (seconds of GPU per second). Load ``L`` runs ``G = round(L · W / Σ_apps
infer_big / sample_duration)`` groups (hospital: 74 groups at 1×; ward-busy: 50). Context
switches and retrieval are not counted; they make the real capacity somewhat lower.

Every (policy, data-aware) pair runs with the same seed, so it sees the same samples and
labels. One LocalCluster per workload serves its runs. ``data_aware_gain`` is the mean
utility of data-aware ``sneakpeek`` over data-oblivious ``sneakpeek`` at 2× load on the
hospital; ``gains`` has the same ratio for every workload and load run. ``oracle_gain``
bounds that ratio from above (see :func:`oracle_gain`): what knowing each request's true
class could earn at that load's GPU budget over what the prior alone can; ``oracle_share``
is the part of that possible gain data-aware ``sneakpeek`` realised,
``(gain - 1) / (oracle - 1)``. The last line is the JSON object.
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
from _common import HOSPITAL, ROOT, derive, emit, machine  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402
from serif_dask.config import SerifConfig  # noqa: E402
from serif_dask.policies import builtin_policies  # noqa: E402
from serif_dask.utility import row_normalise  # noqa: E402

POLICIES = builtin_policies()
LOADS = (0.5, 1.0, 2.0, 4.0)
QUICK_POLICIES = ("sneakpeek", "most-accurate")


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


WORKLOADS = {"hospital": HOSPITAL, "ward-busy": ROOT / "configs" / "ward-busy"}
QUICK_RUNS = {"hospital": ((2.0,), QUICK_POLICIES), "ward-busy": ((2.0,), ("sneakpeek",))}


def run_workload(
    name: str, base_dir: Path, loads: tuple[float, ...], policies: tuple[str, ...],
    duration: float, seed: int, tmp: Path,
) -> list[dict[str, Any]]:
    """Every (load, policy, data-aware) run of one workload on one LocalCluster."""
    base = load_config([base_dir])
    cap = capacity_groups(base)
    rows: list[dict[str, Any]] = []
    with local_cluster(base) as cluster, Client(cluster) as client:
        for load in loads:
            groups = max(1, round(load * cap))
            config = load_config([derive(tmp / f"{name}-{load}", num_groups=groups,
                                         base=base_dir)])
            for policy in policies:
                for aware in (True, False):
                    s = Serif(client, config, policy=policy, data_aware=aware,
                              seed=seed).run(duration)
                    row = {
                        "workload": name,
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
                    rows.append(row)
                    print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2× load only: hospital with sneakpeek and most-accurate, "
                             "ward-busy with sneakpeek (< 2 minutes)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--policies", nargs="*", default=None)
    parser.add_argument("--loads", type=float, nargs="*", default=None)
    parser.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    workloads = args.workloads or list(WORKLOADS)

    started = time.time()
    results: list[dict[str, Any]] = []
    oracle: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="serif-bench-quality-") as tmp:
        for name in workloads:
            loads, policies = (QUICK_RUNS[name] if args.quick else (LOADS, POLICIES))
            loads = tuple(args.loads or loads)
            policies = tuple(args.policies or policies)
            results += run_workload(name, WORKLOADS[name], loads, policies, args.duration,
                                    args.seed, Path(tmp))
            base = load_config([WORKLOADS[name]])
            oracle[name] = {str(load): oracle_gain(base, load) for load in loads}

    def mean_utility(workload: str, aware: bool, load: float) -> float | None:
        for r in results:
            if (r["workload"], r["policy"], r["data_aware"], r["load"]) == (
                workload, "sneakpeek", aware, load
            ):
                return r["mean_utility"]
        return None

    gains: dict[str, dict[str, float | None]] = {}
    share: dict[str, dict[str, float | None]] = {}
    for name in workloads:
        for load in sorted({r["load"] for r in results if r["workload"] == name}):
            on, off = mean_utility(name, True, load), mean_utility(name, False, load)
            gain = None if on is None or not off or off <= 0 else round(on / off, 3)
            bound = oracle[name][str(load)]["all"]
            gains.setdefault(name, {})[str(load)] = gain
            share.setdefault(name, {})[str(load)] = (
                None if gain is None or bound <= 1.0 else round((gain - 1) / (bound - 1), 2)
            )
    result = {
        "results": results,
        "data_aware_gain": gains.get("hospital", {}).get("2.0"),
        "target_gain": 1.6,
        "gains": gains,
        "oracle_gain": oracle,
        "oracle_share": share,
        "capacity_groups": {
            name: round(capacity_groups(load_config([WORKLOADS[name]])), 1) for name in workloads
        },
        "duration_s": args.duration,
        "seed": args.seed,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
