"""A run that never ends stays bounded: Dask's logs, serif's state, records and Redis.

The short soak runs the hospital ward ticking several times a second on a real
LocalCluster with small Dask log caps, samples the sizes of everything a run adds to
(:mod:`serif_dask.memory`) a third of the way in and at the end, and checks that each
either stays put or sits at its cap. Counts, not wall-clock or resident-memory
thresholds: a leak shows as a count that grows with the number of ticks.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from serif_dask.memory import MemoryHistory, scheduler_sizes, worker_sizes
from serif_dask.records import (
    Chunk,
    DecisionTimes,
    LatencySketch,
    RecordLog,
    Rotation,
    rotated_paths,
)
from serif_dask.service import (
    SETTINGS,
    SPAN_COLLECTIONS_KEPT,
    TICK_GROUPS,
    clear_key_caches,
    service_config,
    service_settings,
    trim_span_metadata,
    worker_config,
)
from serif_dask.sink import StreamSink
from serif_dask.worker import LocalInputs
from tests.conftest import HOSPITAL, run_cli

pytest_plugins = ["redis_fixtures"]

#: Small caps, so that Dask's bounded logs fill within seconds.
CAP = 60


def _chunk(n: int, tick: int = 0) -> Chunk:
    g = np.arange(n)
    return Chunk(
        app="a", tick=tick, model="m", worker="w", outcome="completed", group=g,
        arrival=np.zeros(n), finish=np.full(n, 0.1), prediction=np.zeros(n, int),
        label=np.zeros(n, int), utility=np.ones(n), deadline_met=np.ones(n, bool),
        reason=[""] * n,
    )


# -- records: rotation, bounded summaries ------------------------------------------------
def _write_ticks(path: Path, rotation: Rotation, ticks: int, per_tick: int) -> RecordLog:
    """A records log at ``path`` that was given ``ticks`` chunks and closed."""
    log = RecordLog(path, rotation)
    log.open()
    for tick in range(ticks):
        log.add(_chunk(per_tick, tick))
    log.close()
    return log


def test_records_rotate_by_size_and_keep_only_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    log = _write_ticks(path, Rotation(max_bytes=4000, keep=2), ticks=40, per_tick=5)
    files = [p for p in rotated_paths(path, 5) if p.exists()]
    assert [p.name for p in files] == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert log.rotations > 2
    ticks = []
    for p in reversed(files):  # oldest first
        lines = p.read_text().splitlines()
        rows = [json.loads(line) for line in lines]  # no line split between files
        assert p.stat().st_size < 4000 + 5 * 300  # one chunk past the limit at most
        ticks += [r["tick"] for r in rows]
    # the newest records are kept, in order, each chunk whole
    assert ticks == sorted(ticks) and ticks[-1] == 39 and len(ticks) % 5 == 0
    assert log.totals.requests == 200  # the summary counts every record, rotated or not


def test_records_added_while_the_writer_rotates_are_all_written(tmp_path: Path) -> None:
    # Rotating after every chunk keeps the writer thread busy closing and reopening files
    # while the caller adds the next chunks: none may be skipped for it.
    path = tmp_path / "r.jsonl"
    _write_ticks(path, Rotation(max_bytes=1, keep=400), ticks=300, per_tick=3)
    ticks = [json.loads(line)["tick"] for p in reversed(rotated_paths(path, 400))
             if p.exists() for line in p.read_text().splitlines()]
    assert ticks == [t for t in range(300) for _ in range(3)]


def test_records_rotate_by_age(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    log = RecordLog(path, Rotation(every_s=0.05, keep=0))
    log.open()
    log.add(_chunk(2, 0))
    time.sleep(0.1)
    log.add(_chunk(2, 1))  # the file is older than every_s: rotates after this chunk
    log.add(_chunk(2, 2))
    log.close()
    assert log.rotations == 1
    assert not (tmp_path / "r.jsonl.1").exists()  # keep=0: rotated files are deleted
    assert [json.loads(x)["tick"] for x in path.read_text().splitlines()] == [2, 2]


@pytest.mark.parametrize("args, message", [
    (["--records-max-bytes", "lots"], "not a size"),
    (["--records-rotate-every", "soon"], "not a duration"),
    (["--records-max-bytes", "0"], "max_bytes must be positive"),
])
def test_cli_rejects_bad_rotation(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run_cli("run", str(HOSPITAL), "--records", str(tmp_path / "r.jsonl"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_summaries_stay_bounded() -> None:
    sketch = LatencySketch(exact_cap=1000)
    for _ in range(50):
        sketch.add(np.random.default_rng(0).exponential(0.2, 100))
    assert len(sketch) == 5000 and sketch._values.size <= 1000
    decisions = DecisionTimes()
    for ms in [1.0] * 70_000 + [9.0]:
        decisions.append(ms)
    assert len(decisions) == 70_001
    assert decisions.sketch._values.size <= decisions.sketch.exact_cap
    result = decisions.result()
    assert result["max"] == 9.0 and result["p50"] == pytest.approx(1.0, rel=0.02)


# -- worker state ------------------------------------------------------------------------
def test_local_inputs_drop_reads_whose_peek_never_came() -> None:
    inputs = LocalInputs(capacity_bytes=1 << 20, max_age_s=0.05)
    stale = inputs.put(("run", "app", 0), np.zeros(10, np.float32))
    time.sleep(0.1)
    fresh = [inputs.put(("run", "app", t), np.zeros(10, np.float32)) for t in range(1, 4)]
    assert len(inputs) == 3 and inputs.pop(stale) is None
    assert all(inputs.pop(k) is not None for k in fresh)
    assert len(inputs) == 0 and inputs.nbytes == 0
    big = LocalInputs(capacity_bytes=1000)
    for t in range(20):
        big.put(("r", t), np.zeros(100, np.float32))  # 400 bytes each
    assert len(big) == 2 and big.nbytes <= 1000


# -- Dask settings -----------------------------------------------------------------------
def test_service_settings_leave_the_users_own_values() -> None:
    key = "distributed.scheduler.dashboard.tasks.task-stream-length"
    assert service_settings() == SETTINGS
    with dask.config.set({key: 123}):
        assert key not in service_settings()
    nested = worker_config()["distributed"]
    assert nested["worker"]["profile"]["enabled"] is False
    assert nested["scheduler"]["dashboard"]["tasks"]["task-stream-length"] == 10_000


# -- Redis: the results stream expires ---------------------------------------------------
def test_stream_entries_expire(redis_server) -> None:
    r = redis_server.client(decode_responses=True)
    r.xadd("s", {"old": "1"}, id=f"{int((time.time() - 3600) * 1000)}-0")
    sink = StreamSink(lambda: redis_server.client(), "s", maxlen=1000, max_age_s=60)
    sink.put([{"app": "a", "group": 1, "tick": 0, "outcome": "completed"}])
    sink.close()
    entries = r.xrange("s")
    assert [e[1].get("old") for e in entries] == [None]  # the hour-old entry is trimmed
    assert 0 < r.ttl("s") <= 60


# -- the short soak ----------------------------------------------------------------------
def _fast_ward(config_dir) -> Path:
    def apps(doc: dict) -> None:
        for app in doc["applications"]:
            app["sample-duration"] /= 4  # 6 ticks a second
            for p in app["model-profiles"]:
                p["latencies"] = {n: [v[0] / 4, v[1] / 4] for n, v in p["latencies"].items()}

    return config_dir(application=apps, data=lambda d: d.update({"num-groups": 8}))


def _sizes(client: Client) -> tuple[dict, dict]:
    return client.run_on_scheduler(scheduler_sizes), client.run(worker_sizes)


def test_clear_key_caches_empties_dasks_key_split_cache() -> None:
    from dask.utils import key_split

    for tick in range(50):
        key_split(f"serif-read-cafe-app-{tick}-server-video")
    assert clear_key_caches() >= 50
    assert key_split.cache_info().currsize == 0


def test_span_metadata_is_trimmed_to_the_newest_entries() -> None:
    with (dask.config.set({"distributed.scheduler.work-stealing": False}),
          Client(n_workers=1, threads_per_worker=1, processes=True,
                 dashboard_address=":0") as client):
        futures = [client.submit(int, i, key=f"span-trim-{i}") for i in range(150)]
        client.gather(futures)

        def trim(dask_scheduler) -> tuple[int, int, int]:
            from serif_dask.memory import scheduler_sizes

            before = scheduler_sizes(dask_scheduler)["span_collections"]
            dropped = trim_span_metadata(dask_scheduler, keep=20)
            return before, dropped, scheduler_sizes(dask_scheduler)["span_collections"]

        before, dropped, after = client.run_on_scheduler(trim)
    assert before >= 150  # one entry per submit, kept by Dask for the span's lifetime
    assert after == 20 and dropped == before - 20


def test_short_soak_keeps_state_bounded(config_dir, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dask.utils import key_split

    import serif_dask.service

    # The scheduler of a LocalCluster lives here: clear its key cache every 5 s.
    monkeypatch.setattr(serif_dask.service, "KEY_CACHE_CLEAR_S", 5.0)
    config = load_config([_fast_ward(config_dir)])
    caps = {"distributed.admin.low-level-log-length": CAP}
    with (dask.config.set(caps), service_config(), local_cluster(config) as cluster,
          Client(cluster) as client):
        # The dashboard's task stream, created as a page showing it would create it.
        client.run_on_scheduler(lambda dask_scheduler: bool(
            dask_scheduler._task_stream_plugin()))
        serif = Serif(client, config, seed=5, records=tmp_path / "r.jsonl",
                      records_rotation=Rotation(max_bytes=20_000, keep=2))
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(s=serif.run(duration=30)))
        thread.start()
        time.sleep(12)  # past warm-up: first fits, first groups, first loads
        s0, w0 = _sizes(client)
        thread.join(150)
        assert not thread.is_alive()
        s1, w1 = _sizes(client)
        stream = client.run_on_scheduler(
            lambda dask_scheduler: (len(dask_scheduler.plugins["task-stream"].buffer),
                                    dask_scheduler.plugins["task-stream"].buffer.maxlen))
        history = client.run_on_scheduler(
            lambda dask_scheduler: [len(s) for s in dask_scheduler._serif_memory.samples
                                    .values()])
        clearing = client.run(lambda dask_worker: dask_worker.periodic_callbacks[
            "serif-key-caches"].is_running())
        trimming = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler
                                           .periodic_callbacks["serif-span-metadata"]
                                           .is_running())
        cached = key_split.cache_info().currsize
    summary = result["s"]
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert summary["ticks"] >= 150, summary["ticks"]  # enough ticks for a leak to show
    # One task group per kind of tick task and a constant set of spans, however many
    # ticks ran (without the anchors: a new group per tick, and often a new span).
    assert s0["task_groups"] <= len(TICK_GROUPS) + 2, s0
    assert s1["spans"] == s0["spans"] <= 3, (s0, s1)
    assert s1["span_groups"] == s0["span_groups"] <= len(TICK_GROUPS) + 2, (s0, s1)
    assert s1["computation_groups"] <= s0["computation_groups"] + 2, (s0, s1)
    # Each submit's span metadata entry is trimmed every 5 s here (untrimmed: about 7 a
    # tick, 1,263 in 180 ticks; trimmed: 275).
    assert trimming
    assert s1["span_collections"] <= s1["spans"] * (SPAN_COLLECTIONS_KEPT + 300), s1
    assert s1["span_code"] <= s0["span_code"] + 2, (s0, s1)
    # Dask's logs sit at their caps.
    assert s1["transition_log"] == CAP and s1["events_max_topic"] <= CAP, s1
    assert stream[1] == SETTINGS[
        "distributed.scheduler.dashboard.tasks.task-stream-length"] >= stream[0]
    for address, sizes in w1.items():
        before = w0[address]
        assert sizes["log"] <= CAP and sizes["stimulus_log"] <= CAP, sizes
        assert sizes["transfer_incoming_log"] <= CAP, sizes
        assert sizes["transfer_outgoing_log"] <= CAP, sizes
        assert sizes["profile_history"] == 0, sizes  # profiling is off for serving
        # Fine performance metrics: entries per span and activity, not per tick.
        assert sizes["digests_total"] <= before["digests_total"] + 8, (before, sizes)
        assert sizes["serif_inputs"] <= 4, sizes
    # Dask's cache of key prefixes is cleared (a new key every tick would fill it).
    assert all(clearing.values()) and len(clearing) == len(w1), clearing
    assert cached < 2 * summary["ticks"], (cached, summary["ticks"])  # ~5 keys a tick made
    # serif's own state
    assert s1["serif_pending"] == 0 and s1["serif_worker_pending"] == 0, s1
    assert s1["serif_timeline"] <= 2 * 2048 and s1["serif_latencies"] <= 2 * 4096, s1
    assert serif.driver is not None
    assert serif.driver.stats.decision_ms.sketch._values.size <= 1 << 16
    # Records rotate: keep + 1 files on disk, each about max_bytes.
    files = [p for p in rotated_paths(tmp_path / "r.jsonl", 5) if p.exists()]
    assert len(files) == 3, files
    assert all(p.stat().st_size < 40_000 for p in files)
    # Each process's memory is sampled (scheduler+driver and every worker), bounded.
    assert len(history) == 1 + len(w1)
    assert all(0 < n <= MemoryHistory().maxlen for n in history)
