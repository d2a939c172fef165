"""Faults against real processes: every request ends completed, dropped or failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from distributed import Client
from redis_fixtures import assert_gone

from serif_dask import Serif, load_config, local_cluster
from serif_dask.policies import _REGISTERED, register_policy
from serif_dask.redis_server import EmbeddedRedis, start_cluster
from serif_dask.store import REDIS_ERRORS, WeightStore, connect
from tests.conftest import BIN, HOSPITAL, ROOT, run_cli
from tests.fault_kit import (
    HANG_ENV,
    HANG_MODEL_ENV,
    KILL_ENV,
    RoutePolicy,
    hang_linear_model,
    one_slow_app,
)

CONFIG_FILES = ("system", "application", "data")


def test_compute_worker_killed_mid_run(tmp_path: Path) -> None:
    config = load_config([HOSPITAL])
    rec = tmp_path / "r.jsonl"
    with local_cluster(config) as cluster, Client(cluster) as client:
        info = client.scheduler_info(n_workers=-1)["workers"]
        victim = next(a for a, w in info.items() if w["name"] == "bay-a")
        pid = client.run(os.getpid, workers=[victim])[victim]
        killer = threading.Timer(3.0, os.kill, (pid, signal.SIGKILL))
        serif = Serif(client, config, policy="fastest", seed=4, records=rec)
        killer.start()
        try:
            summary = serif.run(duration=10)
        finally:
            killer.cancel()
        state = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["serif"].state()
        )
        stuck = _no_worker_tasks(client)
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert len(records) == summary["requests"]
    assert len({(r["app"], r["group"], r["tick"]) for r in records}) == len(records)
    assert not stuck, f"tasks left waiting for a dead worker: {stuck}"
    assert victim in state["lost_workers"]
    # The nanny restarts bay-a under the same name; it rejoins and gets work again.
    start = min(r["arrival"] for r in records)
    late = [r for r in records if r["worker"] == "bay-a" and r["arrival"] > start + 7]
    assert late, "the restarted worker never served again"
    failed = summary.get("failures_by_reason", {})
    assert set(failed) <= {"worker-lost", "policy-drop"}, failed


def test_worker_changes_are_pushed_to_the_driver(tmp_path: Path) -> None:
    """The driver's view of the workers follows a kill and the nanny's restart through the
    plugin's event topic, with no call of its own."""
    from serif_dask.membership import membership

    config = load_config([HOSPITAL])
    with local_cluster(config) as cluster, Client(cluster) as client:
        members = client.sync(membership, client)
        names = {w["name"] for w in members.workers.values()}
        assert names == {"bay-a", "bay-b", "bay-c", "data@bay-a", "data@bay-b"}
        victim = next(a for a, w in members.workers.items() if w["name"] == "bay-a")
        assert members.workers[victim]["role"] == "compute"
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in members.alive:
            assert time.monotonic() < deadline, "the kill never reached the driver"
            time.sleep(0.05)
        while not any(w["name"] == "bay-a" for w in members.workers.values()):
            assert time.monotonic() < deadline, "the restarted worker never reached it"
            time.sleep(0.05)


@pytest.mark.parametrize(("sla", "expected"), [(6.0, "completed"), (1.5, "worker-lost")])
def test_compute_worker_killed_mid_batch(config_dir, tmp_path: Path, routes: RoutePolicy,
                                         sla: float, expected: str) -> None:
    """A batch running on a worker that dies is planned again on a survivor while its
    deadline allows (the re-plan path, under a real kill); after it, ``worker-lost``."""
    config = load_config([config_dir(application=one_slow_app(sla),
                                     data={"num-groups": 16})])
    rec = tmp_path / "r.jsonl"
    with local_cluster(config) as cluster, Client(cluster) as client:
        addr = _addresses(client)
        victim, survivor = addr["bay-a"], addr["bay-b"]
        pid = client.run(os.getpid, workers=[victim])[victim]
        routes.routes = {0: ("falldetection/x3d_s", victim), 1: ("falldetection/x3d_s", victim)}
        run = _SteeredRun(Serif(client, config, policy="test-fault-routes", seed=3,
                                records=rec))
        try:
            deadline = time.monotonic() + 90
            while not any("serif-score" in str(k) for k in
                          client.processing(workers=[victim]).get(victim, ())):
                assert run.thread.is_alive(), run.error
                assert time.monotonic() < deadline, "the batch never started on bay-a"
                time.sleep(0.05)
            started = time.time()
            # Re-plans go to the survivor; kill inside the batch (before or after 2 × sla).
            routes.routes = {0: ("falldetection/x3d_s", survivor),
                             1: ("falldetection/x3d_s", survivor)}
            time.sleep(1.0 if expected == "completed" else 3.2)
            os.kill(pid, signal.SIGKILL)
            run.wait_for("every request of tick 0",
                         lambda _: sum(1 for r in run.rows if r["tick"] == 0) >= 16, cap_s=120)
        finally:
            summary = run.stop()
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    _accounted(summary, records)
    first = [r for r in records if r["tick"] == 0]
    assert len(first) == 16 and started > 0
    if expected == "completed":
        assert {(r["outcome"], r["worker"]) for r in first} == {("completed", "bay-b")}, first
    else:
        assert {(r["outcome"], (r["reason"] or "").split(":")[0]) for r in first} == {
            ("failed", "worker-lost")}, first


def _stop_when(serif: Serif, done: Callable[[list[dict]], bool], cap_s: float = 90.0):
    """``on_records`` that stops the run once ``done(records so far)``; and a safety cap.

    Runs end on an event, not after a fixed time, so a slow machine makes a test longer,
    never flaky. Returns (callback, the records list, the cap timer to cancel).
    """
    rows: list[dict] = []

    def on_records(new: list[dict]) -> None:
        rows.extend(new)
        if done(rows):
            serif.stop()

    cap = threading.Timer(cap_s, lambda: serif.client.loop.add_callback(serif.stop))
    return on_records, rows, cap


def _accounted(summary: dict, records: list[dict]) -> None:
    assert summary["requests"] == summary["completed"] + summary["dropped"] + summary["failed"]
    assert len(records) == summary["requests"]
    assert len({(r["app"], r["group"], r["tick"]) for r in records}) == len(records)


def _no_worker_tasks(client: Client, settle_s: float = 10.0) -> list[str]:
    """Tasks the scheduler holds in ``no-worker``, once releases sent at run end land."""
    deadline = time.monotonic() + settle_s
    while True:
        stuck = client.run_on_scheduler(
            lambda dask_scheduler: [
                str(k) for k, ts in dask_scheduler.tasks.items() if ts.state == "no-worker"
            ]
        )
        if not stuck or time.monotonic() > deadline:
            return stuck
        time.sleep(0.2)


def test_data_worker_killed_mid_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data@bay-a dies inside its read of tick 2; its groups fail, bay-b's carry on."""
    docs = {n: json.loads((HOSPITAL / f"{n}.json").read_text()) for n in CONFIG_FILES}
    for mod in docs["data"]["data-modalities"]:
        mod["impl"] = "tests.fault_kit:KillingReader"
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"bay-a:2:{marker}")
    config = load_config([tmp_path])
    kill_tick = {"wakeword": 2, "falldetection": 1}  # the ticks read at t = 2 s
    bay_a = {
        app.name: set(config.groups_of("bay-a", config.peek_modality(app)))
        for app in config.apps
    }

    def back(rows: list[dict]) -> bool:  # bay-a's groups served again after the kill
        return any(r["outcome"] == "completed" and r["group"] in bay_a[r["app"]]
                   and r["tick"] > kill_tick[r["app"]] + 1 for r in rows)

    with local_cluster(config) as cluster, Client(cluster) as client:
        serif = Serif(client, config, policy="fastest", seed=4, records=tmp_path / "r.jsonl")
        serif.on_records, _, cap = _stop_when(serif, back)
        cap.start()
        try:
            summary = serif.run(duration=0)
        finally:
            cap.cancel()
        stuck = _no_worker_tasks(client)
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    _accounted(summary, records)
    assert marker.exists(), "the data worker never died"
    assert not stuck, f"tasks left waiting for a dead worker: {stuck}"
    lost = [r for r in records if r["outcome"] == "failed"]
    assert lost and {r["reason"] for r in lost} == {"reader-lost"}, summary
    # Only the dead server's groups fail, and only until its worker is back.
    assert all(r["group"] in bay_a[r["app"]] for r in lost if r["tick"] > kill_tick[r["app"]])
    assert back(records)
    others = [r for r in records if r["group"] not in bay_a[r["app"]]
              and r["tick"] > kill_tick[r["app"]]]
    assert others and all(r["outcome"] == "completed" for r in others)


def test_hung_reader_fails_its_groups_read_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data@bay-a's read of falldetection tick 1 hangs for 6 s: its groups fail
    ``read-timeout`` (not ``policy-drop``), bay-b's groups of that tick are served, and the
    ticks after the hang are served again."""
    docs = {n: json.loads((HOSPITAL / f"{n}.json").read_text()) for n in CONFIG_FILES}
    docs["data"]["num-groups"] = 8
    for mod in docs["data"]["data-modalities"]:
        mod["impl"] = "tests.fault_kit:HangingReader"
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    monkeypatch.setenv(HANG_ENV, "bay-a:1:6")
    config = load_config([tmp_path])
    rec = tmp_path / "r.jsonl"
    with local_cluster(config) as cluster, Client(cluster) as client:
        summary = Serif(client, config, policy="fastest", seed=4, records=rec).run(14)
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    _accounted(summary, records)
    bay_a = set(config.groups_of("bay-a", "video"))
    hung = [r for r in records if r["app"] == "falldetection" and r["tick"] == 1]
    assert {r["reason"] for r in hung if r["group"] in bay_a} == {"read-timeout"}
    assert all(r["outcome"] == "completed" for r in hung if r["group"] not in bay_a)
    assert "policy-drop" not in summary["failures_by_reason"], summary["failures_by_reason"]
    failed = {r["reason"] for r in records if r["outcome"] == "failed"}
    assert failed <= {"read-timeout"}, failed
    # While the data worker sleeps, its later reads time out too; after it, all is served.
    after = [r for r in records if r["arrival"] > min(x["arrival"] for x in records) + 10]
    assert after and all(r["outcome"] == "completed" for r in after)


def _fault_config(target: Path) -> Path:
    """The hospital example whose reads go through :class:`tests.fault_kit.KillingReader`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        doc = json.loads((HOSPITAL / f"{name}.json").read_text())
        for mod in doc.get("data-modalities", []):
            mod["impl"] = "tests.fault_kit:KillingReader"
        (target / f"{name}.json").write_text(json.dumps(doc))
    return target


def test_scheduler_killed_mid_tick(tmp_path: Path) -> None:
    """`serif-dask run` against a hand-started cluster whose scheduler dies mid-tick."""
    dask = str(BIN / "dask")
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([dask, *args], stdin=subprocess.DEVNULL,
                                stdout=(logs / f"{name}.log").open("w"),
                                stderr=subprocess.STDOUT, env=env)

    sched_file, marker = tmp_path / "scheduler.json", tmp_path / "killed"
    scheduler = start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                       ":0", "--scheduler-file", str(sched_file), "--preload",
                       "serif_dask.scheduler"], "scheduler")
    procs = [scheduler]
    try:
        while not sched_file.exists():
            assert scheduler.poll() is None, (logs / "scheduler.log").read_text()
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        # data@bay-a kills the scheduler in the middle of its read of tick 3.
        env = os.environ | {KILL_ENV: f"bay-a:3:{marker}:{scheduler.pid}",
                            "PYTHONPATH": str(ROOT)}  # workers import tests.fault_kit
        workers = [(n, "GPU=1") for n in ("bay-a", "bay-b", "bay-c")]
        workers += [(f"data@{s}", "DATA=1") for s in ("bay-a", "bay-b")]
        for name, resources in workers:
            procs.append(start(
                ["worker", address, "--name", name, "--resources", resources, "--nthreads", "1",
                 "--preload", "serif_dask.worker", "--no-dashboard"], name, env,
            ))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(workers), timeout=120)
        out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
        proc = run_cli("run", str(_fault_config(tmp_path / "config")), "--scheduler-address",
                       address, "--duration", "30", "--policy", "fastest", "--json", str(out),
                       "--records", str(rec), timeout=120)
    finally:
        for p in reversed(procs):
            p.kill()
        for p in procs:
            p.wait()
    assert marker.exists(), "the scheduler was never killed"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: lost the Dask scheduler; summary holds what was recorded"
    ], proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    records = [json.loads(x) for x in rec.read_text().splitlines()]
    _accounted(summary, records)
    assert summary["ticks"] < 30  # it stopped on the loss, not at the end of the duration
    failed = {r["reason"] for r in records if r["outcome"] == "failed"}
    assert failed == {"scheduler-lost"}, summary  # tick 3 was in flight
    assert {r["tick"] for r in records if r["app"] == "wakeword"} >= {0, 1, 2, 3}


DIGITS = ROOT / "configs" / "digits"
LINEAR, MLP = "digits/digits-linear", "digits/digits-mlp"


def _digits_config(target: Path, redis_ports: list[int], *, colocate: bool) -> Path:
    """configs/digits on the given Redis. ``colocate``: its scanners are the compute nodes
    (inputs then go through shared memory, not through Redis)."""
    target.mkdir(parents=True, exist_ok=True)
    docs = {n: json.loads((DIGITS / f"{n}.json").read_text()) for n in CONFIG_FILES}
    docs["system"]["redis-nodes"] = [{"ip-address": "127.0.0.1", "ports": redis_ports}]
    for app in docs["application"]["applications"]:
        for profile in app["model-profiles"]:
            profile["model-weights"] = str(DIGITS / profile["model-weights"])
    if colocate:
        for server, node in zip(docs["data"]["servers"], ("node-a", "node-b"), strict=True):
            server["name"] = node
    for name, doc in docs.items():
        (target / f"{name}.json").write_text(json.dumps(doc))
    return target


class _SteeredRun:
    """``serif.run(duration=0)`` in a thread; the test waits for what the records show."""

    def __init__(self, serif: Serif) -> None:
        self.serif, self.rows = serif, []
        self.summary: dict | None = None
        self.error: BaseException | None = None
        serif.on_records = self.rows.extend
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.serif.run(duration=0)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, what: str, seen: Callable[[dict], bool], cap_s: float = 90) -> None:
        """Until a record satisfies ``seen``; the cap only keeps a broken run from hanging."""
        deadline = time.monotonic() + cap_s
        while not any(seen(r) for r in list(self.rows)):
            assert self.thread.is_alive(), f"the run ended before {what}: {self.error!r}"
            assert time.monotonic() < deadline, f"never saw {what}"
            time.sleep(0.1)

    def stop(self) -> dict:
        self.serif.client.loop.add_callback(self.serif.stop)
        self.thread.join(60)
        assert self.summary is not None, self.error
        return self.summary


def _addresses(client: Client) -> dict[str, str]:
    """Worker name -> address."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {str(w["name"]): address for address, w in info.items()}


@pytest.fixture
def routes():
    """A :class:`RoutePolicy` registered as ``test-fault-routes`` for this test."""
    policy = RoutePolicy()
    register_policy("test-fault-routes", policy)
    yield policy
    _REGISTERED.pop("test-fault-routes", None)


def _persistent_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    """A redis-server whose data survives a SIGKILL (AOF, fsync always), as in production."""
    return EmbeddedRedis(port, extra_config={
        "dir": str(data_dir), "appendonly": "yes", "appendfsync": "always",
    }).start()


def test_redis_lost_and_back(tmp_path: Path, routes: RoutePolicy) -> None:
    """Warm models serve on; a cold one falls back to a warm one or fails; loads resume."""
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    servers = [_persistent_redis(data_dir)]
    port = servers[0].port
    config = load_config([_digits_config(tmp_path / "config", [port], colocate=True)])
    try:
        with local_cluster(config) as cluster, Client(cluster) as client:
            addr = _addresses(client)
            routes.routes = {0: (LINEAR, addr["node-a"]), 1: (LINEAR, addr["node-a"])}
            # A cold start: models load on first use, so that some are cold when Redis goes.
            run = _SteeredRun(Serif(client, config, policy="test-fault-routes", seed=3,
                                    records=tmp_path / "r.jsonl", warm_models=False))
            try:
                run.wait_for("linear warm on node-a", lambda r: r["outcome"] == "completed")
                # mlp is cold everywhere, and node-b has nothing warm at all.
                routes.routes = {0: (MLP, addr["node-a"]), 1: (MLP, addr["node-b"])}
                servers[0].kill()
                down = time.time()
                run.wait_for("node-a's warm linear serving mlp's requests with Redis down",
                             lambda r: r["arrival"] > down and r["outcome"] == "completed"
                             and r["model"] == "digits-linear" and r["worker"] == "node-a")
                run.wait_for("node-b failing weights-unavailable with Redis down",
                             lambda r: r["arrival"] > down and r["worker"] == "node-b"
                             and (r["reason"] or "").startswith("weights-unavailable"))
                servers.append(_persistent_redis(data_dir, port))  # back, with its data
                up = time.time()
                run.wait_for("node-b loading mlp once Redis is back",
                             lambda r: r["arrival"] > up and r["outcome"] == "completed"
                             and r["model"] == "digits-mlp" and r["worker"] == "node-b")
            finally:
                summary = run.stop()
    finally:
        for server in servers:
            server.stop()
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    _accounted(summary, records)
    reasons = {(r["reason"] or "").split(":", 1)[0] for r in records if r["outcome"] == "failed"}
    assert reasons <= {"weights-unavailable", "input-unavailable"}, summary


def test_hung_model_fails_score_timeout_and_its_worker_is_restarted(
    tmp_path: Path, routes: RoutePolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """node-a's linear model wedges in its third forward (tick 1) for 120 s: those requests
    fail ``score-timeout`` at the tick's deadline (not ``policy-drop``), the worker still
    running it is restarted through its nanny, and node-a serves again afterwards."""
    import serif_dask.tick

    server = _persistent_redis(tmp_path)
    path = _digits_config(tmp_path / "config", [server.port], colocate=True)
    hang_linear_model(path)
    # Forward 1 is the warm-up, 2 is tick 0, 3 hangs.
    monkeypatch.setenv(HANG_MODEL_ENV, f"{tmp_path / 'hung'}:120:3")
    monkeypatch.setattr(serif_dask.tick, "STUCK_S", 3.0)
    config = load_config([path])
    try:
        with local_cluster(config) as cluster, Client(cluster) as client:
            addr = _addresses(client)
            routes.routes = {0: (LINEAR, addr["node-a"]), 1: (LINEAR, addr["node-a"])}
            run = _SteeredRun(Serif(client, config, policy="test-fault-routes", seed=3,
                                    records=tmp_path / "r.jsonl"))
            try:
                run.wait_for("a score-timeout", lambda r: r["reason"] == "score-timeout")
                hung_at = time.time()
                run.wait_for("node-a serving after its restart",
                             lambda r: r["outcome"] == "completed" and r["worker"] == "node-a"
                             and r["arrival"] > hung_at + 3.0, cap_s=120)
            finally:
                summary = run.stop()
    finally:
        server.stop()
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    _accounted(summary, records)
    assert (tmp_path / "hung").exists()
    hung = [r for r in records if r["tick"] == 1]
    assert hung and {(r["outcome"], r["reason"]) for r in hung} == {("failed", "score-timeout")}
    reasons = {(r["reason"] or "").split(":")[0] for r in records if r["outcome"] != "completed"}
    # Never a false policy-drop. Batches queued behind the wedged one may find their
    # inputs' cache slots reused by later ticks by the time they run: input-stale.
    assert reasons <= {"score-timeout", "worker-lost", "input-stale"}, reasons


def test_redis_cluster_master_killed(tmp_path: Path, routes: RoutePolicy) -> None:
    """3 masters + 3 replicas; a master dies mid-run: no weight lost, every request counted."""
    cluster = start_cluster(3, replicas=1, node_timeout_ms=1000, timeout=60)
    pids = [s.pid or 0 for s in cluster.servers]
    try:
        ports = [p for _, p in cluster.nodes]
        config = load_config([_digits_config(tmp_path / "config", ports, colocate=False)])
        with local_cluster(config) as dask_cluster, Client(dask_cluster) as client:
            addr = _addresses(client)
            routes.routes = {0: (LINEAR, addr["node-a"]), 1: (LINEAR, addr["node-a"])}
            # A cold start: models load on first use, so that some are cold when Redis goes.
            run = _SteeredRun(Serif(client, config, policy="test-fault-routes", seed=3,
                                    records=tmp_path / "r.jsonl", warm_models=False))
            try:
                run.wait_for("requests served through the cluster",
                             lambda r: r["outcome"] == "completed")
                # Kill the master holding mlp's weights, which nobody has loaded yet.
                key = "serif:weights:{digits-mlp}:meta"
                redis = connect(cluster.nodes)
                owner = redis.get_node_from_key(key)
                redis.close()
                victim = next(s for s in cluster.masters if s.port == owner.port)
                victim.kill()
                survivors = [s.address for s in cluster.servers if s is not victim]
                _wait_for_failover(survivors, key)
                routes.routes = {0: (MLP, addr["node-b"]), 1: (MLP, addr["node-b"])}
                moved = time.time()
                run.wait_for("mlp loaded from the promoted replica",
                             lambda r: r["arrival"] > moved and r["outcome"] == "completed"
                             and r["model"] == "digits-mlp")
            finally:
                summary = run.stop()
        store = WeightStore(connect(survivors))
        for app in config.apps:
            for profile in app.model_profiles:
                assert store.fetch(profile.redis_key) == Path(profile.weights).read_bytes()
    finally:
        cluster.stop()
        assert_gone(pids)
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    _accounted(summary, records)
    reasons = {(r["reason"] or "").split(":", 1)[0] for r in records if r["outcome"] == "failed"}
    assert reasons <= {"weights-unavailable", "input-unavailable", "input-missing"}, summary


def _wait_for_failover(nodes: list[tuple[str, int]], key: str, cap_s: float = 60) -> None:
    """Until ``key``'s slot, whose master was killed, is served again (a replica took over)."""
    deadline = time.monotonic() + cap_s
    while True:
        try:
            client = connect(nodes)
            try:
                if client.exists(key):
                    return
            finally:
                client.close()
        except REDIS_ERRORS:
            pass
        assert time.monotonic() < deadline, "the cluster never failed over"
        time.sleep(0.2)


def test_heartbeat_noise_of_a_closing_worker_is_dropped() -> None:
    """Dask's traceback for a heartbeat cut by the worker's own close is not shown; the
    same failure while a worker of the process still runs (a lost scheduler) is."""
    import logging

    from distributed import Worker
    from distributed.core import Status

    from serif_dask.worker import _HEARTBEAT_FILTER

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg,
                                 None, None)

    class Stand:  # what the filter reads of a worker: its status
        status = Status.closing

    heartbeat = record("Failed to communicate with scheduler during heartbeat.")
    stand = Stand()
    Worker._instances.add(stand)  # type: ignore[arg-type]
    try:
        assert not _HEARTBEAT_FILTER.filter(heartbeat)
        assert _HEARTBEAT_FILTER.filter(record("Compute Failed"))
        stand.status = Status.running
        assert _HEARTBEAT_FILTER.filter(heartbeat)
    finally:
        Worker._instances.discard(stand)  # type: ignore[arg-type]


def test_a_cancelled_gather_leaves_every_other_gather_working() -> None:
    """A tick that times out mid-gather must not cancel other ticks' gathers, now or later.

    Dask's client shares one pending gather request among concurrent callers. With its
    five gather slots busy (held here as five slow gathers would hold them), a new request
    waits; cancelling the caller that made it cancels it for every caller, and the client
    keeps the cancelled request for all later ones. ``gathered`` shields it. (The first
    half checks Dask's behaviour in the pinned range; drop it once a release fixes it.)
    """
    import asyncio

    from distributed import LocalCluster, wait

    from serif_dask.waiting import gathered, outcome

    async def scenario(shielded: bool) -> tuple[list, list]:
        async with (LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                 asynchronous=True, dashboard_address=":0") as cluster,
                    Client(cluster, asynchronous=True) as client):
            futures = [client.submit(int, i, pure=False) for i in range(4)]
            await wait(futures)

            async def gather_one(i: int) -> list:
                if shielded:
                    return await gathered(client, [futures[i]])
                return await client.gather([futures[i]], asynchronous=True)

            slots = client._gather_semaphore
            for _ in range(5):
                await slots.acquire()
            first = asyncio.ensure_future(gather_one(0))
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(gather_one(1))
            await asyncio.sleep(0.05)
            first.cancel()  # its tick timed out
            await asyncio.sleep(0.05)
            for _ in range(5):
                slots.release()
            now = await asyncio.gather(first, second, return_exceptions=True)
            later = [await asyncio.wait_for(
                asyncio.gather(gather_one(2), return_exceptions=True), 10)]
            if shielded:
                later.append(await asyncio.wait_for(outcome(futures[3]), 10))
            return now, later

    now, later = asyncio.run(scenario(shielded=False))  # Dask's own behaviour
    assert isinstance(now[1], asyncio.CancelledError), now
    assert isinstance(later[0][0], asyncio.CancelledError), later  # and for good
    now, later = asyncio.run(scenario(shielded=True))
    assert isinstance(now[0], asyncio.CancelledError) and now[1] == [1], now
    assert later == [[[2]], (3, None)], later
