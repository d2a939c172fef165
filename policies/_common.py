"""Shared, vectorised machinery for the built-in policies.

The cost model every built-in plans with (``Timeline``): each worker runs its batches one
after another (one GPU), a (worker, model) batch is one score task that pays the model's
context switch once (nothing when the model is warm and the policy is cache-aware), and the
request in position ``k`` of a batch that starts at ``s`` finishes at
``s + k * infer + retrieval`` (inputs are fetched while earlier work runs, so retrieval
delays the request but does not occupy the GPU). A batch can only grow while it is the last
one on its worker: a request joining an earlier batch would overtake work already promised
a finish time, and one (worker, model) pair is one task, so it cannot be split either.

The central operation is :func:`fill`: give ``n`` requests (in the policy's order) to one
model per worker by merging the workers' arithmetic sequences of slot finish times, which is
exactly list scheduling ("earliest finish first") for those requests, in one sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serif_dask.policies import DROP, Plan, PlanProblem
from serif_dask.utility import timeliness

#: At most this many cohorts are planned one after another; more distinct deadlines are
#: merged into this many consecutive chunks of the EDF order.
MAX_COHORTS = 8
#: Serving a request must be expected to earn at least this much more than dropping it; a
#: sliver of utility is not worth a GPU slot (and chasing slivers costs planning rounds).
MIN_GAIN = 1e-3
#: Rounds of the "best realised utility" fallback before the rest is dropped.
MAX_FALLBACK_ROUNDS = 100000


def deadlines(problem: PlanProblem) -> np.ndarray:
    return np.asarray(problem.arrival, dtype=float) + np.asarray(problem.sla, dtype=float)


def stable_argsort(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values, kind="stable")``, five times faster on this kind of input.

    numpy's default sort is vectorised but not stable; sorting by (value, position) as one
    unique integer key afterwards restores the stable order among equal values, and is
    skipped when no two values are equal (continuous SneakPeek estimates).
    """
    order = np.argsort(values)
    ranked = values[order]
    ties = ranked[1:] == ranked[:-1]
    if ties.any():
        run = np.concatenate(([0], np.cumsum(~ties)))
        order = order[np.argsort(run * order.size + order)]
    return order


def servable(problem: PlanProblem) -> np.ndarray:
    """bool (R, M): model m belongs to r's application and runs on at least one worker."""
    return np.isfinite(problem.eu) & problem.feasible.any(axis=1)[None, :]


def edf_order(problem: PlanProblem) -> np.ndarray:
    """Request indices, earliest deadline first, ties by group then index (deterministic)."""
    return np.lexsort((np.arange(problem.n_requests), problem.group, deadlines(problem)))


def cohorts_by_key(order: np.ndarray, key: np.ndarray, max_cohorts: int = MAX_COHORTS):
    """Split ``order`` into runs of equal ``key`` (sorted along ``order``), at most
    ``max_cohorts`` of them."""
    if order.size == 0:
        return []
    k = key[order]
    cuts = np.flatnonzero(k[1:] != k[:-1]) + 1
    if cuts.size + 1 > max_cohorts:
        # Too many distinct keys: chunk into equal-sized consecutive pieces instead.
        cuts = np.linspace(0, order.size, max_cohorts + 1).astype(int)[1:-1]
    return [c for c in np.split(order, cuts) if c.size]


@dataclass
class Timeline:
    """Where each worker stands while a plan is being built (seconds after ``now``)."""

    load: np.ndarray  # float (W,): when the worker's queue, incl. this plan, drains
    tail: np.ndarray  # int (W,): model of the worker's last batch in this plan, -1 if none
    has: np.ndarray  # bool (M, W): this plan already has a (m, w) batch
    warm: np.ndarray  # bool (M, W): loaded (only consulted by cache-aware policies)

    @classmethod
    def start(cls, problem: PlanProblem) -> Timeline:
        m, w = problem.infer.shape
        return cls(
            load=np.asarray(problem.backlog, dtype=float).copy(),
            tail=np.full(w, -1),
            has=np.zeros((m, w), dtype=bool),
            warm=np.asarray(problem.warm, dtype=bool).T.copy(),
        )


class Planner:
    """Greedy planner over a :class:`Timeline`; policies differ in order and preferences.

    ``cache_aware`` policies know warm models (no switch) and input locality (retrieval);
    the others plan as SERIF's originals did, paying a switch for every new batch and
    ignoring where inputs lie.
    """

    def __init__(self, problem: PlanProblem, *, cache_aware: bool) -> None:
        self.p = problem
        self.cache_aware = cache_aware
        self.feasible = problem.feasible
        self.infer = np.where(self.feasible, problem.infer, np.inf)
        self.switch = np.where(self.feasible, np.asarray(problem.switch, dtype=float), 0.0)
        self.deadline = deadlines(problem)
        self.sla = np.asarray(problem.sla, dtype=float)
        self.arrival = np.asarray(problem.arrival, dtype=float)
        self.eu = np.asarray(problem.eu, dtype=float)
        # What a request earns unserved: a drop, or an answer from its SneakPeek estimate.
        self.miss = problem.drop_utility
        self.source = np.asarray(problem.source)
        self.fetch = np.asarray(problem.fetch, dtype=float)
        self.tl = Timeline.start(problem)
        r = problem.n_requests
        self.model = np.full(r, DROP)
        self.worker = np.full(r, DROP)
        self.finish = np.full(r, np.nan)

    # -- cost model ---------------------------------------------------------------------
    def open_mask(self) -> np.ndarray:
        """bool (M, W): (m, w) may take more requests now (tail batch, or a new batch)."""
        tl = self.tl
        m_idx = np.arange(self.infer.shape[0])[:, None]
        return self.feasible & ((tl.tail[None, :] == m_idx) | ~tl.has)

    def base(self) -> np.ndarray:
        """float (M, W): seconds after ``now`` when a new request's batch slot sequence starts."""
        tl = self.tl
        m_idx = np.arange(self.infer.shape[0])[:, None]
        switch = self.switch
        if self.cache_aware:
            switch = np.where(tl.warm, 0.0, switch)
        return tl.load[None, :] + np.where(tl.tail[None, :] == m_idx, 0.0, switch)

    def retr(self, idx: np.ndarray, m: np.ndarray, w: np.ndarray) -> np.ndarray:
        if not self.cache_aware:
            return np.zeros(idx.shape)
        return self.fetch[self.source[idx], m, w]

    def pooled_cost(self) -> np.ndarray:
        """float (M,): seconds of the whole cluster one request of each model takes, with
        every worker that runs it working in parallel (inf where none does)."""
        rate = np.where(self.feasible, 1.0 / self.infer, 0.0).sum(axis=1)
        return np.divide(1.0, rate, out=np.full(rate.shape, np.inf), where=rate > 0)

    # -- the core operation ---------------------------------------------------------------
    def fill(self, idx: np.ndarray, model_of_worker: np.ndarray):
        """List-schedule ``idx`` (in order) on workers running ``model_of_worker`` (-1: none).

        Returns (model, worker, finish) per request; the i-th request gets the i-th
        earliest slot over all workers. Nothing is committed.
        """
        n = idx.size
        open_ = self.open_mask()
        w_all = np.arange(model_of_worker.size)
        ok = model_of_worker >= 0
        ok[ok] = open_[model_of_worker[ok], w_all[ok]]
        ws = np.flatnonzero(ok)
        if n == 0 or ws.size == 0:
            return None
        ms = model_of_worker[ws]
        base = self.base()[ms, ws]
        step = self.infer[ms, ws]
        slots = base[:, None] + step[:, None] * np.arange(1, n + 1)[None, :]
        flat = slots.ravel()
        if flat.size > 4 * n:
            part = np.argpartition(flat, n - 1)[:n]
            pick = part[np.argsort(flat[part], kind="stable")]
        else:
            pick = np.argsort(flat, kind="stable")[:n]
        w = ws[pick // n]
        m = model_of_worker[w]
        finish = self.p.now + flat[pick] + self.retr(idx, m, w)
        return m, w, finish

    def commit(self, idx: np.ndarray, m: np.ndarray, w: np.ndarray, finish: np.ndarray) -> None:
        tl = self.tl
        counts = np.bincount(w, minlength=tl.load.size)
        used = np.flatnonzero(counts)
        mw = np.zeros(tl.load.size, dtype=int)
        mw[w] = m
        base = self.base()[mw[used], used]
        tl.load[used] = base + counts[used] * self.infer[mw[used], used]
        tl.tail[used] = mw[used]
        tl.has[mw[used], used] = True
        tl.warm[mw[used], used] = True
        self.model[idx], self.worker[idx], self.finish[idx] = m, w, finish

    def place(self, idx: np.ndarray, model_of_worker: np.ndarray, accept) -> np.ndarray:
        """Fill, keep the requests ``accept(idx, m, w, finish)`` approves, commit them.

        Rejected requests leave; the rest are re-packed (they only move earlier in the
        workers' sequences) and re-checked until all approve. Returns the placed mask.
        """
        keep = np.ones(idx.size, dtype=bool)
        while keep.any():
            sub = idx[keep]
            got = self.fill(sub, model_of_worker)
            if got is None:
                keep[:] = False
                break
            m, w, finish = got
            ok = accept(sub, m, w, finish)
            if ok.all():
                self.commit(sub, m, w, finish)
                break
            keep[np.flatnonzero(keep)[~ok]] = False
        return keep

    def value(self, idx: np.ndarray, m: np.ndarray, finish: np.ndarray) -> np.ndarray:
        """Expected realised utility of serving ``idx`` with ``m`` finishing at ``finish``."""
        f = timeliness(finish - self.arrival[idx], self.sla[idx])
        return f * self.eu[idx, m]

    # -- strategies ---------------------------------------------------------------------
    def model_worker_rows(self, m: int) -> np.ndarray:
        row = np.full(self.infer.shape[1], -1)
        row[self.feasible[m]] = m
        return row

    def by_preference(self, idx: np.ndarray, pref: np.ndarray, *, meet_deadline: bool):
        """Give each request its most preferred model that can take it, best rank first.

        ``pref`` (R, M) ranks models per request (-inf: never). With ``meet_deadline`` a
        request is only placed where it finishes by its deadline; otherwise always.
        Returns the indices still unplaced, in their original order.
        """
        pending = idx
        if pending.size == 0:
            return pending
        ranked = np.argsort(-pref[pending], axis=1, kind="stable")
        n_ranks = int(np.isfinite(pref[pending]).sum(axis=1).max(initial=0))
        row_of = np.empty(self.p.n_requests, dtype=np.int64)
        row_of[pending] = np.arange(pending.size)
        accept = self._meets if meet_deadline else always
        placed_now = np.zeros(self.p.n_requests, dtype=bool)
        for k in range(n_ranks):
            if pending.size == 0:
                break
            choice = ranked[row_of[pending], k]
            valid = np.isfinite(pref[pending, choice])
            for m in np.unique(choice[valid]):
                sel = pending[valid & (choice == m)]
                placed = self.place(sel, self.model_worker_rows(int(m)), accept)
                placed_now[sel[placed]] = True
            pending = pending[~placed_now[pending]]
        return pending

    def _meets(self, idx, m, w, finish) -> np.ndarray:
        return finish <= self.deadline[idx] + 1e-9

    def best_finish_value(self, idx: np.ndarray):
        """Each request's best expected realised utility per model, appended now anywhere.

        Returns (value (n, M): -inf where m cannot take it, fin (S, M, W): the finish of
        one more request of each placement on each (m, w), source (n,), open (M, W)).
        Timeliness only falls with the finish time, so a request's best worker for m is its
        earliest finish (its latest, where eu < 0): one (S, M) table per placement instead
        of timeliness over every (request, model, worker).
        """
        open_ = self.open_mask()
        first = self.p.now + self.base() + self.infer  # (M, W)
        source = self.source[idx] if self.cache_aware else np.zeros(idx.size, dtype=np.int64)
        fetch = self.fetch if self.cache_aware else np.zeros((1, *first.shape))
        fin = first[None, :, :] + fetch  # (S, M, W)
        early = np.where(open_[None], fin, np.inf).min(axis=2)
        late = np.where(open_[None], fin, -np.inf).max(axis=2)
        eu = self.eu[idx]
        usable = np.isfinite(eu) & open_.any(axis=1)[None, :]
        at = np.where(eu < 0, late[source], early[source])  # (n, M)
        f = timeliness(np.where(usable, at, 0.0) - self.arrival[idx, None],
                       self.sla[idx, None])
        value = np.where(usable, f * np.where(usable, eu, 0.0), -np.inf)
        return value, fin, source, open_

    def best_effort(self, idx: np.ndarray, price: float = 0.0) -> np.ndarray:
        """Serve what can still earn more than a drop; drop the rest (the fallback).

        Each round prices appending every pending request to every open (model, worker),
        takes each request's best model and list-schedules per model, keeping only requests
        whose expected realised utility beats ``miss_utility``. Returns dropped indices.
        With a ``price`` (utility per pooled second), a request weighs each model's utility
        against the cluster time it uses, and is served only if it earns more than a drop
        by at least what that time is worth: late work must not crowd out on-time work.
        """
        cost = self.pooled_cost()
        pending = idx
        for _ in range(MAX_FALLBACK_ROUNDS):
            if pending.size == 0:
                break
            best_m, fin, source, open_ = self.best_finish_value(pending)
            net = best_m - price * np.where(np.isfinite(cost), cost, 0.0)[None, :]
            earns = net > self.miss[pending, None] + MIN_GAIN
            hopeful = earns.any(axis=1)
            net = np.where(earns, net, -np.inf)
            m_choice = net.argmax(axis=1)
            if not hopeful.any():
                break
            placed_any = False
            cand, mc = pending[hopeful], m_choice[hopeful]
            # Each hopeful request's best worker for its model (the first, among equals).
            fin_w = fin[source[hopeful], mc]  # (h, W)
            f_w = timeliness(fin_w - self.arrival[cand, None], self.sla[cand, None])
            u_w = np.where(open_[mc], f_w * self.eu[cand, mc][:, None], -np.inf)
            wc = u_w.argmax(axis=1)
            for m in np.unique(mc):
                sel = mc == m
                earns_here = self._earns_at(price * float(cost[m]) if price else 0.0)
                placed = self.place(cand[sel], self.model_worker_rows(int(m)), earns_here)
                if not placed.any():
                    # List scheduling ignores where inputs lie; the worker each request
                    # priced best surely takes at least its first request.
                    for w in np.unique(wc[sel]):
                        row = np.full(self.infer.shape[1], -1)
                        row[w] = m
                        on_w = cand[sel & (wc == w)]
                        placed = self.place(on_w, row, earns_here)
                        placed_any |= bool(placed.any())
                placed_any |= bool(placed.any())
            still = self.model[pending] == DROP
            pending = pending[still & hopeful]
            if not placed_any:
                break
        return pending

    def _earns_at(self, charge: float):
        """Acceptance for a request that must earn ``charge`` more than a drop: what the
        cluster time it takes is worth to other requests."""
        def accept(idx, m, w, finish) -> np.ndarray:
            return self.value(idx, m, finish) > self.miss[idx] + MIN_GAIN + charge
        return accept

    def plan(self, priority: np.ndarray) -> Plan:
        return Plan(
            model=self.model.copy(),
            worker=self.worker.copy(),
            priority=np.asarray(priority, dtype=float),
            finish=self.finish.copy(),
        )


def always(idx, m, w, finish) -> np.ndarray:
    return np.ones(idx.size, dtype=bool)


def run_cohorts(
    planner: Planner,
    cohorts: Sequence[np.ndarray],
    pref: np.ndarray,
    *,
    meet_deadline: bool = True,
    fallback_last: bool = False,
) -> None:
    """Plan cohorts in turn: preferred models meeting deadlines, then best effort."""
    left: list[np.ndarray] = []
    for c in cohorts:
        rest = planner.by_preference(c, pref, meet_deadline=meet_deadline)
        if fallback_last:
            left.append(rest)
        else:
            planner.best_effort(rest)
    if left:
        planner.best_effort(np.concatenate(left))
