"""Queue overhead: no-op jobs through interpq's whole path vs bare Celery no-op tasks.

Both run in one process tree on the same embedded Redis, with the same worker pool
(prefork, ``--concurrency`` processes), the same log level (INFO) and the same reliability
settings (JSON, acks_late, prefetch 1, task events on for Flower). interpq's path: validate → one transaction of job
rows → one message per job → worker claims the row (UPDATE ... RETURNING), runs the no-op,
marks it succeeded → the submitter sees it in the database. Bare Celery: ``send_task`` → a
task that only INCRs a Redis counter (so completion can be observed without a result backend).

    python benchmarks/queue_overhead.py                 # 3000 jobs each, then 10,000 submitted
    python benchmarks/queue_overhead.py --jobs 500 --submit-jobs 2000   # quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpq.scheduler.client import Client  # noqa: E402
from interpq.settings import Settings  # noqa: E402
from interpq.specs import Noop  # noqa: E402
from interpq.stack.embedded import Stack  # noqa: E402

BARE_APP = textwrap.dedent(
    """
    import os
    from celery import Celery
    import redis
    app = Celery("bare", broker=os.environ["BROKER"])
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_acks_late=True, task_reject_on_worker_lost=True,
                    worker_prefetch_multiplier=1, worker_send_task_events=True)
    _r = None
    @app.task(name="bare.noop")
    def noop():
        global _r
        if _r is None:
            _r = redis.Redis(unix_socket_path=os.environ["BROKER"][len("redis+socket://"):])
        _r.incr("bare:done")
    """
)


def _redis(url: str) -> redis.Redis:
    return redis.Redis(unix_socket_path=url[len("redis+socket://") :])


def bench_bare(stack: Stack, n: int, concurrency: int, tmp: Path) -> dict[str, float]:
    (tmp / "bare_app.py").write_text(BARE_APP)
    broker = stack.env["INTERPQ_BROKER_URL"]
    env = stack.child_env() | {"BROKER": broker, "PYTHONPATH": str(tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-Q", "bare", "-P",
         "prefork", "-c", str(concurrency), "--without-mingle", "--without-gossip", "-l",
         "INFO", "-n", "bare@%h"],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sys.path.insert(0, str(tmp))
    os.environ["BROKER"] = broker
    import bare_app  # type: ignore[import-not-found]

    r = _redis(broker)
    try:
        deadline = time.monotonic() + 60
        while not bare_app.app.control.ping(timeout=0.5):
            assert time.monotonic() < deadline, "bare worker did not start"
        r.set("bare:done", 0)
        t0 = time.perf_counter()
        with bare_app.app.producer_or_acquire() as producer, producer.batch(max_size=n):
            for _ in range(n):
                bare_app.app.send_task("bare.noop", queue="bare", producer=producer)
        t_submit = time.perf_counter() - t0
        while int(r.get("bare:done") or 0) < n:
            time.sleep(0.05)
        total = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
    return {"submit_s": t_submit, "total_s": total, "jobs_per_s": n / total}


def bench_interpq(client: Client, n: int) -> dict[str, float]:
    jobs = [Noop() for _ in range(n)]
    t0 = time.perf_counter()
    batch = client.submit(jobs, name=f"overhead-{n}")
    t_submit = time.perf_counter() - t0
    batch.wait(poll_s=0.5)
    total = time.perf_counter() - t0
    status = batch.status()
    assert status.counts == {"succeeded": n}, status.counts
    return {"submit_s": t_submit, "total_s": total, "jobs_per_s": n / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=3000, help="no-op jobs per side (default 3000)")
    ap.add_argument("--submit-jobs", type=int, default=10_000, help="size of the submit test")
    ap.add_argument("--concurrency", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="interpq-bench-"))
    stack = Stack(tmp, api_workers=0, compute_workers=1, compute_concurrency=args.concurrency,
                  flower=False, provider=False)  # fmt: skip
    with stack:
        env = {k[len("INTERPQ_") :].lower(): v for k, v in stack.env.items()}
        client = Client(Settings(**env))
        bench_interpq(client, 200)  # warm-up: imports, connections, SQLite pages
        ours = bench_interpq(client, args.jobs)
        bare = bench_bare(stack, args.jobs, args.concurrency, tmp)
        big = bench_interpq(client, args.submit_jobs)
    print(f"\nno-op jobs: {args.jobs} each side, 1 worker x {args.concurrency} prefork processes,"
          f" {os.cpu_count()} cores\n")  # fmt: skip
    print(f"{'':28}{'submit s':>10}{'total s':>10}{'jobs/s':>10}")
    for name, r in (("bare Celery (INCR task)", bare), ("interpq (DB + broker)", ours)):
        print(f"{name:28}{r['submit_s']:10.2f}{r['total_s']:10.2f}{r['jobs_per_s']:10.0f}")
    print(
        f"\ninterpq / bare Celery time: {ours['total_s'] / bare['total_s']:.2f}x  "
        f"(target <= 2x); interpq throughput {ours['jobs_per_s']:.0f} jobs/s (target >= 300)"
    )
    print(
        f"submit of {args.submit_jobs} jobs: {big['submit_s']:.2f} s (target <= 10 s); "
        f"all done after {big['total_s']:.1f} s ({big['jobs_per_s']:.0f} jobs/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
