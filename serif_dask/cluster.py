"""A one-machine cluster shaped like the config: one worker per compute node and server.

``serif-dask run`` without ``--scheduler-address`` starts it: a LocalCluster (processes)
whose workers are named after the config's compute nodes (``resources={"GPU": 1}``) and
request-generating servers (``data@<server>``, ``resources={"DATA": 1}``). Each worker's
``SERIF_NODE`` is its config name, so one machine stands in for several nodes. The
scheduler and the workers get the long-running settings of :mod:`serif_dask.service`.
"""

from __future__ import annotations

from typing import Any

from distributed import LocalCluster, Nanny
from distributed.security import Security

from serif_dask.config import SerifConfig
from serif_dask.roles import DATA_PREFIX
from serif_dask.service import service_config, worker_config


def worker_specs(config: SerifConfig, compute: int | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Dask SpecCluster worker specs for every compute node (the first ``compute`` of
    them, when given: adaptive scaling starts the others) and data server."""
    specs: dict[str, dict[str, Any]] = {}
    for node in config.system.compute_nodes[:compute]:
        specs[node.name] = {
            "name": node.name,
            "resources": {"GPU": 1},
            "env": {"SERIF_NODE": node.name},
            "nthreads": 1,
        }
    for server in config.data.servers:
        name = f"{DATA_PREFIX}{server.name}"
        specs[name] = {
            "name": name,
            "resources": {"DATA": 1},
            "env": {"SERIF_NODE": server.name},
            "nthreads": max(1, min(int(server.workers), 4)),
        }
    return specs


def uses_tls(security: Security | None) -> bool:
    """Whether ``security`` (given, or Dask's ``distributed.comm.tls.*`` config) asks for
    TLS: encryption required, or certificates named."""
    security = security if security is not None else Security()
    return bool(security.require_encryption or security.tls_ca_file)


def tls_security(ca_file: str, cert: str, key: str | None = None) -> Security:
    """Dask ``Security`` with one certificate for every role (client, scheduler,
    worker), encryption required: what ``--tls-ca-file/--tls-cert/--tls-key`` mean."""
    roles = {f"tls_{role}_{part}": value for role in ("client", "scheduler", "worker")
             for part, value in (("cert", cert), ("key", key))}
    return Security(tls_ca_file=ca_file, require_encryption=True, **roles)


def _new_cluster(
    config: SerifConfig, asynchronous: bool, dashboard_address: str | None, silence_logs: Any,
    security: Security | None = None,
) -> LocalCluster:
    tls = {"protocol": "tls://", "security": security or Security()} if uses_tls(security) \
        else {}
    cluster = LocalCluster(
        n_workers=0,
        processes=True,
        threads_per_worker=1,
        dashboard_address=dashboard_address or ":0",
        asynchronous=asynchronous,
        silence_logs=silence_logs,
        memory_limit=None,
        scheduler_kwargs={"preload": ["serif_dask.scheduler"]},
        **tls,
    )
    return cluster


def _add_workers(cluster: LocalCluster, config: SerifConfig, compute: int | None) -> None:
    base = dict(cluster.new_spec["options"])
    dask_config = worker_config()
    for name, spec in worker_specs(config, compute).items():
        options = {**base, **spec, "preload": ["serif_dask.worker"], "config": dask_config}
        cluster.worker_spec[name] = {"cls": Nanny, "options": options}


def local_cluster(
    config: SerifConfig, *, dashboard_address: str | None = None, silence_logs: Any = 40,
    security: Security | None = None, compute_workers: int | None = None,
) -> LocalCluster:
    """A LocalCluster with exactly the config's workers, for ``Client(local_cluster(cfg))``.

    With ``security`` asking for TLS (or Dask's ``distributed.comm.tls.*`` config doing
    so), every connection of the cluster is ``tls://`` with those certificates.

    ``compute_workers`` starts only the first that many compute nodes (the others are for
    adaptive scaling, :mod:`serif_dask.adaptive`).

    The scheduler reads most of its settings when it starts; a few (the dashboard's task
    stream) only when first used, so a process hosting it for long also wants
    ``dask.config.set(serif_dask.service.service_settings())`` (``serif-dask run`` does).
    """
    with service_config():
        cluster = _new_cluster(config, False, dashboard_address, silence_logs, security)
    try:
        _add_workers(cluster, config, compute_workers)
        cluster.sync(cluster._correct_state)
        cluster.wait_for_workers(len(cluster.worker_spec), timeout=120)
    except BaseException:
        cluster.close()
        raise
    return cluster


async def start_local_cluster(
    config: SerifConfig, *, dashboard_address: str | None = None, silence_logs: Any = 40,
    security: Security | None = None, compute_workers: int | None = None,
) -> LocalCluster:
    """The asynchronous form of :func:`local_cluster`."""
    with service_config():
        cluster = await _new_cluster(config, True, dashboard_address, silence_logs, security)
    try:
        _add_workers(cluster, config, compute_workers)
        await cluster._correct_state()
        await cluster.wait_for_workers(len(cluster.worker_spec), timeout=120)
    except BaseException:
        await cluster.close()
        raise
    return cluster
