"""A user's clone stands on its own: nothing it needs lives outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: Paths that only exist on a development machine: the team's shared folder beside the
#: checkout, and absolute home or work directories.
OUTSIDE = re.compile(
    r"\.\./shared|(?<![\w.])shared/(?:serif-reference|DESIGN|seeds)"
    r"|(?<![\w.~])/(?:work|root|home|Users|mnt)/"
)


#: SERIF's example configs, kept byte for byte: the lab paths inside are their data (run
#: them with ``--simulate``), not paths this project reads.
VERBATIM = ROOT / "configs" / "serif-reference"


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    paths = [ROOT / name for name in out.stdout.decode().split("\0") if name]
    return [p for p in paths if not p.is_relative_to(VERBATIM)]


def test_pattern_catches_outside_paths() -> None:
    # Spelled in parts, so that this file does not hold what it looks for.
    for bad in ("/".join(["..", "shared", "serif-reference", "systemcfg.json"]),
                'Path("/' + 'work/shared/x")', "see " + "shared/" + "DESIGN.md",
                "/" + "root/.cache/x"):
        assert OUTSIDE.search(bad), bad
    for fine in ("configs/serif-reference/systemcfg.json", "serif_dask/worker.py",
                 "a shared-memory segment", "docs/DESIGN.md"):
        assert not OUTSIDE.search(fine), fine


def test_no_tracked_file_points_outside_the_repository() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (weights) or deleted in the work tree
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_reference_configs_are_carried() -> None:
    names = sorted(p.name for p in (ROOT / "configs" / "serif-reference").glob("*.json"))
    assert names == ["applicationcfg.json", "datacfg.json", "systemcfg.json"]


@pytest.mark.timeout(600)
def test_fresh_clone_collects_and_passes_config_tests(tmp_path: Path) -> None:
    """Clone HEAD into an empty folder and run its collection and config tests there with
    the clone's own code: an editable install of the clone into a venv of its own, which
    borrows this venv's dependencies (a ``.pth`` line) but not its install of the project."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "alone" / "serif-dask"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert sorted(os.listdir(clone.parent)) == ["serif-dask"]  # nothing beside it
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    deps_site = sysconfig.get_paths()["purelib"]
    # A path line in a .pth file adds the folder without running that folder's own .pth
    # files, so this venv's editable finder for the project stays out.
    Path(own_site, "_serif_deps.pth").write_text(deps_site + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-build-isolation", "--no-index", "-e", str(clone)],
        timeout=300, capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    where = subprocess.run(
        [str(python), "-c", "import serif_dask.policies as p; print(p.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(clone), where.stdout

    def pytest_in_clone(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=clone, capture_output=True, text=True, timeout=500, stdin=subprocess.DEVNULL,
        )

    collected = pytest_in_clone("--collect-only")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-2000:]
    assert re.search(r"\d+ tests? collected", collected.stdout), collected.stdout[-500:]
    config = pytest_in_clone("tests/test_config.py", "-x")
    assert config.returncode == 0, config.stdout[-3000:] + config.stderr[-2000:]
    assert re.search(r"\d+ passed", config.stdout)
