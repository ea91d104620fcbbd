"""Redis connections: one client per broker URL per process, shared by every user of Redis.

The limiter, the leases (run leases and compute locks) and the CLI's status read all ask
``redis_client(url)``; a forked worker process drops the parent's clients
(``forget_after_fork``) so no socket is shared across a fork. ``connect`` makes a new client
(tests, tools that want their own connection). Celery's broker connection is kombu's own.
"""

from __future__ import annotations

import threading

import redis

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def connect(url: str) -> redis.Redis:
    """A new Redis client for a broker URL (``redis://``, ``rediss://`` or ``redis+socket://``)."""
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url[len("redis+socket://") :])
    return redis.Redis.from_url(url)


def redis_client(url: str) -> redis.Redis:
    """The process's client for ``url`` (thread-safe: redis-py pools its connections)."""
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = connect(url)
        return client


def forget_after_fork() -> None:
    """A forked child must not use the parent's sockets: drop every client."""
    with _lock:
        _clients.clear()
