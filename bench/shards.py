"""Sharding: what planning costs one scheduler, and what splitting a ward into shards costs.

The evidence behind ``docs/SCALING.md``'s design for 1,000,000 groups, measured on this
machine without a cluster, with the replay of ``serif-dask plan``
(:func:`serif_dask.capacity.simulate`: the driver's tick schedule and plan rounds, the
SneakPeek beliefs, the same ``PlanProblem`` and policy, the plugin's booking of batches):

- ``plan_cost``: the plan thread's work per round (build the joint problem, run the
  policy) at growing numbers of groups, on ``configs/hospital`` (two applications, three
  compute workers). Its time per request says how many groups one scheduler can decide
  for in a tick period.
- ``sharding``: one ward of ``--groups`` groups on ``--per-type`` workers of each of the
  hospital's three node types, planned jointly (one scheduler) or split into K shards
  (K schedulers, each with 1/K of the groups and of each type's workers). Mean utility and
  deadline met over all requests say what a shard loses by not pricing its requests
  against the whole cluster. Each shard's data come from its own seed, as different wards'
  would, so small differences are noise.
- ``uneven``: two wards, one RATIO times busier, planned jointly on all the workers or
  as two shards with half of them each (``--uneven RATIOS``).
- ``live`` (with ``--live``): K real runs side by side on this machine
  (``bench/scale.py --quick --groups N/K``, K LocalClusters at once), to measure what
  shards on one machine cost one another.

Samples are thumbnails (as in ``bench/scale.py``) so that beliefs for 100,000 groups fit in
memory. ``--quick``: smaller sizes, 20 simulated seconds. The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import derive, emit, machine  # noqa: E402

from serif_dask.capacity import SimulatedLoad, planned_documents, simulate  # noqa: E402
from serif_dask.config import SerifConfig, load_config, load_config_dicts  # noqa: E402

SHAPES = {"video": [3, 2, 4, 4], "audio": [64]}
SCALE = Path(__file__).resolve().parent / "scale.py"


def ward(tmp: Path, name: str, groups: int, sample_duration: float | None = None) -> SerifConfig:
    return load_config([derive(tmp / name, num_groups=groups, shapes=SHAPES,
                               sample_duration=sample_duration)])


def with_workers(config: SerifConfig, per_type: int) -> SerifConfig:
    """``config`` with ``per_type`` compute nodes of each of its node types."""
    counts = {t: per_type for t in config.system.node_types}
    docs, _ = planned_documents(config, counts)
    return load_config_dicts(docs["system"], docs["application"], docs["data"])


def plan_cost(tmp: Path, sizes: list[int], policy: str, seed: int) -> list[dict[str, Any]]:
    """Plan time per round at each size, both applications ticking every second."""
    out = []
    for groups in sizes:
        config = ward(tmp, f"cost-{groups}", groups, sample_duration=1.0)
        started = time.perf_counter()
        load = SimulatedLoad.build(config, duration=4.0, seed=seed, data_aware=True)
        build_s = time.perf_counter() - started
        times: list[tuple[int, float]] = []
        simulate(config, load, policy, plan_times=times)
        requests = np.asarray([n for n, _ in times], dtype=float)
        seconds = np.asarray([t for _, t in times], dtype=float)
        out.append({
            "groups": groups,
            "rounds": len(times),
            "requests_per_round": int(np.median(requests)),
            "plan_ms_p50": round(float(np.median(seconds)) * 1e3, 2),
            "plan_ms_max": round(float(seconds.max()) * 1e3, 2),
            "us_per_request": round(float(np.median(seconds / requests)) * 1e6, 3),
            "beliefs_build_s": round(build_s, 2),
        })
    return out


def sharding(tmp: Path, groups: int, per_type: int, shards: list[int], duration: float,
             policy: str, seed: int) -> dict[str, dict[str, Any]]:
    """The ward planned jointly and in K shards; totals over every request."""
    out = {}
    for k in shards:
        if groups % k or per_type % k:
            raise SystemExit(f"--groups {groups} and --per-type {per_type} must both "
                             f"divide into {k} shards")
        requests = completed = dropped = answered = 0
        utility = met = 0.0
        base = ward(tmp, f"shard-{groups // k}", groups // k)
        config = with_workers(base, per_type // k)
        for shard in range(k):
            load = SimulatedLoad.build(config, duration=duration, seed=seed + shard,
                                       data_aware=True)
            p = simulate(config, load, policy)
            requests += p.requests
            completed += p.completed
            dropped += p.dropped
            answered += p.answered
            utility += p.mean_utility * p.requests
            met += p.deadline_met * p.requests
        out[str(k)] = {
            "shards": k,
            "groups_per_shard": groups // k,
            "workers_per_shard": per_type // k * len(base.system.node_types),
            "requests": requests,
            "mean_utility": round(utility / requests, 4),
            "deadline_met": round(met / requests, 4),
            "dropped_share": round(dropped / requests, 4),
            "answered_share": round(answered / requests, 4),
        }
    joint = out[str(min(shards))]
    for row in out.values():
        row["utility_vs_fewest_shards"] = round(row["mean_utility"] - joint["mean_utility"], 4)
    return out


def _replay(config: SerifConfig, duration: float, policy: str, seed: int) -> dict[str, float]:
    load = SimulatedLoad.build(config, duration=duration, seed=seed, data_aware=True)
    p = simulate(config, load, policy)
    return {"requests": p.requests, "utility": p.mean_utility * p.requests,
            "met": p.deadline_met * p.requests, "answered": p.answered, "dropped": p.dropped}


def uneven(tmp: Path, groups: int, per_type: int, ratio: float, duration: float,
           policy: str, seed: int) -> dict[str, Any]:
    """Two wards, one ``ratio`` times busier than the other, on an even split of the
    workers (two shards) or on all of them (one joint plan): what a static split costs
    when the load is not where the workers are."""
    if per_type % 2:
        raise SystemExit("--per-type must be even for --uneven (two shards)")
    busy = round(groups * ratio / (1 + ratio))
    quiet = groups - busy
    arrangements = {
        "joint": [(with_workers(ward(tmp, f"joint-{groups}", groups), per_type), seed)],
        "sharded": [
            (with_workers(ward(tmp, f"busy-{busy}", busy), per_type // 2), seed),
            (with_workers(ward(tmp, f"quiet-{quiet}", quiet), per_type // 2), seed + 1),
        ],
    }
    out: dict[str, Any] = {"ratio": ratio, "busy_groups": busy, "quiet_groups": quiet}
    for name, parts in arrangements.items():
        runs = [_replay(config, duration, policy, s) for config, s in parts]
        requests = sum(r["requests"] for r in runs)
        out[name] = {
            "requests": requests,
            "mean_utility": round(sum(r["utility"] for r in runs) / requests, 4),
            "deadline_met": round(sum(r["met"] for r in runs) / requests, 4),
            "answered_share": round(sum(r["answered"] for r in runs) / requests, 4),
            "dropped_share": round(sum(r["dropped"] for r in runs) / requests, 4),
        }
    out["joint_gain"] = round(out["joint"]["mean_utility"] - out["sharded"]["mean_utility"], 4)
    return out


def live(groups: int, shards: list[int]) -> dict[str, Any]:
    """K ``bench/scale.py --quick`` runs at once, each with groups / K."""
    out = {}
    for k in shards:
        procs = [subprocess.Popen([sys.executable, str(SCALE), "--quick",
                                   "--groups", str(groups // k), "--seed", str(1 + i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for i in range(k)]
        runs = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=900)
            lines = stdout.strip().splitlines()
            runs.append(json.loads(lines[-1]) if proc.returncode == 0 and lines else
                        {"error": f"exit {proc.returncode}"})
        ok = [r for r in runs if "error" not in r]
        out[str(k)] = {
            "shards": k,
            "groups_per_shard": groups // k,
            "all_keep_up": len(ok) == k and all(r["keeps_up"] for r in ok),
            "requests_per_s": round(sum(r["requests_per_s"] for r in ok), 1),
            "offered_per_s": sum(r["offered_per_s"] for r in ok),
            "latency_p99_ms": max((r["latency_ms"]["p99"] or 0.0 for r in ok), default=None),
            "decision_p50_ms": max((r["decision_ms"]["p50"] or 0.0 for r in ok), default=None),
            "dropped": sum(r["dropped"] for r in ok),
            "failed": sum(r["failed"] for r in ok),
            "peak_rss_mb": round(sum(r.get("peak_rss_mb") or 0.0 for r in ok), 1),
            "errors": [r["error"] for r in runs if "error" in r],
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 20 s simulated")
    parser.add_argument("--sizes", default=None,
                        help="groups for plan_cost, comma-separated (default 10000,30000,"
                             "100000; quick: 10000,30000)")
    parser.add_argument("--groups", type=int, default=240, help="the sharded ward's groups")
    parser.add_argument("--per-type", type=int, default=4,
                        help="the sharded ward's workers of each node type")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--duration", type=float, default=None, help="simulated seconds")
    parser.add_argument("--policy", default="sneakpeek")
    parser.add_argument("--live", type=int, default=0, metavar="GROUPS",
                        help="also run bench/scale.py side by side, GROUPS split over shards")
    parser.add_argument("--uneven", default="1,3", metavar="RATIOS",
                        help="load ratios of a busy to a quiet ward, comma-separated, each "
                             "planned jointly and as two shards (default 1,3; none: skip)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("10000,30000" if args.quick
                                              else "10000,30000,100000")).split(",")]
    shards = [int(x) for x in args.shards.split(",")]
    duration = args.duration or (20.0 if args.quick else 60.0)

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="serif-bench-shards-") as tmp:
        cost = plan_cost(Path(tmp), sizes, args.policy, args.seed)
        split = sharding(Path(tmp), args.groups, args.per_type, shards, duration,
                         args.policy, args.seed)
    result: dict[str, Any] = {
        "policy": args.policy,
        "plan_cost": cost,
        "sharding": {"groups": args.groups, "workers_per_type": args.per_type,
                     "simulated_s": duration, "by_shards": split},
    }
    if args.uneven != "none":
        with tempfile.TemporaryDirectory(prefix="serif-bench-shards-") as tmp:
            result["uneven"] = [uneven(Path(tmp), args.groups, args.per_type, float(r),
                                       duration, args.policy, args.seed)
                                for r in args.uneven.split(",")]
    if args.live:
        result["live"] = {"groups": args.live, "by_shards": live(args.live, shards)}
    result["bench_wall_s"] = round(time.time() - started, 1)
    result.update(machine())
    emit(result)
    return result


if __name__ == "__main__":
    main()
