"""Waiting on a run's futures: bounded, woken by worker changes, never raising for a task.

The driver's steps wait on many futures at once and must notice a dead worker at once
(a task pinned to it would wait in ``no-worker`` for ever): :func:`wait_or_change` also
returns when the scheduler plugin pushes a worker change (:mod:`serif_dask.membership`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed import Client, Future

from serif_dask.membership import membership


async def live_workers(client: Client) -> list[dict[str, Any]]:
    """Live workers, kept current by the plugin's pushed events (no round trip)."""
    return list((await membership(client)).workers.values())


async def wait_or_change(client: Client, waiting: Any, timeout: float) -> set:
    """``asyncio.wait`` for the first of ``waiting``, the timeout, or a worker change."""
    change = (await membership(client)).changed()
    try:
        done, _ = await asyncio.wait([*waiting, change], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        change.cancel()
    done.discard(change)
    return done


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


async def settled(fut: Future) -> str | None:
    """Wait for a task to end without fetching its result: None, or why it erred."""
    exc = await fut.exception(asynchronous=True)
    if fut.status == "cancelled":  # by the client itself: it lost the scheduler
        raise asyncio.CancelledError(f"{fut.key} cancelled")
    return None if exc is None else _reason(exc)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a shielded gather nobody awaits any more is no error


async def gathered(client: Client, futures: list[Future], errors: str = "raise") -> list:
    """``client.gather``, safe to cancel or time out.

    Dask's client batches concurrent gathers into one shared request, awaited by every
    caller. Cancelling one caller (a tick's timeout, ``asyncio.wait_for``) cancels that
    shared request for all of them, and when it had not started yet (five gathers already
    running) the client keeps it: every later gather attaches to the cancelled request and
    fails ``CancelledError``. At 8× the hospital ward's rate that turned a run from all
    completed to all failed ``stopped`` within a minute of its first late peek, for
    good. Shielded, a cancelled caller only stops waiting; the request runs to its end.
    """
    task = asyncio.ensure_future(client.gather(futures, errors=errors, asynchronous=True))
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


async def outcome(fut: Future) -> tuple[Any, str | None]:
    """A task's (result, None), or (None, why it erred); safe to cancel (:func:`gathered`)."""
    try:
        error = await settled(fut)
        if error is not None:
            return None, error
        return (await gathered(fut.client, [fut]))[0], None
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return None, _reason(exc)
