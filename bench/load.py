"""Load experiments on live inputs (Crayfish's set): input-rate sweep, bursty rate, scalability.

Every run reads its samples from Redis streams (``"impl": "redis-stream"``) that a
:class:`serif_dask.feed.Feeder` fills beside it, as ``serif-dask feed`` would, on one
embedded redis-server this bench starts and stops.

* ``rate_sweep``: offered requests per second = groups × applications / sample-duration,
  raised by shortening the tick period (the feeder pushes at twice the tick rate, so every
  tick finds a fresh sample). On ``configs/hospital`` in profile mode (``config:
  "profile"``, 3 GPU workers whose models sleep their profiled latency) and on
  ``configs/digits`` with its real models (``config: "digits"``, samples from the
  bundled test images, SneakPeek calibrated on their calibration split).
* ``burst``: profile mode, ticks every 0.5 s; the feeder pushes every group at a base rate
  of one sample per 2 s (each group has input at one tick in four) and ×8 (every tick)
  for ``on`` seconds of every ``every``; requests, goodput, p99 and utility per phase.
* ``scalability``: 1..N GPU workers at a fixed overloaded rate, profile mode. The models
  only sleep, so this measures how well the framework spreads work (dispatch, planning,
  batching), not compute.

``goodput`` is requests completed within their SLA per second; ``p99_ms`` is over completed
requests; ``mean_utility`` over requests that had an input (a tick that found no fresh
sample fails ``no-sample``, counted apart). ``--quick`` takes about two minutes on two
cores; ``--plots DIR`` writes PNGs. The last line printed is the JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402
from _live import digits_docs, live, metrics, profile_docs, serve_live  # noqa: E402

from serif_dask import load_config, local_cluster  # noqa: E402
from serif_dask.feed import Schedule  # noqa: E402
from serif_dask.redis_server import EmbeddedRedis  # noqa: E402

#: The rate experiments' groups; scalability's latency scale makes one worker 4x overloaded.
GROUPS = {"profile": 40, "digits": 32}
#: An unrecorded run on each fresh cluster first (workers import torch, fit, connect).
WARMUP_S = 2.0


def _sla(config: Any) -> dict[str, float]:
    return {a.name: a.sla_latency for a in config.apps}


def _cluster_for(docs: dict[str, Any], tmp: Path) -> Any:
    from _common import write_config

    return local_cluster(load_config(write_config(docs, tmp)))


def rate_sweep(redis: EmbeddedRedis, tmp: Path, kind: str, periods: list[float],
               duration: float) -> list[dict[str, Any]]:
    make = profile_docs if kind == "profile" else digits_docs
    groups = GROUPS[kind]
    out = []
    first = live(make(groups, periods[0]), redis.port)
    with _cluster_for(first, tmp / f"{kind}-cluster") as cluster, Client(cluster) as client:
        for period in periods:
            docs = live(make(groups, period), redis.port)
            n_apps = len(docs["application"]["applications"])
            run = serve_live(client, redis, docs, tmp / f"{kind}-{period}",
                             Schedule(rate=2.0 / period), duration,
                             source="synthetic" if kind == "profile" else "digits",
                             warmup=WARMUP_S if period == periods[0] else 0.0)
            m = metrics(run["rows"], _sla(run["config"]), duration)
            out.append({"config": kind, "rate": round(groups * n_apps / period, 1),
                        "period_s": period, **m, "accuracy": run["summary"]["accuracy"]})
    return out


def burst(redis: EmbeddedRedis, tmp: Path, duration: float, on: float, every: float,
          ) -> dict[str, Any]:
    period, base, factor = 0.5, 0.5, 8.0
    docs = live(profile_docs(GROUPS["profile"], period), redis.port)
    schedule = Schedule(rate=base, burst=(factor, on, every))
    with _cluster_for(docs, tmp / "burst-cluster") as cluster, Client(cluster) as client:
        run = serve_live(client, redis, docs, tmp / "burst", schedule, duration,
                         warmup=WARMUP_S)
    sla = _sla(run["config"])
    phases: dict[str, list[dict[str, Any]]] = {"base": [], "burst": []}
    for row in run["rows"]:
        phase = "burst" if schedule.in_burst(row["arrival"] - run["feed_start"]) else "base"
        phases[phase].append(row)
    # seconds of each phase within the run
    n_cycles, rest = divmod(duration, every)
    burst_s = n_cycles * on + min(rest, on)
    result: dict[str, Any] = {"period_s": period, "base_rate_hz": base, "factor": factor,
                              "on_s": on, "every_s": every, "duration_s": duration}
    for phase, seconds in (("base", duration - burst_s), ("burst", burst_s)):
        m = metrics(phases[phase], sla, seconds)
        m["offered_rps"] = round(m["with_input"] / seconds, 1)
        result[phase] = m
    result["timeline"] = _timeline(run["rows"], run["feed_start"], sla, duration)
    return result


def _timeline(rows: list[dict[str, Any]], t0: float, sla: dict[str, float],
              duration: float) -> list[dict[str, Any]]:
    """Per second of arrival: requests with input, and completed within SLA."""
    bins = [{"t": s, "with_input": 0, "good": 0} for s in range(int(duration) + 2)]
    for r in rows:
        s = int(r["arrival"] - t0)
        if not 0 <= s < len(bins) or (r["reason"] or "").startswith("no-sample"):
            continue
        bins[s]["with_input"] += 1
        if r["outcome"] == "completed" and r["latency"] <= sla[r["app"]]:
            bins[s]["good"] += 1
    return bins


def scalability(redis: EmbeddedRedis, tmp: Path, workers: list[int], duration: float,
                ) -> list[dict[str, Any]]:
    period = 0.5
    groups = GROUPS["profile"]
    # The cheapest models' work at this rate is 4x what one worker can do.
    base = profile_docs(groups, period)
    work = sum(groups / period * min(p["latencies"]["bay-a"][0] for p in a["model-profiles"])
               for a in base["application"]["applications"])
    scale = 4.0 / work
    out = []
    for n in workers:
        docs = live(profile_docs(groups, period, nodes=n, latency_scale=scale), redis.port)
        with _cluster_for(docs, tmp / f"scale-{n}-cluster") as cluster, \
                Client(cluster) as client:
            run = serve_live(client, redis, docs, tmp / f"scale-{n}", Schedule(rate=2 / period),
                             duration, warmup=WARMUP_S)
        m = metrics(run["rows"], _sla(run["config"]), duration)
        out.append({"workers": n, "goodput": m["goodput"], "mean_utility": m["mean_utility"],
                    "p99_ms": m["p99_ms"], "requests": m["requests"],
                    "dropped": m["dropped"]})
    return out


def plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in GROUPS:
        pts = [p for p in result["rate_sweep"] if p["config"] == kind]
        if pts:
            axes[0].plot([p["rate"] for p in pts], [p["goodput"] for p in pts], "o-", label=kind)
            axes[1].plot([p["rate"] for p in pts], [p["p99_ms"] or 0 for p in pts], "o-",
                         label=kind)
    axes[0].plot(*[[0, max(p["rate"] for p in result["rate_sweep"])]] * 2, "k:", label="ideal")
    axes[0].set(xlabel="offered requests/s", ylabel="goodput (within SLA)/s")
    axes[1].set(xlabel="offered requests/s", ylabel="p99 latency (ms)")
    axes[0].legend()
    fig.tight_layout()
    files.append(str(out / "rate_sweep.png"))
    fig.savefig(files[-1])
    plt.close(fig)

    tl = result["burst"]["timeline"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.step([b["t"] for b in tl], [b["with_input"] for b in tl], where="post", label="offered")
    ax.step([b["t"] for b in tl], [b["good"] for b in tl], where="post", label="within SLA")
    ax.set(xlabel="seconds", ylabel="requests per second", title="bursty input rate")
    ax.legend()
    fig.tight_layout()
    files.append(str(out / "burst.png"))
    fig.savefig(files[-1])
    plt.close(fig)

    sc = result["scalability"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["workers"] for p in sc], [p["goodput"] for p in sc], "o-")
    ax.set(xlabel="GPU workers (profile mode)", ylabel="goodput/s", title="scalability")
    fig.tight_layout()
    files.append(str(out / "scalability.png"))
    fig.savefig(files[-1])
    plt.close(fig)
    return files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (~2 minutes)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per point")
    parser.add_argument("--workers", type=int, default=None, help="scalability up to N")
    parser.add_argument("--plots", type=Path, default=None, help="write PNGs here")
    args = parser.parse_args(argv)
    duration = args.duration or (5.0 if args.quick else 20.0)
    periods = {"profile": [1.0, 0.5, 0.25] if args.quick else [2.0, 1.0, 0.5, 0.25, 0.125],
               "digits": [1.0, 0.25] if args.quick else [1.0, 0.5, 0.25, 0.125]}
    n_workers = args.workers or (2 if args.quick else 4)
    started = time.time()
    load0 = round(os.getloadavg()[0], 2)  # a shared machine: say how busy it was
    with tempfile.TemporaryDirectory(prefix="serif-bench-load-") as tmp_name, \
            EmbeddedRedis() as redis:
        tmp = Path(tmp_name)
        sweep = [p for kind in GROUPS for p in rate_sweep(redis, tmp, kind, periods[kind],
                                                           duration)]
        bursty = burst(redis, tmp, duration=12.0 if args.quick else 40.0,
                       on=3.0 if args.quick else 4.0, every=6.0 if args.quick else 10.0)
        scale = scalability(redis, tmp, list(range(1, n_workers + 1)), duration)
    result: dict[str, Any] = {
        "rate_sweep": sweep,
        "burst": bursty,
        "scalability": scale,
        "scalability_note": "profile mode: models sleep their profiled latency, so this "
                            "measures the framework (dispatch, planning, batching), not compute",
        "duration_s": duration,
        "quick": args.quick,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
        "load_avg_1m": {"start": load0, "end": round(os.getloadavg()[0], 2)},
    }
    if args.plots:
        result["plots"] = plot(result, args.plots)
    emit(result)
    return result


if __name__ == "__main__":
    main()
