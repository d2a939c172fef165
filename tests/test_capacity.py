"""``serif-dask plan``: node types in the config, planned configs, the offline replay, and a
planned config run for real that delivers its prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serif_dask.capacity import (
    PlanError,
    SimulatedLoad,
    plan_capacity,
    planned_documents,
    simulate,
)
from serif_dask.config import load_config, load_config_dicts
from tests.conftest import HOSPITAL, run_cli


def ward_docs(*, groups: int = 40, answer: bool = False,
              duration: float = 12) -> dict[str, dict[str, Any]]:
    """configs/hospital's fall detection alone, on two node types: ``fast`` (gpu-a, cost 2)
    and ``slow`` (cpu-a, 1.5× the inference time), latencies keyed by type."""
    app = json.loads((HOSPITAL / "application.json").read_text())["applications"][0]
    app["sample-duration"] = 1
    app["sneakpeek"] = {"answer": answer}
    for model in app["model-profiles"]:
        infer, switch = model["latencies"]["bay-a"]
        model["latencies"] = {"fast": [infer, switch], "slow": [round(1.5 * infer, 4), switch]}
    system = {
        "seed": 5, "duration-in-secs": duration, "data-aware": True,
        "scheduler-type": "sneakpeek", "redis-nodes": [],
        "compute-nodes": [{"name": "gpu-a", "type": "fast", "cost": 2},
                          {"name": "cpu-a", "type": "slow"}],
    }
    data = {
        "num-groups": groups,
        "data-modalities": [{
            "name": "video", "use-synthetic-data": True, "synthetic-shape": [3, 4, 16, 16],
            "cache-entry-size": 20000, "retrieval-latencies": {"fast": 0.02, "slow": 0.03},
        }],
        "servers": [{"name": "cam-a"}, {"name": "cam-b"}],
    }
    return {"system": system, "application": {"applications": [app]}, "data": data}


def write(docs: dict[str, dict[str, Any]], target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for kind, doc in docs.items():
        (target / f"{kind}.json").write_text(json.dumps(doc))
    return target


# ------------------------------------------------------------------------ node types
def test_latencies_keyed_by_type_hold_for_every_node_of_that_type() -> None:
    docs = ward_docs()
    docs["system"]["compute-nodes"].append({"name": "cpu-b", "type": "slow"})
    # A node's own name wins over its type.
    docs["application"]["applications"][0]["model-profiles"][0]["latencies"]["cpu-b"] = [1, 2]
    cfg = load_config_dicts(docs["system"], docs["application"], docs["data"])
    small, large = cfg.apps[0].model_profiles[0], cfg.apps[0].model_profiles[2]
    assert dict(large.latencies) == {"gpu-a": (0.035, 0.15), "cpu-a": (0.0525, 0.15),
                                     "cpu-b": (0.0525, 0.15)}
    assert small.latencies["cpu-b"] == (1, 2) and small.latencies["cpu-a"] == (0.009, 0.05)
    assert dict(cfg.modality("video").retrieval_latencies) == {
        "gpu-a": 0.02, "cpu-a": 0.03, "cpu-b": 0.03}
    assert cfg.system.node_types == ("fast", "slow")
    assert [n.node_type for n in cfg.system.compute_nodes] == ["fast", "slow", "slow"]


def test_a_node_without_type_is_its_own_type() -> None:
    cfg = load_config(HOSPITAL)
    assert cfg.system.node_types == cfg.system.node_names == ("bay-a", "bay-b", "bay-c")


def _set(path: tuple[Any, ...], value: Any):
    def edit(docs: dict[str, dict[str, Any]]) -> None:
        node: Any = docs
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _add_node(entry: dict[str, Any]):
    def edit(docs: dict[str, dict[str, Any]]) -> None:
        docs["system"]["compute-nodes"].append(entry)
    return edit


def _key_latency(key: str):
    def edit(docs: dict[str, dict[str, Any]]) -> None:
        docs["application"]["applications"][0]["model-profiles"][1]["latencies"][key] = [1, 1]
    return edit


@pytest.mark.parametrize(("edit", "line"), [
    (_set(("system", "compute-nodes", 1, "type"), 3),
     "system.json: compute-nodes[1].type: expected a string, got 3"),
    (_set(("system", "compute-nodes", 1, "type"), ""),
     "system.json: compute-nodes[1].type: must not be empty"),
    (_set(("system", "compute-nodes", 0, "cost"), -1),
     "system.json: compute-nodes[0].cost: must be >= 0, got -1"),
    (_set(("system", "compute-nodes", 0, "cost"), "cheap"),
     "system.json: compute-nodes[0].cost: expected a number, got 'cheap'"),
    (_add_node({"name": "gpu-b", "type": "fast", "cost": 3}),
     "system.json: compute-nodes[2].cost: 3 differs from compute-nodes[0].cost (2), of the "
     "same type 'fast'"),
    (_add_node({"name": "slow", "type": "fast"}),
     "system.json: compute-nodes[1].type: 'slow' is the name of a compute node of another "
     "type ('fast')"),
    (_key_latency("medium"),
     "application.json: applications[0].model-profiles[1].latencies.medium: unknown compute "
     "node 'medium'; system.json defines: gpu-a, cpu-a (types: fast, slow)"),
    (_set(("data", "data-modalities", 0, "retrieval-latencies"), {"fast": 0.02}),
     "data.json: data-modalities[0].retrieval-latencies: missing compute node 'cpu-a' "
     "(model falldetection/x3d_s runs there)"),
])
def test_bad_node_types_and_costs_are_one_line_and_exit_2(tmp_path: Path, edit: Any,
                                                          line: str) -> None:
    docs = ward_docs()
    edit(docs)
    result = run_cli("validate", str(write(docs, tmp_path / "cfg")), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {line}"]


# ------------------------------------------------------------------------ planned configs
def test_planned_config_replicates_nodes_under_unique_names(tmp_path: Path) -> None:
    docs = ward_docs()
    docs["data"]["servers"].append({"name": "gpu-a-2"})  # a name a replica must skip
    cfg = load_config(write(docs, tmp_path / "cfg"))
    out = tmp_path / "planned"
    planned, left_out = planned_documents(cfg, {"fast": 3, "slow": 1}, out_dir=out,
                                          costs={"fast": 2.0})
    nodes = planned["system"]["compute-nodes"]
    assert [(n["name"], n["type"]) for n in nodes] == [
        ("gpu-a", "fast"), ("gpu-a-3", "fast"), ("gpu-a-4", "fast"), ("cpu-a", "slow")]
    assert [n.get("cost") for n in nodes] == [2.0, 2.0, 2.0, None]
    assert left_out == ()
    again = load_config_dicts(planned["system"], planned["application"], planned["data"])
    large = again.apps[0].model_profiles[2]
    assert large.latencies["gpu-a-4"] == (0.035, 0.15) and large.latencies["cpu-a"][0] == 0.0525
    # A model no planned node can run is left out of the planned config.
    docs["application"]["applications"][0]["model-profiles"][2]["latencies"].pop("slow")
    cfg = load_config(write(docs, tmp_path / "cfg2"))
    planned, left_out = planned_documents(cfg, {"slow": 2}, out_dir=out)
    assert left_out == ("falldetection/x3d_l",)
    names = [p["name"] for p in planned["application"]["applications"][0]["model-profiles"]]
    assert names == ["x3d_s", "x3d_m"]


def test_relative_weights_paths_still_resolve_from_the_planned_folder(tmp_path: Path) -> None:
    digits = Path(__file__).resolve().parents[1] / "configs" / "digits"
    cfg = load_config(digits)
    out = tmp_path / "deep" / "planned"
    planned, _ = planned_documents(cfg, {"node-a": 2}, out_dir=out)
    weights = planned["application"]["applications"][0]["model-profiles"][0]["model-weights"]
    assert not Path(weights).is_absolute()
    assert (out / weights).resolve() == (digits / "weights" / "digits-linear.safetensors").resolve()


# ------------------------------------------------------------------------ the replay
def test_replay_is_reproducible_and_more_workers_serve_more(tmp_path: Path) -> None:
    cfg = load_config(write(ward_docs(), tmp_path / "cfg"))
    load = SimulatedLoad.build(cfg, duration=8, seed=5, data_aware=True)
    results = {}
    for n in (1, 2):
        docs, _ = planned_documents(cfg, {"slow": n}, out_dir=tmp_path)
        planned = load_config_dicts(docs["system"], docs["application"], docs["data"])
        first = simulate(planned, load, "sneakpeek")
        assert simulate(planned, load, "sneakpeek") == first  # a pure function of its input
        results[n] = first
    one, two = results[1], results[2]
    assert one.requests == two.requests == 8 * 40
    assert one.requests == one.completed + one.dropped
    # One slow worker cannot give every request x3d_l in time; two can give more of them.
    assert one.busy["cpu-a"] > 0.85
    assert two.mean_utility > one.mean_utility + 0.02
    assert set(two.warm) == {"cpu-a", "cpu-a-2"}


def test_plan_maximises_utility_then_cost_or_meets_a_target(tmp_path: Path) -> None:
    cfg = load_config(write(ward_docs(), tmp_path / "cfg"))
    best = plan_capacity(cfg, max_workers=3, duration=8, max_busy=1.0)
    top = max(p.mean_utility for p in best.alternatives)
    assert best.best.mean_utility >= top - 0.01 * top
    cheaper = [p for p in best.alternatives if p.cost < best.best.cost]
    assert cheaper and all(p.mean_utility < top - 0.01 * top for p in cheaper)
    assert len(best.alternatives) == 9  # every vector of at most 3 workers of 2 types
    # With headroom required, no chosen worker is booked for more than that share.
    roomy = plan_capacity(cfg, max_workers=3, duration=8, max_busy=0.8)
    assert roomy.best.busiest <= 0.8 < best.best.busiest
    assert roomy.best.cost >= best.best.cost
    target = plan_capacity(cfg, max_workers=3, duration=8, target_deadline_met=0.999,
                           max_busy=1.0)
    assert target.best.deadline_met >= 0.999
    assert all(p.cost >= target.best.cost for p in target.alternatives
               if p.deadline_met >= 0.999)
    busy = load_config(write(ward_docs(groups=120), tmp_path / "busy"))
    with pytest.raises(PlanError, match="no plan of at most 1 workers meets deadline-met"):
        plan_capacity(busy, max_workers=1, duration=8, target_deadline_met=0.999,
                      max_busy=1.0)
    with pytest.raises(PlanError, match="books a worker for more than 85% of the run"):
        plan_capacity(busy, max_workers=1, duration=8)


def test_plan_options_bad_values_exit_2(tmp_path: Path) -> None:
    cfg = write(ward_docs(), tmp_path / "cfg")
    for option, message in (("nothing", "expected NAME=COST"), ("medium=1", "unknown node type"),
                            ("fast=-1", "expected NAME=COST")):
        result = run_cli("plan", str(cfg), "--out", str(tmp_path / "o"), "--node-cost", option,
                         timeout=60)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ it comes true
def test_planned_config_delivers_its_prediction(tmp_path: Path) -> None:
    """Plan, then run the planned config for real (profile mode, LocalCluster): mean
    utility within 10 % and deadline met within 5 points of the prediction."""
    cfg = write(ward_docs(groups=40, duration=12), tmp_path / "cfg")
    out, plan_json, run_json = tmp_path / "planned", tmp_path / "plan.json", tmp_path / "run.json"
    planned = run_cli("plan", str(cfg), "--max-workers", "3", "--out", str(out),
                      "--json", str(plan_json), timeout=300)
    assert planned.returncode == 0, planned.stderr
    assert "chosen" in planned.stdout
    plan = json.loads(plan_json.read_text())
    assert set(plan) >= {"workers", "predicted", "alternatives"}
    assert sum(plan["workers"].values()) >= 2  # this load needs more than one worker
    assert max(plan["busy"].values()) <= 0.85
    ran = run_cli("run", str(out), "--json", str(run_json), "-q", timeout=300)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(run_json.read_text())
    predicted = plan["predicted"]
    assert summary["requests"] == predicted["requests"]
    assert abs(summary["mean_utility"] - predicted["mean_utility"]) <= (
        0.1 * abs(predicted["mean_utility"])), (summary, predicted)
    assert abs(summary["deadline_met"] - predicted["deadline_met"]) <= 0.05, (summary, predicted)
