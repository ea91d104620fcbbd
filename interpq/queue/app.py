"""The Celery application: JSON only, late acks, one message per job part, two queues.

- ``api``: I/O-bound calls to model APIs; run with the thread pool and high concurrency.
- ``compute``: CPU/GPU work; prefork with one process per core or GPU (prefork, not solo, even
  for one: its main process keeps sending heartbeats while a long part runs).

Results do not go to a Celery result backend: tasks write them to the database. The broker
carries ``[job_id, part]`` and a label only. ``acks_late`` + ``reject_on_worker_lost`` mean a
message is acknowledged after its task ends, so a worker that dies mid-task gets its work
redelivered; tasks are idempotent by job id, so a redelivery never duplicates rows. The one
exception is ``interpq.scheduled_batch`` (``interpq.scheduler.periodic``), acknowledged on receipt: a periodic
batch is submitted at most once per tick.

Stopping: SIGTERM is Celery's warm shutdown (finish every running task, however long).
Containers run workers with ``REMAP_SIGTERM=SIGQUIT`` and ``INTERPQ_SOFT_SHUTDOWN_TIMEOUT_S``
below their stop grace period instead: running tasks get that long, then are cancelled and
their messages requeued at once, rather than being SIGKILLed and coming back only after the
visibility timeout. A cancelled part's run lease lapses within ``INTERPQ_PART_LEASE_S``, after
which another worker redoes it (skipping the calls that already succeeded).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from interpq.errors import ConfigError
from interpq.settings import Settings, get_settings

log = logging.getLogger(__name__)
QUEUES = ("api", "compute")
TASK_MODULES = ("interpq.worker.tasks", "interpq.scheduler.periodic", "interpq.queue.reconcile")
"""The modules whose tasks a worker runs: the job kinds, and what beat's ticks run (periodic
batches, the reconciler)."""


def _closed_transport_is_a_connection_error() -> None:
    """Work around kombu 5.7 so a worker survives Redis going away mid-work.

    After a connection loss Celery's consumer collects the connection (its transport's client
    becomes None) and then closes it; closing the channel restores unacknowledged messages,
    which builds a new Redis pool from that None and fails with ``AttributeError``. That is
    not one of the transport's connection errors, so the consumer stops for good (the chaos
    suite saw both api workers hang this way). Raising Redis' ``ConnectionError`` instead lets
    kombu ignore it while closing; the consumer reconnects, and the messages it held stay in
    Redis's unacked set (restored after the visibility timeout, or by the reconciler)."""
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "interpq_patched", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is already closed")
        return original(self, asynchronous)

    _connparams.interpq_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams


def make_app(broker_url: str | None = None, settings: Settings | None = None) -> Celery:
    """A Celery app for the broker, configured from ``settings`` (default: the process's)."""
    _closed_transport_is_a_connection_error()
    settings = settings or get_settings()
    url = broker_url or settings.broker_url
    # Task modules are named, not imported: a worker imports them at start; a submitter sends
    # tasks by name and never needs them (so this layer knows no job kind).
    app = Celery("interpq", set_as_current=False, include=TASK_MODULES)
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # look for messages of dead workers every few seconds (kombu's default is ~100 s)
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
        },
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="compute",
        worker_send_task_events=True,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        # A Redis blip must not kill running work (an hour of SAE training, say): tasks keep
        # running through a lost broker connection and wait for Redis where they need it
        # (queue/outage.py). Their acknowledgement may then be lost: the message comes back
        # after the visibility timeout and finds the part finished (tasks are idempotent).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Cold shutdown (SIGQUIT; SIGTERM too under REMAP_SIGTERM=SIGQUIT, as compose sets):
        # running tasks get this long to finish, then are cancelled, and kombu's Redis QoS
        # puts every unacknowledged message back on its queue as the channel closes.
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_s,
    )
    return app


_apps: dict[str, Celery] = {}


def get_app(broker_url: str | None = None, settings: Settings | None = None) -> Celery:
    """The process-wide app for a broker URL (default: the settings'), configured from
    ``settings`` when first made (a ``Client``'s own); ``ConfigError`` if there is no URL."""
    settings = settings or get_settings()
    url = broker_url or settings.broker_url
    if not url:
        raise ConfigError(
            "INTERPQ_BROKER_URL is not set: start a stack with `interpq up` (it prints the "
            "variables to export) or point it at your Redis, e.g. redis://localhost:6379/0"
        )
    if url not in _apps:
        _apps[url] = make_app(url, settings)
    return _apps[url]


@worker_process_init.connect
def _after_fork(**_kwargs: object) -> None:
    from interpq.models.db import dispose_engines
    from interpq.queue.leases import forget_after_fork

    dispose_engines(after_fork=True)
    forget_after_fork()


def __getattr__(name: str) -> Celery:  # lazy, so importing this module needs no broker
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
