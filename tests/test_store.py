"""Weight and input stores against real redis-server processes (single and cluster)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import redis
from redis.cluster import RedisCluster

from serif_dask.redis_server import EmbeddedRedis, _free_port, ensure_redis
from serif_dask.store import (
    InputMissing,
    InputStore,
    RedisAuthError,
    RedisUnavailable,
    WeightsCorrupted,
    WeightsMissing,
    WeightStore,
    connect,
    torch_state_dict_from_bytes,
)

pytest_plugins = ["redis_fixtures"]

CHUNK = 1000  # small chunks: several per model without big payloads


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def _roundtrip(client: object, key: str) -> None:
    ws = WeightStore(client, chunk_size=CHUNK)
    data = _payload(4500)
    m = ws.push(key, data)
    assert (m.size, m.chunks, m.version) == (4500, 5, 1)
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert ws.meta(key) == m
    assert ws.fetch(key) == data
    m2 = ws.push(key, data[:1500])
    assert (m2.version, m2.chunks) == (2, 2)
    assert ws.fetch(key) == data[:1500]
    assert ws.push(key, b"x", version=10).version == 10
    assert ws.fetch(key) == b"x"


def test_weights_roundtrip_single(redis_server: EmbeddedRedis) -> None:
    client = connect([redis_server.address])
    assert type(client) is redis.Redis
    _roundtrip(client, "resnet")
    # old pushes' chunks are deleted: only meta, seq and the current chunk remain
    assert sorted(k.decode() for k in client.keys("serif:weights:*")) == [
        "serif:weights:{resnet}:3:0", "serif:weights:{resnet}:meta", "serif:weights:{resnet}:seq",
    ]


def test_weights_from_file_streamed(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    ws = WeightStore(connect([redis_server.address]), chunk_size=CHUNK)
    path = tmp_path / "w.bin"
    path.write_bytes(_payload(3001, seed=1))
    m = ws.push("m", path)
    assert (m.size, m.chunks) == (3001, 4)
    assert ws.fetch("m") == path.read_bytes()


def test_cluster_weights_roundtrip_and_tamper(redis_cluster) -> None:
    client = connect(redis_cluster.nodes)
    assert isinstance(client, RedisCluster)
    _roundtrip(client, "cluster-model")
    # all of one model's keys hash to one slot (hash tag), so pipelines stay on one node
    slots = {client.keyslot(k) for k in client.keys(target_nodes=RedisCluster.ALL_NODES)
             if b"{cluster-model}" in k}
    assert len(slots) == 1
    # any single node of the cluster is enough to find the rest
    assert isinstance(connect(redis_cluster.nodes[1:2]), RedisCluster)

    ws = WeightStore(client, chunk_size=CHUNK)
    m = ws.push("cluster-tamper", _payload(2500))
    client.setrange(f"serif:weights:{{cluster-tamper}}:{m.seq}:1", 7, b"\x00\xff")
    with pytest.raises(WeightsCorrupted, match="sha256"):
        ws.fetch("cluster-tamper")


def test_cluster_with_replicas_and_password() -> None:
    from redis_fixtures import assert_gone

    from serif_dask.redis_server import start_cluster

    with start_cluster(3, replicas=1, password="pw", timeout=60) as cluster:
        assert len(cluster.nodes) == 6
        client = connect(cluster.nodes, password="pw")
        ws = WeightStore(client, chunk_size=CHUNK, replicas=1)
        data = _payload(3500)
        ws.push("replicated", data)
        # as `weights push` and `run` do: wait for the replicas the key's master has
        # (once every replica has attached to its master)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            s.client().info("replication").get("connected_slaves", 0) >= 1
            for s in cluster.servers[:3]
        ):
            time.sleep(0.1)
        WeightStore(client, chunk_size=CHUNK, replicas=None).push("auto", data)
        # the replica of the key's master holds every chunk already (WAIT)
        master = client.get_node_from_key("serif:weights:{replicated}:meta")
        replica = next(
            s for s in cluster.servers[3:]
            if s.client().info("replication").get("master_port") == master.port
        )
        r = replica.client()
        r.execute_command("READONLY")
        assert r.hgetall("serif:weights:{replicated}:meta")[b"chunks"] == b"4"
        assert ws.fetch("replicated") == data
        auto_master = client.get_node_from_key("serif:weights:{auto}:meta")
        auto_replica = next(
            s for s in cluster.servers[3:]
            if s.client().info("replication").get("master_port") == auto_master.port
        ).client()
        auto_replica.execute_command("READONLY")
        assert auto_replica.hgetall("serif:weights:{auto}:meta")[b"chunks"] == b"4"
    assert_gone([s.pid or 0 for s in cluster.servers])


def test_tampered_and_missing(redis_server: EmbeddedRedis) -> None:
    client = connect([redis_server.address])
    ws = WeightStore(client, chunk_size=CHUNK)
    data = _payload(2500)
    m = ws.push("model", data)
    chunk = f"serif:weights:{{model}}:{m.seq}:2"
    client.setrange(chunk, 0, bytes([data[2000] ^ 1]))
    with pytest.raises(WeightsCorrupted) as e:
        ws.fetch("model")
    assert e.value.key == "model" and e.value.expected == m.sha256
    assert e.value.actual != m.sha256
    client.append(chunk, b"x")
    with pytest.raises(WeightsCorrupted, match="size"):
        ws.fetch("model")
    client.delete(chunk)
    with pytest.raises(WeightsCorrupted, match="chunk 2 of 3 is missing"):
        ws.fetch("model")
    with pytest.raises(WeightsMissing, match="nope"):
        ws.fetch("nope")
    assert ws.meta("nope") is None
    assert ws.delete("model") and not ws.delete("model")
    assert client.keys("serif:weights:{model}:[0-9]*") == []
    with pytest.raises(ValueError):
        ws.push("bad{key}", b"x")


def test_push_if_changed(redis_server: EmbeddedRedis) -> None:
    client = connect([redis_server.address])
    ws = WeightStore(client, chunk_size=CHUNK)
    data = _payload(2100)
    m1, pushed = ws.push_if_changed("m", data)
    assert pushed and m1.version == 1
    m2, pushed = ws.push_if_changed("m", data)
    assert not pushed and m2 == m1
    m3, pushed = ws.push_if_changed("m", data + b"!")
    assert pushed and m3.version == 2
    # same hash but a chunk evicted: pushed again rather than trusted
    client.delete(f"serif:weights:{{m}}:{m3.seq}:0")
    m4, pushed = ws.push_if_changed("m", data + b"!")
    assert pushed and ws.fetch("m") == data + b"!"
    assert m4.version == 3


def test_password(redis_password_server: EmbeddedRedis) -> None:
    server = redis_password_server
    client = connect([server.address], password=server.password)
    ws = WeightStore(client)
    ws.push("m", b"weights")
    assert ws.fetch("m") == b"weights"
    with pytest.raises(RedisAuthError, match="rejected the configured password"):
        connect([server.address], password="wrong")
    with pytest.raises(RedisAuthError, match="requires a password"):
        connect([server.address])
    # the password is in a private config file, never on a command line
    cmdline = " ".join(psutil.Process(server.pid).cmdline())
    assert server.password not in cmdline
    conf = Path(server.dir) / "redis.conf"
    assert conf.stat().st_mode & 0o777 == 0o600


def test_unreachable() -> None:
    port = _free_port("127.0.0.1")
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}"):
        connect([("127.0.0.1", port)])


def test_inputs(redis_server: EmbeddedRedis) -> None:
    inputs = InputStore(connect([redis_server.address]))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2]  # non-contiguous
    assert inputs.put("g7", x, ttl_s=30) == x.nbytes
    y, latency = inputs.get_timed("g7")
    np.testing.assert_array_equal(x, y)
    assert y.dtype == np.float32 and latency > 0 and inputs.last_latency_s == latency
    with pytest.raises(InputMissing):
        inputs.get("nothing")
    inputs.put("short", x, ttl_s=0.05)
    time.sleep(0.2)
    with pytest.raises(InputMissing):
        inputs.get("short")
    with pytest.raises(TypeError):
        inputs.put("obj", np.array([object()]), ttl_s=1)
    # a pickle planted under an input key is refused, not loaded
    inputs.client.set("serif:input:evil", b"\x80\x04cos\nsystem\n.")
    with pytest.raises(ValueError, match="not a serif input"):
        inputs.get("evil")


def test_torch_state_dict_formats() -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    for blob in (save(state), _torch_save(torch, state)):
        loaded = torch_state_dict_from_bytes(blob)
        assert set(loaded) == {"w", "b"} and torch.equal(loaded["w"], state["w"])
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        torch_state_dict_from_bytes(_torch_save(torch, {"x": SimpleNamespace(a=1)}))


def _torch_save(torch: object, obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)  # type: ignore[attr-defined]
    return buf.getvalue()


def _system(*ports: int, host: str = "127.0.0.1", password: str | None = None) -> object:
    nodes = (SimpleNamespace(ip_address=host, ports=ports),) if ports else ()
    return SimpleNamespace(redis_nodes=nodes, redis=SimpleNamespace(password=password, tls=None))


def test_ensure_redis(caplog: pytest.LogCaptureFixture) -> None:
    from redis_fixtures import assert_gone

    caplog.set_level(logging.INFO, logger="serif_dask.redis_server")
    with ensure_redis(None) as handle:
        assert handle.embedded and len(handle.nodes) == 1
        assert handle.connect().ping()
    assert_gone([s.pid or 0 for s in handle.servers])

    port = _free_port("127.0.0.1")
    with ensure_redis(_system(port, password="pw")) as handle:
        assert handle.nodes == [("127.0.0.1", port)]
        assert f"starting embedded redis-server on 127.0.0.1:{port}" in caplog.text
        WeightStore(handle.connect()).push("m", b"1")
        # already listening: used as is, nothing started
        with ensure_redis(_system(port, password="pw")) as again:
            assert not again.embedded and again.connect().ping()
    with pytest.raises(RedisUnavailable, match="192.0.2.1:6379 is unreachable"):
        ensure_redis(_system(6379, host="192.0.2.1"))


def test_cluster_ensure_redis_several_ports() -> None:
    from redis_fixtures import assert_gone

    ports = []
    while len(ports) < 3:
        p = _free_port("127.0.0.1", cluster=True)
        if p not in ports:
            ports.append(p)
    with ensure_redis(_system(*ports)) as handle:
        assert handle.cluster and len(handle.servers) == 3
        client = handle.connect()
        assert isinstance(client, RedisCluster)
        ws = WeightStore(client, chunk_size=CHUNK)
        ws.push("m", _payload(3000))
        assert ws.fetch("m") == _payload(3000)
    assert_gone([s.pid or 0 for s in handle.servers])


def test_servers_stop_and_die_with_parent(tmp_path: Path) -> None:
    from redis_fixtures import assert_gone

    server = EmbeddedRedis().start()
    pid, d = server.pid, server.dir
    server.stop()
    server.stop()  # idempotent
    assert_gone([pid])
    assert not Path(d).exists()

    # a parent killed with SIGKILL takes its redis-server with it (PR_SET_PDEATHSIG)
    script = (
        "import sys, time\n"
        "from serif_dask.redis_server import EmbeddedRedis\n"
        "r = EmbeddedRedis().start()\n"
        "print(r.pid, r.dir, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    try:
        child_pid, child_dir = parent.stdout.readline().split()  # type: ignore[union-attr]
        assert psutil.pid_exists(int(child_pid))
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_gone([int(child_pid)])
    # its temp dir is swept by the next embedded start
    assert Path(child_dir).exists()
    EmbeddedRedis().start().stop()
    assert not Path(child_dir).exists()


def test_orphan_from_thread_is_swept() -> None:
    """Started from a thread (no PDEATHSIG) and orphaned: the next start kills it."""
    from redis_fixtures import assert_gone

    script = (
        "import threading, time\n"
        "from serif_dask.redis_server import EmbeddedRedis\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(EmbeddedRedis().start()))\n"
        "t.start(); t.join()\n"
        "print(box[0].pid, box[0].dir, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    try:
        pid, orphan_dir = parent.stdout.readline().split()  # type: ignore[union-attr]
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    time.sleep(0.2)
    assert psutil.pid_exists(int(pid))  # survived its parent
    EmbeddedRedis().start().stop()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_gone([int(pid)])
    assert not Path(orphan_dir).exists()
