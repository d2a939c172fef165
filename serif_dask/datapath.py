"""Node-local shared-memory input cache: read tasks write a sample once, score tasks on
the same node read it zero-copy.

A writer reserves slots (:meth:`ShmCache.reserve`) and gets a writable ``(n, *shape)`` view of
them, so a reader that can fill an ``out=`` array renders its samples straight into
shared memory (no copy at all); :meth:`ShmCache.put` copies an existing array in once.

One segment per (run, node, modality) holds ``entries`` slots of ``entry_size`` bytes.
Dask's own worker-to-worker transfer serialises, sends over a socket and deserialises
every input; on one node no copy at all is needed when the reader writes in place, and
one memcpy each way when it cannot or a batch is not one run of slots.  Slots are reused
round-robin and never re-allocated, because the first write into fresh shared pages
costs several times a memcpy (page faults).

Layout (little-endian)::

    [segment header 128 B][slot headers, 128 B each] ... page-aligned payloads

A slot header carries a generation counter used as a seqlock: odd while the owner is
writing, even when done.  A :class:`SlotRef` remembers the generation it was written
with, so a reader can tell when the slot was reused under it (:class:`StaleSlot`) and
fall back instead of scoring another group's data.

Lifetime: one writer process owns a segment and unlinks it on ``close()`` and at exit;
segments of dead owners (SIGKILL, OOM) are removed by :func:`remove_stale_segments`.
Python < 3.13 registers every attached segment with the ``resource_tracker``, which
unlinks it when *that* process exits, even if it was only a reader; we unregister
right after creating or attaching, in every process, and do our own cleanup instead.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

__all__ = [
    "InputTooLarge",
    "Reservation",
    "SegmentGone",
    "ShmCache",
    "SlotRef",
    "StaleSlot",
    "node_name",
    "read",
    "read_rows",
    "release_buffer",
    "remove_segments",
    "remove_stale_segments",
    "segment_name",
    "take_buffer",
    "valid",
]

PREFIX = "serif"
SHM_DIR = Path("/dev/shm")
PAGE = 4096
MAX_NDIM = 10
_MAGIC = b"SERIFSHM"
_LAYOUT_VERSION = 1
_HEADER = 128
_SLOT_HEADER = 128
# magic, layout version, entries, entry_size, owner pid, owner start time, token,
# data offset, stride
_SEG = struct.Struct("<8sIIQQdQQQ")
# generation, nbytes, ndim, (pad), dtype
_SLOT = struct.Struct("<QQII16s")
_SHAPE_OFFSET = _SLOT.size
_TRACKS = sys.version_info >= (3, 13)  # SharedMemory(track=False) exists
_OWNERLESS_GRACE_S = 60.0


class StaleSlot(RuntimeError):
    """The slot was reused (or is being rewritten) since the reference was taken."""


class SegmentGone(StaleSlot):
    """The segment no longer exists (owner closed or died); the input is gone."""


class InputTooLarge(ValueError):
    """An input does not fit in one cache slot; never truncated."""

    def __init__(self, modality: str, nbytes: int, entry_size: int) -> None:
        super().__init__(
            f"input of modality {modality!r} is {nbytes} bytes but cache-entry-size is "
            f"{entry_size} bytes; raise cache-entry-size for {modality!r} in data.json"
        )
        self.modality = modality
        self.nbytes = nbytes
        self.entry_size = entry_size


@dataclass(frozen=True)
class SlotRef:
    """Where an input lives: small, picklable, travels through Dask instead of the data."""

    run_id: str
    node: str
    modality: str
    slot: int
    generation: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    token: int = 0  # segment incarnation: a recreated segment is a different one


def node_name() -> str:
    """The node a worker belongs to: ``$SERIF_NODE``, else the host name."""
    return os.environ.get("SERIF_NODE") or socket.gethostname()


def _clean(part: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9.-]", "-", str(part))
    if len(s) > limit or s != str(part):
        # keep names unique when sanitising or truncating merged distinct inputs
        digest = hashlib.sha1(str(part).encode()).hexdigest()[:6]
        s = f"{s[: limit - 7]}-{digest}"
    return s or "x"


def segment_name(run_id: str, node: str, modality: str) -> str:
    """``serif_<run>_<node>_<modality>``: a valid, short /dev/shm name."""
    return "_".join([PREFIX, _clean(run_id), _clean(node), _clean(modality)])


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _process_start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _shm_unlink(shm: SharedMemory) -> None:
    """Unlink without telling the resource_tracker (it was never told about the segment)."""
    if _TRACKS:
        shm.unlink()  # created/attached with track=False: no tracker message
        return
    import _posixshmem  # the primitive SharedMemory.unlink wraps, minus its unregister

    _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]


def _open_shm(name: str, *, create: bool, size: int = 0) -> SharedMemory:
    if _TRACKS:
        return SharedMemory(name, create=create, size=size, track=False)  # type: ignore[call-arg]
    shm = SharedMemory(name, create=create, size=size)
    # 3.11/3.12 register on create *and* attach; the tracker would unlink the segment
    # when this process exits, pulling it from under the owner and other readers.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


class ShmCache:
    """A ring of fixed-size slots in one shared-memory segment.

    Build with :meth:`create` (the single writer, which owns and unlinks the segment)
    or :meth:`attach` (readers).  ``reserve``/``put`` are thread-safe within the owner
    process.
    """

    def __init__(self, shm: SharedMemory, run_id: str, node: str, modality: str,
                 *, owner: bool) -> None:
        self._shm = shm
        self.run_id, self.node, self.modality = run_id, node, modality
        self.name = segment_name(run_id, node, modality)
        self.owner = owner
        (magic, version, entries, entry_size, pid, _start, token, data_offset,
         stride) = _SEG.unpack_from(shm.buf, 0)
        if magic != _MAGIC or version != _LAYOUT_VERSION:
            shm.close()
            raise SegmentGone(f"shared-memory segment {self.name} is not a serif cache")
        self.entries, self.entry_size, self.owner_pid = entries, entry_size, pid
        self.token, self._data_offset, self._stride = token, data_offset, stride
        self._buf: memoryview | None = shm.buf
        # 8-byte aligned views: loads and stores of a generation are single instructions
        # np.frombuffer pins the mapping (np.ndarray(buffer=...) does not), so a view can
        # never outlive the mmap it points into.
        words = np.frombuffer(shm.buf, np.uint64, (_HEADER + entries * _SLOT_HEADER) // 8)
        self._gens = words[_HEADER // 8 :: _SLOT_HEADER // 8]
        self._next = 0
        self._busy: set[int] = set()  # slots reserved and not yet committed
        self._cond = threading.Condition()
        self._closed = False

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, run_id: str, node: str, modality: str, entries: int, entry_size: int,
               *, prefault: bool = True) -> ShmCache:
        """Create and own the segment for (run, node, modality)."""
        if entries < 1 or entry_size < 1:
            raise ValueError("entries and entry_size must be positive")
        if entries * _SLOT_HEADER + _HEADER > 2**31:
            raise ValueError("too many entries")
        remove_stale_segments()
        name = segment_name(run_id, node, modality)
        data_offset = _round_up(_HEADER + entries * _SLOT_HEADER, PAGE)
        stride = _round_up(entry_size, PAGE)
        size = data_offset + entries * stride
        try:
            shm = _open_shm(name, create=True, size=size)
        except FileExistsError:
            raise FileExistsError(
                f"shared-memory segment {name} exists and its owner is alive "
                f"(run {run_id!r} on node {node!r} has two writers for {modality!r}?)"
            ) from None
        try:
            _reserve(name, size, modality)
            if prefault:
                _touch(shm.buf, write=True)  # before the header: this zeroes page starts
            pid = os.getpid()
            _SEG.pack_into(shm.buf, 0, _MAGIC, _LAYOUT_VERSION, entries, entry_size, pid,
                           _process_start_time(pid) or 0.0, secrets.randbits(63),
                           data_offset, stride)
            cache = cls(shm, run_id, node, modality, owner=True)
        except BaseException:
            with contextlib.suppress(Exception):
                _shm_unlink(shm)
            shm.close()
            raise
        atexit.register(cache.close)
        return cache

    @classmethod
    def attach(cls, run_id: str, node: str, modality: str, *,
               prefault: bool = True) -> ShmCache:
        """Attach to an existing segment (sizes come from its header)."""
        name = segment_name(run_id, node, modality)
        try:
            shm = _open_shm(name, create=False)
        except FileNotFoundError:
            raise SegmentGone(f"no shared-memory input cache {name} on this node") from None
        cache = cls(shm, run_id, node, modality, owner=False)
        if prefault:
            _touch(shm.buf, write=False)
        return cache

    # -- data --------------------------------------------------------------------------
    def _payload(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._buf, dtype, count,  # type: ignore[arg-type]
                             self._data_offset + slot * self._stride).reshape(shape)

    def _rows(self, first: int, n: int, shape: tuple[int, ...], dtype: np.dtype,
              *, writeable: bool) -> np.ndarray:
        """Slots ``first .. first+n-1`` as one ``(n, *shape)`` array, without a copy.

        Rows are ``stride`` bytes apart, so the array is C-contiguous when ``n == 1`` or
        the sample fills its page-rounded slot exactly (then a batch needs no copy either).
        """
        if n == 0:
            return np.empty((0, *shape), dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        span = (n - 1) * self._stride + nbytes
        flat = np.frombuffer(self._buf, np.uint8, span,  # type: ignore[arg-type]
                             self._data_offset + first * self._stride).view(dtype)
        strides = [dtype.itemsize]
        for length in reversed(shape[1:]):
            strides.insert(0, strides[0] * length)
        return np.lib.stride_tricks.as_strided(
            flat, (n, *shape), (self._stride, *strides[: len(shape)]), writeable=writeable
        )

    def reserve(self, n: int, shape: tuple[int, ...], dtype: np.dtype | str = np.float32,
                ) -> Reservation:
        """Take ``n`` adjacent slots for writing; fill ``reservation.array`` in place.

        The slots are marked *being written* (odd generation) until
        :meth:`Reservation.commit`, so a reader holding an older ref to one of them sees
        it stale from now on.  Adjacent slots let a score task read a whole batch as one
        zero-copy array; when ``n`` slots do not fit before the end of the ring the
        reservation starts again at slot 0.
        """
        if not self.owner:
            raise PermissionError("only the process that created the cache writes to it")
        dt = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if dt.kind not in "biufcmM" or dt.fields is not None:
            raise TypeError(f"cannot cache dtype {dt} as raw bytes")
        if len(shape) > MAX_NDIM:
            raise ValueError(f"at most {MAX_NDIM} dimensions")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if nbytes > self.entry_size:
            raise InputTooLarge(self.modality, nbytes, self.entry_size)
        if not 0 <= n <= self.entries:
            raise ValueError(f"cannot reserve {n} of {self.entries} slots of {self.name}")
        gens: list[int] = []
        with self._cond:
            self._check_open()
            while True:
                first = self._next if self._next + n <= self.entries else 0
                if self._busy.isdisjoint(range(first, first + n)):
                    break
                self._cond.wait()  # another thread is still writing there
                self._check_open()
            self._next = (first + n) % self.entries
            for slot in range(first, first + n):
                gen = int(self._gens[slot])
                gen += gen & 1  # a writer that died mid-write left it odd
                self._gens[slot] = gen + 1  # odd: being written
                off = _HEADER + slot * _SLOT_HEADER
                _SLOT.pack_into(self._buf, off, gen + 1, nbytes, len(shape), 0,
                                dt.str.encode())
                struct.pack_into(f"<{len(shape)}Q", self._buf, off + _SHAPE_OFFSET, *shape)
                gens.append(gen + 2)
            self._busy.update(range(first, first + n))
        array = self._rows(first, n, shape, dt, writeable=True)
        return Reservation(self, first, tuple(gens), shape, dt.str, nbytes, array)

    def _finish(self, first: int, gens: Sequence[int]) -> None:
        with self._cond:
            if not self._closed:
                self._gens[first : first + len(gens)] = gens  # even: done
            self._busy.difference_update(range(first, first + len(gens)))
            self._cond.notify_all()

    def put(self, array: np.ndarray) -> SlotRef:
        """Copy ``array`` into the next slot (the one copy of a reader that cannot write
        into a reservation); the returned ref travels to readers."""
        a = np.asarray(array)
        with self.reserve(1, a.shape, a.dtype) as res:
            np.copyto(res.array[0], a, casting="no")
            (ref,) = res.commit()
        assert ref is not None
        return ref

    def valid(self, ref: SlotRef) -> bool:
        """Whether the slot still holds what ``ref`` points to."""
        return (not self._closed and ref.token == self.token
                and 0 <= ref.slot < self.entries
                and int(self._gens[ref.slot]) == ref.generation)

    def check(self, ref: SlotRef) -> None:
        """Raise :class:`StaleSlot` unless ``ref`` is still valid (call after using a view)."""
        if not self.valid(ref):
            raise StaleSlot(f"{self.name} slot {ref.slot} was reused since generation "
                            f"{ref.generation}")

    def _own(self, ref: SlotRef) -> None:
        self._check_open()
        if (ref.run_id, ref.node, ref.modality) != (self.run_id, self.node, self.modality):
            raise ValueError(f"{ref} does not belong to cache {self.name}")
        if ref.token != self.token:
            raise SegmentGone(f"{self.name} was recreated since {ref} was written")

    def get(self, ref: SlotRef, copy: bool = False, *, out: np.ndarray | None = None,
            ) -> np.ndarray:
        """The input ``ref`` names: a read-only zero-copy view, or a private copy.

        A view stays valid only until the writer wraps around to its slot; check with
        :meth:`valid`/:meth:`check` after using it.  A copy (into ``out`` when given, e.g.
        a row of a reused batch buffer; cast like an assignment) is checked after copying.
        """
        self._own(ref)
        self.check(ref)
        view = self._payload(ref.slot, tuple(ref.shape), np.dtype(ref.dtype))
        if copy or out is not None:
            if out is None:
                out = view.copy()
            else:
                out[...] = view
            self.check(ref)
            return out
        view.flags.writeable = False
        return view

    def rows(self, refs: Sequence[SlotRef | None]) -> np.ndarray | None:
        """``refs`` as one read-only ``(n, *shape)`` view when they sit in adjacent slots
        in order (as one reservation writes them) and the view is C-contiguous; else None.

        A None entry is a row the caller will not use (a failed group): the view still
        spans its slot, whatever that holds.  Like :meth:`get`, the view is only good
        while every ref stays :meth:`valid`.
        """
        given = [(i, r) for i, r in enumerate(refs) if r is not None]
        if not given:
            return None
        i0, head = given[0]
        base = head.slot - i0
        for _, ref in given:
            self._own(ref)
        if base < 0 or base + len(refs) > self.entries or any(
            r.slot != base + i or r.shape != head.shape or r.dtype != head.dtype
            for i, r in given
        ):
            return None
        for _, ref in given:
            self.check(ref)
        view = self._rows(base, len(refs), tuple(head.shape), np.dtype(head.dtype),
                          writeable=False)
        return view if view.flags.c_contiguous else None

    # -- lifetime ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SegmentGone(f"cache {self.name} is closed")

    def close(self) -> None:
        """Detach; the owner also unlinks the segment.  Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                _shm_unlink(self._shm)
        self._gens = np.zeros(0, np.uint64)
        self._buf = None
        try:
            self._shm.close()
        except BufferError:
            # A caller still holds a zero-copy view, which pins the mmap: hand the mmap
            # over to the views (it unmaps when the last one goes) and close the rest.
            self._shm._mmap = None  # type: ignore[attr-defined]
            self._shm.close()

    def __enter__(self) -> ShmCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "reader"
        return f"<ShmCache {self.name} {self.entries}x{self.entry_size}B {role}>"


class Reservation:
    """Slots taken by :meth:`ShmCache.reserve`: fill ``array``, then :meth:`commit`.

    As a context manager it aborts (slots finished, no refs handed out) when the block
    leaves without a commit, e.g. because the reader raised.
    """

    def __init__(self, cache: ShmCache, first: int, gens: tuple[int, ...],
                 shape: tuple[int, ...], dtype: str, nbytes: int, array: np.ndarray) -> None:
        self.cache, self.first, self.gens = cache, first, gens
        self.shape, self.dtype, self.nbytes = shape, dtype, nbytes
        self.array = array  # writable (n, *shape) view of the slots
        self.done = False

    def commit(self, ok: Sequence[bool] | np.ndarray | None = None) -> list[SlotRef | None]:
        """Publish the rows: a ref per row, None where ``ok`` is False (never readable)."""
        if self.done:
            raise RuntimeError("reservation already finished")
        self.done = True
        c = self.cache
        c._finish(self.first, self.gens)
        c._check_open()
        return [
            SlotRef(c.run_id, c.node, c.modality, self.first + i, gen, self.shape,
                    self.dtype, self.nbytes, c.token)
            if ok is None or ok[i] else None
            for i, gen in enumerate(self.gens)
        ]

    def abort(self) -> None:
        """Finish the slots without publishing them (idempotent)."""
        if not self.done:
            self.done = True
            self.cache._finish(self.first, self.gens)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _touch(buf: memoryview, *, write: bool) -> None:
    """Fault every page in now, so that the first put/get runs at memcpy speed."""
    pages = np.frombuffer(buf, np.uint8)[::PAGE]
    if write:
        pages[:] = 0
    else:
        int(pages.sum())


def _reserve(name: str, size: int, modality: str) -> None:
    """Back the whole segment now: a full /dev/shm is a clear error here, not a SIGBUS
    on some later write."""
    path = SHM_DIR / name
    if not hasattr(os, "posix_fallocate") or not path.exists():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot reserve {size} bytes of shared memory for the {modality!r} "
            f"input cache in {SHM_DIR} ({e.strerror}); lower cache-entries-per-modality or "
            "cache-entry-size, or enlarge /dev/shm"
        ) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------
# readers: one attachment per segment and process
# ---------------------------------------------------------------------------------
_attached: dict[tuple[str, str, str], ShmCache] = {}
_attached_lock = threading.Lock()


def _attachment(ref: SlotRef) -> ShmCache:
    """This process's attachment to ``ref``'s segment (created on first use, and
    re-created when the owner recreated the segment); kept mapped until
    :func:`detach_all`, so a read costs no mmap and no page faults."""
    key = (ref.run_id, ref.node, ref.modality)
    with _attached_lock:
        cache = _attached.get(key)
        if cache is None or cache._closed or cache.token != ref.token:
            if cache is not None:
                cache.close()
            cache = ShmCache.attach(*key)
            _attached[key] = cache
    return cache


def read(ref: SlotRef, copy: bool = False, *, out: np.ndarray | None = None) -> np.ndarray:
    """Read ``ref`` through this process's attachment: a read-only view (check
    :func:`valid` after using it), or a checked copy (into ``out`` when given)."""
    return _attachment(ref).get(ref, copy=copy, out=out)


def read_rows(refs: Sequence[SlotRef | None]) -> np.ndarray | None:
    """A batch of refs as one zero-copy ``(n, *shape)`` view when one reservation wrote
    them in this order (see :meth:`ShmCache.rows`), else None; check :func:`valid` for
    each ref after using it."""
    given = [r for r in refs if r is not None]
    if not given or any((r.run_id, r.node, r.modality, r.token) != (
            given[0].run_id, given[0].node, given[0].modality, given[0].token) for r in given):
        return None
    return _attachment(given[0]).rows(refs)


def valid(ref: SlotRef) -> bool:
    """Whether ``ref`` is still current, through this process's attachment; call it
    after using a view from :func:`read` to know the data did not change under you."""
    cache = _attached.get((ref.run_id, ref.node, ref.modality))
    return cache is not None and cache.valid(ref)


# Reused batch buffers for score tasks that must copy (inputs from several reads, or
# from Redis): a fresh 35 MB array costs more in page faults than the copy into it.
_BUFFER_BYTES = 1 << 30
_buffers: list[np.ndarray] = []
_buffers_lock = threading.Lock()


def take_buffer(n: int, shape: tuple[int, ...], dtype: np.dtype | str = np.float32,
                ) -> np.ndarray:
    """An ``(m >= n, *shape)`` array for this thread's exclusive use until
    :func:`release_buffer`; reused (already faulted in) when one is free."""
    dt = np.dtype(dtype)
    with _buffers_lock:
        for i, buf in enumerate(_buffers):
            if buf.dtype == dt and buf.shape[1:] == tuple(shape) and len(buf) >= n:
                return _buffers.pop(i)
    return np.empty((n, *shape), dt)


def release_buffer(buf: np.ndarray) -> None:
    """Hand a :func:`take_buffer` array back; the oldest go beyond 1 GiB in total."""
    with _buffers_lock:
        _buffers.append(buf)
        while sum(b.nbytes for b in _buffers) > _BUFFER_BYTES:
            _buffers.pop(0)


def detach_all() -> None:
    """Drop this process's reader attachments and batch buffers (end of a run)."""
    with _attached_lock:
        for cache in _attached.values():
            cache.close()
        _attached.clear()
    with _buffers_lock:
        _buffers.clear()


# ---------------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------------
def _segments() -> list[Path]:
    if not SHM_DIR.is_dir():
        return []
    return [p for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX + "_")]


def _owner_alive(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            raw = f.read(_SEG.size)
        st = path.stat()
    except FileNotFoundError:
        return True  # already gone: nothing to do
    except OSError:
        return True  # not ours to judge
    if len(raw) < _SEG.size or raw[:8] != _MAGIC:
        # being created right now, or garbage: give a creator time to write its header
        return time.time() - st.st_mtime < _OWNERLESS_GRACE_S
    _, _, _, _, pid, start, *_ = _SEG.unpack(raw)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    actual = _process_start_time(pid)
    # a recycled pid belongs to a process that started after the segment's owner
    return not (start and actual is not None and abs(actual - start) > 1.0)


def _unlink_path(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except (FileNotFoundError, PermissionError):
        return False


def remove_stale_segments() -> list[str]:
    """Unlink serif segments in /dev/shm whose owner process is dead; returns their names."""
    return [p.name for p in _segments() if not _owner_alive(p) and _unlink_path(p)]


def remove_segments(run_id: str) -> list[str]:
    """Unlink every segment of ``run_id`` on this node, whoever owns it (end of a run)."""
    prefix = f"{PREFIX}_{_clean(run_id)}_"
    return [p.name for p in _segments() if p.name.startswith(prefix) and _unlink_path(p)]
