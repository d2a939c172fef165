"""The run's Redis password on a worker: carried by a worker plugin, never by a reply.

The client registers :class:`RedisCredentials` (the scheduler keeps it for workers that
join later); its ``setup`` leaves the password here, where :mod:`serif_dask.dataplane`
reads it when it first connects.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.worker import Worker

#: The run's Redis password on this worker, set by :class:`RedisCredentials`.
_redis_password: str | None = None


class RedisCredentials(WorkerPlugin):
    """The run's Redis password, carried to every worker (those that join later too) inside
    the plugin the client registers, so that it is never in a scheduler handler's reply,
    which any client of the scheduler may ask for. Use Dask TLS to keep it off the wire.
    """

    name = "serif-redis-credentials"

    def __init__(self, password: str | None) -> None:
        self.password = password

    def __repr__(self) -> str:
        return f"RedisCredentials(password={'***' if self.password else None})"

    def setup(self, worker: Worker) -> None:
        global _redis_password
        _redis_password = self.password

    def teardown(self, worker: Worker) -> None:
        global _redis_password
        _redis_password = None


def redis_password() -> str | None:
    """The password :class:`RedisCredentials` brought to this worker, if any."""
    return _redis_password
