"""Shared-memory input cache against real /dev/shm segments and real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serif_dask import datapath
from serif_dask.datapath import (
    InputTooLarge,
    SegmentGone,
    ShmCache,
    SlotRef,
    StaleSlot,
    node_name,
    remove_segments,
    remove_stale_segments,
    segment_name,
)

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = "t" + uuid.uuid4().hex[:8]
    yield rid
    datapath.detach_all()
    left = remove_segments(rid)
    assert not left, f"segments left behind: {left}"


def _shm(name: str) -> Path:
    return Path("/dev/shm") / name


def _reader(ref: SlotRef, q: mp.Queue) -> None:
    view = datapath.read(ref)
    cache = datapath._attached[(ref.run_id, ref.node, ref.modality)]
    base = np.frombuffer(cache._buf, np.uint8)  # type: ignore[arg-type]
    q.put((
        float(view.sum(dtype=np.float64)), view.shape, str(view.dtype),
        view.flags.writeable, bool(np.shares_memory(view, base)),
        float(datapath.read(ref, copy=True).sum(dtype=np.float64)),
    ))


def test_roundtrip_in_another_process_zero_copy(run_id: str) -> None:
    x = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
    with ShmCache.create(run_id, "bay-a", "video", entries=2, entry_size=x.nbytes) as cache:
        ref = cache.put(x)
        assert (ref.shape, ref.dtype, ref.nbytes, ref.generation) == (x.shape, "<f4", 240, 2)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_reader, args=(ref, q))
        p.start()
        total, shape, dtype, writeable, shared, copied = q.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0
        assert total == pytest.approx(float(x.sum(dtype=np.float64)))
        assert copied == total and shape == x.shape and dtype == "float32"
        assert shared and not writeable  # a read-only view into the segment, no copy
        assert _shm(cache.name).exists()
    assert not _shm(cache.name).exists()


def test_reused_slot_is_detected(run_id: str) -> None:
    with ShmCache.create(run_id, "n", "ecg", entries=2, entry_size=64) as cache:
        a = cache.put(np.full(8, 1.0))
        view = cache.get(a)
        cache.put(np.full(8, 2.0))
        assert cache.valid(a)
        cache.put(np.full(8, 3.0))  # wraps around onto a's slot
        assert a.slot == 0 and not cache.valid(a)
        with pytest.raises(StaleSlot):
            cache.get(a)
        with pytest.raises(StaleSlot):
            cache.check(a)  # the view taken before now shows other data
        assert view[0] == 3.0
        # a write in progress (odd generation) is not readable either
        c = cache.put(np.full(8, 4.0))
        cache._gens[c.slot] = c.generation + 1
        with pytest.raises(StaleSlot):
            datapath.read(c, copy=True)
        cache._gens[c.slot] = c.generation
        assert datapath.read(c, copy=True)[0] == 4.0


def test_input_too_large_is_never_truncated(run_id: str) -> None:
    with ShmCache.create(run_id, "n", "audio", entries=1, entry_size=100) as cache:
        with pytest.raises(InputTooLarge, match="'audio' is 104 bytes.*cache-entry-size is 100"):
            cache.put(np.zeros(26, np.float32))
        cache.put(np.zeros(25, np.float32))
        with pytest.raises(TypeError):
            cache.put(np.array([None]))


def test_segment_is_private_and_unlinked_on_close(run_id: str) -> None:
    cache = ShmCache.create(run_id, "bay a/1", "vid eo", entries=3, entry_size=10_000)
    name = cache.name
    assert name.startswith(f"serif_{run_id}_bay-a-1-") and " " not in name
    assert name == segment_name(run_id, "bay a/1", "vid eo")
    assert _shm(name).stat().st_mode & 0o777 == 0o600
    view = cache.get(cache.put(np.arange(10)))
    cache.close()  # a live view does not stop the unlink
    cache.close()
    assert not _shm(name).exists()
    assert view[3] == 3
    with pytest.raises(SegmentGone):
        ShmCache.attach(run_id, "bay a/1", "vid eo")


def test_reattach_after_owner_recreated(run_id: str) -> None:
    first = ShmCache.create(run_id, "n", "m", entries=1, entry_size=64)
    old = first.put(np.ones(4))
    assert datapath.read(old)[0] == 1
    first.close()
    with ShmCache.create(run_id, "n", "m", entries=1, entry_size=64) as second:
        new = second.put(np.full(4, 7.0))
        assert datapath.read(new)[0] == 7  # the stale attachment is replaced
        with pytest.raises(SegmentGone):
            datapath.read(old)


_OWNER = """
import sys, time
from serif_dask.datapath import ShmCache
cache = ShmCache.create(sys.argv[1], "n", "m", entries=2, entry_size=1 << 20)
print(cache.name, flush=True)
time.sleep(120)
"""

_ATTACH_AND_EXIT = """
import sys
from multiprocessing.shared_memory import SharedMemory
from serif_dask.datapath import ShmCache
if sys.argv[1] == "serif":
    cache = ShmCache.attach(sys.argv[2], "n", "m")
    print("attached", cache.entries, flush=True)
else:  # control: a plain attach, as multiprocessing does it on 3.11/3.12
    SharedMemory(sys.argv[2])
"""


def _python(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            text=True, **kw)  # type: ignore[call-overload]


def test_killed_owner_is_cleaned_up(run_id: str) -> None:
    owner = _python(_OWNER, run_id, stdout=subprocess.PIPE)
    try:
        name = owner.stdout.readline().strip()  # type: ignore[union-attr]
        assert _shm(name).exists()
        assert name not in remove_stale_segments()  # owner alive: left alone
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    assert _shm(name).exists()  # SIGKILL: nobody unlinked it
    assert name in remove_stale_segments()
    assert not _shm(name).exists()


def test_exiting_reader_does_not_unlink(run_id: str) -> None:
    """A reader with its own resource_tracker exits; the owner's segment survives."""
    with ShmCache.create(run_id, "n", "m", entries=2, entry_size=4096) as cache:
        ref = cache.put(np.arange(5))
        reader = _python(_ATTACH_AND_EXIT, "serif", run_id, stdout=subprocess.PIPE)
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0 and "attached" in out
        assert _shm(cache.name).exists()
        assert cache.get(ref)[4] == 4
        if sys.version_info < (3, 13):
            # control: without the unregister, the reader's tracker does unlink it
            control = _python(_ATTACH_AND_EXIT, "plain", cache.name, stderr=subprocess.PIPE)
            control.communicate(timeout=60)
            assert not _shm(cache.name).exists()


def test_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERIF_NODE", "bay-b")
    assert node_name() == "bay-b"
    monkeypatch.delenv("SERIF_NODE")
    assert node_name()


def test_reader_writes_straight_into_reserved_slots(run_id: str) -> None:
    """A reservation is a writable (n, *shape) view of adjacent slots: the reader fills it,
    the score side reads a batch back as one zero-copy view when its rows are adjacent."""
    from types import SimpleNamespace

    from serif_dask.readers.synthetic import SyntheticReader

    shape = (2, 3, 50)  # 1200 bytes: slots are page-spaced, rows not adjacent
    reader = SyntheticReader(
        SimpleNamespace(name="ecg", synthetic_shape=shape, synthetic_snr=1.0,
                        label_persistence=0.9),
        SimpleNamespace(name="app", prior=(0.5, 0.5)),
    )
    groups = np.arange(3)
    expected = reader.read(groups, 4).samples
    with ShmCache.create(run_id, "n", "ecg", entries=5, entry_size=1200) as cache:
        cache.put(np.zeros(shape, np.float32))  # slot 0: the reservation starts at 1
        with cache.reserve(3, shape) as res:
            assert not res.array.flags.c_contiguous and res.array[0].flags.c_contiguous
            assert reader.read(groups, 4, out=res.array).samples is res.array
            refs = res.commit(ok=[True, False, True])
        assert refs[1] is None and [r.slot for r in (refs[0], refs[2])] == [1, 3]
        np.testing.assert_array_equal(datapath.read(refs[2]), expected[2])
        # page-spaced rows are not one C-contiguous batch: the score side must copy
        assert datapath.read_rows([refs[0], refs[2]]) is None
        # two more slots do not fit before the end of the ring: back to slot 0
        with cache.reserve(2, (300,)) as res:
            res.array[...] = np.arange(600, dtype=np.float32).reshape(2, 300)
            wrapped = res.commit()
        assert [r.slot for r in wrapped] == [0, 1]  # type: ignore[union-attr]
        assert not datapath.valid(refs[0])  # its slot was taken

    with ShmCache.create(run_id, "n", "video", entries=4, entry_size=4096) as cache:
        with cache.reserve(3, (1024,)) as res:  # rows fill their page: one batch view
            res.array[...] = np.arange(3 * 1024, dtype=np.float32).reshape(3, 1024)
            refs = res.commit()
        batch = datapath.read_rows(refs)  # type: ignore[arg-type]
        assert batch is not None and batch.shape == (3, 1024) and batch.flags.c_contiguous
        assert not batch.flags.writeable and batch[2, 5] == 2 * 1024 + 5
        assert datapath.read_rows(refs[::-1]) is None  # type: ignore[arg-type]
        cache.put(np.zeros(1024, np.float32))  # slot 3
        cache.put(np.zeros(1024, np.float32))  # slot 0 again: the batch view is stale
        assert [datapath.valid(r) for r in refs] == [False, True, True]  # type: ignore[arg-type]
        with pytest.raises(StaleSlot):
            datapath.read_rows(refs)  # type: ignore[arg-type]


def test_aborted_reservation_publishes_nothing(run_id: str) -> None:
    with ShmCache.create(run_id, "n", "m", entries=2, entry_size=64) as cache:
        old = cache.put(np.full(4, 1.0))
        with pytest.raises(RuntimeError, match="reader failed"), cache.reserve(2, (4,)) as res:
            res.array[0] = 9.0
            raise RuntimeError("reader failed")
        assert not cache.valid(old)  # half-overwritten: never readable again
        assert all(int(g) % 2 == 0 for g in cache._gens)  # and not left "being written"
        with pytest.raises(ValueError, match="cannot reserve 3 of 2"):
            cache.reserve(3, (4,))
        with pytest.raises(InputTooLarge):
            cache.reserve(1, (9,), np.float64)


def test_copy_into_a_reused_buffer_is_checked(run_id: str) -> None:
    with ShmCache.create(run_id, "n", "m", entries=1, entry_size=64) as cache:
        ref = cache.put(np.arange(8, dtype=np.float64))
        buf = datapath.take_buffer(2, (8,), np.float32)
        datapath.read(ref, out=buf[1])
        np.testing.assert_array_equal(buf[1], np.arange(8))
        datapath.release_buffer(buf)
        assert datapath.take_buffer(1, (8,), np.float32) is buf  # reused, not reallocated
        cache.put(np.zeros(8))
        with pytest.raises(StaleSlot):
            datapath.read(ref, out=buf[0])


def test_score_batch_is_a_view_and_a_reused_slot_fails_its_request(run_id: str) -> None:
    """The engine's path: read_task's reader fills reserved slots, score_task's
    gather_inputs gets the batch without a copy, and a slot reused while the batch was in
    use is reported after the fact (never scored as the wrong group's data)."""
    from types import SimpleNamespace

    from serif_dask import dataplane
    from serif_dask.readers.synthetic import SyntheticReader
    from serif_dask.tasks import ReadResult, _call_reader
    from serif_dask.worker import SerifWorkerPlugin

    reader = SyntheticReader(
        SimpleNamespace(name="ecg", synthetic_shape=(1024,), synthetic_snr=1.0,
                        label_persistence=0.9),
        SimpleNamespace(name="app", prior=(0.5, 0.5)),
    )
    groups = np.asarray([4, 9, 11])
    expected = reader.read(groups, 3).samples
    plugin = SerifWorkerPlugin()
    plugin.node = "n"
    with ShmCache.create(run_id, "n", "ecg", entries=4, entry_size=4096) as cache:
        res = dataplane.reserve_samples(cache, reader, len(groups))
        assert res is not None
        samples, labels, errors = _call_reader(reader, groups, 3, True, (1024,), 2,
                                               out=res.array)
        assert samples is res.array and not errors
        refs = dataplane.share_samples(cache, samples, groups, errors, res)
        read = ReadResult(app="app", modality="ecg", server="s", tick=3, worker="", node="n",
                          groups=groups, labels=labels, refs=tuple(refs))

        inputs = dataplane.gather_inputs(plugin, groups, [read], [], errors)
        assert inputs.buffer is None and not inputs.samples.flags.writeable  # a view
        np.testing.assert_array_equal(inputs.samples, expected)
        assert inputs.stale() == []
        cache.put(np.zeros(1024, np.float32))  # slot 3
        cache.put(np.zeros(1024, np.float32))  # slot 0: group 4's input is gone
        assert inputs.stale() == [0]
        inputs.release()

        # out of slot order: one checked copy per row, into a reused buffer
        inputs = dataplane.gather_inputs(plugin, groups[::-1], [read], [], errors)
        assert inputs.buffer is not None
        np.testing.assert_array_equal(inputs.samples[:2], expected[:0:-1])
        assert errors == {4: dataplane.STALE}
        inputs.release()


def test_concurrent_writers_never_publish_torn_slots(run_id: str) -> None:
    """Threads of one data worker reserving from the same ring: every ref that is still
    valid reads back exactly what its writer put there."""
    import threading

    with ShmCache.create(run_id, "n", "m", entries=3, entry_size=4096) as cache:
        seen: list[tuple[float, SlotRef]] = []
        lock = threading.Lock()

        def writer(base: int) -> None:
            for i in range(200):
                value = float(base + i)
                with cache.reserve(2, (512,)) as res:
                    res.array[...] = value
                    refs = res.commit()
                with lock:
                    seen.extend((value, r) for r in refs)  # type: ignore[misc]

        threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 1200
        live = [(v, r) for v, r in seen if cache.valid(r)]
        assert 1 <= len(live) <= 3
        for value, ref in live:
            assert np.all(cache.get(ref, copy=True) == value)
        assert all(int(g) % 2 == 0 for g in cache._gens) and not cache._busy
