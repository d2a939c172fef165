"""The command line as ``serif-dask`` and as ``dask serif``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import HOSPITAL

DASK = str(Path(sys.executable).parent / "dask")


def test_dask_serif_reaches_the_same_commands(config_dir) -> None:
    ok = subprocess.run([DASK, "serif", "validate", str(HOSPITAL)], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "40 groups" in ok.stdout

    def negative_sla(doc: dict) -> None:
        doc["applications"][1]["sla-latency"] = -1

    bad = subprocess.run([DASK, "serif", "validate", str(config_dir(application=negative_sla))],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "applications[1].sla-latency" in bad.stderr
