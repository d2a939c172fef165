"""The arrays a policy sees: retrieval costs are kept per input placement, not per request."""

from __future__ import annotations

import numpy as np

from serif_dask.config import load_config
from serif_dask.planning import ModelTable, WorkerView, build_problem, join
from tests.conftest import HOSPITAL


def _problem(n: int, seed: int, app_index: int = 0):
    table = ModelTable.from_config(load_config([HOSPITAL]))
    app = table.apps[app_index]
    rng = np.random.default_rng(seed)
    mods = sorted({table.modality[i] for i in app.models})
    nodes = np.array(["node-a", "node-b", ""], dtype=object)  # "": input unknown
    input_node = {m: nodes[rng.integers(0, 3, n)] for m in mods}
    w = len(table.node_names)
    view = WorkerView(addresses=tuple(f"tcp://w{i}" for i in range(w)),
                      node_index=np.arange(w), host_node=("node-a", "node-b", "node-c")[:w],
                      backlog=np.zeros(w), warm=np.zeros((w, table.n_models), bool))
    problem = build_problem(table, app, np.arange(n), np.zeros(n), np.tile(app.prior, (n, 1)),
                            input_node, view, 0.0, rng)
    return table, app, view, input_node, problem


def _dense(table, app, view, input_node, n) -> np.ndarray:
    """Per request, model and worker: what fetching its input costs (the definition)."""
    out = np.zeros((n, table.n_models, len(view.addresses)))
    for r in range(n):
        for m in app.models:
            mod = table.modality[m]
            if mod not in input_node:
                continue
            for w, host in enumerate(view.host_node):
                if input_node[mod][r] != host:
                    out[r, m, w] = table.retrieval_node[table.modality_names.index(mod),
                                                        view.node_index[w]]
    return out


def test_placements_give_each_request_its_own_retrieval_cost() -> None:
    n = 400
    table, app, view, input_node, problem = _problem(n, seed=3)
    np.testing.assert_allclose(problem.retrieval, _dense(table, app, view, input_node, n))
    # 400 requests, but at most 3 nodes per modality: the table has one row per placement.
    mods = len({table.modality[i] for i in app.models})
    assert problem.fetch.shape[0] <= 3 ** mods
    assert problem.source.shape == (n,)
    rows = np.arange(0, n, 7)
    m = np.full(rows.size, app.models[0])
    w = rows % len(view.addresses)
    np.testing.assert_allclose(problem.retrieval_of(rows, m, w), problem.retrieval[rows, m, w])


def test_joined_problems_keep_each_requests_placement() -> None:
    *_, first = _problem(50, seed=1, app_index=0)
    *_, second = _problem(30, seed=2, app_index=1)
    joined = join([first, second], np.random.default_rng(0))
    np.testing.assert_allclose(joined.retrieval,
                               np.concatenate([first.retrieval, second.retrieval]))
