"""Move one 35 MB input from a read task to a score task on another worker process of
the same node: through the shared-memory cache, Dask's own transfer, and Redis, with an
in-process memcpy as the physical limit.

Method (medians over ``--repeats`` after one warm-up round; all on one LocalCluster with
two single-threaded worker processes ``a`` (reader) and ``b`` (scorer)):

* ``shm_ms``: ``ShmCache.put`` on ``a`` (one copy into a reused, pre-faulted slot) plus
  ``datapath.read`` on ``b`` (zero-copy view, generation checked).  ``shm_copy_ms`` is
  the same with ``b`` copying the input into a private, reused buffer.
* ``dask_ms``: the consumer-side "transfer" interval that Dask itself records for the
  dependency on ``b`` (task stream ``startstops``): from the start of the fetch until the
  array is deserialised in ``b``'s memory; the producer task just returns the array.
  ``dask_gap_ms`` cross-checks it: the time between the producer finishing on ``a`` and
  the consumer starting on ``b``, minus the same gap for a 1-byte input.
* ``redis_ms``: ``InputStore.put`` on ``a`` plus ``InputStore.get`` on ``b`` (embedded
  redis-server on loopback).
* ``memcpy_ms``: ``np.copyto`` between two pre-faulted arrays in one process.

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import uuid

import numpy as np

SHAPE = (3, 16, 320, 568)  # SERIF's video clip, float32: 34,897,920 bytes
RUN = f"bench{os.getpid()}"


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


# --- worker-side functions (shipped by value; state lives on the worker object) ---
def _setup_reader(redis_addr: tuple[str, int], run_id: str, dask_worker: object) -> None:
    from serif_dask.datapath import ShmCache
    from serif_dask.store import InputStore, connect

    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    dask_worker._bench = {
        "x": x,
        "cache": ShmCache.create(run_id, "bench-node", "video", entries=2,
                                 entry_size=x.nbytes),
        "inputs": InputStore(connect([redis_addr])),
    }


def _setup_scorer(redis_addr: tuple[str, int], dask_worker: object) -> None:
    from serif_dask.store import InputStore, connect

    dask_worker._bench = {
        "dst": np.ones(SHAPE, np.float32),
        "inputs": InputStore(connect([redis_addr])),
    }


def _teardown(dask_worker: object) -> None:
    from serif_dask import datapath

    state = dask_worker.__dict__.pop("_bench", {})
    if "cache" in state:
        state["cache"].close()
    datapath.detach_all()


def _produce_array(tiny: bool) -> np.ndarray:
    from distributed import get_worker

    return np.zeros(1, np.uint8) if tiny else get_worker()._bench["x"]


def _consume_array(x: np.ndarray) -> int:
    return x.size


def _shm_put() -> tuple[object, float]:
    from distributed import get_worker

    state = get_worker()._bench
    t0 = time.perf_counter()
    ref = state["cache"].put(state["x"])
    return ref, time.perf_counter() - t0


def _shm_get(put: tuple[object, float], copy: bool) -> float:
    from distributed import get_worker

    from serif_dask import datapath

    ref, _ = put
    t0 = time.perf_counter()
    view = datapath.read(ref)
    if copy:
        np.copyto(get_worker()._bench["dst"], view)
    if not datapath.valid(ref):
        raise datapath.StaleSlot(str(ref))
    return time.perf_counter() - t0


def _redis_put(key: str) -> float:
    from distributed import get_worker

    state = get_worker()._bench
    t0 = time.perf_counter()
    state["inputs"].put(key, state["x"], ttl_s=60)
    return time.perf_counter() - t0


def _redis_get(key: str, put_s: float) -> tuple[float, float]:
    from distributed import get_worker

    inputs = get_worker()._bench["inputs"]
    x, seconds = inputs.get_timed(key)
    assert x.shape == SHAPE
    inputs.delete(key)
    return put_s, seconds


# --- driver side ---------------------------------------------------------------------
def bench_memcpy(repeats: int) -> float:
    src = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    dst = np.ones_like(src)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def bench_cluster(repeats: int) -> dict[str, float]:
    from distributed import Client, LocalCluster, get_task_stream, wait

    from serif_dask.datapath import remove_segments
    from serif_dask.redis_server import EmbeddedRedis

    results: dict[str, list[float]] = {k: [] for k in (
        "shm", "shm_put", "shm_get", "shm_copy", "dask", "dask_gap", "baseline_gap",
        "redis_put", "redis_get")}
    with EmbeddedRedis() as redis_server, LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        worker_class="distributed.Worker", silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        try:
            client.run(_setup_reader, redis_server.address, RUN, workers=[a])
            client.run(_setup_scorer, redis_server.address, workers=[b])
            on_a = dict(workers=[a], allow_other_workers=False, pure=False)
            on_b = dict(workers=[b], allow_other_workers=False, pure=False)
            for rep in range(repeats + 1):
                record = rep > 0  # round 0 warms attachments, sockets and pages
                # shared memory, consumer keeps a view / consumer copies
                for copy in (False, True):
                    put = client.submit(_shm_put, **on_a)
                    get = client.submit(_shm_get, put, copy, **on_b)
                    get_s = get.result()
                    put_s = put.result()[1]
                    if record:
                        if copy:
                            results["shm_copy"].append(put_s + get_s)
                        else:
                            results["shm"].append(put_s + get_s)
                            results["shm_put"].append(put_s)
                            results["shm_get"].append(get_s)
                    del put, get
                # Dask's own transfer, and the same graph with a 1-byte input
                for tiny in (True, False):
                    with get_task_stream(client) as ts:
                        x = client.submit(_produce_array, tiny, **on_a)
                        y = client.submit(_consume_array, x, **on_b)
                        wait([x, y])
                        xkey, ykey = x.key, y.key
                        del x, y
                    gap, transfer = _stream_times(ts.data, xkey, ykey)
                    if record:
                        results["baseline_gap" if tiny else "dask_gap"].append(gap)
                        if not tiny:
                            results["dask"].append(transfer)
                # Redis
                key = uuid.uuid4().hex
                put_s, get_s = client.submit(
                    _redis_get, key, client.submit(_redis_put, key, **on_a), **on_b
                ).result()
                if record:
                    results["redis_put"].append(put_s)
                    results["redis_get"].append(get_s)
        finally:
            client.run(_teardown)
            remove_segments(RUN)
    med = {k: statistics.median(v) for k, v in results.items()}
    med["dask_gap"] -= med.pop("baseline_gap")
    med["redis"] = med["redis_put"] + med["redis_get"]
    return med


def _stream_times(data: list[dict], xkey: str, ykey: str) -> tuple[float, float]:
    """(gap from producer end to consumer start, consumer's transfer duration), seconds."""
    by_key = {d["key"]: d for d in data}
    produced = max(s["stop"] for s in by_key[xkey]["startstops"] if s["action"] == "compute")
    consumer = by_key[ykey]["startstops"]
    started = min(s["start"] for s in consumer if s["action"] == "compute")
    transfers = [s["stop"] - s["start"] for s in consumer if s["action"] == "transfer"]
    return started - produced, sum(transfers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 2 min)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)

    memcpy_s = bench_memcpy(repeats)
    med = bench_cluster(repeats)
    nbytes = int(np.prod(SHAPE)) * 4
    out = {
        "bytes": nbytes,
        "shm_ms": _ms(med["shm"]),
        "dask_ms": _ms(med["dask"]),
        "redis_ms": _ms(med["redis"]),
        "memcpy_ms": _ms(memcpy_s),
        "shm_vs_dask_speedup": round(med["dask"] / med["shm"], 2),
        "shm_vs_memcpy": round(med["shm"] / memcpy_s, 2),
        "shm_put_ms": _ms(med["shm_put"]),
        "shm_get_ms": _ms(med["shm_get"]),
        "shm_copy_ms": _ms(med["shm_copy"]),
        "dask_gap_ms": _ms(med["dask_gap"]),
        "redis_put_ms": _ms(med["redis_put"]),
        "redis_get_ms": _ms(med["redis_get"]),
        "repeats": repeats,
    }
    print(f"{nbytes / 2**20:.1f} MiB float32 {list(SHAPE)}, median of {repeats}:")
    for name in ("memcpy", "shm", "shm_copy", "dask", "dask_gap", "redis"):
        print(f"  {name:<9} {out[name + '_ms']:9.2f} ms")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
