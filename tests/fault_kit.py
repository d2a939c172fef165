"""Helpers that fault tests and ``bench/faults.py`` load into real worker processes.

Importable by dotted path (``tests.fault_kit:KillingReader``), so a config's modality
``impl`` can name them and the workers of a LocalCluster run them.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

from serif_dask.models.digits import LinearDigits
from serif_dask.policies import DROP, Plan, PlanProblem
from serif_dask.readers.synthetic import SyntheticReader

#: ``<server>:<tick>:<marker file>[:<pid>]``: in the middle of its read of ``<tick>``, the
#: data worker of ``<server>`` SIGKILLs itself (or process ``<pid>``, e.g. the scheduler),
#: once (the marker file says it happened).
KILL_ENV = "SERIF_FAULT_KILL_READ"


def first_time(marker: str) -> bool:
    """True for the first caller only, across processes and restarts (creates ``marker``)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def one_slow_app(sla: float) -> Any:
    """An ``application.json`` edit: hospital's fall detection alone, every 8 s, each request
    0.3 s on x3d_s: a batch of all 16 groups takes about 5 s, long enough to kill its worker
    in the middle of it."""

    def application(doc: dict) -> None:
        app = doc["applications"][0]
        app.update({"sla-latency": sla, "sample-duration": 8})
        for profile in app["model-profiles"]:
            profile["latencies"] = {n: [0.3, 0.05] for n in ("bay-a", "bay-b", "bay-c")}
        doc["applications"] = [app]

    return application


class KillingReader(SyntheticReader):
    """The synthetic reader, killing a process mid-read once, as ``$SERIF_FAULT_KILL_READ`` says.

    Inside a read task is the worst moment for a data worker (or the scheduler) to go: the
    tick's read is in flight and its peek and score tasks wait on it.
    """

    def read(self, groups: np.ndarray, tick: int, **kwargs: Any) -> Any:
        spec = os.environ.get(KILL_ENV, "")
        if spec:
            server, kill_tick, marker, *pid = spec.split(":")
            if (getattr(self.server, "name", None) == server and int(tick) == int(kill_tick)
                    and first_time(marker)):
                os.kill(int(pid[0]) if pid else os.getpid(), signal.SIGKILL)
        return super().read(groups, tick, **kwargs)


class RoutePolicy:
    """A policy the test steers: ``routes[group % 2] = ("app/model", worker address)``.

    Registered in the test process (a LocalCluster's scheduler runs there), it lets a test
    decide which model must be loaded where, and when, whatever the machine's speed.
    Groups whose parity has no route are dropped.
    """

    def __init__(self) -> None:
        self.routes: dict[int, tuple[str, str]] = {}

    def __call__(self, problem: PlanProblem) -> Plan:
        n = problem.n_requests
        model, worker = np.full(n, DROP), np.full(n, DROP)
        for parity, (name, address) in dict(self.routes).items():
            if name in problem.model_names and address in problem.worker_names:
                mine = problem.group % 2 == parity
                model[mine] = problem.model_names.index(name)
                worker[mine] = problem.worker_names.index(address)
        return Plan(model=model, worker=worker, priority=np.zeros(n))


#: ``<server>:<tick>:<seconds>``: the read of ``<tick>`` on ``<server>`` sleeps that long,
#: as a stuck sensor or a hung network mount would.
HANG_ENV = "SERIF_FAULT_HANG_READ"


class HangingReader(SyntheticReader):
    """The synthetic reader, hanging in one read as ``$SERIF_FAULT_HANG_READ`` says."""

    def read(self, groups: np.ndarray, tick: int, **kwargs: Any) -> Any:
        spec = os.environ.get(HANG_ENV, "")
        if spec:
            server, hang_tick, seconds = spec.split(":")
            if getattr(self.server, "name", None) == server and int(tick) == int(hang_tick):
                import time

                time.sleep(float(seconds))
        return super().read(groups, tick, **kwargs)


#: ``<marker file>:<seconds>:<call>``: the ``<call>``-th forward of a :class:`HangingDigits`
#: in a worker process sleeps that long (once: the marker file says it happened), as a
#: wedged GPU kernel or driver would.
HANG_MODEL_ENV = "SERIF_FAULT_HANG_MODEL"


class HangingDigits(LinearDigits):
    """configs/digits' linear model, hanging in one forward as ``$SERIF_FAULT_HANG_MODEL`` says."""

    calls = 0  # forwards in this process

    def forward(self, batch: np.ndarray) -> np.ndarray:
        spec = os.environ.get(HANG_MODEL_ENV, "")
        HangingDigits.calls += 1
        if spec:
            marker, seconds, call = spec.rsplit(":", 2)
            if HangingDigits.calls == int(call) and first_time(marker):
                import time

                time.sleep(float(seconds))
        return super().forward(batch)


def hang_linear_model(config_dir: Path) -> None:
    """Make a copy of configs/digits serve its linear model as :class:`HangingDigits`
    (the config's other models unchanged), in place."""
    path = Path(config_dir) / "application.json"
    doc = json.loads(path.read_text())
    for profile in doc["applications"][0]["model-profiles"]:
        if profile["name"] == "digits-linear":
            profile["impl"] = "tests.fault_kit:HangingDigits"
    path.write_text(json.dumps(doc))
