"""Config fuzzing through the command line: ``validate`` and ``run`` exit 0 or 2, never a
traceback, and a config error is one line.

Mutations start from ``configs/hospital`` (a directory) and SERIF's own reference files
(three paths): keys dropped, values of the wrong type or out of range, broken JSON, a
file missing or not a JSON object. ``tests/test_config.py`` fuzzes ``load_config``
itself; this goes through the CLI, as a user meets it.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serif_dask.cli import cli
from tests.conftest import HOSPITAL, REFERENCE, run_cli

DELETE = object()
REFERENCE_FILES = {"system": "systemcfg.json", "application": "applicationcfg.json",
                   "data": "datacfg.json"}
HOSPITAL_FILES = {kind: f"{kind}.json" for kind in REFERENCE_FILES}
SOURCES = {"hospital": (HOSPITAL, HOSPITAL_FILES), "reference": (REFERENCE, REFERENCE_FILES)}
DOCS = {name: {kind: json.loads((base / f).read_text()) for kind, f in files.items()}
        for name, (base, files) in SOURCES.items()}


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every JSON path in a document (objects and lists, not the root)."""
    out = []
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, child in items:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


PATHS = {name: [(kind, p) for kind, doc in docs.items() for p in _paths(doc)]
         for name, docs in DOCS.items()}
VALUES = [DELETE, "abc", "", -1, 0, 1, -0.5, 1e9, 1e308, float("nan"), float("inf"), None,
          True, [], {}, [1, 2, 3], [[1, 2], [3]], {"x": 1}, "bay-a", "audio",
          "no.such.module:Thing", "/nonexistent/file.npy"]
FILE_FAULTS = ["none", "truncate", "garbage", "missing", "not-an-object", "empty", "directory"]


def _put(doc: Any, path: tuple, value: Any) -> None:
    *parents, last = path
    for key in parents:
        doc = doc[key]
    if value is DELETE:
        del doc[last]
    else:
        doc[last] = copy.deepcopy(value)


def _write(target: Path, source: str, docs: dict[str, Any], fault: str, victim: str,
           cut: float) -> list[str]:
    """Write the three files with one file-level ``fault``; the CLI arguments naming them."""
    files = SOURCES[source][1]
    target.mkdir(parents=True, exist_ok=True)
    for kind, name in files.items():
        path = target / name
        text = json.dumps(docs[kind], indent=1)
        if kind == victim:
            if fault == "truncate":
                text = text[: int(len(text) * cut)]
            elif fault == "garbage":
                text = text[: int(len(text) * cut)] + "}{,]" + text[int(len(text) * cut):]
            elif fault == "not-an-object":
                text = json.dumps([docs[kind]])
            elif fault == "empty":
                text = ""
            elif fault == "missing":
                continue
            elif fault == "directory":
                path.mkdir()
                continue
        path.write_text(text)
    if source == "hospital":
        return [str(target)]
    return [str(target / name) for name in files.values()]


def _check_one_line(code: int, output: str) -> None:
    assert code in (0, 2), f"exit status {code}:\n{output[-2000:]}"
    assert "Traceback" not in output, output[-2000:]
    if code == 2:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        assert len(lines) == 1, output[-2000:]
        assert lines[0].startswith(("error:", "Error:")), lines[0]


mutations = st.sampled_from(sorted(SOURCES)).flatmap(
    lambda source: st.tuples(
        st.just(source),
        st.lists(st.tuples(st.sampled_from(PATHS[source]), st.sampled_from(VALUES)),
                 max_size=3),
        st.sampled_from(FILE_FAULTS),
        st.sampled_from(sorted(REFERENCE_FILES)),
        st.floats(0.05, 0.95),
    )
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations, st.booleans())
def test_validate_exits_0_or_2_with_one_line(case, simulate: bool) -> None:
    source, changes, fault, victim, cut = case
    docs = copy.deepcopy(DOCS[source])
    for (kind, path), value in changes:
        try:
            _put(docs[kind], path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the parent
    with tempfile.TemporaryDirectory(prefix="serif-fuzz-") as tmp:
        args = _write(Path(tmp) / "cfg", source, docs, fault, victim, cut)
        flags = ["--simulate"] if simulate else []
        result = CliRunner().invoke(cli, ["validate", *args, *flags])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"validate raised {result.exception!r}") from result.exception
    _check_one_line(result.exit_code, result.output)
    if result.exit_code == 0:
        assert result.output.startswith("ok:")


# Changes that keep the hospital ward loadable (or give a clean config error): the run
# itself must cope with them.
LOADABLE = st.lists(st.sampled_from([
    (("data", "num-groups"), 1),
    (("data", "num-groups"), 3),
    (("data", "data-modalities", 1, "synthetic-shape"), [1]),
    (("data", "data-modalities", 0, "cache-entry-size"), 8),  # too small: input-too-large
    (("data", "servers", 1, "cache-entries-per-modality"), {"default": 1}),
    (("application", "applications", 0, "sample-duration"), 0.25),
    (("application", "applications", 1, "sla-latency"), 0.001),
    (("application", "applications", 0, "prior"), [1.0, 0.0]),
    (("application", "applications", 1, "model-profiles", 0, "latencies", "bay-a"), [5.0, 5.0]),
    (("system", "scheduler-sleep"), DELETE),
    (("system", "seed"), 0),
    (("system", "data-aware"), False),
    (("system", "scheduler-type"), "random"),
    (("system", "scheduler-type"), "no-such-policy"),
]), min_size=1, max_size=3, unique_by=lambda change: change[0])


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LOADABLE)
def test_run_of_mutated_ward_exits_0_or_2(changes) -> None:
    docs = copy.deepcopy(DOCS["hospital"])
    for (kind, *path), value in changes:
        _put(docs[kind], tuple(path), value)
    with tempfile.TemporaryDirectory(prefix="serif-fuzz-run-") as tmp:
        args = _write(Path(tmp) / "cfg", "hospital", docs, "none", "system", 0.5)
        proc = run_cli("run", *args, "--duration", "1", "--quiet", timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    _check_one_line(proc.returncode, proc.stderr)
    if proc.returncode == 0:
        assert "requests" in proc.stdout
