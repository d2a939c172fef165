"""Redis-backed stores: model weights (chunked, sha256-verified, versioned) and inputs
that must cross nodes (raw bytes with a dtype/shape header).

Nothing read from Redis is ever unpickled: weights are bytes checked against their
sha256 and loaded with safetensors or ``torch.load(weights_only=True)``; inputs are
``numpy`` buffers described by a JSON header.  Redis is shared infrastructure, so a
value there is treated as untrusted input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "InputMissing",
    "InputStore",
    "REDIS_ERRORS",
    "RedisAuthError",
    "RedisUnavailable",
    "WeightMeta",
    "WeightStore",
    "WeightsCorrupted",
    "WeightsError",
    "WeightsMissing",
    "connect",
    "torch_state_dict_from_bytes",
]

DEFAULT_CHUNK_SIZE = 64 * 2**20  # no single Redis value over 64 MB


class RedisUnavailable(RuntimeError):
    """Redis cannot be reached (or started); the message names where and why."""


class RedisAuthError(RedisUnavailable):
    """Redis refused our credentials."""


class WeightsError(Exception):
    """Base class of weight-store errors."""


class WeightsMissing(WeightsError, LookupError):
    """No weights under this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no weights in Redis under key {key!r}; run 'serif-dask weights push'")
        self.key = key


class WeightsCorrupted(WeightsError):
    """The stored bytes do not match their recorded sha256/size (tampered or half-written)."""

    def __init__(self, key: str, reason: str, *, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(f"weights under key {key!r} are corrupted: {reason}")
        self.key = key
        self.reason = reason
        self.expected = expected
        self.actual = actual


class InputMissing(LookupError):
    """No input under this key (never written, or its TTL expired)."""


#: What a Redis command raises when Redis is down, unreachable or failing over.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisUnavailable, OSError)


# ---------------------------------------------------------------------------------
# connection
# ---------------------------------------------------------------------------------
def _where(nodes: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{h}:{p}" for h, p in nodes)


def connect(
    nodes: Sequence[tuple[str, int]],
    password: str | None = None,
    *,
    username: str | None = None,
    ssl: bool = False,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    socket_timeout: float = 30.0,
    **kwargs: Any,
) -> redis.Redis | RedisCluster:
    """A client for ``nodes``: ``redis.Redis`` for one server, ``RedisCluster`` for a cluster.

    Whether the nodes form a cluster is asked from the server (``INFO cluster``), so a
    single-port config may name one node of a cluster, and a cluster config several.
    Raises :class:`RedisUnavailable` (or :class:`RedisAuthError`) with one clear line.

    A command retries twice within ~0.1 s (redis-py's default of 10 tries with backoff
    blocks ~3.5 s per command while Redis is down, past any request's deadline); pass
    ``retry=`` to choose otherwise.
    """
    nodes = [(str(h), int(p)) for h, p in nodes]
    if not nodes:
        raise ValueError("connect() needs at least one (host, port)")
    kwargs.setdefault("retry", Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), 2))
    options: dict[str, Any] = dict(
        password=password, username=username, socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 5.0), **kwargs,
    )
    if ssl:
        options |= dict(ssl=True, ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile,
                        ssl_keyfile=ssl_keyfile)

    errors: list[str] = []
    for host, port in nodes:
        # The probe fails fast: redis-py's default retries (with backoff, and also on
        # AuthenticationError, a ConnectionError) would take seconds to say "no".
        probe = redis.Redis(host=host, port=port, **(options | {"retry": Retry(NoBackoff(), 0)}))
        try:
            cluster_enabled = bool(int(probe.info("cluster").get("cluster_enabled", 0)))
        except redis.AuthenticationError as e:
            raise _auth_error(host, port, password, e) from None
        except redis.ResponseError as e:
            if "AUTH" in str(e).upper():
                raise _auth_error(host, port, password, e) from None
            raise RedisUnavailable(f"Redis at {host}:{port}: {e}") from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            errors.append(f"{host}:{port} ({e})")
            continue
        finally:
            probe.close()
        if cluster_enabled:
            startup = [ClusterNode(h, p) for h, p in nodes]
            try:
                return RedisCluster(startup_nodes=startup, **options)
            except redis.RedisError as e:
                raise RedisUnavailable(f"Redis Cluster at {_where(nodes)}: {e}") from None
        if len(set(nodes)) > 1:
            raise RedisUnavailable(
                f"several Redis nodes configured ({_where(nodes)}) but {host}:{port} "
                "is not part of a Redis Cluster"
            )
        return redis.Redis(host=host, port=port, **options)
    raise RedisUnavailable("no Redis answers at " + "; ".join(errors))


def _auth_error(host: str, port: int, password: str | None, e: Exception) -> RedisAuthError:
    if password is None:
        return RedisAuthError(
            f"Redis at {host}:{port} requires a password; set redis password in the system config"
        )
    return RedisAuthError(f"Redis at {host}:{port} rejected the configured password ({e})")


# ---------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightMeta:
    key: str
    sha256: str
    size: int
    chunks: int
    version: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    seq: int = 0  # namespace of this push's chunk keys (unique per push)
    pushed_at: float = 0.0


def _iter_chunks(data: bytes | bytearray | memoryview | Path, chunk_size: int) -> Iterator[Any]:
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
        return
    view = memoryview(data).cast("B")
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


def _sha256(data: bytes | bytearray | memoryview | Path, chunk_size: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in _iter_chunks(data, chunk_size):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


class WeightStore:
    """Model weights in Redis, chunked (each value ≤ ``chunk_size``) and verified on fetch.

    Layout for key ``k`` (``{k}`` is a Redis Cluster hash tag, so one model's keys live
    in one slot and pipelines stay on one node)::

        <prefix>:{k}:meta       hash: sha256, size, chunks, chunk_size, version, seq
        <prefix>:{k}:seq        counter, one per push
        <prefix>:{k}:<seq>:<i>  chunk i of push <seq>

    A push writes its chunks under a fresh ``seq`` and switches ``meta`` last, so a
    reader never sees a half-written model; the previous push's chunks are deleted
    afterwards, and a reader that lost that race simply retries with the new meta.
    """

    def __init__(self, client: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 prefix: str = "serif:weights", replicas: int | None = 0,
                 replica_timeout_s: float = 10.0) -> None:
        if chunk_size <= 0 or chunk_size > DEFAULT_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{DEFAULT_CHUNK_SIZE}")
        self.client = client
        self.chunk_size = chunk_size
        self.prefix = prefix
        # Replication is asynchronous: with ``replicas`` > 0 a push returns only once that
        # many replicas hold it (WAIT), so losing a master right after loses no weights.
        # ``None``: as many as the key's master has connected at the time of the push.
        self.replicas = replicas
        self.replica_timeout_s = replica_timeout_s

    def _k(self, key: str, *parts: object) -> str:
        if not key or "{" in key or "}" in key:
            raise ValueError(f"invalid weights key {key!r} (empty, or holds braces)")
        return ":".join([self.prefix, f"{{{key}}}", *map(str, parts)])

    def meta(self, key: str) -> WeightMeta | None:
        """The metadata of the current weights, or None when there are none."""
        raw = self.client.hgetall(self._k(key, "meta"))
        if not raw:
            return None
        f = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return WeightMeta(
                key=key, sha256=f["sha256"], size=int(f["size"]), chunks=int(f["chunks"]),
                version=int(f["version"]), chunk_size=int(f["chunk_size"]),
                seq=int(f["seq"]), pushed_at=float(f.get("pushed_at", 0.0)),
            )
        except (KeyError, ValueError) as e:
            raise WeightsCorrupted(key, f"unreadable metadata ({e!r})") from None

    def push(self, key: str, data: bytes | bytearray | memoryview | Path, *,
             version: int | None = None) -> WeightMeta:
        """Store ``data`` (bytes, or a file streamed chunk by chunk); bumps the version."""
        return self._push(key, data, version)

    def push_if_changed(self, key: str, data: bytes | bytearray | memoryview | Path, *,
                        version: int | None = None) -> tuple[WeightMeta, bool]:
        """Push unless the same bytes (sha256) are already stored intact.

        Returns ``(meta, pushed)``.
        """
        sha, size = _sha256(data, self.chunk_size)
        current = self.meta(key)
        if current is not None and current.sha256 == sha and current.size == size \
                and self._chunks_present(current):
            return current, False
        return self._push(key, data, version), True

    def _chunks_present(self, m: WeightMeta) -> bool:
        pipe = self.client.pipeline(transaction=False)
        for i in range(m.chunks):
            pipe.strlen(self._k(m.key, m.seq, i))
        return sum(pipe.execute()) == m.size

    def _push(self, key: str, data: bytes | bytearray | memoryview | Path,
              version: int | None) -> WeightMeta:
        old = self.meta(key)
        seq = int(self.client.incr(self._k(key, "seq")))
        if version is None:
            version = old.version + 1 if old is not None else 1
        h = hashlib.sha256()
        size = n = 0
        try:
            for n, chunk in enumerate(_iter_chunks(data, self.chunk_size), start=1):
                h.update(chunk)
                size += len(chunk)
                self.client.set(self._k(key, seq, n - 1), chunk)
        except BaseException:
            self._delete_chunks(key, seq, n)
            raise
        meta = WeightMeta(key, h.hexdigest(), size, n, int(version), self.chunk_size, seq,
                          time.time())
        self.client.hset(self._k(key, "meta"), mapping={
            "sha256": meta.sha256, "size": meta.size, "chunks": meta.chunks,
            "chunk_size": meta.chunk_size, "version": meta.version, "seq": meta.seq,
            "pushed_at": repr(meta.pushed_at),
        })
        if self.replicas != 0:
            self._wait_replicas(key)
        if old is not None and old.seq != seq:
            self._delete_chunks(key, old.seq, old.chunks)
        return meta

    def _wait_replicas(self, key: str) -> None:
        target: dict[str, Any] = {}
        if isinstance(self.client, RedisCluster):
            target["target_nodes"] = self.client.get_node_from_key(self._k(key, "meta"))
        want = self.replicas
        if want is None:
            info = self.client.info("replication", **target)
            want = int(info.get("connected_slaves", 0))
            if want == 0:
                return
        args = ("WAIT", want, int(self.replica_timeout_s * 1000))
        acked = self.client.execute_command(*args, **target)
        if int(acked) < want:
            raise RedisUnavailable(
                f"weights {key!r}: only {acked} of {want} replicas acknowledged "
                f"within {self.replica_timeout_s} s"
            )

    def _delete_chunks(self, key: str, seq: int, chunks: int) -> None:
        if chunks:
            pipe = self.client.pipeline(transaction=False)
            for i in range(chunks):
                pipe.delete(self._k(key, seq, i))
            pipe.execute()

    def fetch(self, key: str) -> bytes:
        """The weights' bytes, verified against the recorded size and sha256.

        Raises :class:`WeightsMissing` when absent, :class:`WeightsCorrupted` on mismatch.
        """
        for _ in range(3):
            m = self.meta(key)
            if m is None:
                raise WeightsMissing(key)
            pipe = self.client.pipeline(transaction=False)
            for i in range(m.chunks):
                pipe.get(self._k(key, m.seq, i))
            parts = pipe.execute()
            missing = [i for i, p in enumerate(parts) if p is None]
            if missing:
                current = self.meta(key)
                if current is not None and current.seq != m.seq:
                    continue  # replaced while we read: read the new one
                raise WeightsCorrupted(
                    key, f"chunk {missing[0]} of {m.chunks} is missing (evicted or deleted?)"
                )
            data = b"".join(parts)
            if len(data) != m.size:
                raise WeightsCorrupted(key, f"size {len(data)} != recorded {m.size}")
            actual = hashlib.sha256(data).hexdigest()
            if actual != m.sha256:
                raise WeightsCorrupted(key, "sha256 mismatch", expected=m.sha256, actual=actual)
            return data
        raise WeightsCorrupted(key, "replaced repeatedly while reading")

    def delete(self, key: str) -> bool:
        """Remove a model's weights; True if there were any."""
        m = self.meta(key)
        if m is None:
            return False
        self.client.delete(self._k(key, "meta"))
        self._delete_chunks(key, m.seq, m.chunks)
        return True


# ---------------------------------------------------------------------------------
# inputs crossing nodes
# ---------------------------------------------------------------------------------
_INPUT_MAGIC = b"SRFI\x01"
_HDR = struct.Struct("<I")  # length of the JSON header that follows the magic


class InputStore:
    """Arrays in Redis for score tasks on another node: raw bytes + a dtype/shape header.

    ``last_latency_s`` holds the wall time of the latest ``get`` (request to array), which
    the caller records as the input's retrieval latency.
    """

    def __init__(self, client: Any, *, prefix: str = "serif:input") -> None:
        self.client = client
        self.prefix = prefix
        self.last_latency_s: float = float("nan")

    def _k(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def put(self, key: str, array: np.ndarray, ttl_s: float) -> int:
        """Store ``array`` for ``ttl_s`` seconds; returns the payload size in bytes."""
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise TypeError("object arrays cannot travel as raw bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        array = np.ascontiguousarray(array)
        header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}).encode()
        value = b"".join([_INPUT_MAGIC, _HDR.pack(len(header)), header,
                          memoryview(array).cast("B")])
        self.client.set(self._k(key), value, px=max(1, int(ttl_s * 1000)))
        return array.nbytes

    def get(self, key: str) -> np.ndarray:
        """The array (a read-only view over the received bytes)."""
        return self.get_timed(key)[0]

    def get_timed(self, key: str) -> tuple[np.ndarray, float]:
        """``(array, seconds)``; seconds is the retrieval latency, also in ``last_latency_s``."""
        t0 = time.perf_counter()
        raw = self.client.get(self._k(key))
        if raw is None:
            raise InputMissing(key)
        array = _decode_input(key, raw)
        self.last_latency_s = time.perf_counter() - t0
        return array, self.last_latency_s

    def delete(self, key: str) -> None:
        self.client.delete(self._k(key))


def _decode_input(key: str, raw: bytes) -> np.ndarray:
    m = len(_INPUT_MAGIC)
    if raw[:m] != _INPUT_MAGIC or len(raw) < m + _HDR.size:
        raise ValueError(f"input {key!r}: not a serif input record")
    (hlen,) = _HDR.unpack_from(raw, m)
    start = m + _HDR.size
    try:
        header = json.loads(raw[start : start + hlen])
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(s) for s in header["shape"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"input {key!r}: bad header ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"input {key!r}: object dtype refused")
    offset = start + hlen
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"input {key!r}: {len(raw) - offset} payload bytes, header says "
                         f"{expected}")
    return np.frombuffer(raw, dtype=dtype, count=expected // max(dtype.itemsize, 1),
                         offset=offset).reshape(shape)


# ---------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------
def _is_safetensors(data: bytes | memoryview) -> bool:
    if len(data) < 10:
        return False
    (n,) = struct.unpack_from("<Q", data, 0)
    return 2 <= n <= len(data) - 8 and bytes(data[8:9]) == b"{"


def torch_state_dict_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from safetensors bytes or a ``torch.save`` file, never unpickled.

    torch is imported here, not at module level: profile-mode workers never pay for it.
    """
    if _is_safetensors(data):
        from safetensors.torch import load

        return load(bytes(data))
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"expected a state_dict, got {type(state).__name__}")
    return state
