"""``sneakpeek``: spend worker time where the class estimate says it buys the most utility.

Choosing a model per request under the cluster's time is a multiple-choice knapsack. Each
request's options (drop, or one of its models at the pooled cluster seconds it costs) are
walked along their upper convex hull, giving upgrades of falling utility per second; all
upgrades of all requests are then taken best ratio first while a fluid model of the
cluster (pooled work draining from each worker's backlog, one context switch per model
that is cold everywhere) still finishes every deadline cohort in time. That is the LP
optimum of the knapsack, found in one sort. The chosen models are then list-scheduled with
real batches (one context switch per (worker, model), warm models free, input locality
counted), earliest deadline first and most valuable first within a deadline; requests
that miss out are served last if they can still earn more than ``miss_utility``, and
dropped otherwise.

Because ``problem.eu`` carries the SneakPeek estimate, requests that look uncertain or
positive are the ones whose accurate-model gain pays for its time.
"""

from __future__ import annotations

import numpy as np

from serif_dask.policies import Plan, PlanProblem
from serif_dask.policies._common import (
    MAX_COHORTS,
    MIN_GAIN,
    Planner,
    cohorts_by_key,
    servable,
    stable_argsort,
)

__all__ = ["SneakPeekPolicy", "sneakpeek"]


class SneakPeekPolicy:
    """Knapsack-by-marginal-value model choice, then batched list scheduling."""

    def choose_models(self, problem: PlanProblem, planner: Planner, order: np.ndarray):
        """Pick each request's model (multiple-choice knapsack, greedy by marginal value).

        Every request starts dropped; its upgrades (drop → cheapest useful model → better
        ones) follow the upper convex hull of its (pooled cost, gain) options, so their
        utility per second only falls. All upgrades of all requests are taken in order of
        that ratio while the fluid cluster still finishes each deadline cohort in time:
        the LP-optimal mix, which is what lets a known-uncertain request outbid a
        confidently negative one. Returns (model per request, served mask, price), where
        the price is the utility per pooled second of the best upgrade that did not fit:
        what more cluster time would have been worth (0 when it was not scarce).
        """
        n = order.size
        cost = planner.pooled_cost()
        r, m, d_cost, slope, k = self._hull_upgrades(problem, planner, order, cost)
        choice = np.full(n, -1)
        if r.size == 0:
            return choice, choice >= 0, 0.0
        # Best ratio first; equal ratios (identical requests, as without SneakPeek) in an
        # order drawn from the tick's seeded generator, so no group is always favoured,
        # and a request's own upgrades in hull order. (tie, k) is unique per upgrade, so
        # ordering by it with a scatter, then a stable sort by ratio, is one lexsort.
        tie = problem.rng.permutation(n)[r]
        n_steps = int(k.max()) + 1
        slot = np.full(n * n_steps, -1)
        slot[tie * n_steps + k] = np.arange(r.size)
        by_tie = slot[slot >= 0]
        by_value = by_tie[stable_argsort(-slope[by_tie])]
        r, m, d_cost, slope, k = (x[by_value] for x in (r, m, d_cost, slope, k))
        # Fluid capacity: the pooled seconds every worker has left before each deadline.
        n_workers = max(planner.infer.shape[1], 1)
        # Deadline cohorts: at most MAX_COHORTS, each held to its earliest deadline.
        cohorts, cohort = np.unique(planner.deadline[order], return_inverse=True)
        if cohorts.size > MAX_COHORTS:
            bucket = np.arange(cohorts.size) * MAX_COHORTS // cohorts.size
            first_of = np.searchsorted(bucket, np.arange(MAX_COHORTS))
            cohorts, cohort = cohorts[first_of], bucket[cohort]
        horizon = np.clip(cohorts[:, None] - problem.now - planner.tl.load[None, :], 0, None)
        budget = horizon.sum(axis=1) / n_workers  # (K,)
        # A model cold on every worker costs one switch when first used.
        sw = np.where(planner.feasible, np.where(planner.tl.warm, 0.0, planner.switch), np.inf)
        first_switch = np.where(np.isfinite(sw).any(axis=1), sw.min(axis=1, initial=np.inf), 0)
        keep = np.ones(r.size, dtype=bool)
        for _ in range(cohorts.size):
            idx = np.flatnonzero(keep)
            spend = d_cost[idx].copy()
            m_idx = m[idx]  # each model's first upgrade pays its switch
            first = np.asarray([int(np.argmax(m_idx == j)) for j in
                                np.flatnonzero(np.bincount(m_idx))], dtype=np.int64)
            spend[first] += first_switch[m_idx[first]] / n_workers
            c = cohort[r[idx]]
            # used[k, i]: pooled seconds spent on cohorts <= k by the first i + 1 upgrades.
            used = np.cumsum(np.where(c[None, :] <= np.arange(cohorts.size)[:, None], spend, 0),
                             axis=1)
            over = used > budget[:, None] + 1e-12
            if not over.any():
                break
            cut = int(over.any(axis=0).argmax())  # first upgrade that breaks a deadline
            binding = over[:, cut]
            # Upgrades from the cut on for cohorts at or before a binding one cannot fit.
            drop = np.zeros(idx.size, dtype=bool)
            drop[cut:] = c[cut:] <= np.flatnonzero(binding).max()
            keep[idx[drop]] = False
        taken = np.flatnonzero(keep)
        # A request's upgrades are taken in hull order; the last one taken is its model.
        last = taken[np.lexsort((k[taken], r[taken]))]
        is_last = np.append(r[last][1:] != r[last][:-1], True) if last.size else last
        choice[r[last[is_last]]] = m[last[is_last]]
        # The price of cluster time: the best upgrade that did not fit (0 when all did).
        rejected = np.flatnonzero(~keep)
        price = float(slope[rejected[0]]) if rejected.size else 0.0
        return choice, choice >= 0, price

    @staticmethod
    def _hull_upgrades(problem: PlanProblem, planner: Planner, order: np.ndarray,
                       cost: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every request's upgrades along the upper convex hull of its (cost, gain) options.

        Returns (row in ``order``, model, added cost, gain per second, step) per upgrade.
        Requests are walked per application over the models they can use, and only those
        still climbing take part in the next step, so the work follows the options that
        exist rather than requests × all models.
        """
        ok = servable(problem)[order]
        eu = planner.eu[order]
        miss = planner.miss[order]
        apps = np.asarray(problem.app)[order]
        steps: list[tuple[np.ndarray, ...]] = []
        for a in np.unique(apps):
            rows = np.flatnonzero(apps == a)
            cols = np.flatnonzero(ok[rows].any(axis=0) & np.isfinite(cost))
            if cols.size == 0:
                continue
            gain = np.where(ok[np.ix_(rows, cols)], eu[np.ix_(rows, cols)], -np.inf)
            gain -= miss[rows, None]
            c = cost[cols]
            useful = np.isfinite(gain) & (gain > MIN_GAIN)
            cur_cost, cur_gain = np.zeros(rows.size), np.zeros(rows.size)
            active = np.arange(rows.size)
            for k in range(cols.size):
                d_cost = c[None, :] - cur_cost[active, None]
                d_gain = gain[active] - cur_gain[active, None]
                cand = useful[active] & (d_cost > 0) & (d_gain > 0)
                slope = np.where(cand, d_gain / np.where(cand, d_cost, 1.0), -np.inf)
                best = slope.argmax(axis=1)
                top = slope[np.arange(active.size), best]
                moves = np.isfinite(top)
                if not moves.any():
                    break
                up, to = active[moves], best[moves]
                steps.append((rows[up], cols[to], d_cost[moves, to], top[moves],
                              np.full(up.size, k)))
                cur_cost[up], cur_gain[up] = c[to], gain[up, to]
                active = up
        if not steps:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0), np.zeros(0), empty
        return tuple(np.concatenate(x) for x in zip(*steps, strict=True))

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
