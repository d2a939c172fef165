"""Plan rounds: the ticks due together are planned in one ``serif_plan`` call, in order.

Rounds plan one after another in the order they fell due (:class:`PlanOrder`), whatever
order their reads finish in, so the scheduler plugin's bookings, and therefore every
decision, depend only on config and seed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

#: Applications whose ticks fall due within this many seconds of each other are planned
#: together, in one problem.
JOINT_WINDOW_S = 0.01
#: Planning assumes a tick's plan happens this long after its samples are taken (read and
#: peek); a constant, so that decisions stay a pure function of config and seed.
PIPELINE_S = 0.1

#: Plans every part of a round in one call: (parts, now) -> one reply per part.
PlanCall = Callable[[list[dict[str, Any]], float], Awaitable[list[dict[str, Any]]]]


class PlanOrder:
    """Turns in the order rounds fell due; a round that plans nothing still passes its turn."""

    def __init__(self) -> None:
        self._next = 0
        self._turn = 0
        self._changed = asyncio.Condition()
        self._skipped: set[int] = set()

    def take(self) -> int:
        seq, self._next = self._next, self._next + 1
        return seq

    async def wait(self, seq: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._turn >= seq)

    async def passed(self, seq: int) -> None:
        async with self._changed:
            if self._turn == seq:
                self._turn = seq + 1
                self._changed.notify_all()
            elif self._turn < seq:  # an earlier round still holds its turn: queue ours
                self._skipped.add(seq)
            while self._turn in self._skipped:
                self._skipped.discard(self._turn)
                self._turn += 1
                self._changed.notify_all()


class PlanRound:
    """The ticks due together: their requests are planned in one call.

    Each member tick brings its part (:meth:`plan`) or leaves without one (:meth:`withdraw`:
    nothing left to plan, or it failed); once every member has done either, one call plans
    all parts, in the round's turn of the :class:`PlanOrder`, and each member gets its own
    reply.
    """

    def __init__(self, order: PlanOrder, call: PlanCall, members: int) -> None:
        self.order = order
        self.seq = order.take()
        self.call = call
        self.members = members
        self.parts: dict[int, dict[str, Any]] = {}
        self.now: dict[int, float] = {}
        self.left: set[int] = set()
        self.replies: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None
        self._resumed: dict[int, asyncio.Event] = {}
        self._task: asyncio.Task | None = None

    async def plan(self, member: int, part: dict[str, Any], now: float) -> dict[str, Any]:
        self.parts[member], self.now[member] = part, now
        resumed = self._resumed.setdefault(member, asyncio.Event())
        self._maybe_start()
        await resumed.wait()
        if self.error is not None:
            raise self.error
        return self.replies[member]

    def withdraw(self, member: int) -> None:
        if member in self.parts or member in self.left:
            return
        self.left.add(member)
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self._task is None and len(self.parts) + len(self.left) >= self.members:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self.order.wait(self.seq)
            members = sorted(self.parts)
            if members:
                replies = await self.call([self.parts[m] for m in members],
                                          max(self.now.values()))
                self.replies = dict(zip(members, replies, strict=True))
        except BaseException as exc:  # every member sees it; the round itself ends here
            self.error = exc
        finally:
            await self.order.passed(self.seq)
            # Members resume (and submit their score tasks, before they next await) in
            # order of their batches' priority: a worker starts the first task it gets,
            # so the earliest deadline's batches must reach it first, as planned.
            for member in sorted(self._resumed, key=lambda m: (
                    -top_priority(self.replies.get(m)), m)):
                self._resumed[member].set()


def top_priority(reply: dict[str, Any] | None) -> float:
    """The highest priority of a plan reply's batches (-inf without any)."""
    batches = (reply or {}).get("batches") or ()
    return max((float(b["priority"]) for b in batches), default=-math.inf)
