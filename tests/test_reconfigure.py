"""Live reconfiguration: a run changed mid-way, its records split by config version with
every request accounted for; refused changes leave the run as it was.

Real parts only: ``serif-dask run`` and ``serif-dask reconfigure`` as subprocesses on a
LocalCluster with worker processes, and the Python API on one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from serif_dask import Serif, load_config, local_cluster
from serif_dask.errors import ReconfigureRefused
from serif_dask.reconfigure import Reconfigured, diff
from tests.conftest import HOSPITAL, ROOT, run_cli, serif_cmd
from tests.test_run import check_summary, read_records

DIGITS_WEIGHTS = ROOT / "configs" / "digits" / "weights" / "digits-linear.safetensors"


def edited(tmp: Path, name: str, **edits: Any) -> Path:
    """A copy of the hospital config with ``edits`` (file -> function(doc))."""
    target = tmp / name
    shutil.copytree(HOSPITAL, target)
    for file, edit in edits.items():
        path = target / f"{file}.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return target


@contextlib.contextmanager
def live_run(tmp_path: Path, config: Path, policy: str
             ) -> Iterator[tuple[subprocess.Popen, Path, Path, Path]]:
    """``serif-dask run CONFIG --duration 0`` with a scheduler file, summary and records;
    yields (process, summary, records, scheduler file); killed on the way out if the test
    did not stop it."""
    out, rec, sched = tmp_path / "s.json", tmp_path / "r.jsonl", tmp_path / "scheduler.json"
    with (tmp_path / "run.log").open("w") as log:
        proc = subprocess.Popen(
            serif_cmd("run", str(config), "--duration", "0", "--policy", policy,
                      "--scheduler-file", str(sched), "--json", str(out), "--records",
                      str(rec), "--quiet"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            yield proc, out, rec, sched
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def new_model(doc: dict) -> None:
    """falldetection gains a profile-mode model, wakeword a looser SLA."""
    fall = doc["applications"][0]
    extra = copy.deepcopy(fall["model-profiles"][0])
    extra["name"] = "x3d_xs"
    extra["latencies"] = {node: [0.003, 0.02] for node in extra["latencies"]}
    fall["model-profiles"].append(extra)
    doc["applications"][1]["sla-latency"] = 0.8


def more_groups(doc: dict) -> None:
    doc["num-groups"] = 48


def wait_for(what: str, check: Any, proc: subprocess.Popen | None = None,
             timeout: float = 120) -> Any:
    """Poll ``check`` until it returns something true (the deadline only stops a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            assert proc.poll() is None, f"the run ended while waiting for {what}"
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def versions_in(path: Path) -> set[int]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        if line.endswith("}"):  # a line still being written is left for the next look
            out.add(json.loads(line)["version"])
    return out


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def check_versions(records: list[dict], summary: dict, groups: dict[int, int]) -> None:
    """Every tick lies in one version and holds exactly that version's groups; the
    summary's per-version books match the records."""
    ticks: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        ticks[(r["app"], r["tick"])].append(r)
    for (app, tick), rows in ticks.items():
        versions = {r["version"] for r in rows}
        assert len(versions) == 1, f"{app} tick {tick} split over versions {versions}"
        version = versions.pop()
        assert sorted(r["group"] for r in rows) == list(range(groups[version])), (app, tick)
    for app in {a for a, _ in ticks}:
        seen = sorted(t for a, t in ticks if a == app)
        assert seen == list(range(len(seen))), f"{app}: a tick is missing"
    per_version = summary["per_version"]
    assert sorted(map(int, per_version)) == sorted(groups)
    for version, part in per_version.items():
        mine = [r for r in records if r["version"] == int(version)]
        assert part["requests"] == len(mine) > 0
        for outcome in ("completed", "dropped", "failed"):
            assert part[outcome] == sum(r["outcome"] == outcome for r in mine)
        assert part["requests"] == part["completed"] + part["dropped"] + part["failed"]


def test_cli_reconfigures_a_live_run(tmp_path: Path) -> None:
    """Policy, SLA, a new model and num-groups change mid-run; four bad changes are
    refused in one line each and change nothing."""
    with live_run(tmp_path, HOSPITAL, "fastest") as (proc, out, rec, sched):
        wait_for("the first records", lambda: versions_in(rec), proc)
        at = ["--scheduler-file", str(sched)]

        # Refused: the run stays at version 1.
        bad_json = edited(tmp_path, "bad-json")
        (bad_json / "application.json").write_text('{"applications": [')
        refused(run_cli("reconfigure", *at, str(bad_json)), "invalid JSON", "unchanged")
        refused(run_cli("reconfigure", *at, "--policy", "no-such-policy"), "no-such-policy")

        def add_node(doc: dict) -> None:
            doc["compute-nodes"].append({"name": "bay-d"})

        refused(run_cli("reconfigure", *at, str(edited(tmp_path, "layout", system=add_node))),
                "compute-nodes")

        def unknown_model(doc: dict) -> None:
            extra = copy.deepcopy(doc["applications"][0]["model-profiles"][0])
            extra.update({"name": "x3d_real", "use-profile": False,
                          "impl": "no_such_package.models:Model",
                          "model-weights": str(DIGITS_WEIGHTS), "redis-key": "x3d-real"})
            doc["applications"][0]["model-profiles"].append(extra)

        refused(run_cli("reconfigure", *at,
                        str(edited(tmp_path, "unknown-model", application=unknown_model))),
                "unknown model", "x3d_real")

        def real_model(doc: dict) -> None:  # a real class, but the run has no Redis
            unknown_model(doc)
            doc["applications"][0]["model-profiles"][-1]["impl"] = (
                "serif_dask.models.linear:LinearClassifier")

        refused(run_cli("reconfigure", *at,
                        str(edited(tmp_path, "real-model", application=real_model))),
                "x3d_real", "no Redis")

        address = json.loads(sched.read_text())["address"]
        with Client(address, timeout="20s") as client:  # nothing changed on the scheduler
            state = client.sync(client.scheduler.serif_state)
        assert state["version"] == state["applied_version"] == 1, state["versions"]
        assert state["policy"] == "fastest" and state["data_aware"] is True

        # Accepted: version 2 (policy), then version 3 (config).
        two = run_cli("reconfigure", *at, "--policy", "random")
        assert two.returncode == 0, two.stderr
        assert "config version 2 applied" in two.stdout and "policy: fastest -> random" in \
            two.stdout
        wait_for("records of version 2", lambda: 2 in versions_in(rec), proc)
        changed = edited(tmp_path, "changed", application=new_model, data=more_groups)
        three = run_cli("reconfigure", *at, str(changed))
        assert three.returncode == 0, three.stderr
        assert "config version 3 applied" in three.stdout, three.stdout
        for change in ("num-groups: 40 -> 48", "applications[wakeword].sla-latency: 0.5 -> 0.8",
                       "applications[falldetection].model-profiles[x3d_xs]: added"):
            assert change in three.stdout, three.stdout
        same = run_cli("reconfigure", *at, str(changed))
        assert same.returncode == 0 and "no change" in same.stdout, same.stdout + same.stderr
        wait_for("records of version 3", lambda: 3 in versions_in(rec), proc)
        # A few ticks under version 3 (falldetection ticks every 2 s).
        wait_for("falldetection under version 3", lambda: sum(
            1 for line in rec.read_text().splitlines()
            if '"falldetection"' in line and '"version": 3' in line) >= 2 * 48, proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 130, (tmp_path / "run.log").read_text()[-3000:]
    assert not sched.exists(), "the scheduler file outlived its run"
    summary = json.loads(out.read_text())
    records = read_records(rec)
    check_summary(summary, records)
    assert summary["version"] == 3 and summary["policy"] == "random"
    assert [v["version"] for v in summary["versions"]] == [1, 2, 3]
    assert [v["policy"] for v in summary["versions"]] == ["fastest", "random", "random"]
    check_versions(records, summary, {1: 40, 2: 40, 3: 48})
    new = {r["version"] for r in records if r["model"] == "x3d_xs"}
    assert new == {3}, new  # the added model serves only under the version that added it
    assert {r["version"] for r in records if r["group"] >= 40} == {3}


def test_reconfigure_pushes_a_new_real_models_weights(tmp_path: Path) -> None:
    """digits starts without its CNN (so its Redis lacks the CNN's weights); adding the
    CNN back live pushes them, and the CNN serves requests under version 2 only."""
    config = tmp_path / "digits"
    shutil.copytree(ROOT / "configs" / "digits", config)
    app_file = config / "application.json"
    full = app_file.read_text()
    doc = json.loads(full)
    doc["applications"][0]["model-profiles"] = [
        m for m in doc["applications"][0]["model-profiles"] if m["name"] != "digits-cnn"]
    app_file.write_text(json.dumps(doc))
    with live_run(tmp_path, config, "most-accurate") as (proc, out, rec, sched):
        wait_for("the first records", lambda: versions_in(rec), proc)
        app_file.write_text(full)  # the CNN is back
        two = run_cli("reconfigure", "--scheduler-file", str(sched), str(config))
        assert two.returncode == 0, two.stderr
        assert "config version 2 applied" in two.stdout, two.stdout
        assert "applications[digits].model-profiles[digits-cnn]: added" in two.stdout
        # most-accurate gives the CNN what fits beside the MLP: a few requests a tick
        wait_for("the CNN serving", lambda: any(
            '"digits-cnn"' in line and '"completed"' in line
            for line in rec.read_text().splitlines()), proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 130, (tmp_path / "run.log").read_text()[-3000:]
    summary = json.loads(out.read_text())
    records = read_records(rec)
    check_summary(summary, records)
    check_versions(records, summary, {1: 32, 2: 32})
    assert {r["version"] for r in records if r["model"] == "digits-cnn"} == {2}
    assert "weights-unavailable" not in summary["failures_by_reason"], summary


def test_api_reconfigures_and_state_shows_version(tmp_path: Path) -> None:
    """``Serif.reconfigure`` in the run's own process: a frozen result, ``serif_state``
    and the dashboard's header show the version; a refused change leaves it."""
    from serif_dask.dashboard import SerifPage

    config = load_config([HOSPITAL])
    records: list[dict] = []
    lock = threading.Lock()

    def keep(rows: list[dict]) -> None:
        with lock:
            records.extend(rows)

    with local_cluster(config) as cluster, Client(cluster) as client:
        serif = Serif(client, config, policy="fastest", on_records=keep)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["summary"] = serif.run(duration=0)
            except BaseException as exc:  # reported by the main thread
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_for("the first records", lambda: records or "error" in result)
            assert "error" not in result, result.get("error")
            plugin = cluster.scheduler.plugins["serif"]

            def remove_app(doc: dict) -> None:
                doc["applications"] = doc["applications"][:1]

            with pytest.raises(ReconfigureRefused, match="cannot be added or removed"):
                serif.reconfigure(edited(tmp_path, "one-app", application=remove_app))
            assert plugin.version == 1 and plugin.policy_name == "fastest"

            def faster_falls(doc: dict) -> None:
                doc["applications"][0]["sample-duration"] = 1

            done = serif.reconfigure(edited(tmp_path, "faster", application=faster_falls),
                                     policy="sneakpeek", data_aware=False)
            assert isinstance(done, Reconfigured) and done.applied and done.version == 2
            with pytest.raises(AttributeError):
                done.version = 3  # type: ignore[misc]
            assert "policy: fastest -> sneakpeek" in done.changes
            assert "applications[falldetection].sample-duration: 2 -> 1" in done.changes
            state = client.sync(client.scheduler.serif_state)
            assert state["version"] == state["applied_version"] == 2
            assert state["applied_at"] >= state["version_changed_at"]
            assert [v["version"] for v in state["versions"]] == [1, 2]
            assert state["policy"] == "sneakpeek" and state["data_aware"] is False
            assert "config version 2 (since " in SerifPage._header(plugin, [])
            events = [msg for _, msg in client.get_events("serif-config")]
            assert [(e["action"], e["version"]) for e in events] == [("new", 2), ("applied", 2)]
            wait_for("falldetection under version 2", lambda: sum(
                r["app"] == "falldetection" and r["version"] == 2 for r in list(records))
                >= 3 * 40)
        finally:
            serif.stop()
            thread.join(timeout=120)
        assert "error" not in result, result.get("error")
        summary = result["summary"]
        serif.close()
    assert summary["version"] == 2 and summary["data_aware"] is False
    check_versions(records, summary, {1: 40, 2: 40})
    assert summary["policy"] == "sneakpeek"


# -- the judgement alone: what may change live ---------------------------------------------
def _two(tmp: Path, **edits: Any) -> tuple[Any, Any]:
    return load_config([HOSPITAL]), load_config([edited(tmp, "new", **edits)])


def test_diff_lists_what_changes(tmp_path: Path) -> None:
    live, new = _two(tmp_path, application=new_model, data=more_groups)
    proposal = diff(live, new, live_policy="fastest", live_data_aware=True)
    assert proposal.policy == "fastest" and proposal.data_aware is True  # kept: not in file
    assert [str(c) for c in proposal.changes] == [
        "num-groups: 40 -> 48",
        "applications[falldetection].model-profiles[x3d_xs]: added",
        "applications[wakeword].sla-latency: 0.5 -> 0.8",
    ]
    assert diff(live, live, live_policy="fastest", live_data_aware=True).changes == ()


def test_diff_takes_a_changed_scheduler_type(tmp_path: Path) -> None:
    def policy(doc: dict) -> None:
        doc["scheduler-type"] = "random"

    live, new = _two(tmp_path, system=policy)
    proposal = diff(live, new, live_policy="fastest", live_data_aware=True)
    assert proposal.policy == "random"
    assert [str(c) for c in proposal.changes] == ["policy: fastest -> random"]


@pytest.mark.parametrize("file, edit, words", [
    ("system", lambda d: d.update(seed=8), "seed"),
    ("data", lambda d: d["servers"].pop(), "servers"),
    ("data", lambda d: d["data-modalities"][1].update({"synthetic-shape": [2000]}),
     "synthetic-shape"),
    ("application", lambda d: d["applications"][0].update(prior=[0.5, 0.5]), "prior"),
    ("application", lambda d: d["applications"][0].update(
        sneakpeek={"strength": 0.5}), "sneakpeek.strength"),
])
def test_diff_refuses_what_a_live_run_cannot_take(tmp_path: Path, file: str, edit: Any,
                                                  words: str) -> None:
    try:
        live, new = _two(tmp_path, **{file: edit})
    except Exception as exc:  # a config that does not load is refused before any diff
        pytest.fail(f"the edited config does not load: {exc}")
    with pytest.raises(ReconfigureRefused, match=words):
        diff(live, new, live_policy="fastest", live_data_aware=True)


def test_beliefs_follow_num_groups() -> None:
    """Groups that stay keep their belief, new ones start at the prior, and fewer groups
    reset the rest without shrinking (a tick of the older version may still plan them)."""
    import numpy as np

    from serif_dask.sneakpeek import ForwardBeliefs, GroupBeliefs

    for beliefs in (ForwardBeliefs([0.9, 0.1], 4), GroupBeliefs([0.9, 0.1], 4)):
        beliefs.observe(np.arange(4), np.tile([0.01, 0.99], (4, 1)))
        seen = beliefs.pi(np.arange(4))
        beliefs.resize(6)
        np.testing.assert_allclose(beliefs.pi(np.arange(4)), seen)
        np.testing.assert_allclose(beliefs.pi(np.arange(4, 6)), [[0.9, 0.1]] * 2)
        beliefs.resize(2)
        assert beliefs.n_groups == 6
        np.testing.assert_allclose(beliefs.pi(np.arange(2)), seen[:2])
        np.testing.assert_allclose(beliefs.pi(np.arange(2, 6)), [[0.9, 0.1]] * 4)
