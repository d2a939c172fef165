"""Move one 35 MB input from a read task to a score task on another worker process of
the same node: through the shared-memory cache, Dask's own transfer, and Redis, with an
in-process memcpy as the physical limit.

Method (medians over ``--repeats`` after one warm-up round; one LocalCluster with two
single-threaded worker processes, ``a`` reads and ``b`` scores).  The shm path runs the
engine's own functions, the ones ``read_task`` and ``score_task`` call, on a real
:class:`~serif_dask.readers.synthetic.SyntheticReader` video stream:

* ``shm_ms``: the data plane's cost on both sides.  On ``a``: ``reserve_samples`` (slots
  for the reader), then ``_call_reader(..., out=slots)`` renders the clip *into* the slots,
  then ``share_samples`` commits them; the reader's own rendering time is measured apart
  (``read_slot_ms``) and not counted, as Dask's side does not count the producer either.
  On ``b``: ``gather_inputs`` (the batch as a zero-copy view), the consumer, and the
  after-use generation check (``Inputs.stale``).
* ``shm_copy_ms``: the same input through the copying paths, for a reader that cannot
  write in place (``ShmCache.put``: one copy into the slot) and a score task whose batch
  is not one run of slots (``datapath.read(ref, out=...)``: one checked copy into a reused
  buffer).
* ``dask_ms``: the consumer-side "transfer" interval that Dask itself records for the
  dependency on ``b`` (task stream ``startstops``): from the start of the fetch until the
  array is deserialised in ``b``'s memory; the producer task returns the reader's fresh
  samples.  ``dask_gap_ms`` cross-checks it: the time between the producer finishing on
  ``a`` and the consumer starting on ``b``, minus the same gap for a 1-byte input.
* ``redis_ms``: ``InputStore.put`` on ``a`` plus ``InputStore.get`` on ``b`` (embedded
  redis-server on loopback), as export and gather do for another node.
* ``memcpy_ms``: ``np.copyto`` between two pre-faulted arrays in one process.
* ``read_slot_ms`` / ``read_fresh_ms``: the reader rendering into the slots vs into a fresh
  array (what the Dask path's producer does); ``shm_e2e_ms`` / ``dask_e2e_ms`` add each
  path's reader time to its transfer, so nothing the reader does for the shm path is hidden.

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
from types import SimpleNamespace
from typing import Any

import numpy as np

SHAPE = (3, 16, 320, 568)  # SERIF's video clip, float32: 34,897,920 bytes
RUN = f"bench{os.getpid()}"
NODE = "bench-node"
GROUPS = np.asarray([7], dtype=np.int64)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class _Timed:
    """A reader that keeps the time its wrapped reader spends (rendering is the reader's
    work, not the data plane's); ``read`` takes ``out=`` as the wrapped one does."""

    def __init__(self, reader: Any) -> None:
        self.reader, self.shape, self.seconds = reader, reader.shape, 0.0

    def read(self, groups: np.ndarray, tick: int, *, out: np.ndarray | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return self.reader.read(groups, tick, out=out)
        finally:
            self.seconds += time.perf_counter() - t0


def _video_reader() -> Any:
    from serif_dask.readers.synthetic import SyntheticReader

    return SyntheticReader(
        SimpleNamespace(name="video", synthetic_shape=SHAPE, synthetic_snr=1.0,
                        label_persistence=0.9),
        SimpleNamespace(name="bench", prior=(0.5, 0.5)),
    )


def _consume(x: np.ndarray) -> float:
    """What both consumers do with the input they were handed: touch it."""
    return float(x.reshape(-1)[-1])


# --- worker-side functions (shipped by value; state lives on the worker object) ---
def _setup_reader(redis_addr: tuple[str, int], run_id: str, dask_worker: Any) -> None:
    from serif_dask.datapath import ShmCache
    from serif_dask.store import InputStore, connect

    reader = _video_reader()
    nbytes = int(np.prod(SHAPE)) * 4
    dask_worker._bench = {
        "reader": reader,
        "x": reader.read(GROUPS, 0).samples[0],
        # what dataplane.shm_cache creates for a data worker, once per run
        "cache": ShmCache.create(run_id, NODE, "video", entries=4, entry_size=nbytes),
        "inputs": InputStore(connect([redis_addr])),
    }


def _setup_scorer(redis_addr: tuple[str, int], dask_worker: Any) -> None:
    from serif_dask.store import InputStore, connect
    from serif_dask.worker import SerifWorkerPlugin

    plugin = SerifWorkerPlugin()  # gather_inputs asks it for the node (and Redis, unused)
    plugin.node = NODE
    dask_worker._bench = {"plugin": plugin, "inputs": InputStore(connect([redis_addr]))}


def _teardown(dask_worker: Any) -> None:
    from serif_dask import datapath

    state = dask_worker.__dict__.pop("_bench", {})
    if "cache" in state:
        state["cache"].close()
    datapath.detach_all()


def _shm_read(tick: int, in_place: bool) -> tuple[Any, dict[str, float]]:
    """On ``a``: what ``read_task`` does with ``share=True``, timed piece by piece."""
    from distributed import get_worker

    from serif_dask import dataplane
    from serif_dask.tasks import ReadResult, _call_reader

    state = get_worker()._bench
    cache = state["cache"]
    reader = _Timed(state["reader"])
    t0 = time.perf_counter()
    if in_place:
        reservation = dataplane.reserve_samples(cache, reader, len(GROUPS))
        assert reservation is not None
        samples, labels, errors = _call_reader(reader, GROUPS, tick, True, SHAPE, 2,
                                               out=reservation.array)
        refs = dataplane.share_samples(cache, samples, GROUPS, errors, reservation)
    else:  # a reader without out=: it renders into its own array, put copies it in
        samples, labels, errors = _call_reader(reader, GROUPS, tick, True, SHAPE, 2)
        refs = dataplane.share_samples(cache, samples, GROUPS, errors)
    total = time.perf_counter() - t0
    assert refs[0] is not None, errors
    read = ReadResult(app="bench", modality="video", server="srv", tick=tick,
                      worker=get_worker().address, node=NODE, groups=GROUPS, labels=labels,
                      errors=errors, refs=tuple(refs))
    return read, {"write": total - reader.seconds, "reader": reader.seconds}


def _shm_score(put: tuple[Any, dict[str, float]], in_place: bool) -> dict[str, float]:
    """On ``b``: what ``score_task`` does before and after its forward."""
    from distributed import get_worker

    from serif_dask import datapath, dataplane

    read, times = put
    plugin = get_worker()._bench["plugin"]
    errors: dict[int, str] = {}
    t0 = time.perf_counter()
    if in_place:
        inputs = dataplane.gather_inputs(plugin, GROUPS, [read], [], errors)
        assert inputs.samples is not None and inputs.buffer is None, errors  # a view
        _consume(inputs.samples)
        stale = inputs.stale()
        inputs.release()
    else:  # the copy gather_inputs makes per row when a batch is not one run of slots
        buf = datapath.take_buffer(1, SHAPE)
        datapath.read(read.refs[0], out=buf[0])
        _consume(buf[:1])
        datapath.release_buffer(buf)
        stale = []
    times = dict(times, read=time.perf_counter() - t0)
    if stale or errors:
        raise datapath.StaleSlot(f"bench input went stale: {errors or stale}")
    return times


def _produce_array(tiny: bool, tick: int) -> np.ndarray:
    """The Dask path's producer: the reader's samples, in a fresh array."""
    from distributed import get_worker

    if tiny:
        return np.zeros(1, np.uint8)
    return get_worker()._bench["reader"].read(GROUPS, tick).samples


def _time_fresh_read(tick: int) -> float:
    from distributed import get_worker

    reader = get_worker()._bench["reader"]
    t0 = time.perf_counter()
    reader.read(GROUPS, tick)
    return time.perf_counter() - t0


def _consume_array(x: np.ndarray) -> float:
    return _consume(x)


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
        "shm", "shm_write", "shm_read", "read_slot", "shm_copy", "shm_put", "shm_copy_read",
        "read_fresh", "dask", "dask_gap", "baseline_gap", "redis_put", "redis_get")}
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
                record = rep > 0  # round 0 warms attachments, buffers, sockets and pages
                tick = rep + 1
                for in_place in (True, False):
                    put = client.submit(_shm_read, tick, in_place, **on_a)
                    t = client.submit(_shm_score, put, in_place, **on_b).result()
                    del put
                    if not record:
                        continue
                    if in_place:
                        results["shm"].append(t["write"] + t["read"])
                        results["shm_write"].append(t["write"])
                        results["shm_read"].append(t["read"])
                        results["read_slot"].append(t["reader"])
                    else:
                        results["shm_copy"].append(t["write"] + t["read"])
                        results["shm_put"].append(t["write"])
                        results["shm_copy_read"].append(t["read"])
                fresh = client.submit(_time_fresh_read, tick, **on_a).result()
                if record:
                    results["read_fresh"].append(fresh)
                # Dask's own transfer, and the same graph with a 1-byte input
                for tiny in (True, False):
                    with get_task_stream(client) as ts:
                        x = client.submit(_produce_array, tiny, tick, **on_a)
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
    med["shm_e2e"] = med["read_slot"] + med["shm"]
    med["dask_e2e"] = med["read_fresh"] + med["dask"]
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
        "shm_write_ms": _ms(med["shm_write"]),
        "shm_read_ms": _ms(med["shm_read"]),
        "shm_copy_ms": _ms(med["shm_copy"]),
        "shm_put_ms": _ms(med["shm_put"]),
        "shm_copy_read_ms": _ms(med["shm_copy_read"]),
        "shm_copy_vs_dask_speedup": round(med["dask"] / med["shm_copy"], 2),
        "dask_gap_ms": _ms(med["dask_gap"]),
        "redis_put_ms": _ms(med["redis_put"]),
        "redis_get_ms": _ms(med["redis_get"]),
        "read_slot_ms": _ms(med["read_slot"]),
        "read_fresh_ms": _ms(med["read_fresh"]),
        "shm_e2e_ms": _ms(med["shm_e2e"]),
        "dask_e2e_ms": _ms(med["dask_e2e"]),
        "repeats": repeats,
    }
    print(f"{nbytes / 2**20:.1f} MiB float32 {list(SHAPE)}, median of {repeats}:")
    for name in ("memcpy", "shm", "shm_write", "shm_read", "shm_copy", "shm_put",
                 "shm_copy_read", "dask", "dask_gap", "redis", "read_slot", "read_fresh",
                 "shm_e2e", "dask_e2e"):
        print(f"  {name:<14} {out[name + '_ms']:9.2f} ms")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
