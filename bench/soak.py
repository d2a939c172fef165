"""Soak: does ``serif-dask run`` keep flat memory when it runs for a long time?

Workload: a config (``configs/hospital`` by default, ``--config digits`` for real models)
whose ticks come ``--rate-scale`` K times faster: every application's ``sample-duration``
is divided by K, its SLA too (but not below ``--min-sla``, so the engine's fixed
per-hop latency does not turn the run into an overload test), and every profile-mode
model's latencies by K, so the load on the GPUs stays what the config offers. Bounded
logs therefore fill K times sooner than at the config's own rate.

It runs the real command line, ``serif-dask run DIR --duration ... --records ...``, as a
child process (the LocalCluster scheduler lives in that process, as in production), and
every ``--every`` seconds samples the resident memory (RSS) of each process of its tree:
``scheduler+driver``, each Dask worker by name, ``redis`` when one runs. A Dask client
beside it also counts, at each sample, the entries of every log and map that a run adds
to (``serif_dask.memory.scheduler_sizes`` / ``worker_sizes``): what levels off is bounded,
what keeps climbing leaks.

Result (one JSON object, last line): ``rss_mb`` (series per process and ``total``),
``t_s``, ``slope_mb_per_min`` per process and ``total`` (least squares over the second
half), ``over_first_half_peak_mb`` per process (second-half max minus first-half max),
``sizes`` at the first, middle and last sample, the run's summary, the records files'
size on disk (``--records-max-bytes`` rotates them), the processes ``/metrics`` reports
and ``targets``: total slope <= 1 MB/min and no process > 50 MB above its first-half peak.
``--trace`` also runs tracemalloc in every process and reports the allocation sites that
grew most between the middle and the end; its snapshots run on each process's event loop
and stall it for seconds (on a loaded 2-core machine the driver lost its scheduler), so use
it at low rates. Object counts by type (``gc``) are taken after warm-up, at half-time and at
the end. ``--plot FILE`` draws the RSS series.

``--quick`` runs 5 minutes, the default 30. Needs the test extras (psutil).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, load_docs, machine, write_config  # noqa: E402

from serif_dask.memory import scheduler_sizes, worker_sizes  # noqa: E402

CONFIGS = {"hospital": ROOT / "configs" / "hospital", "digits": ROOT / "configs" / "digits"}


#: ``--small-inputs``: thumbnails for the synthetic modalities (as bench/overload.py uses).
SMALL = {"video": [3, 2, 4, 4], "audio": [64]}


def derive(base: Path, target: Path, k: float, min_sla: float,
           small: bool = False) -> tuple[Path, dict[str, Any]]:
    """``base`` with ticks K times faster; returns the directory and what was changed."""
    docs = copy.deepcopy(load_docs(base))
    changed: dict[str, Any] = {}
    for mod in docs["data"]["data-modalities"]:
        if small and mod.get("use-synthetic-data", False) and mod["name"] in SMALL:
            mod["synthetic-shape"] = SMALL[mod["name"]]
            changed.setdefault("small_inputs", {})[mod["name"]] = SMALL[mod["name"]]
    for app in docs["application"]["applications"]:
        period = float(app["sample-duration"]) / k
        sla = max(float(app["sla-latency"]) / k, min_sla)
        app["sample-duration"], app["sla-latency"] = period, sla
        changed[app["name"]] = {"sample_duration_s": period, "sla_s": sla}
        for profile in app["model-profiles"]:
            if profile.get("use-profile", False):
                profile["latencies"] = {
                    node: [float(v[0]) / k, float(v[1]) / k]
                    for node, v in profile["latencies"].items()
                }
    for app in docs["application"]["applications"]:  # weights paths stay where they are
        for profile in app["model-profiles"]:
            for key in ("model-weights", "model-data"):
                if profile.get(key) and not Path(profile[key]).is_absolute():
                    profile[key] = str((base / profile[key]).resolve())
    return write_config(docs, target), changed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_scheduler(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> str:
    """The scheduler's address, from the dashboard's identity page once it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serif-dask run exited early ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/identity.json",
                                        timeout=2) as r:
                return json.loads(r.read())["address"]
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the scheduler's dashboard did not answer")


def metrics_processes(port: int) -> dict[str, float]:
    """``serif_process_resident_bytes`` from the scheduler's ``/metrics``, in MB."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'serif_process_resident_bytes\{(.*)\} (\S+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels.get("process", "?")] = round(float(m.group(2)) / 2**20, 1)
    return out


# tracemalloc, run inside each process through the client -------------------------------
def trace_mark() -> bool:
    import tracemalloc

    if not tracemalloc.is_tracing():
        return False
    # Kept on the module: this function reaches the process pickled by value, with
    # globals of its own on every call.
    tracemalloc._serif_mark = tracemalloc.take_snapshot()  # type: ignore[attr-defined]
    return True


def trace_growth(top: int = 8) -> list[str]:
    import tracemalloc

    mark = getattr(tracemalloc, "_serif_mark", None)
    if mark is None or not tracemalloc.is_tracing():
        return []
    now = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = now.compare_to(mark, "lineno")
    return [str(s) for s in stats[:top]]


def object_counts() -> dict[str, int]:
    """Live objects by type name in this process (gc-tracked ones): a leak's fingerprint."""
    import gc
    from collections import Counter

    gc.collect()
    return dict(Counter(type(o).__name__ for o in gc.get_objects()))


def count_growth(before: dict[str, int], after: dict[str, int], top: int = 12) -> dict:
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    return dict(sorted(((k, v) for k, v in grown.items() if v), key=lambda kv: -kv[1])[:top])


class Processes:
    """The run's process tree, each process named: scheduler+driver, workers, redis."""

    def __init__(self, root: psutil.Process, worker_pids: dict[int, str]):
        self.root = root
        self.worker_pids = worker_pids

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return out
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2**20
                if proc.pid == self.root.pid:
                    name = "scheduler+driver"
                elif proc.pid in self.worker_pids:
                    name = self.worker_pids[proc.pid]
                elif "redis" in proc.name():
                    name = "redis"
                else:
                    name = proc.name()
            except psutil.Error:  # ended meanwhile
                continue
            out[name] = out.get(name, 0.0) + rss
        return out


def slope(t_s: list[float], values: list[float]) -> float:
    """MB per minute, least squares over the second half of the run."""
    t = np.asarray(t_s, dtype=float)
    v = np.asarray(values, dtype=float)
    keep = t >= t[-1] / 2
    if keep.sum() < 3:
        return float("nan")
    return float(np.polyfit(t[keep] / 60.0, v[keep], 1)[0])


def plot(path: Path, t_s: list[float], rss: dict[str, list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_total, ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    minutes = np.asarray(t_s) / 60.0
    ax_total.plot(minutes, rss["total"], color="black")
    ax_total.set_ylabel("total RSS (MB)")
    ax_total.set_title(title)
    for name, values in sorted(rss.items()):
        if name != "total":
            ax.plot(minutes, values, label=name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS per process (MB)")
    ax.legend(fontsize=7, ncol=3)
    for a in (ax_total, ax):
        a.axvline(minutes[-1] / 2, color="grey", lw=0.5, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 minutes")
    parser.add_argument("--minutes", type=float, default=None, help="default 30 (quick: 5)")
    parser.add_argument("--rate-scale", type=float, default=8.0, help="K: ticks K× faster")
    parser.add_argument("--config", default="hospital", help="hospital, digits or a directory")
    parser.add_argument("--min-sla", type=float, default=0.25, help="floor of scaled SLAs, s")
    parser.add_argument("--every", type=float, default=None, help="seconds between samples")
    parser.add_argument("--small-inputs", action="store_true",
                        help="thumbnail synthetic samples, for a machine that cannot make "
                        "K times the config's video")
    parser.add_argument("--records-max-bytes", default="16MB",
                        help="rotate the records file at this size (serif-dask run's option)")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in every process")
    parser.add_argument("--plot", type=Path, default=None, help="draw the RSS series here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    minutes = args.minutes or (5.0 if args.quick else 30.0)
    every = args.every or max(2.0, min(20.0, minutes * 60 / 60))
    base = CONFIGS.get(args.config, Path(args.config))

    bench_started = time.time()
    with tempfile.TemporaryDirectory(prefix="serif-bench-soak-") as tmp:
        config_dir, changed = derive(base, Path(tmp) / "config", args.rate_scale,
                                     args.min_sla, args.small_inputs)
        records = Path(tmp) / "records.jsonl"
        summary_path = Path(tmp) / "summary.json"
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "serif-dask"), "run", str(config_dir),
               "--duration", str(minutes * 60), "--seed", str(args.seed), "--quiet",
               "--json", str(summary_path), "--records", str(records),
               "--dashboard-address", f"127.0.0.1:{port}"]
        if args.records_max_bytes:
            cmd += ["--records-max-bytes", args.records_max_bytes]
        env = dict(os.environ)
        if args.trace:
            env["PYTHONTRACEMALLOC"] = "1"
        log_path = Path(tmp) / "run.log"  # a file, not a pipe nobody reads while it runs
        log = log_path.open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, text=True)
        t_s: list[float] = []
        rss: dict[str, list[float]] = {}
        sizes: list[dict[str, Any]] = []
        growth: dict[str, list[str]] = {}
        reported: dict[str, float] = {}
        try:
            address = wait_scheduler(port, proc)
            with Client(address, timeout="30s") as client:
                while client.run_on_scheduler(_run_id) is None:  # the run is configured
                    time.sleep(0.5)
                    if proc.poll() is not None:
                        raise RuntimeError("serif-dask run exited before its run began")
                names = {a: w["name"] for a, w in client.scheduler_info()["workers"].items()}
                pids = {pid: str(names.get(a, a)) for a, pid in client.run(os.getpid).items()}
                tree = Processes(psutil.Process(proc.pid), pids)
                start = time.monotonic()
                end = start + minutes * 60
                marked = False
                counts: list[dict[str, dict[str, int]]] = []

                def snapshot() -> None:
                    objs = {"scheduler+driver": client.run_on_scheduler(object_counts)}
                    for addr, c in client.run(object_counts).items():
                        objs[str(names.get(addr, addr))] = c
                    counts.append(objs)

                while proc.poll() is None and time.monotonic() < end - 1:
                    now = time.monotonic() - start
                    sample = tree.sample()
                    t_s.append(round(now, 1))
                    for name in set(sample) | set(rss):
                        rss.setdefault(name, [float("nan")] * (len(t_s) - 1))
                        rss[name].append(round(sample.get(name, float("nan")), 1))
                    sizes.append(_sizes(client, now))
                    if (len(counts) == 0 and now >= minutes * 6) or (
                            len(counts) == 1 and now >= minutes * 30):
                        snapshot()  # after warm-up (a tenth of the run), and at half-time
                    if args.trace and not marked and now >= minutes * 30:
                        client.run_on_scheduler(trace_mark)
                        client.run(trace_mark)
                        marked = True
                    time.sleep(max(0.0, start + len(t_s) * every - time.monotonic()))
                if proc.poll() is None and counts:
                    snapshot()
                if args.trace and marked:
                    growth["scheduler+driver"] = client.run_on_scheduler(trace_growth)
                    for addr, lines in client.run(trace_growth).items():
                        growth[str(names.get(addr, addr))] = lines
                if proc.poll() is None:
                    reported = metrics_processes(port)
            proc.wait(timeout=600)
        except BaseException:
            log.flush()
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            log.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        output = log_path.read_text(errors="replace").splitlines()
        if proc.returncode != 0:
            tail = "\n".join(output[-20:])
            raise RuntimeError(f"serif-dask run failed ({proc.returncode}): {tail}")
        warnings = [line for line in output if line.startswith(("WARNING", "ERROR"))]
        summary = json.loads(summary_path.read_text())
        files = sorted(p for p in Path(tmp).iterdir() if p.name.startswith("records.jsonl"))
        disk = {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}

    rss["total"] = [round(float(np.nansum([rss[n][i] for n in rss])), 1) for i in range(len(t_s))]
    half = np.asarray(t_s) < t_s[-1] / 2
    slopes = {n: round(slope(t_s, v), 3) for n, v in rss.items()}
    over = {}
    for name, values in rss.items():
        v = np.asarray(values, dtype=float)
        if np.isfinite(v[half]).any() and np.isfinite(v[~half]).any():
            over[name] = round(float(np.nanmax(v[~half]) - np.nanmax(v[half])), 1)
    worst = max((d for n, d in over.items() if n != "total"), default=0.0)
    mid = sizes[len(sizes) // 2] if sizes else {}
    result = {
        "config": args.config,
        "rate_scale": args.rate_scale,
        "small_inputs": args.small_inputs,
        "minutes": minutes,
        "every_s": every,
        "apps": changed,
        "t_s": t_s,
        "rss_mb": rss,
        "slope_mb_per_min": slopes,
        "over_first_half_peak_mb": over,
        "targets": {
            "total_slope_le_1_mb_per_min": bool(slopes["total"] <= 1.0),
            "no_process_over_first_half_peak_by_50_mb": bool(worst <= 50.0),
        },
        "sizes": {"first": sizes[0] if sizes else {}, "middle": mid,
                  "last": sizes[-1] if sizes else {}},
        "tracemalloc_growth": growth,
        "object_count_growth": {
            "first_to_middle": {n: count_growth(counts[0][n], counts[1].get(n, {}))
                                for n in counts[0]} if len(counts) > 1 else {},
            "middle_to_last": {n: count_growth(counts[1][n], counts[-1].get(n, {}))
                               for n in counts[1]} if len(counts) > 2 else {},
        },
        "metrics_resident_mb": reported,
        "records_disk": disk,
        "run_warnings": {"count": len(warnings), "first": warnings[:5], "last": warnings[-5:]},
        "summary": {k: summary.get(k) for k in (
            "requests", "completed", "dropped", "failed", "deadline_met", "ticks",
            "ticks_late", "mean_utility", "latency_ms", "failures_by_reason")},
        "bench_wall_s": round(time.time() - bench_started, 1),
        **machine(),
    }
    if args.plot:
        plot(args.plot, t_s, rss, f"{args.config} at {args.rate_scale:g}x, {minutes:g} min")
    emit(result)
    return result


def _run_id(dask_scheduler: Any) -> str | None:
    plugin = dask_scheduler.plugins.get("serif")
    return None if plugin is None else plugin.run_id


def _sizes(client: Client, now: float) -> dict[str, Any]:
    """State sizes on the scheduler and, summed over them, the workers."""
    out: dict[str, Any] = {"t_s": round(now, 1), "scheduler": client.run_on_scheduler(
        scheduler_sizes)}
    per_worker = client.run(worker_sizes)
    total: dict[str, int] = {}
    for sizes in per_worker.values():
        for key, value in sizes.items():
            total[key] = total.get(key, 0) + value
    out["workers"] = total
    return out


if __name__ == "__main__":
    main()
