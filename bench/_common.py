"""Helpers shared by the cluster benchmarks: derived configs, task-stream keys, machine.

Benchmarks derive their workloads from ``configs/hospital`` by editing a copy of its JSON
files, so a reader can diff what a bench changed against the example everybody runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import distributed
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOSPITAL = ROOT / "configs" / "hospital"
FILES = ("system", "application", "data")

#: Key prefixes of the tick graph's tasks (see ``serif_dask/tick.py``); each is
#: ``<prefix><run_id>-<app>-<tick>-...``.
TICK_PREFIXES = ("serif-read-", "serif-peek-", "serif-score-")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def load_docs(base: Path = HOSPITAL) -> dict[str, dict[str, Any]]:
    """The three JSON documents of a config directory."""
    return {name: json.loads((base / f"{name}.json").read_text()) for name in FILES}


def write_config(docs: dict[str, dict[str, Any]], target: Path) -> Path:
    """Write the three documents into ``target`` (a directory ``load_config`` accepts)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (target / f"{name}.json").write_text(json.dumps(docs[name], indent=1))
    return target


def derive(
    target: Path,
    *,
    num_groups: int | None = None,
    latency: Callable[[float, float], tuple[float, float]] | None = None,
    shapes: dict[str, list[int]] | None = None,
    sample_duration: float | None = None,
    retrieval: float | None = None,
    base: Path = HOSPITAL,
) -> Path:
    """A copy of ``base`` with some knobs changed, written to ``target``.

    ``latency(infer, switch) -> (infer, switch)`` rewrites every model profile's latencies;
    ``shapes`` replaces modalities' ``synthetic-shape``; ``sample_duration`` sets every
    application's tick period; ``retrieval`` sets every modality's retrieval latency.
    """
    docs = copy.deepcopy(load_docs(base))
    if num_groups is not None:
        docs["data"]["num-groups"] = int(num_groups)
        _replay_streams(docs["data"], int(num_groups))
        # Shared-memory caches sized for the base's groups hold two ticks of the new ones.
        servers = docs["data"]["servers"]
        need = 2 * -(-int(num_groups) // len(servers))
        for server in servers:
            entries = server.get("cache-entries-per-modality")
            if entries:
                server["cache-entries-per-modality"] = {k: max(v, need)
                                                        for k, v in entries.items()}
    for app in docs["application"]["applications"]:
        for profile in app["model-profiles"]:  # the copy lives elsewhere: weights stay
            weights = profile.get("model-weights")
            if weights and not Path(weights).is_absolute():
                profile["model-weights"] = str((base / weights).resolve())
        if sample_duration is not None:
            app["sample-duration"] = sample_duration
        if latency is not None:
            for profile in app["model-profiles"]:
                profile["latencies"] = {
                    node: list(latency(float(v[0]), float(v[1])))
                    for node, v in profile["latencies"].items()
                }
    for mod in docs["data"]["data-modalities"]:
        if shapes and mod["name"] in shapes:
            mod["synthetic-shape"] = list(shapes[mod["name"]])
            mod["cache-entry-size"] = max(4 * int(np.prod(shapes[mod["name"]])), 1024)
        if retrieval is not None:
            mod["retrieval-latencies"] = dict.fromkeys(mod["retrieval-latencies"], retrieval)
    return write_config(docs, target)


def _replay_streams(data: dict[str, Any], groups: int) -> None:
    """More groups than a real-data config lists streams for: the extra groups replay the
    listed ones (group g reads what group g mod listed reads), spread over the servers."""
    servers = data["servers"]
    for mod in data["data-modalities"]:
        if mod.get("use-synthetic-data", True):
            continue
        name = mod["name"]
        listed = {int(g): v for s in servers for g, v in s.get("streams", {}).get(name, {}).items()}
        if not listed or len(listed) >= groups:
            continue
        order = sorted(listed)
        for g in range(groups):
            if g not in listed:
                server = servers[g % len(servers)]
                server.setdefault("streams", {}).setdefault(name, {})[str(g)] = \
                    listed[order[g % len(order)]]


_KEY = re.compile(r"^(serif-(?:read|peek|score))-([0-9a-f]+)-(.+)-(\d+)(?:\.\d+)?-")


def parse_key(key: str, apps: tuple[str, ...]) -> tuple[str, str, str, int] | None:
    """(kind, run_id, app, tick) of a tick-graph task key, or None for other keys.

    App names may hold dashes, so the app is matched against the config's names.
    """
    match = _KEY.match(str(key))
    if match is None:
        return None
    kind, run_id, rest = match.group(1), match.group(2), str(key)[match.end(2) + 1 :]
    for app in sorted(apps, key=len, reverse=True):
        if rest.startswith(app + "-"):
            # score keys may carry a re-plan attempt: ``<tick>.<attempt>``
            tick = rest[len(app) + 1 :].split("-", 1)[0].split(".", 1)[0]
            if tick.isdigit():
                return kind.removeprefix("serif-"), run_id, app, int(tick)
    return None


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last line of output (what ``make bench`` and CI read)."""
    print(json.dumps(result), flush=True)


class PeakRss:
    """The peak resident memory of this process and all its children (the LocalCluster's
    workers, Redis), sampled on a thread every ``every_s`` seconds while in a ``with``."""

    def __init__(self, every_s: float = 0.25) -> None:
        import threading

        self.every_s = every_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _total(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # gone between listing and reading
                total += proc.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_bytes = max(self.peak_bytes, self._total())

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    def __enter__(self) -> PeakRss:
        self.peak_bytes = self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
