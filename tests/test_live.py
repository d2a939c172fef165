"""Live inputs: the ``redis-stream`` reader and ``serif-dask feed`` on a real redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from conftest import run_cli, serif_cmd

from serif_dask.config import load_config
from serif_dask.feed import Feeder, Schedule
from serif_dask.readers import get_reader
from serif_dask.readers.redis_stream import calibration_key, encode_sample, stream_key

pytest_plugins = ["redis_fixtures"]

GROUPS = 6
SILENT = 4  # the feeder never pushes this group
MALFORMED = 5  # this group's entries have the wrong number of bytes


def live_config(config_dir, port: int | None, *, groups: int = GROUPS) -> Path:
    """The hospital example, smaller, both modalities live on the Redis at ``port``."""

    def data(doc: dict) -> None:
        doc["num-groups"] = groups
        for mod in doc["data-modalities"]:
            mod["impl"] = "redis-stream"
        doc["data-modalities"][0]["synthetic-shape"] = [3, 4, 8, 8]
        doc["data-modalities"][1]["synthetic-shape"] = [400]

    def system(doc: dict) -> None:
        doc["redis-nodes"] = [] if port is None else [
            {"ip-address": "127.0.0.1", "ports": [str(port)]}]

    return config_dir(data=data, system=system)


def test_live_modality_needs_redis_nodes(config_dir) -> None:
    out = run_cli("validate", str(live_config(config_dir, None)))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: data.json: data-modalities[0].impl: modality 'video' reads live Redis "
        "streams, which needs redis-nodes in system.json (the embedded Redis has no producer)"
    ]


def test_reader_takes_newest_fresh_entry(config_dir, redis_server) -> None:
    cfg = load_config(live_config(config_dir, redis_server.port))
    app = cfg.app("wakeword")  # audio, sample-duration 1 s
    mod = cfg.modality("audio")
    reader = get_reader(mod, app, cfg.data.servers[0])
    client = redis_server.client()
    reader.client = client
    x = np.arange(400, dtype=np.float32)
    client.xadd(stream_key("audio", 0), encode_sample(x - 1, 0))
    client.xadd(stream_key("audio", 0), encode_sample(x, 1, time.time()))  # the newest
    sec, _ = client.time()
    client.xadd(stream_key("audio", 1), encode_sample(x, 1), id=f"{(sec - 20) * 1000}-0")
    client.xadd(stream_key("audio", 2), {"x": b"\0" * 12, "label": "1"})
    client.xadd(stream_key("audio", 3), {"x": x.tobytes(), "label": "one"})
    client.set(stream_key("audio", 4), "not a stream")
    res = reader.read(np.arange(6), tick=0)
    assert res.ok.tolist() == [True, False, False, False, False, False]
    np.testing.assert_array_equal(res.samples[0], x)
    assert res.labels.tolist() == [1, -1, -1, -1, -1, -1]
    assert res.errors[1].startswith("no-sample: newest entry of serif:in:audio:1 is 20")
    assert res.errors[2].startswith("bad-input:") and "12 bytes, expected 1600" in res.errors[2]
    assert res.errors[3].startswith("bad-input:") and "'label'" in res.errors[3]
    assert res.errors[4].startswith("bad-input:") and "WRONGTYPE" in res.errors[4]
    assert res.errors[5] == "no-sample: stream serif:in:audio:5 is empty"
    # The second read trims what is older than 10 sample-durations: group 1's old entry.
    reader.read(np.arange(6), tick=1)
    assert client.xlen(stream_key("audio", 1)) == 0
    assert client.xlen(stream_key("audio", 0)) == 2
    client.close()


def test_feeder_fills_streams_and_calibration(config_dir, redis_server) -> None:
    cfg = load_config(live_config(config_dir, redis_server.port))
    client = redis_server.client()
    feeder = Feeder(cfg, client, maxlen=5)
    assert feeder.calibrate(40) == 80  # two applications, one live peek modality each
    for _ in range(3):
        assert feeder.push(0) == 2 * GROUPS
    assert client.xlen(stream_key("video", 3)) == 3
    reader = get_reader(cfg.modality("audio"), cfg.app("wakeword"))
    reader.client = client
    x, y = reader.calibration(30)
    x2, y2 = reader.calibration(10, start=30)  # the next chunk continues the sequence
    assert x.shape == (30, 400) and x2.shape == (10, 400)
    assert set(y.tolist()) == {0, 1} and client.xlen(calibration_key("audio", "wakeword")) == 40
    ref_x, ref_y = get_reader(cfg.modality("audio").model_copy(update={"impl": None,
                                                                       "use_synthetic_data": True}),
                              cfg.app("wakeword"), seed=cfg.system.effective_seed).calibration(40)
    np.testing.assert_array_equal(np.concatenate([y, y2]), ref_y)
    np.testing.assert_allclose(np.concatenate([x, x2]), ref_x)
    client.close()


def test_schedule_bursts_and_ramps() -> None:
    s = Schedule(rate=2.0, burst=(3.0, 1.0, 4.0))
    assert [s.at(t) for t in (0.5, 1.5, 4.2)] == [6.0, 2.0, 6.0]
    r = Schedule(rate=1.0, duration=10.0, ramp_to=3.0)
    assert r.at(0) == 1.0 and r.at(5) == 2.0 and r.at(20) == 3.0


def test_feed_cli_stops_cleanly_on_ctrl_c(config_dir, redis_server) -> None:
    cfg_path = live_config(config_dir, redis_server.port)
    proc = subprocess.Popen(serif_cmd("feed", str(cfg_path), "--rate", "20", "--calibration",
                                      "8"), stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    lines: list[str] = []  # drained as it comes, so that a full pipe never blocks the feeder
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    drain.start()
    client = redis_server.client()
    try:
        # Ctrl-C once it feeds (its handler is installed by then), as a user would.
        deadline = time.monotonic() + 120
        while not (any(x.startswith("feeding") for x in lines)
                   and client.xlen(stream_key("audio", 0)) >= 5):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        drain.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "calibration: 16 labelled samples" in err and "fed " in err
    assert "Traceback" not in err
    assert client.xlen(calibration_key("video", "falldetection")) == 8
    client.close()


def test_feeder_and_run_meet(config_dir, redis_server, tmp_path: Path) -> None:
    """Entries in, records out: fed groups complete with their labels, a silent group fails
    ``no-sample``, one with malformed entries ``bad-input``."""
    cfg_path = live_config(config_dir, redis_server.port)
    cfg = load_config(cfg_path)
    client = redis_server.client()
    feeder = Feeder(cfg, client, groups=np.array([0, 1, 2, 3]))
    feeder.calibrate(128)
    stop = threading.Event()

    def feed() -> None:
        feeder.run(Schedule(rate=4.0), stop)

    def malformed() -> None:
        while not stop.wait(0.1):
            for mod in ("video", "audio"):
                client.xadd(stream_key(mod, MALFORMED), {"x": b"\1\2\3", "label": "0"})

    threads = [threading.Thread(target=feed), threading.Thread(target=malformed)]
    for t in threads:
        t.start()
    records = tmp_path / "records.jsonl"
    try:
        out = run_cli("run", str(cfg_path), "--duration", "6", "--records", str(records),
                      "--json", str(tmp_path / "summary.json"), "-q", timeout=240)
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.close()
    assert out.returncode == 0, out.stderr
    assert "SneakPeek uses the prior" not in out.stderr  # calibration streams were filled
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    by_group: dict[int, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    assert set(by_group) == set(range(GROUPS))
    for g in (0, 1, 2, 3):
        done = [r for r in by_group[g] if r["outcome"] == "completed"]
        assert done, by_group[g]
        assert all(r["label"] in (0, 1) for r in done)  # labels came with the entries
    assert {r["outcome"] for r in by_group[SILENT]} == {"failed"}
    assert all(r["reason"].startswith("no-sample:") for r in by_group[SILENT])
    assert {r["outcome"] for r in by_group[MALFORMED]} == {"failed"}
    assert all(r["reason"].startswith("bad-input:") for r in by_group[MALFORMED])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"] == len(rows)
    assert summary["failures_by_reason"]["no-sample"] == len(by_group[SILENT])


def test_run_without_calibration_says_so_in_one_line(config_dir, redis_server,
                                                     tmp_path: Path) -> None:
    cfg_path = live_config(config_dir, redis_server.port)
    out = run_cli("run", str(cfg_path), "--duration", "2", "-q", timeout=240)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "SneakPeek uses the prior" in line]
    assert len(lines) == 2, out.stderr  # one per application
    assert "serif:calib:video:falldetection" in lines[0] + lines[1]
    assert "Traceback" not in out.stderr
