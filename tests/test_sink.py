"""The Redis stream results sink, against a real redis-server and a real LocalCluster."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from serif_dask.records import COLUMNS
from serif_dask.sink import stream_fields
from tests.conftest import HOSPITAL, run_cli

pytest_plugins = ["redis_fixtures"]


@pytest.fixture(scope="module")
def hospital_client():
    config = load_config([HOSPITAL])
    with local_cluster(config) as cluster, Client(cluster) as client:
        yield client


def _stream_config(config_dir, server, **stream):
    host, port = server.address
    return config_dir(system={
        "redis-nodes": [{"ip-address": host, "ports": [port]}],
        "results-stream": stream,
    })


def _keys(rows):
    return Counter((r["app"], str(r["group"]), str(r["tick"]), r["outcome"]) for r in rows)


def test_stream_fields_hold_only_record_columns() -> None:
    record = {"app": "a", "group": 3, "tick": 1, "model": None, "outcome": "dropped",
              "sample": [0.1, 0.2], "pi": [0.5, 0.5]}
    fields = stream_fields(record)
    assert fields == {"app": "a", "group": "3", "tick": "1", "outcome": "dropped"}
    assert set(fields) <= set(COLUMNS)


def test_stream_holds_every_record_of_the_run(
    hospital_client, redis_server, config_dir, tmp_path
) -> None:
    config = load_config([_stream_config(config_dir, redis_server, key="serif:run",
                                         maxlen=100_000)])
    records = tmp_path / "r.jsonl"
    with Serif(hospital_client, config, seed=5, records=records) as serif:
        summary = serif.run(duration=2)
    r = redis_server.client(decode_responses=True)
    entries = [fields for _, fields in r.xrange("serif:run")]
    assert summary["requests"] > 0
    assert len(entries) == summary["requests"]
    lines = [json.loads(x) for x in records.read_text().splitlines()]
    assert _keys(entries) == _keys(lines)
    assert all(set(e) <= set(COLUMNS) for e in entries)
    done = [e for e in entries if e["outcome"] == "completed"]
    assert done and all("prediction" in e and "latency" in e for e in done)


def test_cli_stream_is_trimmed_near_maxlen(redis_server, config_dir, tmp_path) -> None:
    r = redis_server.client(decode_responses=True)
    # Approximate trimming drops whole stream nodes: small nodes make "near" tight.
    r.config_set("stream-node-max-entries", 10)
    path = _stream_config(config_dir, redis_server, key="unused", maxlen=20)
    out = tmp_path / "s.json"
    proc = run_cli("run", str(path), "--duration", "2", "--seed", "3", "--quiet",
                   "--results-stream", "serif:cli", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["requests"] > 40
    assert r.exists("unused") == 0
    assert 20 <= r.xlen("serif:cli") <= 30


def test_redis_failure_warns_once_and_loses_no_record(
    hospital_client, redis_server, config_dir, tmp_path, caplog
) -> None:
    r = redis_server.client()
    r.set("serif:broken", "not a stream")  # every XADD fails: WRONGTYPE
    config = load_config([_stream_config(config_dir, redis_server, key="serif:broken")])
    records = tmp_path / "r.jsonl"
    seen: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="serif_dask.sink"), Serif(
        hospital_client, config, seed=5, records=records, on_records=seen.extend
    ) as serif:
        summary = serif.run(duration=2)
    warnings = [x for x in caplog.records if x.name == "serif_dask.sink"
                and x.levelno == logging.WARNING]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "results stream" in warnings[0].getMessage()
    assert summary["requests"] > 0
    assert len(records.read_text().splitlines()) == summary["requests"] == len(seen)
    assert r.get("serif:broken") == b"not a stream"
