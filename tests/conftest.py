"""Shared fixtures: real clusters, real processes; and a check that nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
HOSPITAL = ROOT / "configs" / "hospital"
REFERENCE = ROOT / "configs" / "serif-reference"  # SERIF's own examples, unchanged
BIN = Path(sys.executable).parent


def serif_cmd(*args: str) -> list[str]:
    return [str(BIN / "serif-dask"), *args]


def run_cli(*args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed ``serif-dask`` console script, capturing its output."""
    return subprocess.run(
        serif_cmd(*args), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, **kwargs,
    )


def serif_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if "serif" in name.lower()}


@pytest.fixture
def config_dir(tmp_path: Path) -> Callable[..., Path]:
    """Copy the hospital example and apply edits: ``config_dir(system={...}, ...)``."""

    def make(**edits: dict) -> Path:
        target = tmp_path / "config"
        shutil.copytree(HOSPITAL, target, dirs_exist_ok=True)
        for name, changes in edits.items():
            path = target / f"{name}.json"
            doc = json.loads(path.read_text())
            if callable(changes):
                doc = changes(doc) or doc
            else:
                doc.update(changes)
            path.write_text(json.dumps(doc))
        return target

    return make


def _helper(proc: psutil.Process) -> bool:
    """multiprocessing's own long-lived helpers (resource tracker, forkserver) are fine."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return True
    return "resource_tracker" in cmd or "forkserver" in cmd


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test must leave no child process and no serif shared-memory segment."""
    before = serif_segments()
    me = psutil.Process()
    existing = {c.pid for c in me.children(recursive=True)}  # e.g. a module-scoped cluster
    yield
    children = [
        c for c in me.children(recursive=True)
        if c.pid not in existing and c.is_running() and not _helper(c)
    ]
    alive = [c for c in children if _alive(c)]
    for child in alive:  # reap whatever a failed test left, then complain
        child.kill()
    leaked = serif_segments() - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
    assert not alive, f"processes left behind: {[c.pid for c in alive]}"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
