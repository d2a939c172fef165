"""A results sink: every request record appended to a Redis stream, for live consumers.

``XADD key MAXLEN ~ maxlen`` per record, one pipeline per recorded chunk, from a background
thread fed through a bounded queue: the driver's event loop only enqueues. With a maximum
age, each pipeline also trims entries older than it (``XTRIM MINID``: stream ids are
milliseconds) and sets the key to expire that long after its last write, so a stream left
behind by a stopped run goes away too. The stream is a
side channel: when Redis fails or falls behind, the sink logs one warning and drops stream
entries, never a record of the run (the JSONL file and the summary have them all).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from serif_dask.records import COLUMNS

logger = logging.getLogger("serif_dask.sink")

#: Chunks waiting for the writer thread; a full queue drops stream entries, not records.
QUEUE_CHUNKS = 4096


def stream_fields(record: dict[str, Any]) -> dict[str, str]:
    """One record as stream fields: the JSONL columns as strings, absent when None.

    Only the known columns go out, so nothing else a record may carry (inputs, estimates)
    reaches the stream.
    """
    return {k: str(record[k]) for k in COLUMNS if record.get(k) is not None}


class StreamSink:
    """Appends records to one Redis stream from its own thread; ``put`` never blocks."""

    def __init__(
        self, connect: Callable[[], Any], key: str, maxlen: int, *,
        max_age_s: float | None = None, queue_chunks: int = QUEUE_CHUNKS,
    ) -> None:
        self.key = key
        self.maxlen = int(maxlen)
        self.max_age_s = max_age_s
        self.written = 0
        self.dropped = 0
        self._connect = connect
        self._redis: Any = None
        self._queue: queue.Queue[list[dict[str, str]] | None] = queue.Queue(queue_chunks)
        self._warned = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="serif-sink", daemon=True)
        self._thread.start()

    def put(self, records: Iterable[dict[str, Any]]) -> None:
        """Queue one chunk of records for the stream (drops it, with a warning, when full)."""
        batch = [stream_fields(r) for r in records]
        if not batch:
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self._fail(len(batch), "the results stream fell behind; dropping entries")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._fail(self._queue.qsize(), "the results stream did not drain in time")
        if not self._thread.is_alive():
            self._drop_connection()
        if self.dropped:
            logger.info("serif: results stream %s: %d entries written, %d dropped",
                        self.key, self.written, self.dropped)

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                if self._redis is None:
                    self._redis = self._connect()
                pipe = self._redis.pipeline(transaction=False)
                for fields in batch:
                    pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
                if self.max_age_s is not None:
                    oldest_ms = int((time.time() - self.max_age_s) * 1000)
                    pipe.xtrim(self.key, minid=f"{max(oldest_ms, 0)}-0", approximate=False)
                    pipe.expire(self.key, max(1, int(self.max_age_s + 0.5)))
                pipe.execute()
                self.written += len(batch)
            except Exception as exc:
                self._drop_connection()  # reconnect on the next chunk: Redis may come back
                self._fail(len(batch), f"writing to the results stream failed: {exc}")

    def _drop_connection(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            try:
                redis.close()
            except Exception:
                logger.debug("serif: closing the results stream's Redis failed", exc_info=True)

    def _fail(self, n: int, message: str) -> None:
        with self._lock:
            self.dropped += n
            warn, self._warned = not self._warned, True
        if warn:
            logger.warning("serif: %s (%s; the run's records are unaffected)", message, self.key)
