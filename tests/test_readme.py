"""The README's Python example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_readme_python_example_runs() -> None:
    """Its run's summary adds up, and its ad-hoc request comes back completed."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code += "\nassert summary['requests'] == summary['completed'] + summary['dropped']"
    code += " + summary['failed'] > 0\nprint('REQUESTS', summary['requests'])\n"
    code += "assert record['app'] == 'wakeword' and record['outcome'] == 'completed'\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REQUESTS" in proc.stdout
