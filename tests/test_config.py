"""Tests for serif_dask.config: loading, every validation rule, and the objects' contracts."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serif_dask.config import (
    Application,
    ConfigError,
    FrozenDict,
    ModelProfile,
    SerifConfig,
    load_config,
    load_config_dicts,
)

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "serif-reference"

DELETE = object()


def base() -> dict[str, dict[str, Any]]:
    """A small valid config: two nodes, two applications, two modalities, two servers."""
    system = {
        "seed": 7,
        "duration-in-secs": 10,
        "scheduler-sleep": 0.5,
        "data-aware": False,
        "scheduler-type": "random",
        "compute-nodes": [
            {"name": "n1", "ip-address": "127.0.0.1", "server-port": "2227"},
            {"name": "n2", "ip-address": "127.0.0.1", "server-port": 2228},
        ],
        "redis-nodes": [{"ip-address": "127.0.0.1", "ports": ["6379", 6380]}],
        "scheduler-node": {"ip-address": "127.0.0.1", "port": "2222"},
    }
    application = {
        "applications": [
            {
                "name": "falls",
                "sla-latency": 1.0,
                "sample-duration": 4,
                "utility-matrix": [[1.0, -0.1], [-1.0, 1.0]],
                "prior": [0.9, 0.1],
                "model-profiles": [
                    {
                        "name": "small",
                        "use-profile": True,
                        "modality": "video",
                        "cmat": [[90.0, 10.0], [5.0, 15.0]],
                        "latencies": {"n1": [0.01, 0.02], "n2": [0.01, 0.02]},
                    },
                    {
                        "name": "big",
                        "use-profile": True,
                        "modality": "video",
                        "cmat": [[98.0, 2.0], [1.0, 19.0]],
                        "latencies": {"n1": [0.05, 0.1]},
                    },
                ],
            },
            {
                "name": "wake",
                "sla-latency": 0.5,
                "sample-duration": 3,
                "utility-matrix": [[1, -1, 0], [-1, 1, 0], [0, 0, 1]],
                "prior": [0.5, 0.25, 0.25],
                "model-profiles": [
                    {
                        "name": "res8",
                        "use-profile": True,
                        "modality": "audio",
                        "cmat": [[8, 1, 1], [1, 8, 1], [1, 1, 8]],
                        "latencies": {"n2": [0.015, 0.02]},
                    }
                ],
            },
        ]
    }
    data = {
        "num-groups": 4,
        "data-modalities": [
            {
                "name": "video",
                "use-synthetic-data": True,
                "synthetic-shape": [3, 4, 8, 8],
                "cache-entry-size": 4000,
                "retrieval-latencies": {"n1": 0.3, "n2": 1.7},
            },
            {
                "name": "audio",
                "use-synthetic-data": True,
                "synthetic-shape": [160],
                "cache-entry-size": 1000,
                "retrieval-latencies": {"n1": 0.005, "n2": 0.007},
            },
        ],
        "servers": [
            {
                "name": "s1",
                "ip-address": "127.0.0.1",
                "port": "2228",
                "workers": 2,
                "cache-entries-per-modality": {"default": 17, "audio": 4},
            },
            {"name": "s2", "ip-address": "127.0.0.1", "port": 2229, "workers": 1},
        ],
    }
    return {"system": system, "application": application, "data": data}


def load(cfg: dict[str, dict[str, Any]], **kwargs: Any) -> SerifConfig:
    return load_config_dicts(cfg["system"], cfg["application"], cfg["data"], **kwargs)


def put(cfg: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """Set (or with DELETE remove) ``cfg[path]``; returns cfg for chaining."""
    node = cfg
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


def error(cfg: dict[str, dict[str, Any]], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(cfg, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


def write(folder: Path, cfg: dict[str, dict[str, Any]], names: dict[str, str] | None = None):
    names = names or {k: f"{k}.json" for k in cfg}
    folder.mkdir(parents=True, exist_ok=True)
    for kind, body in cfg.items():
        (folder / names[kind]).write_text(json.dumps(body, indent=2))
    return {kind: folder / name for kind, name in names.items()}


APP0 = ("applications", 0)
M1 = (*APP0, "model-profiles", 1)

# (file kind, path to change, new value, expected "<file>: <json path>: <message>" prefix)
CASES = [
    # types and missing keys
    (
        "application",
        (*APP0, "sla-latency"),
        "abc",
        "application.json: applications[0].sla-latency: expected a number, got 'abc'",
    ),
    (
        "application",
        (*APP0, "sla-latency"),
        True,
        "application.json: applications[0].sla-latency: expected a number, got true",
    ),
    (
        "application",
        (*APP0, "sla-latency"),
        DELETE,
        "application.json: applications[0].sla-latency: missing key",
    ),
    ("system", ("seed",), "7", "system.json: seed: expected an integer, got '7'"),
    (
        "system",
        ("data-aware",),
        "yes",
        "system.json: data-aware: expected true or false, got 'yes'",
    ),
    (
        "system",
        ("compute-nodes",),
        {"name": "n1"},
        "system.json: compute-nodes: expected a list, got an object",
    ),
    (
        "system",
        ("compute-nodes", 1, "name"),
        DELETE,
        "system.json: compute-nodes[1].name: missing key",
    ),
    (
        "system",
        ("compute-nodes", 0, "server-port"),
        "http",
        "system.json: compute-nodes[0].server-port: expected a port number, got 'http'",
    ),
    (
        "system",
        ("redis-nodes", 0, "ports", 1),
        70000,
        "system.json: redis-nodes[0].ports[1]: must be <= 65535, got 70000",
    ),
    ("data", ("num-groups",), DELETE, "data.json: num-groups: missing key"),
    (
        "data",
        ("data-modalities", 0, "synthetic-shape"),
        "3x4",
        "data.json: data-modalities[0].synthetic-shape: expected a list, got '3x4'",
    ),
    (
        "application",
        (*M1, "latencies", "n1"),
        [0.05],
        "application.json: applications[0].model-profiles[1].latencies.n1: too few entries",
    ),
    (
        "application",
        (*M1, "latencies", "n1"),
        [0.05, 0.1, 0.2],
        "application.json: applications[0].model-profiles[1].latencies.n1: expected at most 2",
    ),
    # unknown references
    (
        "application",
        (*M1, "modality"),
        "lidar",
        "application.json: applications[0].model-profiles[1].modality: unknown modality 'lidar'",
    ),
    (
        "application",
        (*M1, "latencies", "n9"),
        [0.1, 0.1],
        "application.json: applications[0].model-profiles[1].latencies.n9: "
        "unknown compute node 'n9'",
    ),
    (
        "data",
        ("data-modalities", 1, "retrieval-latencies", "gpu7"),
        0.1,
        "data.json: data-modalities[1].retrieval-latencies.gpu7: unknown compute node 'gpu7'",
    ),
    (
        "data",
        ("data-modalities", 1, "retrieval-latencies", "n2"),
        DELETE,
        "data.json: data-modalities[1].retrieval-latencies: missing compute node 'n2' "
        "(model wake/res8 runs there)",
    ),
    (
        "application",
        (*M1, "latencies"),
        {},
        "application.json: applications[0].model-profiles[1].latencies: "
        "no compute node has a latency",
    ),
    # matrices
    (
        "application",
        (*APP0, "model-profiles", 0, "cmat"),
        [[1, 2], [3, 4, 5]],
        "application.json: applications[0].model-profiles[0].cmat: row 1 has 3 entries, expected 2",
    ),
    (
        "application",
        (*APP0, "model-profiles", 0, "cmat"),
        [[1, 2]],
        "application.json: applications[0].model-profiles[0].cmat: has 1 rows, expected 2",
    ),
    (
        "application",
        (*APP0, "model-profiles", 0, "cmat"),
        [[1, 2], [-3, 4]],
        "application.json: applications[0].model-profiles[0].cmat[1][0]: must be >= 0, got -3",
    ),
    (
        "application",
        (*APP0, "model-profiles", 0, "cmat"),
        [[1, 2], [0, 0]],
        "application.json: applications[0].model-profiles[0].cmat: row 1 is all zeros",
    ),
    (
        "application",
        (*APP0, "utility-matrix"),
        [[1, 0], [0, 1, 0]],
        "application.json: applications[0].utility-matrix: row 1 has 3 entries, expected 2",
    ),
    (
        "application",
        (*APP0, "utility-matrix", 1, 0),
        -1.5,
        "application.json: applications[0].utility-matrix[1][0]: utility must be within [-1, 1], "
        "got -1.5",
    ),
    (
        "application",
        (*APP0, "miss-utility"),
        2,
        "application.json: applications[0].miss-utility: utility must be within [-1, 1], got 2",
    ),
    (
        "application",
        (*APP0, "prior"),
        [0.5, 0.25, 0.25],
        "application.json: applications[0].prior: has 3 entries, but utility-matrix is 2x2",
    ),
    (
        "application",
        (*APP0, "prior"),
        [0.9, 0.2],
        "application.json: applications[0].prior: must sum to 1, sums to 1.1",
    ),
    (
        "application",
        (*APP0, "prior"),
        [1.1, -0.1],
        "application.json: applications[0].prior[1]: must be >= 0, got -0.1",
    ),
    # non-positive and negative numbers
    (
        "application",
        (*APP0, "sla-latency"),
        0,
        "application.json: applications[0].sla-latency: must be > 0, got 0",
    ),
    (
        "application",
        (*APP0, "sample-duration"),
        -4,
        "application.json: applications[0].sample-duration: must be > 0, got -4",
    ),
    (
        "data",
        ("data-modalities", 0, "synthetic-shape", 2),
        0,
        "data.json: data-modalities[0].synthetic-shape[2]: must be > 0, got 0",
    ),
    (
        "data",
        ("data-modalities", 0, "synthetic-shape"),
        [1],
        "data.json: data-modalities[0].synthetic-shape: synthetic samples of shape [1] cannot "
        "hold 2 classes",
    ),
    (
        "data",
        ("data-modalities", 0, "cache-entry-size"),
        -1,
        "data.json: data-modalities[0].cache-entry-size: must be > 0, got -1",
    ),
    ("data", ("num-groups",), 0, "data.json: num-groups: must be > 0, got 0"),
    (
        "application",
        (*M1, "latencies", "n1"),
        [-0.05, 0.1],
        "application.json: applications[0].model-profiles[1].latencies.n1[0]: must be >= 0, "
        "got -0.05",
    ),
    (
        "data",
        ("data-modalities", 0, "retrieval-latencies", "n1"),
        -0.3,
        "data.json: data-modalities[0].retrieval-latencies.n1: must be >= 0, got -0.3",
    ),
    ("system", ("duration-in-secs",), -1, "system.json: duration-in-secs: must be >= 0, got -1"),
    ("data", ("servers", 0, "workers"), 0, "data.json: servers[0].workers: must be > 0, got 0"),
    # empty lists
    ("system", ("compute-nodes",), [], "system.json: compute-nodes: must not be empty"),
    ("application", ("applications",), [], "application.json: applications: must not be empty"),
    (
        "application",
        (*APP0, "model-profiles"),
        [],
        "application.json: applications[0].model-profiles: must not be empty",
    ),
    ("data", ("data-modalities",), [], "data.json: data-modalities: must not be empty"),
    ("data", ("servers",), [], "data.json: servers: must not be empty"),
    # duplicates
    (
        "system",
        ("compute-nodes", 1, "name"),
        "n1",
        "system.json: compute-nodes[1].name: duplicate name 'n1' (also compute-nodes[0])",
    ),
    (
        "application",
        ("applications", 1, "name"),
        "falls",
        "application.json: applications[1].name: duplicate name 'falls' (also applications[0])",
    ),
    (
        "application",
        (*M1, "name"),
        "small",
        "application.json: applications[0].model-profiles[1].name: duplicate name 'small'",
    ),
    (
        "data",
        ("data-modalities", 1, "name"),
        "video",
        "data.json: data-modalities[1].name: duplicate name 'video' (also data-modalities[0])",
    ),
    (
        "data",
        ("servers", 1, "name"),
        "s1",
        "data.json: servers[1].name: duplicate name 's1' (also servers[0])",
    ),
    # scheduler
    (
        "system",
        ("scheduler-type",),
        "best-effort",
        "system.json: scheduler-type: unknown scheduler 'best-effort'; known:",
    ),
    # streams
    (
        "data",
        ("servers", 0, "streams"),
        {"video": {"one": "/a.npy"}},
        "data.json: servers[0].streams.video.one: invalid key: expected an integer, got 'one'",
    ),
    (
        "data",
        ("servers", 0, "streams"),
        {"video": {"4": "/a.npy"}},
        "data.json: servers[0].streams.video.4: group 4 is out of range: num-groups is 4",
    ),
    (
        "data",
        ("servers", 0, "streams"),
        {"lidar": {"0": "/a.npy"}},
        "data.json: servers[0].streams.lidar: unknown modality 'lidar'",
    ),
    (
        "data",
        ("servers", 0, "cache-entries-per-modality", "lidar"),
        3,
        "data.json: servers[0].cache-entries-per-modality.lidar: unknown modality 'lidar'",
    ),
    # models that are not in profile mode
    (
        "application",
        (*M1, "use-profile"),
        False,
        "application.json: applications[0].model-profiles[1].model-weights: required when "
        "use-profile is false",
    ),
    # extensions
    (
        "application",
        (*APP0, "sneakpeek"),
        {"memory": 1.5},
        "application.json: applications[0].sneakpeek.memory: must be <= 1, got 1.5",
    ),
    (
        "application",
        (*APP0, "sneakpeek"),
        {"strength": 0},
        "application.json: applications[0].sneakpeek.strength: must be > 0, got 0",
    ),
    (
        "application",
        (*APP0, "sneakpeek"),
        {"modality": "audio"},
        "application.json: applications[0].sneakpeek.modality: no model of this application reads "
        "modality 'audio'",
    ),
    (
        "application",
        (*M1, "impl"),
        "mymodels.Big",
        "application.json: applications[0].model-profiles[1].impl: expected 'package.module:Name', "
        "got 'mymodels.Big'",
    ),
    (
        "data",
        ("data-modalities", 0, "label-persistence"),
        1.0,
        "data.json: data-modalities[0].label-persistence: must be < 1, got 1.0",
    ),
    (
        "data",
        ("data-modalities", 0, "synthetic-snr"),
        0,
        "data.json: data-modalities[0].synthetic-snr: must be > 0, got 0",
    ),
    (
        "data",
        ("data-modalities", 0, "dtype"),
        "float99",
        "data.json: data-modalities[0].dtype: unknown dtype 'float99'",
    ),
    (
        "system",
        ("compute-nodes", 0, "model-cache-bytes"),
        0,
        "system.json: compute-nodes[0].model-cache-bytes: must be > 0, got 0",
    ),
    (
        "system",
        ("redis",),
        {"tls": "on"},
        "system.json: redis.tls: expected true or false, got 'on'",
    ),
    # absurd sizes: one line, never an out-of-memory
    (
        "data",
        ("num-groups",),
        20_000_000,
        "data.json: num-groups: 20,000,000 groups is above the 10,000,000 serif-dask supports",
    ),
    (
        "data",
        ("data-modalities", 0, "synthetic-shape"),
        [100000, 100000],
        "data.json: data-modalities[0].synthetic-shape: a sample of shape [100000, 100000] has "
        "10,000,000,000 elements, above the 1,000,000,000 serif-dask supports",
    ),
    (
        "data",
        ("data-modalities", 0, "cache-entry-size"),
        2**50,
        "data.json: servers[0].cache-entries-per-modality: the shared-memory input cache would "
        "take",
    ),
    (
        "system",
        ("compute-nodes", 0, "model-cache-bytes"),
        2**60,
        "system.json: compute-nodes[0].model-cache-bytes: 1073741824.0 GiB of models is more "
        "than this machine's",
    ),
]


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    CASES,
    ids=[c[3].split(": ", 2)[1] + ":" + c[3].split(": ", 2)[2][:20] for c in CASES],
)
def test_validation_rule(kind, path, value, expected):
    cfg = base()
    put(cfg[kind], path, value)
    assert error(cfg).startswith(expected)


def test_base_config_is_valid():
    cfg = load(base())
    assert cfg.node_names == ("n1", "n2")
    assert cfg.server_names == ("s1", "s2")
    assert [a.name for a in cfg.apps] == ["falls", "wake"]
    assert cfg.app("wake").k == 3


def test_node_without_latency_is_allowed_and_model_is_infeasible_there():
    cfg = load(base())
    assert cfg.model("falls", "big").nodes == ("n1",)
    assert "n2" not in cfg.model("falls", "big").latencies


def test_retrieval_latency_only_needed_where_models_of_the_modality_run():
    cfg = base()
    # No audio model runs on n1, so audio need not say how long fetching it to n1 takes.
    del cfg["data"]["data-modalities"][1]["retrieval-latencies"]["n1"]
    assert load(cfg).modality("audio").retrieval_latencies == {"n2": 0.007}


def test_json_syntax_error_has_line_and_column(tmp_path):
    files = write(tmp_path, base())
    files["application"].write_text('{\n  "applications": [\n    {"name": "x",}\n  ]\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith("application.json: line 3, column 18: invalid JSON:")


def test_top_level_must_be_an_object(tmp_path):
    write(tmp_path, base())
    (tmp_path / "data.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^data.json: \(top level\): expected a JSON object"):
        load_config(tmp_path)


def test_scheduler_names_of_serif_and_import_paths_are_accepted():
    for name in [
        "random",
        "random-cache",
        "locally-optimal-edf",
        "locally-optimal-edf-cache",
        "grouped-priority",
        "fastest",
        "most-accurate",
        "sneakpeek",
        "mypkg.sched:plan",
    ]:
        cfg = put(base(), ("system", "scheduler-type"), name)
        assert load(cfg).system.scheduler_type == name


def test_group_on_two_servers():
    cfg = base()
    cfg["data"]["servers"][0]["streams"] = {"audio": {"1": "a"}}
    cfg["data"]["servers"][1]["streams"] = {"audio": {"1": "b"}}
    assert error(cfg).startswith(
        "data.json: servers[1].streams.audio.1: group 1 is also read by servers[0] ('s1')"
    )


def real_video(cfg: dict[str, dict[str, Any]], folder: Path, groups=range(4)) -> None:
    """Make video a real-data modality whose streams are files under ``folder``."""
    cfg["data"]["data-modalities"][0]["use-synthetic-data"] = False
    cfg["data"]["servers"][0]["streams"] = {
        "video": {str(g): str(folder / f"g{g}.npy") for g in groups}
    }


def test_real_data_needs_a_stream_for_every_group(tmp_path):
    cfg = base()
    real_video(cfg, tmp_path, groups=[0, 2])
    assert error(cfg) == (
        "data.json: data-modalities[0].use-synthetic-data: is false, but no server has a stream "
        "for group(s) 1, 3 under streams.video"
    )
    assert load(cfg, simulate=True).modality("video").use_synthetic_data


def test_missing_stream_file_is_named_with_its_path(tmp_path):
    cfg = base()
    real_video(cfg, tmp_path)
    for g in (0, 1, 3):
        (tmp_path / f"g{g}.npy").write_bytes(b"")
    assert error(cfg, check_files=True) == (
        f"data.json: servers[0].streams.video.2: file not found: {tmp_path / 'g2.npy'}"
    )
    assert load(cfg, check_files=False).group_server(2, "video") == "s1"
    (tmp_path / "g2.npy").write_bytes(b"")
    assert load(cfg, check_files=True).groups_of("s1", "video") == (0, 1, 2, 3)


def test_streams_of_custom_readers_and_urls_are_not_checked_as_files(tmp_path):
    cfg = base()
    real_video(cfg, tmp_path)
    cfg["data"]["servers"][0]["streams"]["video"]["0"] = "rtsp://camera-0/stream"
    cfg["data"]["data-modalities"][0]["impl"] = "myreaders.camera:Camera"
    assert load(cfg, check_files=True).modality("video").impl == "myreaders.camera:Camera"


def test_model_weights_and_redis_key_required_unless_profile(tmp_path):
    cfg = base()
    model = cfg["application"]["applications"][0]["model-profiles"][1]
    model.update({"use-profile": False, "model-weights": str(tmp_path / "big.pt")})
    assert error(cfg).startswith(
        "application.json: applications[0].model-profiles[1].redis-key: required when "
        "use-profile is false"
    )
    model["redis-key"] = "big"
    assert error(cfg, check_files=True) == (
        "application.json: applications[0].model-profiles[1].model-weights: file not found: "
        f"{tmp_path / 'big.pt'}"
    )
    (tmp_path / "big.pt").write_bytes(b"w")
    loaded = load(cfg, check_files=True).model("falls", "big")
    assert (loaded.use_profile, loaded.weights, loaded.redis_key) == (
        False,
        str(tmp_path / "big.pt"),
        "big",
    )
    # SERIF's other spelling, and the error names the key the file used
    model["model-data"] = model.pop("model-weights")
    assert load(cfg, check_files=True).model("falls", "big").weights == str(tmp_path / "big.pt")
    (tmp_path / "big.pt").unlink()
    assert error(cfg, check_files=True).startswith(
        "application.json: applications[0].model-profiles[1].model-data: file not found"
    )
    model["model-weights"] = "/elsewhere.pt"
    assert error(cfg).startswith(
        "application.json: applications[0].model-profiles[1].model-data: conflicts with "
        "model-weights"
    )


def test_simulate_makes_everything_profiled_and_synthetic(tmp_path):
    cfg = base()
    cfg["application"]["applications"][0]["model-profiles"][1]["use-profile"] = False
    real_video(cfg, tmp_path, groups=[0])
    sim = load(cfg, simulate=True, check_files=True)
    assert all(m.use_profile for a in sim.apps for m in a.model_profiles)
    assert all(m.use_synthetic_data for m in sim.data.data_modalities)


def test_reference_configs_load_with_simulate():
    cfg = load_config(REFERENCE, simulate=True)
    assert cfg.system.scheduler_type == "grouped-priority"
    assert cfg.node_names == ("csel-cuda1", "csel-cuda3", "cs-geeta")
    assert cfg.model("falldetection", "x3d_m").weights.endswith("x3d_m.ckpt")
    assert cfg.model("falldetection", "x3d_m").redis_key == "x3d_m"
    assert cfg.app("wakeword").k == 2
    assert cfg.data.num_groups == 40
    assert cfg.group_server(25, "video") == "csel-cuda1"
    assert cfg.groups_of("cs-geeta", "video") == tuple(range(20))
    assert cfg.groups_of("cs-geeta", "audio") == tuple(range(0, 40, 2))
    assert cfg.data.servers[0].cache_entries("video") == 17
    assert cfg.data.servers[0].port == 2228
    assert cfg.system.redis_nodes[0].ports == (2223, 2224, 2225)
    assert cfg.system.scheduler_node.port == 2222


def test_reference_configs_without_simulate_name_a_missing_file():
    files = [REFERENCE / n for n in ("datacfg.json", "systemcfg.json", "applicationcfg.json")]
    with pytest.raises(ConfigError) as info:
        load_config(files)
    text = str(info.value)
    assert "\n" not in text
    assert "x3d_m.ckpt" in text or "fall.mp4" in text
    assert text.startswith(
        "applicationcfg.json: applications[0].model-profiles[1].model-data: file not found:"
    )
    # Everything else about them is valid.
    assert not load_config(files, check_files=False).modality("video").use_synthetic_data


def test_directory_and_three_files_in_any_order(tmp_path):
    files = write(tmp_path / "cfg", base())
    expected = load_config(tmp_path / "cfg")
    assert expected.sources == {k: p for k, p in files.items()}
    for order in itertools.permutations(files.values()):
        assert load_config([str(p) for p in order]) == expected


def test_directory_with_other_names_is_recognised_by_content(tmp_path):
    shutil.copytree(REFERENCE, tmp_path / "ref")
    assert load_config(tmp_path / "ref", simulate=True).data.num_groups == 40


@pytest.mark.parametrize(
    ("arrange", "expected"),
    [
        (
            lambda d, f: [f["system"], f["data"]],
            "expected a directory or three files (system, application, data)",
        ),
        (
            lambda d, f: [f["system"], f["system"], f["data"]],
            "system.json: (top level): a second system config",
        ),
        (lambda d, f: d / "nowhere", "nowhere: (top level): no such file or directory"),
        (lambda d, f: f["system"], "expected a directory or three files"),
    ],
)
def test_bad_paths(tmp_path, arrange, expected):
    files = write(tmp_path, base())
    with pytest.raises(ConfigError) as info:
        load_config(arrange(tmp_path, files))
    assert expected in str(info.value)


def test_missing_file_in_directory_and_unrecognisable_file(tmp_path):
    files = write(tmp_path, base())
    files["data"].unlink()
    with pytest.raises(ConfigError, match=r"^data.json: \(top level\): file not found in"):
        load_config(tmp_path)
    other = tmp_path / "notes.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ConfigError, match=r"^notes.json: \(top level\): cannot tell which"):
        load_config([files["system"], files["application"], other])


def test_relative_paths_are_taken_from_the_config_file(tmp_path):
    cfg = base()
    model = cfg["application"]["applications"][0]["model-profiles"][1]
    model.update({"use-profile": False, "model-weights": "weights/big.pt", "redis-key": "big"})
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "big.pt").write_bytes(b"w")
    write(tmp_path, cfg)
    loaded = load_config(tmp_path)
    assert loaded.model("falls", "big").weights == str(tmp_path / "weights" / "big.pt")


def test_extension_defaults():
    cfg = load(base())
    falls = cfg.app("falls")
    assert falls.miss_utility == 0.0
    assert (falls.sneakpeek.memory, falls.sneakpeek.strength) == (0.5, 1.0)
    assert falls.sneakpeek.modality == "video"  # the first model's modality
    assert falls.sneakpeek.impl is None and falls.model_profiles[0].impl is None
    video = cfg.modality("video")
    assert (video.synthetic_snr, video.label_persistence, video.dtype, video.impl) == (
        1.0,
        0.9,
        "float32",
        None,
    )
    assert cfg.system.compute_nodes[0].model_cache_bytes is None
    assert cfg.system.redis.password is None and cfg.system.redis.tls is False
    s2 = cfg.data.servers[1]
    assert s2.cache_entries("video") == 16 and s2.streams == {}
    assert cfg.data.servers[0].cache_entries("audio") == 4
    assert cfg.data.servers[0].cache_entries("video") == 17


def test_optional_serif_keys_and_prior_default():
    cfg = base()
    for key in ("scheduler-sleep", "redis-nodes", "scheduler-node"):
        del cfg["system"][key]
    del cfg["application"]["applications"][1]["prior"]
    del cfg["data"]["servers"][1]["workers"]
    loaded = load(cfg)
    assert loaded.system.redis_nodes == () and loaded.system.scheduler_node is None
    assert loaded.system.scheduler_sleep == 0.0
    assert loaded.app("wake").prior == pytest.approx((1 / 3,) * 3)
    assert loaded.data.servers[1].workers == 1


def test_extensions_are_read():
    cfg = base()
    app = cfg["application"]["applications"][1]
    app["miss-utility"] = -0.5
    app["sneakpeek"] = {"memory": 0.0, "strength": 4, "impl": "pk.est:Est", "modality": "audio"}
    cfg["data"]["data-modalities"][1].update(
        {"impl": "pk.read:Wav", "synthetic-snr": 2.5, "label-persistence": 0, "dtype": "f2"}
    )
    cfg["system"]["compute-nodes"][0]["model-cache-bytes"] = 2**30
    cfg["system"]["redis"] = {"password": "hunter2", "tls": True, "tls-ca-file": "/ca.pem"}
    loaded = load(cfg)
    wake = loaded.app("wake")
    assert wake.miss_utility == -0.5
    assert wake.sneakpeek.model_dump() == {
        "belief": "filter",
        "persistence": None,
        "answer": True,
        "memory": 0.0,
        "strength": 4.0,
        "impl": "pk.est:Est",
        "modality": "audio",
        "calibration": None,
    }
    audio = loaded.modality("audio")
    assert (audio.impl, audio.synthetic_snr, audio.label_persistence, audio.dtype) == (
        "pk.read:Wav",
        2.5,
        0.0,
        "float16",
    )
    assert loaded.system.compute_nodes[0].model_cache_bytes == 2**30
    assert loaded.system.redis.password == "hunter2" and loaded.system.redis.tls
    assert loaded.system.redis.tls_ca_file == "/ca.pem"
    assert "hunter2" not in repr(loaded) and "hunter2" not in str(loaded.system.redis)
    assert "password" not in loaded.to_json_dicts()["system"]["redis"]
    assert loaded.to_json_dicts(include_secrets=True)["system"]["redis"]["password"] == "hunter2"


def test_password_is_not_echoed_in_errors():
    cfg = put(base(), ("system", "redis"), {"password": 123456789})
    text = error(cfg)
    assert text == "system.json: redis.password: expected a string, got a value"


def test_tls_files_are_checked(tmp_path):
    cfg = put(base(), ("system", "redis"), {"tls": True, "tls-ca-file": str(tmp_path / "ca.pem")})
    assert error(cfg, check_files=True) == (
        f"system.json: redis.tls-ca-file: file not found: {tmp_path / 'ca.pem'}"
    )


def test_unknown_keys_are_ignored():
    cfg = base()
    cfg["system"]["comment"] = "from the wild"
    cfg["application"]["applications"][0]["model-profiles"][0]["notes"] = [1, 2]
    cfg["data"]["servers"][0]["gpu"] = True
    assert load(cfg) == load(base())


def test_seed():
    assert load(base()).system.effective_seed == 7
    zero = load(put(base(), ("system", "seed"), 0))
    assert zero.system.seed == 0
    seed = zero.system.effective_seed
    assert isinstance(seed, int) and seed > 0 and zero.system.effective_seed == seed
    assert pickle.loads(pickle.dumps(zero)).system.effective_seed == seed


def test_group_to_server_rule():
    cfg = base()
    cfg["data"]["num-groups"] = 7
    cfg["data"]["servers"][1]["streams"] = {"video": {"0": "a", "2": "b"}}
    loaded = load(cfg)
    # s2 lists groups 0 and 2 for video; the rest go round-robin over the two servers.
    assert loaded.groups_of("s2", "video") == (0, 1, 2, 3, 5)
    assert loaded.groups_of("s1", "video") == (4, 6)
    assert loaded.groups_of("s1", "audio") == (0, 2, 4, 6)
    assert [loaded.group_server(g, "video") for g in range(7)] == [
        "s2",
        "s2",
        "s2",
        "s2",
        "s1",
        "s2",
        "s1",
    ]
    for bad in (
        lambda: loaded.groups_of("s9", "video"),
        lambda: loaded.group_server(0, "x"),
        lambda: loaded.group_server(7, "video"),
    ):
        with pytest.raises(KeyError):
            bad()


def test_lookups():
    cfg = load(base())
    assert cfg.model("wake", "res8").modality == "audio"
    assert cfg.modality("audio").synthetic_shape == (160,)
    assert cfg.server("s1").workers == 2
    with pytest.raises(KeyError, match="unknown application 'nope'"):
        cfg.app("nope")
    with pytest.raises(KeyError, match="has no model 'nope'"):
        cfg.model("wake", "nope")
    with pytest.raises(KeyError):
        cfg.modality("nope")


def test_pickle_round_trip_and_hash():
    cfg = load(base())
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and hash(again) == hash(cfg)
    assert again.groups_of("s2", "audio") == cfg.groups_of("s2", "audio")
    assert {cfg: 1}[again] == 1
    err = ConfigError("a.json", "x[0]", "bad\nthing")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) == "a.json: x[0]: bad thing"


def test_immutable():
    cfg = load(base())
    with pytest.raises(ValidationError):
        cfg.system.seed = 3
    with pytest.raises(ValidationError):
        cfg.apps[0].name = "other"
    assert isinstance(cfg.apps, tuple) and isinstance(cfg.apps[0].utility_matrix[0], tuple)
    latencies = cfg.model("falls", "small").latencies
    assert isinstance(latencies, FrozenDict) and latencies["n1"] == (0.01, 0.02)
    with pytest.raises(TypeError):
        latencies["n1"] = (0.0, 0.0)
    with pytest.raises(TypeError):
        cfg.data.servers[0].cache_entries_per_modality.update(video=1)
    assert copy.deepcopy(cfg) == cfg


def test_json_round_trip():
    cfg = load(base())
    dicts = json.loads(json.dumps(cfg.to_json_dicts()))
    assert load_config_dicts(dicts["system"], dicts["application"], dicts["data"]) == cfg


def test_models_can_be_built_in_python_with_snake_case_names():
    model = ModelProfile(
        name="m",
        use_profile=True,
        modality="video",
        cmat=[[1, 0], [0, 1]],
        latencies={"n1": (0.1, 0.2)},
    )
    app = Application(
        name="a",
        sla_latency=1,
        sample_duration=2,
        utility_matrix=[[1, 0], [0, 1]],
        model_profiles=[model],
    )
    assert app.prior == (0.5, 0.5) and app.sneakpeek.modality == "video"
    with pytest.raises(ValidationError):
        Application(
            name="a",
            sla_latency=1,
            sample_duration=2,
            utility_matrix=[[1, 0, 0]],
            model_profiles=[model],
        )


# -- property test: a mutated config is either valid or one clean line of error ------------------


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


_BASE = base()
_ALL_PATHS = [(kind, p) for kind, body in _BASE.items() for p in _paths(body)]
_VALUES = [
    DELETE,
    "abc",
    -1,
    0,
    -0.5,
    1e9,
    None,
    True,
    [],
    {},
    [1, 2, 3],
    {"x": 1},
    "n1",
    "video",
    float("nan"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(_ALL_PATHS), st.sampled_from(_VALUES)), min_size=1, max_size=3
    ),
    st.booleans(),
    st.booleans(),
)
def test_mutations_give_a_config_or_one_line_error(mutations, simulate, check_files):
    cfg = base()
    for (kind, path), value in mutations:
        try:
            put(cfg[kind], path, copy.deepcopy(value))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    try:
        loaded = load(cfg, simulate=simulate, check_files=check_files)
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text and "Traceback" not in text
        assert text.split(": ", 1)[0] in ("system.json", "application.json", "data.json")
        assert len(text.split(": ")) >= 3
    else:
        assert isinstance(loaded, SerifConfig)
        hash(loaded)


def test_many_groups_cost_nothing_to_validate():
    cfg = put(base(), ("data", "num-groups"), 10**7)  # the most there may be
    loaded = load(cfg)
    assert loaded.group_server(10**7 - 1, "audio") == "s2"
    real_video(cfg, Path("/nonexistent"), groups=[0, 1, 5])
    assert error(cfg) == (
        "data.json: data-modalities[0].use-synthetic-data: is false, but no server has a stream "
        "for group(s) 2-4, 6-9999999 under streams.video"
    )


def test_not_utf8(tmp_path):
    write(tmp_path, base())
    (tmp_path / "system.json").write_bytes(b'{"seed": "\xff"}')
    with pytest.raises(ConfigError, match=r"^system.json: \(top level\): not UTF-8 text"):
        load_config(tmp_path)
