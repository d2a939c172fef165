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
``heap`` samples the scheduler+driver process's heap beside its RSS at every sample (RSS
split anonymous/file/shared, glibc's arenas over all threads: in use, free, mmapped; gc
objects), so that a Python leak (in use grows) shows apart from allocator retention (RSS
grows, in use flat). ``driver_state`` and ``container_growth`` count the driver's
containers and every container one level down in the scheduler, its extensions, plugins,
prefixes, groups, workers and clients, after warm-up, at half-time and at the end.
``--trace`` starts tracemalloc in the scheduler+driver process (``--trace-workers``: in
the workers too) after warm-up (the first 2 minutes, or 40 % of a short run) and reports
the sites and stacks that grew from then, and from half-time, to a last snapshot taken
well before the run's end; a snapshot stalls the process's event loop for seconds (on a
loaded 2-core machine the driver lost its scheduler), so use it at low rates. Object counts
by type (``gc``) are taken at the same times. A run that fails still reports its series
(``run_error``). ``--plot FILE`` draws the RSS series.

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
from distributed.comm.core import CommClosedError

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
# Each function reaches the process pickled by value, with globals of its own on every
# call, so what must last between calls is kept on the tracemalloc module itself.
def trace_start(nframe: int = 12) -> bool:
    """Start tracing now (after warm-up): only what is allocated from here on is traced,
    which is what growth is made of, and the startup runs at full speed."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        tracemalloc.start(nframe)
    tracemalloc._serif_marks = {}  # type: ignore[attr-defined]
    return True


def trace_mark(name: str = "mark") -> bool:
    """Keep a snapshot under ``name`` in the process, for :func:`trace_growth`."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        return False
    marks = getattr(tracemalloc, "_serif_marks", None)
    if marks is None:
        marks = tracemalloc._serif_marks = {}  # type: ignore[attr-defined]
    marks[name] = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    return True


def trace_growth(since: str = "mark", until: str = "end", top: int = 10,
                 stacks: int = 4) -> dict[str, Any]:
    """Sites that grew most from snapshot ``since`` to ``until`` (by line), the full
    stacks of the ``stacks`` largest, and traced bytes at both."""
    import tracemalloc

    marks = getattr(tracemalloc, "_serif_marks", {})
    if since not in marks or until not in marks:
        return {}
    a, b = marks[since], marks[until]
    by_line = b.compare_to(a, "lineno")
    by_stack = b.compare_to(a, "traceback")
    return {
        "traced_mb": [round(sum(t.size for t in s.traces) / 2**20, 2) for s in (a, b)],
        "lines": [str(s) for s in by_line[:top]],
        "stacks": [{"size_diff_kb": round(s.size_diff / 1024, 1), "count_diff": s.count_diff,
                    "stack": s.traceback.format()[-16:]} for s in by_stack[:stacks]],
    }


def heap_probe() -> dict[str, float]:
    """This process's heap, cheaply: Python bytes tracemalloc traces (once started), glibc's
    view (in use, free inside its arenas, mmapped) and the number of gc-tracked objects.
    Traced memory flat while RSS grows is allocator retention, not a Python leak."""
    import ctypes
    import gc
    import tracemalloc

    out: dict[str, float] = {"gc_objects": len(gc.get_objects())}
    try:  # RSS split: anonymous (heap, pymalloc arenas, stacks), file-backed, shared memory
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[f"{key}_mb"] = round(int(value.split()[0]) / 1024, 2)
    except OSError:  # not Linux
        pass
    if tracemalloc.is_tracing():
        out["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
    try:  # malloc_info: every arena (mallinfo2 sees the main one only), as XML
        import os
        import re
        import tempfile

        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        fd, path = tempfile.mkstemp(prefix="serif-malloc-")
        os.close(fd)
        try:
            fp = libc.fopen(path.encode(), b"w")
            libc.malloc_info(0, fp)
            libc.fclose(fp)
            with open(path) as f:
                xml = f.read()
        finally:
            os.unlink(path)
        tail = xml[xml.rfind("</heap>"):]  # the totals over all arenas follow the last heap
        free = sum(int(m) for m in re.findall(
            r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', tail))
        current = int(re.search(r'<system type="current" size="(\d+)"', tail).group(1))
        mmap = int(re.search(r'<total type="mmap" count="\d+" size="(\d+)"', tail).group(1))
        out.update(malloc_arenas=xml.count("<heap nr="),
                   malloc_arena_mb=round(current / 2**20, 2),
                   malloc_free_mb=round(free / 2**20, 2),
                   malloc_in_use_mb=round((current - free + mmap) / 2**20, 2),
                   malloc_mmap_mb=round(mmap / 2**20, 2))
    except (OSError, AttributeError, ValueError):  # not glibc
        pass
    return out


def driver_state() -> dict[str, int]:
    """Sizes of the driver's state in this process (``serif-dask run``: the scheduler's),
    found through gc, since the run does not publish its Driver object."""
    import gc
    from collections import deque

    out: dict[str, int] = {}
    for obj in gc.get_objects():
        if type(obj).__name__ != "Driver" or type(obj).__module__ != "serif_dask.driver":
            continue
        d: Any = obj
        for name, value in vars(d).items():  # every container it holds, whatever its name
            if isinstance(value, dict | list | set | deque):
                out[name] = len(value)
        log, stats = getattr(d, "log", None), getattr(d, "stats", None)
        if log is not None:
            writer = getattr(log, "_writer", None)
            out["per_app"] = len(log.per_app)
            out["records_queue"] = writer._work_queue.qsize() if writer is not None else 0
            sketches = [log.totals.latency, *(t.latency for t in log.per_app.values())]
            if stats is not None:
                sketches.append(stats.decision_ms.sketch)
            out["latency_drift"] = len(getattr(getattr(d, "batch_times", None), "drift", {}))
            out["sketch_exact_values"] = sum(int(s._values.size) for s in sketches)
        out["client_futures"] = len(d.client.futures)
        out["client_refcount"] = len(getattr(d.client, "refcount", {}))
        from serif_dask.membership import _BY_CLIENT

        members = _BY_CLIENT.get(d.client)
        if members is not None:
            out["membership_workers"] = len(members.workers)
            out["membership_waiters"] = len(members._waiters)
    return out


def container_lengths(dask_scheduler: Any) -> dict[str, int]:
    """The length of every dict, list, set and deque held one level down by the scheduler,
    its extensions and plugins, each client in the process, and summed over its task
    prefixes, groups and workers: a net wider than ``scheduler_sizes`` for what grows."""
    from collections import deque

    from distributed import Client

    kinds = (dict, list, set, deque)

    def lens(obj: Any) -> dict[str, int]:
        attrs = getattr(obj, "__dict__", {})
        slots = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
        out = {k: len(v) for k, v in attrs.items() if isinstance(v, kinds)}
        for name in slots:
            v = getattr(obj, name, None)
            if isinstance(v, kinds):
                out[name] = len(v)
        return out

    out: dict[str, int] = {}

    def add(prefix: str, sizes: dict[str, int]) -> None:
        for k, v in sizes.items():
            out[f"{prefix}.{k}"] = out.get(f"{prefix}.{k}", 0) + v

    s = dask_scheduler
    add("scheduler", lens(s))
    for name, ext in s.extensions.items():
        add(f"ext[{name}]", lens(ext))
    for name, plugin in s.plugins.items():
        add(f"plugin[{name}]", lens(plugin))
    for tp in s.task_prefixes.values():
        add("task_prefix", lens(tp))
    for tg in s.task_groups.values():
        add("task_group", lens(tg))
    for ws in s.workers.values():
        add("worker_state", lens(ws))
    for client in list(Client._instances):
        add("client", lens(client))
    return out


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
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc in the scheduler+driver process, after warm-up")
    parser.add_argument("--trace-workers", action="store_true",
                        help="with --trace: in the workers too")
    parser.add_argument("--trace-frames", type=int, default=12,
                        help="frames per traced allocation (more: slower, clearer stacks)")
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
        log_path = Path(tmp) / "run.log"  # a file, not a pipe nobody reads while it runs
        log = log_path.open("w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, text=True)
        t_s: list[float] = []
        rss: dict[str, list[float]] = {}
        sizes: list[dict[str, Any]] = []
        growth: dict[str, Any] = {}
        heap: list[dict[str, Any]] = []
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
                # Tracing starts after warm-up (rings and caches filling at first are not
                # growth) and the last snapshots are taken well before the run ends.
                warm = min(120.0, minutes * 60 * 0.4)
                margin = max(20.0, 2 * every) if args.trace else 1.0
                traced = False
                counts: list[dict[str, dict[str, int]]] = []
                state: list[dict[str, Any]] = []

                def snapshot(now: float) -> None:
                    objs = {"scheduler+driver": client.run_on_scheduler(object_counts)}
                    for addr, c in client.run(object_counts).items():
                        objs[str(names.get(addr, addr))] = c
                    counts.append(objs)
                    entry: dict[str, Any] = {"t_s": round(now, 1)}
                    for key, probe in (("driver", driver_state),
                                       ("containers", container_lengths)):
                        try:  # the probes read private state, which may change shape
                            entry[key] = client.run_on_scheduler(probe)
                        except Exception as exc:
                            entry[key] = {"error": repr(exc)}
                    state.append(entry)

                def trace(name: str) -> None:
                    client.run_on_scheduler(trace_mark, name)
                    if args.trace_workers:
                        client.run(trace_mark, name)

                while proc.poll() is None and time.monotonic() < end - margin:
                    now = time.monotonic() - start
                    sample = tree.sample()
                    t_s.append(round(now, 1))
                    for name in set(sample) | set(rss):
                        rss.setdefault(name, [float("nan")] * (len(t_s) - 1))
                        rss[name].append(round(sample.get(name, float("nan")), 1))
                    try:
                        sizes.append(_sizes(client, now))
                        heap.append({"t_s": round(now, 1), "rss_mb": round(sample.get(
                            "scheduler+driver", float("nan")), 1),
                            **client.run_on_scheduler(heap_probe)})
                    except (OSError, TimeoutError, CommClosedError):
                        if proc.poll() is None and time.monotonic() < end - margin:
                            raise
                        break  # the run ended while we asked
                    if args.trace and not traced and now >= warm:
                        client.run_on_scheduler(trace_start, args.trace_frames)
                        if args.trace_workers:
                            client.run(trace_start, args.trace_frames)
                        trace("start")
                        traced = True
                    if (len(counts) == 0 and now >= warm) or (
                            len(counts) == 1 and now >= minutes * 30):
                        snapshot(now)  # after warm-up, and at half-time
                        if traced and len(counts) == 2:
                            trace("middle")
                    time.sleep(max(0.0, start + len(t_s) * every - time.monotonic()))
                try:  # the run may end meanwhile: what was gathered still counts
                    if proc.poll() is None and counts:
                        snapshot(time.monotonic() - start)
                    if traced and proc.poll() is None:
                        trace("end")
                        for since in ("start", "middle"):
                            growth[f"scheduler+driver {since}->end"] = (
                                client.run_on_scheduler(trace_growth, since, "end"))
                            if args.trace_workers:
                                for addr, g in client.run(trace_growth, since, "end").items():
                                    growth[f"{names.get(addr, addr)} {since}->end"] = g
                except (OSError, TimeoutError, CommClosedError) as exc:
                    print(f"soak: final snapshots lost, the run ended ({exc!r})",
                          file=sys.stderr)
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
        run_error = None
        if proc.returncode != 0:  # the memory series still tell something: report them
            run_error = {"returncode": proc.returncode, "tail": output[-20:]}
            if not summary_path.exists() or not t_s:
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
        "heap": {"series": heap, "slope_mb_per_min": {
            k: round(slope([h["t_s"] for h in heap], [h.get(k, float("nan")) for h in heap]), 3)
            for k in (heap[-1] if heap else {}) if k != "t_s"}},
        "driver_state": [{"t_s": x["t_s"], **x["driver"]} for x in state],
        "container_growth": {
            f"{a['t_s']}->{b['t_s']}": {
                k: [a["containers"].get(k, 0), v] for k, v in b["containers"].items()
                if v != a["containers"].get(k, 0)}
            for a, b in zip(state, state[1:], strict=False)},
        "object_count_growth": {
            "first_to_middle": {n: count_growth(counts[0][n], counts[1].get(n, {}))
                                for n in counts[0]} if len(counts) > 1 else {},
            "middle_to_last": {n: count_growth(counts[1][n], counts[-1].get(n, {}))
                               for n in counts[1]} if len(counts) > 2 else {},
        },
        "metrics_resident_mb": reported,
        "records_disk": disk,
        "run_error": run_error,
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
