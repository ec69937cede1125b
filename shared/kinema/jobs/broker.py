"""The broker connection of Kinema's Celery apps: kombu's, except that a lost connection does not kill the worker.

Celery 5.7.0 / kombu 5.7.0 with Redis: when Redis goes away while a worker runs a job (`acks_late`: its message is
unacknowledged) and has a slot free (its channel waits in BRPOP for the next message), the consumer calls
`Connection.collect()`, whose close of the channel fails on the dead socket (an error it ignores) and which then
drops the transport's `client`, the `kombu.Connection` that holds the broker's address. The consumer then calls
`Connection.close()`, which closes the channel again; this time the channel hands the unacknowledged message back
through a Redis connection pool it rebuilds from that `client`, now None:

    CRITICAL/MainProcess] Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")
      ... kombu/transport/redis.py, in _connparams: 'host': conninfo.hostname or '127.0.0.1',

That is not a connection error, so nothing catches it and the worker exits with status 1 (tests/jobs/test_celery.py
`test_worker_outlives_redis_killed_under_a_running_job`). The job's own acknowledgement, when it ends, would take the
same path.

`BrokerConnection` leaves the transport its `client` when it lets go of the transport, so the channel reaches Redis
itself: while Redis is down that is a connection error, which the close ignores as kombu means it to; once Redis is
back the running job's acknowledgement goes through, and the consumer has reconnected meanwhile.
"""

from __future__ import annotations

from celery.app.amqp import AMQP as CeleryAMQP
from kombu import Connection

NAME = f"{__name__}:AMQP"  # what `Celery(amqp=...)` takes


class BrokerConnection(Connection):
    """`kombu.Connection` whose transport keeps the broker's address after the connection is collected or closed."""

    def _do_close_transport(self) -> None:
        # kombu also sets `self._transport.client = None` here, which its Redis channels still read (see above).
        self._transport = None


class AMQP(CeleryAMQP):
    """Celery's broker API with `BrokerConnection`."""

    Connection = BrokerConnection
    BrokerConnection = BrokerConnection
