"""The digits example: its reader, its three torch models, their committed weights."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from serif_dask.config import load_config
from serif_dask.models import ModelImpl
from serif_dask.models.digits import (
    MODELS,
    CNNDigits,
    LinearDigits,
    MLPDigits,
    StateDictMismatch,
)
from serif_dask.models.train_digits import confusion_matrix, train_model
from serif_dask.readers import ReaderError, get_reader
from serif_dask.readers.digits import STREAM_ID, DigitsReader, load_split
from serif_dask.readers.synthetic import SyntheticReader
from serif_dask.store import torch_state_dict_from_bytes

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
WEIGHTS = DIGITS / "weights"


@pytest.fixture(scope="module")
def cfg():
    return load_config(DIGITS)


def loaded(cls: type, device: str = "cpu") -> ModelImpl:
    """A model built the way a worker builds it: no arguments, bytes -> state -> load."""
    model = cls()
    data = (WEIGHTS / f"{cls.name}.safetensors").read_bytes()
    model.load(torch_state_dict_from_bytes(data), device)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, ModelImpl]:
    return {cls.name: loaded(cls) for cls in MODELS}


# ----------------------------------------------------------------------------- data
def test_splits_are_disjoint_stratified_and_cover_the_data_set():
    from sklearn.datasets import load_digits

    parts = {s: load_split(s) for s in ("train", "calibration", "test")}
    sizes = {s: y.size for s, (_, y) in parts.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] > sizes["test"] > sizes["calibration"]
    # Together the splits are the data set, each image exactly once (a partition).
    raw = (load_digits().images / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    together = np.concatenate([xs for xs, _ in parts.values()])
    assert sorted(map(bytes, together)) == sorted(map(bytes, raw))
    for _, y in parts.values():
        assert (np.bincount(y, minlength=10) > 0).all()
    x, _ = parts["test"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert x.min() >= 0.0 and x.max() <= 1.0 and not x.flags.writeable
    with pytest.raises(ValueError, match="unknown split"):
        load_split("validation")


def test_reader_streams_test_images_of_persistent_labels(cfg):
    app = cfg.apps[0]
    modality = cfg.modality("image")
    server = cfg.server("scanner-a")
    reader = get_reader(modality, app, server, seed=3)
    assert isinstance(reader, DigitsReader)
    groups = np.array(cfg.groups_of("scanner-a", "image"))
    test_x, test_y = load_split("test")
    by_image = {x.tobytes(): y for x, y in zip(test_x, test_y, strict=True)}
    chain = SyntheticReader(modality, app, server, seed=3)
    seen = []
    for tick in range(30):
        r = reader.read(groups, tick)
        assert r.samples.shape == (groups.size, 1, 8, 8) and r.samples.dtype == np.float32
        assert r.ok.all() and not r.errors
        # Every sample is a held-out test image of the group's current class ...
        assert [by_image[s.tobytes()] for s in r.samples] == r.labels.tolist()
        # ... and the class is the synthetic chain's, shared with other modalities.
        np.testing.assert_array_equal(r.labels, chain.labels(groups, tick))
        seen.append(r.labels)
    labels = np.array(seen)
    assert np.mean(labels[1:] == labels[:-1]) > 0.8  # label-persistence 0.9
    assert len(set(labels.ravel())) == 10


def test_reader_is_deterministic_and_batch_independent(cfg):
    app, modality = cfg.apps[0], cfg.modality("image")
    a = DigitsReader(modality, app, None, seed=5)
    b = pickle.loads(pickle.dumps(a))
    full = a.read(np.arange(20), 7)
    part = b.read(np.array([13, 2]), 7)
    np.testing.assert_array_equal(part.samples, full.samples[[13, 2]])
    np.testing.assert_array_equal(part.labels, full.labels[[13, 2]])
    other = DigitsReader(modality, app, None, seed=6).read(np.arange(20), 7)
    assert not np.array_equal(other.samples, full.samples)


def test_reader_calibration_is_the_held_out_split(cfg):
    reader = DigitsReader(cfg.modality("image"), cfg.apps[0], None, seed=1)
    cx, cy = load_split("calibration")
    n = reader.calibration_size
    assert n == cy.size
    x, y = reader.calibration(n)
    assert sorted(map(bytes, x)) == sorted(map(bytes, cx))
    np.testing.assert_array_equal(np.sort(y), np.sort(cy))
    x2, y2 = reader.calibration(10, start=n - 5)  # cycles after the last image
    np.testing.assert_array_equal(x2[5:], x[:5])
    np.testing.assert_array_equal(y2[:5], y[-5:])


def test_reader_shapes_streams_and_classes(cfg):
    app, modality = cfg.apps[0], cfg.modality("image")
    flat = DigitsReader(modality.model_copy(update={"synthetic_shape": (64,)}), app)
    assert flat.read(np.arange(3), 0).samples.shape == (3, 64)
    with pytest.raises(ReaderError, match="8x8"):
        DigitsReader(modality.model_copy(update={"synthetic_shape": (1, 9, 9)}), app)
    two = app.model_copy(update={"prior": (0.5, 0.5)})
    with pytest.raises(ReaderError, match="10 classes"):
        DigitsReader(modality, two)
    server = cfg.server("scanner-a")
    streams = dict(server.streams["image"])
    streams[2] = "sklearn:mnist"
    bad = server.model_copy(update={"streams": {"image": streams}})
    r = DigitsReader(modality, app, bad).read(np.array([0, 2, 4]), 3)
    assert r.ok.tolist() == [True, False, True]
    assert "sklearn:mnist" in r.errors[2] and STREAM_ID in r.errors[2]
    assert r.labels[1] == -1 and not r.samples[1].any()


# ---------------------------------------------------------------------------- models
def test_accuracy_on_the_test_split(models):
    x, y = load_split("test")
    acc = {name: float(np.mean(m.forward(x) == y)) for name, m in models.items()}
    assert acc["digits-linear"] < acc["digits-mlp"] < acc["digits-cnn"]
    assert acc["digits-cnn"] >= 0.97 and acc["digits-mlp"] >= 0.95
    assert 0.8 <= acc["digits-linear"] <= 0.92  # clearly worse: a real trade-off
    sizes = [models[cls.name].nbytes for cls in MODELS]
    assert sizes == sorted(sizes) and sizes[-1] > 50 * sizes[0]
    for cls in MODELS:  # nbytes is what the parameters occupy
        params = cls.network().parameters()
        assert models[cls.name].nbytes == sum(p.numel() * 4 for p in params)


def test_weights_are_small_safetensors_with_no_pickle():
    files = sorted(WEIGHTS.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted(cls.name for cls in MODELS)
    assert sum(f.stat().st_size for f in files) < 2 << 20
    for f in files:
        assert torch_state_dict_from_bytes(f.read_bytes()).keys() == load_file(f).keys()


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.name)
def test_weights_round_trip_through_bytes(cls, models):
    x, _ = load_split("test")
    original = models[cls.name]
    state = {k: v.clone() for k, v in original.net.state_dict().items()}
    again = cls()
    again.load(torch_state_dict_from_bytes(save(state)), "cpu")
    np.testing.assert_array_equal(again.forward(x), original.forward(x))
    direct = cls()
    direct.load(load_file(WEIGHTS / f"{cls.name}.safetensors"), "cpu")
    np.testing.assert_array_equal(direct.forward(x), original.forward(x))


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.name)
def test_forward_batches_under_inference_mode(cls, models):
    model = models[cls.name]
    x, _ = load_split("test")
    x = x[:64]
    seen: list[bool] = []
    hook = model.net.register_forward_hook(
        lambda mod, inp, out: seen.append(torch.is_inference_mode_enabled())
    )
    try:
        batched = model.forward(x)
    finally:
        hook.remove()
    assert seen == [True]
    assert batched.dtype == np.int64 and batched.shape == (64,)
    singles = np.concatenate([model.forward(x[i : i + 1]) for i in range(64)])
    np.testing.assert_array_equal(batched, singles)
    # Any 64-element layout, dtype and read-only memory (a shared-memory view) work.
    for view in (x.reshape(64, 8, 8), x.reshape(64, 64), x.astype(np.float64)):
        np.testing.assert_array_equal(model.forward(view), batched)
    assert model.forward(x[:0]).shape == (0,)


def test_forward_errors_are_clear(models):
    with pytest.raises(RuntimeError, match="call load"):
        CNNDigits().forward(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"8x8 images, got shape \[2, 1, 9, 9\]"):
        models["digits-cnn"].forward(np.zeros((2, 1, 9, 9), np.float32))


def test_mismatched_or_tampered_state_dict_is_refused(models):
    good = {k: v.clone() for k, v in models["digits-mlp"].net.state_dict().items()}
    cases = {
        "missing 1.weight": {k: v for k, v in good.items() if k != "1.weight"},
        "unexpected extra": {**good, "extra": torch.zeros(1)},
        r"3.weight has shape \[10, 32\], expected \[10, 64\]": {
            **good, "3.weight": torch.zeros(10, 32)
        },
        "1.bias has dtype torch.int64": {**good, "1.bias": torch.zeros(64, dtype=torch.int64)},
        "1.weight holds NaN": {**good, "1.weight": good["1.weight"].index_fill(0,
                                                   torch.tensor([3]), float("nan"))},
    }
    for message, state in cases.items():
        with pytest.raises(StateDictMismatch, match=f"MLPDigits: weights do not fit: {message}"):
            MLPDigits().load(state, "cpu")
    # Another model's weights: named as such, on one line.
    with pytest.raises(StateDictMismatch) as info:
        LinearDigits().load(good, "cpu")
    assert "\n" not in str(info.value) and "missing 2.weight" in str(info.value)
    with pytest.raises(StateDictMismatch, match="expected a state_dict"):
        MLPDigits().load([1, 2], "cpu")  # type: ignore[arg-type]


def test_training_is_reproducible_and_accurate(tmp_path):
    a = train_model(LinearDigits, tmp_path / "a")
    b = train_model(LinearDigits, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.test_accuracy > 0.8
    cmat = np.array(a.test_cmat)
    assert cmat.shape == (10, 10) and cmat.sum() == load_split("test")[1].size
    committed = LinearDigits().network()
    assert a.params == sum(p.numel() for p in committed.parameters())


def test_confusion_matrix_counts():
    cmat = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cmat.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_example_config_is_real(cfg):
    (app,) = cfg.apps
    assert app.k == 10 and all(not m.use_profile for m in app.model_profiles)
    for m in app.model_profiles:
        assert Path(m.weights).is_file() and m.redis_key and m.impl
        assert set(m.latencies) == set(cfg.node_names)
    modality = cfg.modality("image")
    assert not modality.use_synthetic_data and modality.impl.endswith(":DigitsReader")
    assert 4 * np.prod(modality.synthetic_shape) <= modality.cache_entry_size
