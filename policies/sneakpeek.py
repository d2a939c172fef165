"""``sneakpeek``: spend worker time where the class estimate says it buys the most utility.

With a price ``λ`` on a second of cluster time, each request takes the model maximising
``eu[r, m] - λ·c[m]`` (``c[m]``: seconds of pooled cluster time per request of m), or waits
when no model beats a drop. A fluid model of the cluster (requests finish, in EDF order, as
the pooled work before them drains) prices every ``λ`` of a small grid at once, as one
``(λ, request, model)`` array, and the grid point of highest total expected realised
utility wins. The chosen models are then list-scheduled with real batches (one context
switch per (worker, model), warm models free, input locality counted), earliest deadline
first and most valuable first within a deadline; requests that miss out are served last
if they can still earn more than ``miss_utility``, and dropped otherwise.

Because ``problem.eu`` carries the SneakPeek estimate, requests that look uncertain or
positive are the ones whose accurate-model gain pays for its time.
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import Plan, PlanProblem
from serif_dask.policies._common import Planner, cohorts_by_key, servable
from serif_dask.utility import timeliness

__all__ = ["SneakPeekPolicy", "sneakpeek"]


class SneakPeekPolicy:
    """Greedy utility-per-second planner; ``grid`` is the number of prices tried."""

    def __init__(self, grid: int = 16) -> None:
        self.grid = grid

    def choose_models(self, problem: PlanProblem, planner: Planner, order: np.ndarray):
        """Price the options of the requests in ``order``: (model per request, served mask)."""
        ok = servable(problem)[order]
        eu = np.where(ok, planner.eu[order], -np.inf)
        gain = eu - planner.miss[order, None]
        rate = np.where(planner.feasible, 1.0 / planner.infer, 0.0).sum(axis=1)
        with np.errstate(divide="ignore"):
            cost = np.where(rate > 0, 1.0 / rate, np.inf)  # (M,) pooled seconds/request
        useful = np.isfinite(gain) & (gain > 0)
        ratios = (gain / cost[None, :])[useful]
        lam = np.zeros(1)
        if ratios.size:
            lam = np.concatenate([lam, np.quantile(ratios, np.linspace(0, 1, self.grid - 1))])
        score = np.where(useful[None], gain[None] - lam[:, None, None] * cost[None, None, :], 0)
        score = np.where(useful[None], score, -np.inf)
        choice = score.argmax(axis=2)  # (G, n)
        served = np.take_along_axis(score, choice[..., None], axis=2)[..., 0] > 0
        # Fluid estimate of each price's outcome; a model cold everywhere pays one switch,
        # spread over the workers.
        n_workers = max(planner.infer.shape[1], 1)
        sw = np.where(planner.feasible, np.where(planner.tl.warm, 0.0, planner.switch), np.inf)
        first_switch = np.where(np.isfinite(sw).any(axis=1), sw.min(axis=1, initial=np.inf), 0)
        used = np.zeros((lam.size, planner.infer.shape[0]), dtype=bool)
        g_idx = np.broadcast_to(np.arange(lam.size)[:, None], choice.shape)
        used[g_idx[served], choice[served]] = True
        start = problem.now + planner.tl.load.mean() + used @ first_switch / n_workers
        work = np.where(served, cost[choice], 0.0)
        finish = start[:, None] + np.cumsum(work, axis=1)
        eu_choice = np.take_along_axis(
            np.broadcast_to(eu, (lam.size, *eu.shape)), choice[..., None], 2
        )[..., 0]
        f = timeliness(finish - planner.arrival[order][None], planner.sla[order][None])
        total = np.where(served, f * eu_choice, planner.miss[order][None]).sum(axis=1)
        best = int(total.argmax())
        return choice[best], served[best], float(lam[best])

    def __call__(self, problem: PlanProblem) -> Plan:
        planner = Planner(problem, cache_aware=True)
        ok = servable(problem)
        r = problem.n_requests
        order = np.lexsort((np.arange(r), problem.group, planner.deadline))
        order = order[ok.any(axis=1)[order]]
        if order.size == 0:
            return planner.plan(-planner.deadline)
        choice, served, price = self.choose_models(problem, planner, order)
        pref = np.where(ok & (planner.eu > planner.miss[:, None]), planner.eu, -np.inf)
        chosen = order[served]
        # The chosen model first (a finite bonus beyond any utility), the others by eu.
        pref[chosen, choice[served]] += 1e3
        value = np.zeros(r)
        value[chosen] = planner.eu[chosen, choice[served]]
        # Earliest deadline first, the most valuable first within a deadline.
        chosen = chosen[np.lexsort((-value[chosen], planner.deadline[chosen]))]
        left = [
            planner.by_preference(c, pref, meet_deadline=True)
            for c in cohorts_by_key(chosen, planner.deadline)
        ]
        left.append(order[~served])
        planner.best_effort(np.concatenate(left), price=price)
        return planner.plan(-planner.deadline)


sneakpeek = SneakPeekPolicy()
