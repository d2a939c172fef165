"""The ``/individual-serif`` dashboard page and the ``serif_`` series on ``/metrics``.

A ward runs under ``serif-dask run --duration 0 --dashboard-address``, as a user starts
it; the page, the navigation link, the metrics and a headless Chromium look at it while it
runs, and Ctrl-C stops it. Exact agreement between ``/metrics`` and the summary is checked
in-process, after ``Serif.run`` returns and before the cluster closes, which cannot race.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HOSPITAL, ROOT, serif_cmd

ARTIFACTS = ROOT / "artifacts"
SERIES = (
    "serif_requests_total", "serif_utility_total", "serif_latency_seconds",
    "serif_decision_seconds", "serif_models_warm",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}, serif_ series only."""
    _, text = get(f"{base}/metrics")
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("serif_"):
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name, tuple(sorted(labels.items()))]


@dataclass
class Ward:
    """A ``serif-dask run`` in the background, with its dashboard."""

    proc: subprocess.Popen
    base: str
    summary: Path
    records: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ward]:
    tmp = tmp_path_factory.mktemp("ward")
    port = free_port()
    summary, records = tmp / "s.json", tmp / "r.jsonl"
    log = (tmp / "run.log").open("w")
    proc = subprocess.Popen(
        serif_cmd("run", str(HOSPITAL), "--duration", "0", "--quiet",
                  "--dashboard-address", f"127.0.0.1:{port}",
                  "--json", str(summary), "--records", str(records)),
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    w = Ward(proc, f"http://127.0.0.1:{port}", summary, records)
    try:
        deadline = time.monotonic() + 150
        while True:  # until the page is served and a few ticks have been reported
            assert proc.poll() is None, (tmp / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the ward did not come up"
            with contextlib.suppress(OSError, KeyError, ValueError):
                done = sum(v for (name, labels), v in scrape(w.base).items()
                           if name == "serif_requests_total")
                if done >= 100:
                    break
            time.sleep(0.5)
        yield w
    finally:
        w.stop()
        log.close()


def test_page_is_a_bokeh_document(ward: Ward) -> None:
    status, html = get(f"{ward.base}/individual-serif")
    assert status == 200
    assert "static/js/bokeh.min.js" in html and "embed_items" in html
    assert "myTopnav" in html, "not in the dashboard's template"
    status, html = get(f"{ward.base}/status")
    assert status == 200
    assert 'href="individual-serif"' in html, "no link in the dashboard's navigation"


def test_metrics_series(ward: Ward) -> None:
    metrics = scrape(ward.base)
    names = {name for name, _ in metrics}
    for series in SERIES:
        assert any(n == series or n.startswith(series + "_") for n in names), series
    assert value(metrics, "serif_requests_total", app="wakeword", outcome="completed") > 0
    assert value(metrics, "serif_decision_seconds_count") > 0
    assert {dict(labels)["worker"] for name, labels in metrics
            if name == "serif_models_warm"} == {"bay-a", "bay-b", "bay-c"}


def test_metrics_show_each_process_memory(ward: Ward) -> None:
    metrics = scrape(ward.base)
    resident = {dict(labels)["process"]: (dict(labels)["role"], v)
                for (name, labels), v in metrics.items()
                if name == "serif_process_resident_bytes"}
    workers = {"bay-a", "bay-b", "bay-c", "data@bay-a", "data@bay-b"}
    assert set(resident) == {"scheduler", *workers}, resident
    # serif-dask run: the driver reports from the scheduler's own process
    assert resident["scheduler"][0] == "scheduler+driver"
    assert {resident[w][0] for w in workers} == {"compute", "data"}
    assert all(10 * 2**20 < v < 8 * 2**30 for _, v in resident.values()), resident


# -- headless Chromium over the DevTools protocol ------------------------------------------
SOURCE_LENGTHS_JS = """
(() => {
  const docs = (window.Bokeh && window.Bokeh.documents) || [];
  if (docs.length === 0) return null;
  const out = {};
  for (const model of docs[0].all_models) {
    if (typeof model.get_length === "function" && model.name
        && model.name.startsWith("serif-")) {
      out[model.name] = model.get_length() || 0;
    }
  }
  return out;
})()
"""
#: Sources that must hold data while a ward runs (nothing is dropped in the hospital).
MUST_HAVE_DATA = (
    "serif-apps", "serif-latency", "serif-decision", "serif-pi", "serif-workers",
    "serif-backlog", "serif-timeline-falldetection", "serif-timeline-wakeword",
    "serif-memory",
)


class DevTools:
    """The few DevTools protocol calls the test needs, over tornado's websocket client."""

    def __init__(self, ws: object):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        ident = self.next_id
        await self.ws.write_message(json.dumps({"id": ident, "method": method,
                                                "params": params}))
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), timeout=60)
            assert raw is not None, "chromium closed the DevTools connection"
            msg = json.loads(raw)
            if msg.get("id") == ident:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif (e.get("method") == "Runtime.consoleAPICalled"
                  and params.get("type") in ("error", "assert")):
                out.append(json.dumps(params.get("args", []))[:500])
            elif (e.get("method") == "Log.entryAdded"
                  and params.get("entry", {}).get("level") == "error"):
                out.append(json.dumps(params["entry"])[:500])
        return out


@contextlib.contextmanager
def chromium(binary: str) -> Iterator[int]:
    """A headless Chromium in its own process group; yields its DevTools port."""
    profile = tempfile.mkdtemp(prefix="serif-chromium-")
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         "--window-size=1400,2000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open DevTools"
            time.sleep(0.2)
        yield int(active.read_text().split()[0])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # renderers that outlived the browser
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(profile, ignore_errors=True)


async def look_at_page(port: int, url: str, screenshot: Path) -> tuple[dict, list[str]]:
    from tornado.websocket import websocket_connect

    _, listing = get(f"http://127.0.0.1:{port}/json/list")
    target = next(t for t in json.loads(listing) if t.get("type") == "page")
    ws = await websocket_connect(target["webSocketDebuggerUrl"], max_message_size=64 << 20)
    try:
        tools = DevTools(ws)
        for domain in ("Runtime", "Log", "Page"):
            await tools.call(f"{domain}.enable")
        await tools.call("Page.navigate", url=url)
        lengths: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            result = await tools.call("Runtime.evaluate", expression=SOURCE_LENGTHS_JS,
                                      returnByValue=True)
            lengths = result.get("result", {}).get("value") or {}
            if all(lengths.get(name, 0) > 0 for name in MUST_HAVE_DATA):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(1.5)  # let the canvases paint before the picture
        shot = await tools.call("Page.captureScreenshot", format="png",
                                captureBeyondViewport=True)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return lengths, tools.errors()
    finally:
        ws.close()


def test_page_in_headless_chromium(ward: Ward) -> None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    screenshot = ARTIFACTS / "dashboard-individual-serif.png"
    with chromium(binary) as port:
        lengths, errors = asyncio.run(
            look_at_page(port, f"{ward.base}/individual-serif", screenshot)
        )
    assert not errors, errors
    empty = [name for name in MUST_HAVE_DATA if lengths.get(name, 0) == 0]
    assert not empty, f"plots without data: {empty} (all: {lengths})"
    assert screenshot.stat().st_size > 10_000


def test_ctrl_c_summary_covers_metrics(ward: Ward) -> None:
    """Metrics only grow until the run stops; the summary then accounts for all of them."""
    before = scrape(ward.base)
    assert ward.stop() == 130
    summary = json.loads(ward.summary.read_text())
    for app, s in summary["per_app"].items():
        for outcome in ("completed", "dropped", "failed"):
            seen = value(before, "serif_requests_total", app=app, outcome=outcome)
            assert seen <= s[outcome]
        assert value(before, "serif_latency_seconds_count", app=app) <= s["completed"]


def construct_again(dask_scheduler: object) -> None:
    """A second plugin object on the same scheduler registers everything again."""
    from serif_dask.scheduler import SerifSchedulerPlugin

    SerifSchedulerPlugin(dask_scheduler)


# -- exact agreement, in-process --------------------------------------------------------------
def test_metrics_match_summary_in_process(tmp_path: Path) -> None:
    from distributed import Client

    from serif_dask import Serif, load_config, local_cluster

    config = load_config([HOSPITAL])
    records = tmp_path / "r.jsonl"
    port = free_port()
    with (local_cluster(config, dashboard_address=f"127.0.0.1:{port}") as cluster,
          Client(cluster) as client):
        serif = Serif(client, config, seed=3, records=records)
        summary = serif.run(duration=4)
        base = f"http://127.0.0.1:{port}"
        metrics = scrape(base)
        status, _ = get(f"{base}/individual-serif")
        client.run_on_scheduler(construct_again)
        assert "serif_requests_total" in get(f"{base}/metrics")[1]
    assert status == 200
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert summary["requests"] == len(rows) > 0
    for app, s in summary["per_app"].items():
        for outcome in ("completed", "dropped", "failed"):
            assert value(metrics, "serif_requests_total", app=app, outcome=outcome) == s[outcome]
        assert value(metrics, "serif_utility_total", app=app) == pytest.approx(s["utility"])
        assert value(metrics, "serif_latency_seconds_count", app=app) == s["completed"]
        latencies = [r["latency"] for r in rows if r["app"] == app and r["latency"] is not None]
        assert value(metrics, "serif_latency_seconds_sum", app=app) == pytest.approx(
            sum(latencies))
        le_1 = value(metrics, "serif_latency_seconds_bucket", app=app, le="1.0")
        assert le_1 == sum(x <= 1.0 for x in latencies)
    # One decision per plan round: ticks due together are planned in one call.
    assert summary["ticks"] >= value(metrics, "serif_decision_seconds_count") > 0


def test_histogram_and_collector_registration_are_idempotent() -> None:
    from prometheus_client import REGISTRY, generate_latest

    from serif_dask import metrics

    hist = metrics.Histogram((0.5, 1.0))
    hist.observe([0.5, 0.7, 1.0, 3.0])
    hist.observe([])
    assert hist.buckets() == [("0.5", 1), ("1.0", 3), ("+Inf", 4)]
    assert (hist.count, hist.total) == (4, pytest.approx(5.2))
    metrics._register_collector()
    metrics._register_collector()
    generate_latest(REGISTRY)  # a scrape with no live plugin works too
