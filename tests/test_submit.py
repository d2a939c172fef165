"""``Serif.submit``: ad-hoc requests as Dask futures, on a real LocalCluster (processes)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from distributed import Client, Future, get_task_stream

from serif_dask import Serif, load_config, local_cluster
from serif_dask.readers import get_reader
from tests.conftest import HOSPITAL, ROOT

DIGITS = ROOT / "configs" / "digits"
FIELDS = {"app", "group", "tick", "model", "worker", "arrival", "finish", "latency",
          "prediction", "label", "utility", "outcome", "reason", "version"}


@pytest.fixture(scope="module")
def hospital():
    config = load_config([HOSPITAL])
    with local_cluster(config) as cluster, Client(cluster) as client:
        yield client, config


def samples_of(config, app: str, groups: list[int], tick: int = 0):
    """Real class-conditional samples and labels from the app's own (synthetic) reader."""
    app_cfg = config.app(app)
    modality = config.modality(app_cfg.model_profiles[0].modality)
    server = config.data.servers[0]
    out = get_reader(modality, app_cfg, server, 1).read(np.asarray(groups), tick)
    return out.samples, out.labels


def check_completed(record: dict, config, app: str, group: int) -> None:
    assert set(record) >= FIELDS
    assert record["app"] == app and record["group"] == group
    assert record["outcome"] == "completed", record
    assert record["reason"] is None and record["tick"] is None
    assert 0 <= record["prediction"] < config.app(app).k
    if record["model"] == "sneakpeek":  # answered from the peek: no GPU model adds more
        assert record["worker"] is None
    else:
        assert record["model"] in config.app(app).model_names
        assert record["worker"] in config.node_names  # scored on a GPU worker
    assert record["latency"] > 0
    assert np.isclose(sum(record["pi"]), 1.0)


def test_submit_without_a_run_returns_a_future_of_the_record(hospital) -> None:
    client, config = hospital
    serif = Serif(client, config, seed=2)
    samples, labels = samples_of(config, "wakeword", [3])
    with serif, get_task_stream(client) as stream:
        future = serif.submit("wakeword", 3, samples[0], label=int(labels[0]))
        assert isinstance(future, Future)
        record = future.result(timeout=120)
    check_completed(record, config, "wakeword", 3)
    assert record["label"] == int(labels[0])
    info = client.scheduler_info(n_workers=-1)["workers"]
    scores = [t for t in stream.data if "-submit." in str(t["key"])]
    assert scores and all(info[t["worker"]]["resources"].get("GPU", 0) >= 1 for t in scores)


def test_submit_composes_with_client_submit_and_gather(hospital) -> None:
    client, config = hospital
    samples, labels = samples_of(config, "falldetection", list(range(8)))
    with Serif(client, config, seed=2) as serif:
        futures = [serif.submit("falldetection", g, samples[g]) for g in range(8)]
        futures.append(client.submit(lambda x: x + 1, 41))
        results = client.gather(futures)
        assert results[-1] == 42
        for g, record in enumerate(results[:-1]):
            check_completed(record, config, "falldetection", g)
        assert len({r["request"] for r in results[:-1]}) == 8
        chained = client.submit(lambda r: (r["group"], r["outcome"]),
                                serif.submit("falldetection", 5, samples[5]))
        assert chained.result(timeout=120) == (5, "completed")
    # Closed: the ad-hoc run it configured is over, so a run may start at once.
    assert client.run_on_scheduler(_live_run) is None


def _live_run(dask_scheduler) -> str | None:
    from serif_dask.scheduler import SerifSchedulerPlugin

    return dask_scheduler.plugins[SerifSchedulerPlugin.name].live_run()


def test_submit_while_a_run_is_active(hospital, tmp_path) -> None:
    client, config = hospital
    serif = Serif(client, config, seed=4, records=tmp_path / "r.jsonl")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=serif.run(duration=3)))
    runner.start()
    try:
        deadline = time.time() + 120
        while not (serif.driver and serif.driver.estimators) and time.time() < deadline:
            time.sleep(0.05)
        run_id = serif.driver.run_id
        samples, labels = samples_of(config, "wakeword", [0, 1, 2])
        records = client.gather([serif.submit("wakeword", g, samples[g], label=int(labels[g]))
                                 for g in range(3)])
    finally:
        runner.join(120)
    for g, record in enumerate(records):
        check_completed(record, config, "wakeword", g)
    summary = result["summary"]
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert summary["requests"] == len(lines)  # ad-hoc requests are not the run's
    assert serif.driver.run_id == run_id
    after = serif.submit("wakeword", 7, samples[0]).result(timeout=120)  # the run is over
    check_completed(after, config, "wakeword", 7)


def test_submit_with_an_asynchronous_client(hospital) -> None:
    client, config = hospital
    samples, _ = samples_of(config, "wakeword", [6])

    async def main() -> dict:
        async with Client(client.scheduler.address, asynchronous=True) as aclient:
            serif = Serif(aclient, config, seed=2)
            with pytest.raises(RuntimeError, match="open_async"):
                serif.submit("wakeword", 6, samples[0])
            await serif.open_async()
            return await serif.submit("wakeword", 6, samples[0])

    check_completed(asyncio.run(main()), config, "wakeword", 6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", 0, np.zeros(4000)), "unknown application 'nope'"),
        (("wakeword", 40, np.zeros(4000)), "group 40 is out of range 0 .. 39"),
        (("wakeword", -1, np.zeros(4000)), "out of range"),
        (("wakeword", 1.5, np.zeros(4000)), "group must be an integer"),
        (("wakeword", 0, np.zeros(3999)), r"shape \[3999\], expected \[4000\]"),
        (("wakeword", 0, np.full(4000, np.nan)), "NaN or inf"),
        (("wakeword", 0, ["a"] * 4000), "not numeric"),
        (("wakeword", 0, {"video": np.zeros((3, 8, 32, 32))}), "takes samples of audio"),
    ],
)
def test_bad_input_raises_at_call_time(hospital, args, message) -> None:
    client, config = hospital
    serif = Serif(client, config)
    with pytest.raises(ValueError, match=message):
        serif.submit(*args)


def test_bad_label_raises(hospital) -> None:
    client, config = hospital
    with pytest.raises(ValueError, match="label must be an integer in 0 .. 1"):
        Serif(client, config).submit("wakeword", 0, np.zeros(4000), label=2)


def test_same_config_joins_the_served_run_and_another_replaces_it(hospital, config_dir) -> None:
    client, config = hospital
    sample = np.zeros(4000, dtype=np.float32)
    first, joiner = Serif(client, config, seed=1), Serif(client, config, seed=1)
    assert first.submit("wakeword", 0, sample).result(timeout=120)["outcome"] == "completed"
    assert joiner.open() == first.open()  # same config: no new run on the scheduler
    other = Serif(client, load_config([config_dir(system={"seed": 99})]))
    with pytest.raises(ValueError, match="live run"):
        other.open()  # another config's run is live: refused ...
    other = Serif(client, load_config([config_dir(system={"seed": 99})]), replace=True)
    other.open()  # ... unless it replaces the served one
    record = first.submit("wakeword", 0, sample).result(timeout=120)
    assert record["outcome"] == "failed"
    assert record["reason"].startswith("run-changed")
    assert other.submit("wakeword", 0, sample).result(timeout=120)["outcome"] == "completed"


def test_submit_real_model_scores_the_inline_sample() -> None:
    config = load_config([DIGITS])
    from serif_dask.readers.digits import load_split

    images, labels = load_split("test")
    # Data-oblivious: no answer from the peek, so a real model scores every sample.
    with local_cluster(config) as cluster, Client(cluster) as client, Serif(
        client, config, seed=3, data_aware=False
    ) as serif:
        records = client.gather([
            serif.submit("digits", i, images[i], label=int(labels[i])) for i in range(6)
        ])
    for i, record in enumerate(records):
        check_completed(record, config, "digits", i)
    right = sum(r["prediction"] == r["label"] for r in records)
    assert right >= 4, records  # every model is > 85 % accurate on held-out images
