"""Faults on a small ward: whatever fails, every request ends completed, dropped or failed.

Each scenario runs on its own LocalCluster (real worker processes, each under a nanny) and
kills real processes with SIGKILL:

* ``compute-worker-lost``: the GPU worker ``bay-a`` dies at 30 % of the run; its requests
  are re-planned or fail ``worker-lost``; its nanny starts it again.
* ``data-worker-lost``: the data worker ``data@bay-a`` dies at 30 %; its groups fail
  ``reader-lost`` until its nanny has it back.
* ``redis-lost``: ``configs/digits`` (real torch models) on a redis-server that keeps its
  data (AOF), killed at 30 % and started again on the same port at 60 %. Model caches
  hold ~one model, so loads keep happening: warm models serve, cold ones fall back to a
  warm one or fail ``weights-unavailable``, and loading resumes when Redis is back.
* ``bad-input``: a reader that raises for group 1 and gives NaN for group 2, every tick.
* ``hung-reader``: ``data@bay-a``'s read of tick 3 sleeps 120 s (a stuck sensor): its
  groups fail ``read-timeout`` at the tick's deadline, later ticks go on.
* ``hung-model``: ``configs/digits``' linear model wedges in one forward on ``node-a`` for
  120 s: that tick fails ``score-timeout``, and the worker still running it is restarted
  through its nanny after ``serif_dask.tick.STUCK_S``.
* ``mid-batch-kill``: fall detection alone, one 5 s batch of all 16 groups on ``bay-a``,
  whose worker is SIGKILLed 1 s into it: the batch is planned again on the survivors.

The ward is ``configs/hospital`` with 16 groups and thumbnail samples (video [3, 2, 8, 8],
audio [256]); ``redis-lost`` uses the digits example's 32 groups. Per scenario,
``requests`` is what the driver offered (ticks × groups); ``completed``, ``dropped`` and
``failed`` are counted from the records file, one per distinct (app, group, tick); and
``lost = requests - (completed + dropped + failed)``, which must be 0. The last line is
the JSON object ``{scenario: {...}}``; the line before it says what machine ran it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fault_kit
from _common import ROOT, derive, emit, load_docs, machine, write_config  # noqa: E402

from serif_dask import Serif, load_config, local_cluster  # noqa: E402
from serif_dask.redis_server import EmbeddedRedis  # noqa: E402

GROUPS = 16
SHAPES = {"video": [3, 2, 8, 8], "audio": [256]}
DIGITS = ROOT / "configs" / "digits"

BAD_READER = '''
"""bench/faults.py bad-input reader: group 1's sensor raises, group 2's gives NaN."""
import numpy as np

from serif_dask.readers.synthetic import SyntheticReader


class BadReader(SyntheticReader):
    def read(self, groups, tick):
        groups = np.asarray(groups)
        if 1 in groups:
            raise OSError("sensor of group 1 unplugged")
        out = super().read(groups, tick)
        samples = out.samples.copy()
        samples[groups == 2] = np.nan
        return out._replace(samples=samples)
'''


def count(records: Path, summary: dict[str, Any], groups: int) -> dict[str, Any]:
    """The scenario's line: offered requests against what the records file accounts for."""
    outcome: dict[tuple[str, int, int], str] = {}
    reasons: Counter[str] = Counter()
    lines = records.read_text().splitlines() if records.exists() else []
    for line in lines:
        r = json.loads(line)
        outcome[r["app"], r["group"], r["tick"]] = r["outcome"]
        if r["outcome"] == "failed":
            reasons[(r["reason"] or "").split(":", 1)[0]] += 1
    done = Counter(outcome.values())
    requests = summary["ticks"] * groups
    accounted = done["completed"] + done["dropped"] + done["failed"]
    return {
        "requests": requests,
        "completed": done["completed"],
        "dropped": done["dropped"],
        "failed": done["failed"],
        "lost": requests - accounted,
        "duplicates": len(lines) - len(outcome),
        "failures_by_reason": dict(sorted(reasons.items())),
        "wall_s": round(summary["wall_s"], 1),
    }


def run(
    config_dir: Path, records: Path, duration: float, policy: str, seed: int,
    during: Callable[[Client], list[tuple[float, Callable[[], None]]]] | None = None,
) -> dict[str, Any]:
    """One run on a fresh cluster; ``during(client)`` gives faults as (seconds, action),
    timed from the first records (set-up, such as importing torch, takes a while)."""
    config = load_config([config_dir])
    with local_cluster(config) as cluster, Client(cluster) as client:
        timers = [threading.Timer(at, act) for at, act in (during(client) if during else [])]

        def start_faults(_rows: list[dict[str, Any]]) -> None:
            for timer in timers:
                if not timer.is_alive() and not timer.finished.is_set():
                    timer.start()

        serif = Serif(client, config, policy=policy, seed=seed, records=records,
                      on_records=start_faults)
        try:
            summary = serif.run(duration)
        finally:
            for timer in timers:
                timer.cancel()
            serif.close()
    return count(records, summary, config.data.num_groups)


def kill_worker(name: str, at: float) -> Callable[[Client], list[tuple[float, Callable[[], None]]]]:
    """SIGKILL the worker called ``name`` ``at`` seconds into the run."""

    def plan(client: Client) -> list[tuple[float, Callable[[], None]]]:
        info = client.scheduler_info(n_workers=-1)["workers"]
        address = next(a for a, w in info.items() if w["name"] == name)
        pid = client.run(os.getpid, workers=[address])[address]
        return [(at, lambda: os.kill(pid, signal.SIGKILL))]

    return plan


def digits_on(target: Path, port: int, cache_bytes: int) -> Path:
    """configs/digits on Redis ``port``, scanners on the compute nodes, small model caches."""
    docs = copy.deepcopy(load_docs(DIGITS))
    docs["system"]["redis-nodes"] = [{"ip-address": "127.0.0.1", "ports": [port]}]
    for node in docs["system"]["compute-nodes"]:
        node["model-cache-bytes"] = cache_bytes
    for app in docs["application"]["applications"]:
        for profile in app["model-profiles"]:
            profile["model-weights"] = str(DIGITS / profile["model-weights"])
    for server, node in zip(docs["data"]["servers"], ("node-a", "node-b"), strict=True):
        server["name"] = node  # inputs through shared memory: warm models need no Redis
    return write_config(docs, target)


def redis_lost(tmp: Path, duration: float, seed: int) -> dict[str, Any]:
    data = tmp / "redis-data"
    data.mkdir()
    persist = {"dir": str(data), "appendonly": "yes", "appendfsync": "always"}
    servers = [EmbeddedRedis(extra_config=persist).start()]
    port = servers[0].port

    def faults(_client: Client) -> list[tuple[float, Callable[[], None]]]:
        return [
            (0.3 * duration, servers[0].kill),
            (0.6 * duration, lambda: servers.append(EmbeddedRedis(port, extra_config=persist)
                                                    .start())),
        ]

    try:  # ~ one model per cache: mlp + linear fit, cnn evicts both
        config = digits_on(tmp / "redis-lost", port, cache_bytes=25_000)
        return run(config, tmp / "redis-lost.jsonl", duration, "random", seed, faults)
    finally:
        for server in servers:
            server.stop()


def bad_input(tmp: Path, duration: float, seed: int) -> dict[str, Any]:
    module = tmp / "serif_bench_bad_reader.py"
    module.write_text(BAD_READER)
    sys.path.insert(0, str(tmp))  # spawned workers start with this sys.path
    try:
        config = derive(tmp / "bad-input", num_groups=GROUPS, shapes=SHAPES)
        docs = load_docs(config)
        for mod in docs["data"]["data-modalities"]:
            mod["impl"] = "serif_bench_bad_reader:BadReader"
        write_config(docs, config)
        return run(config, tmp / "bad-input.jsonl", duration, "sneakpeek", seed)
    finally:
        sys.path.remove(str(tmp))


def with_env(name: str, value: str, go: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``go()`` with ``$name`` set, which the cluster's worker processes inherit."""
    os.environ[name] = value
    try:
        return go()
    finally:
        os.environ.pop(name, None)


def hung_reader(tmp: Path, duration: float, seed: int) -> dict[str, Any]:
    from tests.fault_kit import HANG_ENV

    config = derive(tmp / "hung-reader", num_groups=GROUPS, shapes=SHAPES)
    docs = load_docs(config)
    for mod in docs["data"]["data-modalities"]:
        mod["impl"] = "tests.fault_kit:HangingReader"
    write_config(docs, config)
    return with_env(HANG_ENV, "bay-a:3:120", lambda: run(
        config, tmp / "hung-reader.jsonl", duration, "sneakpeek", seed))


def hung_model(tmp: Path, duration: float, seed: int) -> dict[str, Any]:
    from tests.fault_kit import HANG_MODEL_ENV, hang_linear_model

    server = EmbeddedRedis().start()
    try:
        config = digits_on(tmp / "hung-model", server.port, cache_bytes=10**7)
        hang_linear_model(config)
        # forward 1 is the warm-up; the fifth wedges (one per tick once served).
        return with_env(HANG_MODEL_ENV, f"{tmp / 'hung-model.marker'}:120:5", lambda: run(
            config, tmp / "hung-model.jsonl", duration, "fastest", seed))
    finally:
        server.stop()


def mid_batch_kill(tmp: Path, duration: float, seed: int) -> dict[str, Any]:
    """SIGKILL ``bay-a`` one second into its first score batch (seen on the scheduler)."""
    from tests.fault_kit import one_slow_app

    docs = load_docs(derive(tmp / "mid-batch", num_groups=GROUPS, shapes=SHAPES))
    one_slow_app(6.0)(docs["application"])
    config = write_config(docs, tmp / "mid-batch")

    killed: list[str] = []

    def faults(client: Client) -> list[tuple[float, Callable[[], None]]]:
        info = client.scheduler_info(n_workers=-1)["workers"]
        victim = next(a for a, w in info.items() if w["name"] == "bay-a")
        pid = client.run(os.getpid, workers=[victim])[victim]

        def kill_in_batch() -> None:
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                running = client.processing(workers=[victim]).get(victim, ())
                batch = next((str(k) for k in running if "serif-score" in str(k)), None)
                if batch is not None:
                    time.sleep(1.0)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(batch)
                    return
                time.sleep(0.05)

        return [(0.0, kill_in_batch)]

    result = run(config, tmp / "mid-batch.jsonl", max(duration, 20.0), "sneakpeek", seed,
                 faults)
    return result | {"killed_in_batch": killed[0] if killed else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 s per scenario (< 2 minutes)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per scenario")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="scenarios to run (default: all)")
    args = parser.parse_args(argv)
    duration = args.duration or (8.0 if args.quick else 30.0)

    started = time.time()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="serif-bench-faults-") as name:
        tmp = Path(name)
        ward = derive(tmp / "ward", num_groups=GROUPS, shapes=SHAPES)
        scenarios: dict[str, Callable[[], dict[str, Any]]] = {
            "compute-worker-lost": lambda: run(
                ward, tmp / "compute.jsonl", duration, "sneakpeek", args.seed,
                kill_worker("bay-a", 0.3 * duration)),
            "data-worker-lost": lambda: run(
                ward, tmp / "data.jsonl", duration, "sneakpeek", args.seed,
                kill_worker("data@bay-a", 0.3 * duration)),
            "redis-lost": lambda: redis_lost(tmp, duration, args.seed),
            "bad-input": lambda: bad_input(tmp, duration, args.seed),
            "hung-reader": lambda: hung_reader(tmp, duration, args.seed),
            "hung-model": lambda: hung_model(tmp, duration, args.seed),
            "mid-batch-kill": lambda: mid_batch_kill(tmp, duration, args.seed),
        }
        for scenario, go in scenarios.items():
            if args.only and scenario not in args.only:
                continue
            result[scenario] = go()
            print(f"# {scenario}: {json.dumps(result[scenario])}", file=sys.stderr, flush=True)
    print("# machine: " + json.dumps(machine() | {
        "duration_s": duration, "bench_wall_s": round(time.time() - started, 1),
    }), flush=True)
    emit(result)
    return result


if __name__ == "__main__":
    main()
