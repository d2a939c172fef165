"""Readers: synthetic class signal and label dynamics; .npy/.wav/.csv files; failures."""

from __future__ import annotations

import pickle
import types
import wave

import numpy as np
import pytest

from serif_dask.readers import (
    NoCalibrationData,
    Reader,
    ReaderError,
    get_reader,
    register_reader,
)
from serif_dask.readers.files import CsvReader, NpyReader, WavReader
from serif_dask.readers.synthetic import SyntheticReader, coarse_grid


def make_app(prior=(0.5, 0.5), name="app"):
    return types.SimpleNamespace(name=name, prior=tuple(prior))


def make_modality(shape, name="sensor", synthetic=True, snr=1.0, persistence=0.9, impl=None):
    return types.SimpleNamespace(
        name=name,
        use_synthetic_data=synthetic,
        synthetic_shape=None if shape is None else tuple(shape),
        impl=impl,
        synthetic_snr=snr,
        label_persistence=persistence,
    )


def make_server(modality, paths, name="srv"):
    return types.SimpleNamespace(name=name, streams={modality: dict(enumerate(paths))})


# ================================================================== synthetic
def test_synthetic_read_contract():
    r = get_reader(make_modality([9, 200]), make_app(), None, seed=0)
    assert isinstance(r, SyntheticReader)
    res = r.read(np.array([0, 5, 9]), tick=3)
    assert res.samples.shape == (3, 9, 200) and res.samples.dtype == np.float32
    assert res.labels.dtype == np.int64 and res.labels.shape == (3,)
    assert res.ok.all() and res.errors == {}
    empty = r.read(np.array([], dtype=np.int64), tick=3)
    assert empty.samples.shape == (0, 9, 200)


def test_synthetic_deterministic_by_seed_and_batch_independent():
    m, app = make_modality([9, 200]), make_app()
    a = get_reader(m, app, None, seed=7).read(np.arange(10), 4)
    b = get_reader(m, app, None, seed=7).read(np.array([9, 3]), 4)
    np.testing.assert_array_equal(a.samples[[9, 3]], b.samples)
    np.testing.assert_array_equal(a.labels[[9, 3]], b.labels)
    c = get_reader(m, app, None, seed=8).read(np.arange(10), 4)
    assert not np.array_equal(a.samples, c.samples)
    # Different ticks give different samples; pickling keeps the stream.
    r = get_reader(m, app, None, seed=7)
    assert not np.array_equal(r.read(np.arange(10), 5).samples, a.samples)
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(r)).read(np.arange(10), 4).samples, a.samples
    )


def test_labels_shared_across_modalities_and_query_order():
    app = make_app((0.7, 0.2, 0.1))
    sensor = get_reader(make_modality([9, 200]), app, None, seed=1)
    audio = get_reader(make_modality([16000], name="audio", snr=2.0), app, None, seed=1)
    groups = np.arange(200)
    forward = np.stack([sensor.labels(groups, t) for t in range(60)])
    backward = np.stack([audio.labels(groups, t) for t in reversed(range(60))])[::-1]
    np.testing.assert_array_equal(forward, backward)
    np.testing.assert_array_equal(audio.read(groups, 17).labels, forward[17])
    # Another application has its own conditions.
    other = get_reader(make_modality([9, 200]), make_app((0.7, 0.2, 0.1), name="b"), None, 1)
    assert not np.array_equal(other.labels(groups, 17), forward[17])


@pytest.mark.parametrize("persistence", [0.0, 0.8, 0.95])
def test_labels_persist_and_follow_the_prior(persistence):
    prior = np.array([0.7, 0.2, 0.1])
    r = get_reader(make_modality([9, 200], persistence=persistence), make_app(prior), None, 5)
    groups = np.arange(400)
    labels = np.stack([r.labels(groups, t) for t in range(100)])  # (T, G)
    freq = np.bincount(labels.ravel(), minlength=3) / labels.size
    np.testing.assert_allclose(freq, prior, atol=0.03)
    same = np.mean(labels[1:] == labels[:-1])
    expected = persistence + (1 - persistence) * np.sum(prior**2)
    assert same == pytest.approx(expected, abs=0.02)


def test_labels_at_large_ticks_are_cheap_and_stable():
    r = get_reader(make_modality([9, 200], persistence=0.99), make_app(), None, 0)
    groups = np.arange(1000)
    late = r.labels(groups, 10**6)  # no chain to unroll: labels depend on the tick alone
    np.testing.assert_array_equal(late, r.labels(groups, 10**6))
    always = get_reader(make_modality([4], persistence=1.0), make_app(), None, 0)
    np.testing.assert_array_equal(always.labels(groups, 0), always.labels(groups, 50))


def test_synthetic_class_signal_matches_snr():
    # Class means sit snr·√2 apart in units of the nuisance: project on the true direction.
    r = get_reader(make_modality([9, 200], snr=2.0), make_app(), None, 0)
    x, y = r.calibration(2000)
    q = r.patterns.astype(np.float64) / r.snr  # orthonormal on the coarse grid
    np.testing.assert_allclose(q @ q.T, np.eye(2), atol=1e-6)
    cells = x.reshape(len(x), 3, 3, 4, 50).mean(axis=(2, 4)).reshape(len(x), -1)
    d = (q[1] - q[0]) / np.sqrt(2)
    proj = cells @ d
    gap = proj[y == 1].mean() - proj[y == 0].mean()
    assert gap == pytest.approx(2.0 * np.sqrt(2), rel=0.1)
    assert proj[y == 0].std() == pytest.approx(1.0, rel=0.1)


def test_calibration_is_chunkable_and_covers_every_class():
    r = get_reader(make_modality([9, 200]), make_app((0.95, 0.05)), None, 0)
    x, y = r.calibration(40)
    x2, y2 = r.calibration(20, start=20)
    np.testing.assert_array_equal(x[20:], x2)
    np.testing.assert_array_equal(y[20:], y2)
    assert 0.2 < y.mean() < 0.35  # rare class over-represented: half prior, half uniform


def test_coarse_grid():
    assert coarse_grid((9, 200), 2) == (3, 4)
    assert coarse_grid((3, 16, 320, 568), 2) == (1, 2, 2, 2)
    assert coarse_grid((16000,), 2) == (4,)
    assert coarse_grid((7,), 5) == (7,)
    with pytest.raises(ReaderError):
        coarse_grid((2,), 3)


def test_synthetic_video_has_its_full_shape():
    r = get_reader(make_modality([3, 16, 320, 568], name="video"), make_app(), None, 0)
    res = r.read(np.arange(2), 1)
    assert res.samples.shape == (2, 3, 16, 320, 568)
    assert res.samples.dtype == np.float32 and np.isfinite(res.samples).all()


def test_synthetic_needs_a_shape():
    with pytest.raises(ReaderError, match="synthetic-shape"):
        get_reader(make_modality(None), make_app(), None, 0)


# ================================================================== registry
class EchoReader(Reader):
    def read(self, groups, tick):
        from serif_dask.readers import ReadResult

        n = len(groups)
        samples = np.full((n, 2), tick, np.float32)
        return ReadResult(samples, np.full(n, -1), np.ones(n, bool), {})

    def calibration(self, n, start=0):
        raise NoCalibrationData("echo has no labels")


def test_get_reader_impl_and_registry(tmp_path):
    app = make_app()
    r = get_reader(make_modality([2], impl=f"{__name__}:EchoReader"), app, None, 0)
    assert isinstance(r, EchoReader)
    np.testing.assert_array_equal(r.read([1, 2], 3).samples, np.full((2, 2), 3.0))
    with pytest.raises(ReaderError, match="cannot import"):
        get_reader(make_modality([2], impl="nope_mod:Nope"), app, None, 0)
    register_reader(".echo", EchoReader)
    m = make_modality([2], synthetic=False)
    assert isinstance(get_reader(m, app, make_server("sensor", ["a.echo"]), 0), EchoReader)


def test_get_reader_by_extension_and_clear_errors():
    app = make_app()
    m = make_modality([4], synthetic=False)
    assert isinstance(get_reader(m, app, make_server("sensor", ["a.npy"]), 0), NpyReader)
    assert isinstance(get_reader(m, app, make_server("sensor", ["a.WAV"]), 0), WavReader)
    assert isinstance(get_reader(m, app, make_server("sensor", ["a.csv"]), 0), CsvReader)
    with pytest.raises(ReaderError, match=r"no reader for '\.mp4'"):
        get_reader(m, app, make_server("sensor", ["fall.mp4"]), 0)
    with pytest.raises(ReaderError, match="mix file types"):
        get_reader(m, app, make_server("sensor", ["a.npy", "b.csv"]), 0)
    with pytest.raises(ReaderError, match="no streams"):
        get_reader(m, app, None, 0)


# ================================================================== file readers
def file_reader(tmp_path, cls_ext, shape, n_groups_files, k=2):
    m = make_modality(shape, synthetic=False)
    server = make_server("sensor", [str(p) for p in n_groups_files])
    r = get_reader(m, make_app((0.5,) * k if k == 2 else (1 / k,) * k), server, seed=0)
    assert r.__class__.__name__.lower().startswith(cls_ext)
    return r


def test_npy_windows_wrap_and_sidecar_labels(tmp_path):
    a = np.arange(3 * 2 * 4, dtype=np.float64).reshape(3, 2, 4)
    np.save(tmp_path / "g0.npy", a)
    np.save(tmp_path / "g0.labels.npy", np.array([1, 0, -1]))
    np.save(tmp_path / "g1.npy", -a[:2].astype(np.int16))  # no sidecar: labels unknown
    r = file_reader(tmp_path, "npy", [2, 4], [tmp_path / "g0.npy", tmp_path / "g1.npy"])
    for tick in range(7):
        res = r.read(np.array([0, 1]), tick)
        assert res.ok.all() and res.errors == {}
        assert res.samples.dtype == np.float32
        np.testing.assert_array_equal(res.samples[0], a[tick % 3])
        np.testing.assert_array_equal(res.samples[1], -a[tick % 2])
        assert res.labels.tolist() == [[1, 0, -1][tick % 3], -1]
    x, y = r.calibration(10)  # only the labelled windows, at most n
    assert sorted(y.tolist()) == [0, 1]
    for xi, yi in zip(x, y, strict=True):
        np.testing.assert_array_equal(xi, a[1 - yi])
    # Picklable: memory maps are reopened on the other side.
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(
        r2.read(np.array([0]), 4).samples, r.read(np.array([0]), 4).samples
    )


def test_npy_shape_mismatch_and_missing_file_fail_only_that_group(tmp_path):
    np.save(tmp_path / "good.npy", np.ones((2, 2, 4), np.float32))
    np.save(tmp_path / "wide.npy", np.ones((2, 2, 5), np.float32))
    paths = [tmp_path / "good.npy", tmp_path / "wide.npy", tmp_path / "gone.npy"]
    r = file_reader(tmp_path, "npy", [2, 4], paths)
    res = r.read(np.array([0, 1, 2, 3]), 0)
    assert res.ok.tolist() == [True, False, False, False]
    assert set(res.errors) == {1, 2, 3}
    assert "wide.npy" in res.errors[1] and "group 1" in res.errors[1]
    assert "[2, 4]" in res.errors[1]
    assert "gone.npy" in res.errors[2] and "not found" in res.errors[2]
    assert "no 'sensor' stream" in res.errors[3]
    np.testing.assert_array_equal(res.samples[0], np.ones((2, 4)))
    assert (res.samples[1:] == 0).all() and (res.labels[1:] == -1).all()
    # A file that appears later is picked up on the next tick.
    np.save(tmp_path / "gone.npy", np.zeros((1, 2, 4), np.float32))
    assert r.read(np.array([2]), 1).ok.all()


def test_npy_truncated_file_fails_only_that_group(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 8), np.float32))
    np.save(tmp_path / "b.npy", np.ones((4, 8), np.float32))
    raw = (tmp_path / "b.npy").read_bytes()
    (tmp_path / "b.npy").write_bytes(raw[: len(raw) - 40])
    r = file_reader(tmp_path, "npy", [8], [tmp_path / "a.npy", tmp_path / "b.npy"])
    res = r.read(np.array([0, 1]), 3)
    assert res.ok.tolist() == [True, False] and "b.npy" in res.errors[1]


def test_npy_bad_sidecar_is_a_group_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float32))
    np.save(tmp_path / "a.labels.npy", np.array([0, 5, 1]))
    r = file_reader(tmp_path, "npy", [4], [tmp_path / "a.npy"])
    res = r.read(np.array([0]), 0)
    assert not res.ok[0] and "label 5 outside" in res.errors[0]
    with pytest.raises(NoCalibrationData, match="no labelled calibration data"):
        r.calibration(4)


def write_wav(path, frames: np.ndarray, width=2, rate=8000):
    frames = frames.reshape(len(frames), -1)  # (n, channels)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())


def test_wav_windows_scaling_and_labels(tmp_path):
    pcm = np.array([0, 16384, -32768, 32767, 100, -100, 7, 8, 9, 10], dtype=np.int16)
    write_wav(tmp_path / "p.wav", pcm)
    np.save(tmp_path / "p.labels.npy", np.array([1, 0, 1]))  # 10 frames // 3 = 3 windows
    r = file_reader(tmp_path, "wav", [3], [tmp_path / "p.wav"])
    res = r.read(np.array([0]), 0)
    np.testing.assert_allclose(res.samples[0], [0.0, 0.5, -1.0])
    assert res.labels.tolist() == [1]
    np.testing.assert_allclose(r.read(np.array([0]), 4).samples[0], pcm[3:6] / 32768)
    assert r.read(np.array([0]), 2).labels.tolist() == [1]
    assert np.all(np.abs(r.read(np.array([0]), 1).samples) <= 1.0)
    x, y = r.calibration(5)
    assert len(y) == 3 and sorted(y.tolist()) == [0, 1, 1]


def test_wav_stereo_and_errors(tmp_path):
    stereo = np.stack([np.arange(8), -np.arange(8)], axis=1) * 1000
    write_wav(tmp_path / "s.wav", stereo)
    write_wav(tmp_path / "short.wav", np.arange(1))
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    paths = [tmp_path / "s.wav", tmp_path / "short.wav", tmp_path / "junk.wav"]
    r = file_reader(tmp_path, "wav", [2, 4], paths)
    res = r.read(np.array([0, 1, 2]), 1)
    np.testing.assert_allclose(
        res.samples[0], np.array([[4, 5, 6, 7], [-4, -5, -6, -7]]) * 1000 / 32768
    )
    assert res.ok.tolist() == [True, False, False]
    assert "short.wav" in res.errors[1] and "channel" in res.errors[1]
    assert "junk.wav" in res.errors[2]
    mono = file_reader(tmp_path, "wav", [4], [tmp_path / "short.wav"])
    assert "shorter than one window" in mono.read(np.array([0]), 0).errors[0]


def test_csv_windows_with_header_and_label_column(tmp_path):
    rows = ["t0,t1,label"] + [f"{i},{10 * i},{int(i >= 4)}" for i in range(9)]
    (tmp_path / "s.csv").write_text("\n".join(rows) + "\n")
    r = file_reader(tmp_path, "csv", [2, 3], [tmp_path / "s.csv"])
    res = r.read(np.array([0]), 1)  # rows 3, 4, 5; labels 0, 1, 1 -> 1
    np.testing.assert_array_equal(res.samples[0], [[3, 4, 5], [30, 40, 50]])
    assert res.labels.tolist() == [1]
    assert r.read(np.array([0]), 3).labels.tolist() == [0]  # wraps to window 0
    x, y = r.calibration(10)
    assert sorted(y.tolist()) == [0, 1, 1]


def test_csv_without_header_or_labels_and_errors(tmp_path):
    (tmp_path / "a.csv").write_text("1,2\n3,4\n5,6\n7,8\n")
    (tmp_path / "b.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "c.csv").write_text("1,2\n3,x\n")
    paths = [tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"]
    r = file_reader(tmp_path, "csv", [2, 2], paths)
    res = r.read(np.array([0, 1, 2]), 1)
    np.testing.assert_array_equal(res.samples[0], [[5, 7], [6, 8]])
    assert res.labels.tolist() == [-1, -1, -1]
    assert res.ok.tolist() == [True, False, False]
    assert "b.csv" in res.errors[1] and "3 channel" in res.errors[1]
    assert "c.csv" in res.errors[2]
    with pytest.raises(NoCalibrationData):
        r.calibration(3)


def test_synthetic_read_into_buffer():
    r = get_reader(make_modality([9, 200]), make_app(), None, seed=0)
    buf = np.full((3, 9, 200), np.nan, np.float32)
    res = r.read(np.arange(3), 2, out=buf)
    assert res.samples is buf
    np.testing.assert_array_equal(buf, r.read(np.arange(3), 2).samples)
    with pytest.raises(ValueError, match="out must be"):
        r.read(np.arange(2), 2, out=buf)
