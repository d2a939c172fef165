"""``serif-dask profile``: measured latencies and confusion matrices, written back as config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HOSPITAL, run_cli
from safetensors.torch import load_file

from serif_dask.config import load_config
from serif_dask.models.digits import MODELS
from serif_dask.profiler import (
    ProfileError,
    dumps,
    fit_line,
    measure_model,
    profile_config,
    updated_application,
    write_profile,
)
from serif_dask.readers.digits import DigitsReader

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
QUICK = {"batch_sizes": (1, 4, 16)}


def independent_cmat(cfg, cls) -> np.ndarray:
    """The confusion matrix from scratch: safetensors file, the reader's calibration set."""
    profile = next(m for m in cfg.apps[0].model_profiles if m.impl.endswith(cls.__name__))
    model = cls()
    model.load(load_file(profile.weights), "cpu")
    reader = DigitsReader(cfg.modality("image"), cfg.apps[0], None, cfg.system.effective_seed)
    x, y = reader.calibration(reader.calibration_size)
    cmat = np.zeros((10, 10))
    np.add.at(cmat, (y, model.forward(x)), 1)
    return cmat


@pytest.fixture(scope="module")
def cfg():
    return load_config(DIGITS)


@pytest.fixture(scope="module")
def reports(cfg):
    return profile_config(cfg, **QUICK)


def test_profile_measures_every_real_model(cfg, reports):
    assert [r.model for r in reports] == [cls.name for cls in MODELS]
    for r in reports:
        assert r.device == "cpu" and r.batch_sizes == [1, 4, 16]
        assert all(t > 0 for t in r.batch_s) and r.switch_s >= r.load_s > 0
        assert r.reference_batch == 16  # 32 groups over 2 compute nodes
        assert r.infer_s == pytest.approx((r.intercept_s + 16 * r.slope_s) / 16)
        assert r.n_samples == DigitsReader(cfg.modality("image"), cfg.apps[0]).calibration_size
    by_name = {r.model: r for r in reports}
    # Sizes differ as designed (speeds too, but timings are for benchmarks, not asserts).
    assert by_name["digits-linear"].nbytes < by_name["digits-mlp"].nbytes
    assert by_name["digits-mlp"].nbytes < by_name["digits-cnn"].nbytes


def test_written_profile_loads_and_its_cmat_is_an_independent_evaluation(cfg, reports,
                                                                          tmp_path):
    out = tmp_path / "profiled"
    write_profile(cfg, reports, out)
    for name in ("system.json", "data.json"):
        shutil.copy(DIGITS / name, out / name)
    got = load_config(out)  # weights paths were rewritten relative to the new folder
    for cls, model in zip(MODELS, got.apps[0].model_profiles, strict=True):
        assert Path(model.weights).samefile(DIGITS / "weights" / f"{cls.name}.safetensors")
        np.testing.assert_array_equal(np.array(model.cmat), independent_cmat(cfg, cls))
        report = next(r for r in reports if r.model == model.name)
        for node in cfg.node_names:
            infer, switch = model.latencies[node]
            assert infer == pytest.approx(report.infer_s, rel=0.01)
            assert switch == pytest.approx(report.switch_s, rel=0.01)
    raw = json.loads((out / "profile.json").read_text())
    assert [m["model"] for m in raw["models"]] == [cls.name for cls in MODELS]
    # Only cmat, latencies (and a moved weights path) change; the rest is as written.
    before = json.loads((DIGITS / "application.json").read_text())
    after = json.loads((out / "application.json").read_text())
    for doc in (before, after):
        for m in doc["applications"][0]["model-profiles"]:
            for key in ("cmat", "latencies", "model-weights"):
                m.pop(key)
    assert before == after


def test_committed_example_matches_its_weights(cfg):
    """configs/digits was written by the profiler from the committed weights."""
    for cls, model in zip(MODELS, cfg.apps[0].model_profiles, strict=True):
        np.testing.assert_array_equal(np.array(model.cmat), independent_cmat(cfg, cls))


def test_profile_keeps_profile_models_and_node_placement(tmp_path):
    def edit(doc):
        profiles = doc["applications"][0]["model-profiles"]
        profiles[0]["latencies"].pop("node-b")  # the linear model runs on node-a only
        profiles.append({"name": "oracle", "use-profile": True, "modality": "image",
                         "cmat": np.eye(10).tolist(), "latencies": {"node-b": [0.5, 1.0]}})
        return doc

    shutil.copytree(DIGITS, tmp_path / "c")
    path = tmp_path / "c" / "application.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    cfg = load_config(tmp_path / "c")
    reports = profile_config(cfg, **QUICK)
    assert [r.model for r in reports] == [cls.name for cls in MODELS]
    doc = updated_application(cfg, reports)
    profiles = doc["applications"][0]["model-profiles"]
    assert list(profiles[0]["latencies"]) == ["node-a"]
    assert profiles[3]["latencies"] == {"node-b": [0.5, 1.0]}
    assert profiles[0]["model-weights"] == "weights/digits-linear.safetensors"


def test_unprofilable_models_fail_with_one_line(cfg, tmp_path):
    app = cfg.apps[0]
    cnn = app.model_profiles[2]
    wrong = cnn.model_copy(update={"weights": app.model_profiles[1].weights})
    with pytest.raises(ProfileError, match=r"^digits/digits-cnn: cannot load the model: "
                       r"StateDictMismatch: CNNDigits: weights do not fit: missing") as info:
        measure_model(cfg, app, wrong, **QUICK)
    assert "\n" not in str(info.value)
    with pytest.raises(ProfileError, match="no impl"):
        measure_model(cfg, app, cnn.model_copy(update={"impl": None}), **QUICK)
    with pytest.raises(ProfileError, match="use-profile is true"):
        measure_model(cfg, app, cnn.model_copy(update={"use_profile": True}), **QUICK)
    assert profile_config(load_config(HOSPITAL)) == []


def test_fit_line():
    assert fit_line([1, 2, 4], [3.0, 5.0, 9.0]) == pytest.approx((1.0, 2.0))
    assert fit_line([1, 2, 4], [2.0, 3.0, 8.0])[0] == 0.0  # never a negative intercept
    assert fit_line([8], [4.0]) == (4.0, 0.0)


def test_dumps_keeps_number_rows_on_one_line():
    doc = {"cmat": [[1.0, 0.0], [2.5e-05, -3]], "name": "x", "empty": []}
    text = dumps(doc)
    assert "[1.0, 0.0]" in text and json.loads(text) == doc


def test_cli_profile(tmp_path):
    out = tmp_path / "out"
    done = run_cli("profile", str(DIGITS), "--out", str(out), "--batch-sizes", "1,8")
    assert done.returncode == 0, done.stderr
    assert "digits/digits-cnn: accuracy" in done.stderr
    assert (out / "application.json").is_file() and (out / "profile.json").is_file()
    bad = run_cli("profile", str(DIGITS), "--batch-sizes", "1,x")
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr
