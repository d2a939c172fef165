"""The scheduler's workers as a driver sees them, pushed rather than polled.

The scheduler plugin publishes every worker that joins, changes (its shared-memory node)
or leaves on the Dask event topic :data:`serif_dask.scheduler.WORKERS_TOPIC`; a client
subscribes once (``Client.subscribe_topic``) and keeps the set current. A tick then reads
it without a round trip, and a tick waiting on a worker wakes the moment it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from typing import Any

from distributed import Client

from serif_dask.scheduler import WORKERS_TOPIC

logger = logging.getLogger("serif_dask.membership")

_FIELDS = ("address", "name", "role", "node", "host_node")
#: How long to wait for the first echo of a ping, and for all of them.
PING_WAIT_S = 0.2
PING_LIMIT_S = 10.0


class Membership:
    """Live workers by address: ``{address, name, role, node, host_node}`` each."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.workers: dict[str, dict[str, Any]] = {}
        self._waiters: list[asyncio.Future] = []
        self._started: asyncio.Future | None = None
        self._during_start: list[dict[str, Any]] | None = None
        self._token: str | None = None
        self._pinged: asyncio.Future | None = None

    @property
    def alive(self) -> set[str]:
        return set(self.workers)

    async def start(self) -> None:
        """Subscribe, then take one snapshot; events seen meanwhile are applied after it."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        self._during_start = []
        self.client.subscribe_topic(WORKERS_TOPIC, self._on_event)
        try:
            # The subscription goes on the client's batched stream, which a handler call
            # may overtake: ping until our own echo comes back, then take the snapshot, so
            # that no change falls between the two.
            token = uuid.uuid4().hex
            self._pinged = asyncio.get_running_loop().create_future()
            self._token = token
            deadline = time.monotonic() + PING_LIMIT_S
            while not self._pinged.done() and time.monotonic() < deadline:
                await self.client.scheduler.serif_workers_ping(token=token)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._pinged), PING_WAIT_S)
            if not self._pinged.done():
                logger.warning("serif: worker events did not arrive in %.0f s; the view of "
                               "the workers may lag", PING_LIMIT_S)
            state = await self.client.scheduler.serif_state()
            self.workers = {w["address"]: {k: w[k] for k in _FIELDS}
                            for w in state["workers"]}
            for msg in self._during_start:  # in order: a leave after the snapshot holds
                self._apply(msg)
        finally:
            self._during_start = None

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        try:
            _, msg = event
            if self._during_start is not None:
                self._during_start.append(msg)
            self._apply(msg)
        except Exception:  # a malformed event must not take the client's handler down
            logger.exception("serif: bad worker event %r", event)

    def _apply(self, msg: dict[str, Any]) -> None:
        if msg.get("action") == "ping":
            if msg.get("token") == self._token and not self._pinged.done():
                self._pinged.set_result(None)
            return
        if msg.get("action") == "remove":
            self.workers.pop(msg["worker"], None)
        else:
            self.workers[msg["worker"]] = {
                "address": msg["worker"], **{k: msg.get(k) for k in _FIELDS[1:]}}
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def changed(self) -> asyncio.Future:
        """A future that resolves at the next join, change or leave; cancel it when no
        longer wanted (cancelled ones are dropped here, so they never pile up)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters = [w for w in self._waiters if not w.done()]
        self._waiters.append(waiter)
        return waiter


#: One per client: a topic has one handler per client, and drivers sharing a client share it.
_BY_CLIENT: weakref.WeakKeyDictionary[Client, Membership] = weakref.WeakKeyDictionary()


async def membership(client: Client) -> Membership:
    """The started :class:`Membership` of ``client``."""
    found = _BY_CLIENT.get(client)
    if found is None:
        found = _BY_CLIENT[client] = Membership(client)
    await found.start()
    return found
