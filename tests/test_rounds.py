"""Plan rounds: one call for the ticks due together, and their submissions in priority order.

A worker starts the first score task it receives, so the member ticks of a round must
submit in the order the plan ran them: the earliest deadline (highest priority) first.
Members submit between being resumed and their next await, so the order they resume in
is the order their tasks reach the workers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serif_dask.rounds import PlanOrder, PlanRound, top_priority


def _reply(*priorities: float) -> dict[str, Any]:
    return {"batches": [{"priority": p} for p in priorities]}


async def _members(replies: list[dict[str, Any]], arrive: list[int],
                   fail: bool = False) -> tuple[list[int], list[Any]]:
    calls: list[int] = []

    async def call(parts: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        calls.append(len(parts))
        if fail:
            raise RuntimeError("scheduler gone")
        return [replies[part["member"]] for part in parts]

    plan_round = PlanRound(PlanOrder(), call, len(replies))
    resumed: list[int] = []

    async def member(m: int) -> Any:
        await asyncio.sleep(0.01 * arrive.index(m))  # reads finish in this order
        try:
            reply = await plan_round.plan(m, {"member": m}, now=1.0)
        except RuntimeError as exc:
            resumed.append(m)
            return exc
        resumed.append(m)  # what a tick submits now reaches the workers in this order
        return reply

    results = await asyncio.gather(*(member(m) for m in range(len(replies))))
    assert calls == [len(replies)]  # one call for the whole round
    return resumed, results


@pytest.mark.parametrize("arrive", [[0, 1, 2], [2, 1, 0], [1, 2, 0]])
def test_members_resume_by_their_batches_top_priority(arrive: list[int]) -> None:
    # member 0: a later deadline (-1000); member 1: the earliest (-500); member 2: nothing
    replies = [_reply(-1000.0, -1000.0), _reply(-500.0, -700.0), {"batches": []}]
    resumed, results = asyncio.run(_members(replies, arrive))
    assert resumed == [1, 0, 2]  # whatever order their reads finished in
    assert results == replies


def test_equal_priorities_resume_in_member_order() -> None:
    replies = [_reply(-1.0), _reply(-1.0), _reply(-1.0)]
    resumed, _ = asyncio.run(_members(replies, [2, 0, 1]))
    assert resumed == [0, 1, 2]


def test_a_failed_call_resumes_every_member_with_the_error() -> None:
    resumed, results = asyncio.run(_members([_reply(-1.0), _reply(-2.0)], [0, 1], fail=True))
    assert sorted(resumed) == [0, 1]
    assert all(isinstance(r, RuntimeError) for r in results)


def test_top_priority() -> None:
    assert top_priority(_reply(-3.0, -1.5)) == -1.5
    assert top_priority({"batches": []}) == float("-inf")
    assert top_priority(None) == float("-inf")
