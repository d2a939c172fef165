"""Policy quality: utility of every policy against computed bounds, paired by seed.

Workloads, each its example config with only ``num-groups`` changed:

- ``hospital`` (``configs/hospital``): SERIF's fall detection and wake word, the two due
  together every 2 s.
- ``ward-busy`` (``configs/ward-busy``): rare falls worth fifty cleared patients.
- ``triage`` (``configs/triage``): SERIF's x3d models on a fall-triage utility.
- ``real-ward`` (``configs/real-ward``, when present): real models on a real data set.

Load. Offered GPU work per second, if every request ran on its application's biggest
model, is ``G · Σ_apps infer_big / sample_duration`` for G groups; capacity is the number
of GPU workers. Load ``L`` runs ``G = round(L · capacity_groups)`` groups.

Runs. In every cell (workload × load) each variant (a policy, data-aware or not) runs
once on the first seed; ``sneakpeek`` data-aware and the two best other variants then run
on every seed (``--seeds``, default 5). Runs of the same seed see the same samples and
labels, so comparisons are paired: ``ci`` holds, per cell, the mean and the 95 % interval
(Student t) of ``sneakpeek - other`` over the shared seeds. ``best_policy`` is the
variant with the highest mean utility; ``sneakpeek_ok`` says whether sneakpeek is it, or
not worse by a significant margin.

References, per run, from its own records (each request's app, tick and true label):

- ``bound``, perfect information: every request earns ``max_k U[c][k]`` for its true class
  c, what a look that knew the label would answer at no GPU cost. Nothing can earn more
  (timeliness is at most 1); the LP over models, answers and drops under worker-seconds is
  solved by that corner.
- ``oblivious_bound``, the best data-oblivious plan under the same cost model: per tick,
  one mix of models (and drops) for all its requests, since without a look they are alike,
  valued at their true classes; the pooled worker-seconds (``1 / Σ_w 1/infer``, no
  switches) of every window ``[s, e]`` hold the work of the ticks that arrive after ``s``
  and are due (2 × sla) before ``e``. An LP (HiGHS), a relaxation of every real plan, so an
  upper bound for data-oblivious runs; a data-oblivious run above it (beyond 3 standard
  errors of the models' own randomness) fails the bench.

``oracle_share`` is a run's mean utility over its ``bound``; ``gains`` is sneakpeek
data-aware over sneakpeek data-oblivious. ``--plot FILE`` draws utility against load per
workload; ``--readme`` rewrites the README's table. The last line is the JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client
from scipy import stats
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HOSPITAL, ROOT, derive, emit, machine  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402
from serif_dask.config import SerifConfig  # noqa: E402
from serif_dask.policies import builtin_policies  # noqa: E402
from serif_dask.utility import row_normalise  # noqa: E402

WORKLOADS = {
    "hospital": HOSPITAL,
    "ward-busy": ROOT / "configs" / "ward-busy",
    "triage": ROOT / "configs" / "triage",
    "real-ward": ROOT / "configs" / "real-ward",
}
#: Loads per workload in a full run: sized so the whole bench stays near 90 minutes on
#: two cores (about 20 runs of 20 s per cell).
LOADS = {"hospital": (0.5, 2.0, 4.0, 8.0), "triage": (0.5, 2.0, 4.0, 8.0),
         "ward-busy": (1.0, 4.0), "real-ward": (1.0, 4.0)}
QUICK = {"workloads": ("hospital", "triage"), "loads": (4.0,), "seeds": 2, "duration": 8.0,
         "variants": ("sneakpeek", "sneakpeek:oblivious", "fastest")}
#: Variants screened on the first seed: every built-in, data-aware, plus sneakpeek without
#: its look. Plain ``random`` and ``locally-optimal-edf`` are the cache-blind twins of
#: ``random-cache`` and ``locally-optimal-edf-cache``, which plan with strictly more.
SKIP = {"random", "locally-optimal-edf"}
MAIN = "sneakpeek"


def variants() -> tuple[str, ...]:
    names = [p for p in builtin_policies() if p not in SKIP]
    return (MAIN, *[p for p in names if p != MAIN], f"{MAIN}:oblivious")


def capacity_groups(config: SerifConfig) -> float:
    """Groups whose requests, all on the biggest models, keep every GPU exactly busy."""
    per_group = 0.0  # GPU seconds per second per group
    for app in config.apps:
        big = max(float(np.mean([v[0] for v in p.latencies.values()])) for p in app.model_profiles)
        per_group += big / app.sample_duration
    return len(config.system.compute_nodes) / per_group


# ----------------------------------------------------------------------------- bounds
def _model_values(app: Any) -> tuple[np.ndarray, np.ndarray]:
    """(E (M, K): expected U of model m for true class c, cost (M,): pooled seconds)."""
    u = np.asarray(app.utility_matrix, dtype=float)
    values = np.stack([(row_normalise(np.asarray(p.cmat, dtype=float)) * u).sum(axis=1)
                       for p in app.model_profiles])
    cost = np.asarray([1.0 / sum(1.0 / v[0] for v in p.latencies.values() if v[0] > 0)
                       for p in app.model_profiles])
    return values, cost


def bounds(config: SerifConfig, records: list[dict[str, Any]]) -> dict[str, float]:
    """The perfect-information and best data-oblivious bounds of one run's requests, as
    mean utility per request (see the module docstring), and the noise allowance."""
    labels: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in records:
        labels[(r["app"], int(r["tick"]))].append(-1 if r["label"] is None else r["label"])
    n_total = sum(len(v) for v in labels.values())
    perfect = 0.0
    cols, values, costs, rows_eq, window_rows = [], [], [], [], []
    for (name, tick), ys in sorted(labels.items()):
        app = config.app(name)
        u = np.asarray(app.utility_matrix, dtype=float)
        prior = np.asarray(app.prior, dtype=float)
        ys_arr = np.asarray(ys)
        known = ys_arr[ys_arr >= 0]
        perfect += float(u.max(axis=1)[known].sum()) + float(u.max()) * (ys_arr < 0).sum()
        e, cost = _model_values(app)
        # Value of serving this tick's requests with model m: at their true classes (the
        # prior's expectation where a label is unknown).
        counts = np.bincount(known, minlength=len(prior)).astype(float)
        counts += (ys_arr < 0).sum() * prior
        value = e @ counts
        n = len(ys)
        idx = np.arange(len(cols), len(cols) + len(cost) + 1)  # its models, then a drop
        cols += [(name, tick, m) for m in range(len(cost))] + [(name, tick, -1)]
        values += [*value, n * app.miss_utility]
        costs += [*(n * cost), 0.0]
        rows_eq.append(idx)
        arrival = tick * app.sample_duration
        window_rows.append((arrival, arrival + 2 * app.sla_latency, idx))
    n_var = len(cols)
    a_eq = np.zeros((len(rows_eq), n_var))
    for i, idx in enumerate(rows_eq):
        a_eq[i, idx] = 1.0
    starts = sorted({s for s, _, _ in window_rows})
    ends = sorted({e for _, e, _ in window_rows})
    a_ub, b_ub = [], []
    cost_arr = np.asarray(costs)
    for s in starts:
        for e in ends:
            if e <= s:
                continue
            row = np.zeros(n_var)
            for arr, due, idx in window_rows:
                if arr >= s and due <= e:
                    row[idx] = cost_arr[idx]
            if row.any():
                a_ub.append(row)
                b_ub.append(e - s)
    res = linprog(-np.asarray(values), A_ub=np.asarray(a_ub) if a_ub else None,
                  b_ub=b_ub or None, A_eq=a_eq, b_eq=np.ones(len(rows_eq)), bounds=(0, 1),
                  method="highs")
    if not res.success:
        raise RuntimeError(f"oblivious bound LP failed: {res.message}")
    return {"bound": perfect / n_total, "oblivious_bound": -res.fun / n_total,
            "noise": 3.0 * math.sqrt(_variance(config, records)) / n_total}


def _variance(config: SerifConfig, records: list[dict[str, Any]]) -> float:
    """Σ over completed requests of Var(U[c][pred]) under their model's confusion row: how
    far a run's utility may stray from its expectation by the models' own randomness."""
    total = 0.0
    for r in records:
        if r["outcome"] != "completed" or r["label"] is None or r["model"] == "sneakpeek":
            continue
        app = config.app(r["app"])
        u = np.asarray(app.utility_matrix, dtype=float)[r["label"]]
        p = row_normalise(np.asarray(config.model(r["app"], r["model"]).cmat, dtype=float))
        p = p[r["label"]]
        total += float(p @ u**2 - (p @ u) ** 2)
    return total


# ----------------------------------------------------------------------------- runs
def run_one(client: Client, config: SerifConfig, variant: str, seed: int, duration: float,
            tmp: Path, tag: dict[str, Any] | None = None) -> dict[str, Any]:
    policy, _, mode = variant.partition(":")
    records = tmp / f"{variant.replace(':', '-')}-{seed}.jsonl"
    s = Serif(client, config, policy=policy, data_aware=mode != "oblivious", seed=seed,
              records=records).run(duration)
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    records.unlink()
    gpu = sum(1 for r in recs if r["outcome"] == "completed" and r["model"] != "sneakpeek")
    row = {
        "variant": variant, "seed": seed, "mean_utility": round(s["mean_utility"], 4),
        "deadline_met": round(s["deadline_met"], 4), "dropped": s["dropped"],
        "failed": s["failed"], "requests": s["requests"],
        "gpu_served_share": round(gpu / max(s["requests"], 1), 4),
        "brier": s["sneakpeek"]["brier"], "brier_single": s["sneakpeek"]["brier_single"],
        "brier_prior": s["sneakpeek"]["brier_prior"],
        **{k: round(v, 4) for k, v in bounds(config, recs).items()},
    }
    row["oracle_share"] = round(row["mean_utility"] / row["bound"], 4) if row["bound"] else None
    if row["mean_utility"] > row["bound"] + 1e-9:
        raise AssertionError(f"{variant} seed {seed} earned {row['mean_utility']} above the "
                             f"perfect-information bound {row['bound']}")
    if mode == "oblivious" and row["mean_utility"] > row["oblivious_bound"] + row["noise"]:
        raise AssertionError(f"{variant} seed {seed} earned {row['mean_utility']} above the "
                             f"data-oblivious bound {row['oblivious_bound']} (+{row['noise']})")
    print(json.dumps((tag or {}) | row), file=sys.stderr, flush=True)  # --rows reads these
    return row


def paired(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Mean and 95 % interval of (a - b) over the seeds both ran."""
    ua = {r["seed"]: r["mean_utility"] for r in rows if r["variant"] == a}
    ub = {r["seed"]: r["mean_utility"] for r in rows if r["variant"] == b}
    d = np.asarray([ua[s] - ub[s] for s in sorted(set(ua) & set(ub))])
    if d.size == 0:
        return None
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)) \
        if d.size > 1 else float("inf")
    return {"mean": round(float(d.mean()), 4), "lo": round(float(d.mean()) - half, 4),
            "hi": round(float(d.mean()) + half, 4), "n": int(d.size)}


def run_cell(client: Client, config: SerifConfig, names: tuple[str, ...], seeds: list[int],
             duration: float, tmp: Path, tag: dict[str, Any]) -> dict[str, Any]:
    rows = [tag | run_one(client, config, v, seeds[0], duration, tmp, tag) for v in names]
    first = {r["variant"]: r["mean_utility"] for r in rows}
    others = sorted((v for v in names if v != MAIN), key=lambda v: -first[v])[:2]
    for seed in seeds[1:]:
        rows += [tag | run_one(client, config, v, seed, duration, tmp, tag)
                 for v in (MAIN, *others)]
    return aggregate(rows)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures from its runs (those of ``run_cell``, or rows saved earlier)."""
    names = tuple(dict.fromkeys(r["variant"] for r in rows))
    first_seed = rows[0]["seed"]
    first = {r["variant"]: r["mean_utility"] for r in rows if r["seed"] == first_seed}
    others = sorted((v for v in names if v != MAIN), key=lambda v: -first[v])[:2]
    mean = {v: float(np.mean([r["mean_utility"] for r in rows if r["variant"] == v]))
            for v in names}
    best = max(mean, key=mean.get)
    ci = {v: paired(rows, MAIN, v) for v in names if v != MAIN}
    ok = best == MAIN or (ci[best] is not None and ci[best]["hi"] >= 0)
    main_rows = [r for r in rows if r["variant"] == MAIN]
    return {
        "rows": rows, "mean_utility": {v: round(m, 4) for v, m in mean.items()},
        "finalists": [MAIN, *others], "best_policy": best, "sneakpeek_ok": ok, "ci": ci,
        "bound": round(float(np.mean([r["bound"] for r in main_rows])), 4),
        "oblivious_bound": round(float(np.mean([r["oblivious_bound"] for r in main_rows])), 4),
        "oracle_share": round(float(np.mean([r["oracle_share"] for r in main_rows])), 4),
        "gpu_served_share": {v: round(float(np.mean([r["gpu_served_share"] for r in rows
                                                     if r["variant"] == v])), 4)
                             for v in names},
        "brier": {k: _mean(main_rows, k) for k in ("brier", "brier_single", "brier_prior")},
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return round(float(np.mean(values)), 4) if values else None


# ----------------------------------------------------------------------------- output
def plot(cells: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 3.6), squeeze=False)
    for ax, (workload, by_load) in zip(axes[0], cells.items(), strict=True):
        loads = sorted(by_load, key=float)
        x = [float(v) for v in loads]
        for variant in by_load[loads[0]]["mean_utility"]:
            y = [by_load[v]["mean_utility"].get(variant, np.nan) for v in loads]
            ax.plot(x, y, marker="o", lw=2.5 if variant == MAIN else 1, label=variant)
        ax.plot(x, [by_load[v]["bound"] for v in loads], "k--", label="perfect information")
        ax.plot(x, [by_load[v]["oblivious_bound"] for v in loads], "k:",
                label="best data-oblivious")
        ax.set_xscale("log", base=2)
        ax.set(title=workload, xlabel="load (x capacity)", ylabel="mean utility")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(cells: dict[str, dict[str, dict[str, Any]]], duration: float, seeds: int) -> str:
    lines = [
        f"Measured by `bench/policy_quality.py` ({duration:g} s runs, {seeds} seeds for the "
        "finalists); mean utility, sneakpeek's paired difference to the best other variant "
        "with its 95 % interval, and the bounds.",
        "",
        "| workload | load | sneakpeek | best other | sneakpeek − best other (95 % CI) | "
        "perfect-information bound | best data-oblivious | share of bound | GPU-served |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, by_load in cells.items():
        for load, cell in sorted(by_load.items(), key=lambda kv: float(kv[0])):
            mean = cell["mean_utility"]
            other = max((v for v in mean if v != MAIN), key=mean.get)
            ci = cell["ci"][other]
            lines.append(
                f"| {workload} | {load}x | {mean[MAIN]:.3f} | {other} {mean[other]:.3f} | "
                f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}] | {cell['bound']:.3f} | "
                f"{cell['oblivious_bound']:.3f} | {cell['oracle_share']:.2f} | "
                f"{cell['gpu_served_share'][MAIN]:.2f} |")
    return "\n".join(lines)


def rewrite_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    begin, end = "<!-- policy-quality:begin -->", "<!-- policy-quality:end -->"
    doc = readme.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"README.md has no {begin} ... {end} section")
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", doc))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="hospital and triage at 4x, three variants, 2 seeds, 8 s runs")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the finalists")
    parser.add_argument("--workloads", nargs="*", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--loads", type=float, nargs="*", default=None)
    parser.add_argument("--cells", nargs="*", default=None, metavar="WORKLOAD=L1,L2",
                        help="only these workloads, each at its own loads "
                        "(e.g. hospital=4,8 triage=4); overrides --workloads and --loads")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="e.g. sneakpeek fastest sneakpeek:oblivious")
    parser.add_argument("--rows", type=Path, nargs="*", default=(),
                        help="runs saved earlier (the JSON lines this bench prints on stderr): "
                        "their cells join the result, and are not run again")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of utility vs load")
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    args = parser.parse_args(argv)
    quick = args.quick
    workloads = args.workloads or (QUICK["workloads"] if quick else
                                   [w for w, p in WORKLOADS.items() if p.is_dir()])
    chosen: dict[str, tuple[float, ...]] = {}
    for item in args.cells or ():
        workload, _, loads_text = item.partition("=")
        if workload not in WORKLOADS or not loads_text:
            parser.error(f"--cells {item!r}: expected WORKLOAD=L1,L2 with WORKLOAD one of "
                         f"{', '.join(sorted(WORKLOADS))}")
        chosen[workload] = tuple(float(x) for x in loads_text.split(","))
    if chosen:
        workloads = list(chosen)
    duration = QUICK["duration"] if quick and args.duration == 20.0 else args.duration
    n_seeds = QUICK["seeds"] if quick and args.seeds == 5 else args.seeds
    names = tuple(args.variants or (QUICK["variants"] if quick else variants()))
    if MAIN not in names:
        names = (MAIN, *names)
    seeds = [3 + 10 * i for i in range(n_seeds)]

    started = time.time()
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    saved: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in args.rows:
        for line in path.read_text().splitlines():
            if line.startswith("{") and '"workload"' in line:
                row = json.loads(line)
                saved.setdefault((row["workload"], str(row["load"])), []).append(row)
    for (workload, load), rows in saved.items():
        cells.setdefault(workload, {})[load] = aggregate(rows) | {"groups": rows[0]["groups"]}
    if args.rows and not args.cells:
        workloads = []  # only what was saved
    with tempfile.TemporaryDirectory(prefix="serif-bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        for workload in workloads:
            base_dir = WORKLOADS[workload]
            base = load_config([base_dir])
            cap = capacity_groups(base)
            loads = chosen.get(workload) or args.loads or (
                QUICK["loads"] if quick else LOADS[workload])
            with local_cluster(base) as cluster, Client(cluster) as client:
                for load in loads:
                    if str(load) in cells.get(workload, {}):
                        continue  # saved
                    groups = max(1, round(load * cap))
                    config = load_config([derive(tmp / f"{workload}-{load}",
                                                 num_groups=groups, base=base_dir)])
                    tag = {"workload": workload, "load": load, "groups": groups}
                    cell = run_cell(client, config, names, seeds, duration, tmp, tag)
                    cell["groups"] = groups
                    cells.setdefault(workload, {})[str(load)] = cell
    summary = {
        w: {load: {k: c[k] for k in ("best_policy", "sneakpeek_ok", "oracle_share")}
            for load, c in by_load.items()} for w, by_load in cells.items()}
    gains = {w: {load: (round(c["mean_utility"][MAIN] / c["mean_utility"][f"{MAIN}:oblivious"],
                              3) if c["mean_utility"].get(f"{MAIN}:oblivious", 0) > 0 else None)
                 for load, c in by_load.items()} for w, by_load in cells.items()}
    result = {
        "gains": gains,
        "ci": {w: {load: c["ci"] for load, c in b.items()} for w, b in cells.items()},
        "bound": {w: {load: c["bound"] for load, c in b.items()} for w, b in cells.items()},
        "oblivious_bound": {w: {load: c["oblivious_bound"] for load, c in b.items()}
                            for w, b in cells.items()},
        "oracle_share": {w: {load: c["oracle_share"] for load, c in b.items()}
                         for w, b in cells.items()},
        "best_policy": {w: {load: c["best_policy"] for load, c in b.items()}
                        for w, b in cells.items()},
        "summary": summary,
        "cells": cells,
        "duration_s": duration,
        "seeds": seeds,
        "bench_wall_s": round(time.time() - started, 1),
        **machine(),
    }
    if args.plot:
        plot(cells, args.plot)
    if args.readme:
        rewrite_readme(table(cells, duration, n_seeds))
    emit(result)
    return result


if __name__ == "__main__":
    main()
