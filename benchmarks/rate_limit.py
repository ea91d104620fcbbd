"""Global rate limiting: Celery's per-worker ``rate_limit`` vs interpq's limiter, one run.

The same local provider (``interpq serve``) enforces a sliding-window limit of L requests/s and
answers overrun with 429 + Retry-After. 8 worker processes make N embeddings calls:

  (a) bare Celery, ``rate_limit=f"{L}/s"`` on the task (per worker instance, as documented)
  (b) bare Celery, ``rate_limit=f"{L/8}/s"`` (the limit divided by the workers)
  (c) interpq: Benchmark jobs under the global limiter (rpm = 60·L, default safety margin)
  (d) interpq with tokens/min as the binding limit (tpm at half of what L requests use)

Reported, from the server's counts: successful requests/s over the whole run (n_ok over the
span from the first request's arrival to the last successful one's) as a fraction of L, 429s,
the most requests *sent* in any 1 s window (429s included: overrun shows here) and the most
accepted; and wall time from the moment the workers answer a ping to the last answer. Bare
tasks retry a 429 after its Retry-After.

    python benchmarks/rate_limit.py                 # L=20, N=400
    python benchmarks/rate_limit.py --rps 10 --calls 150   # quicker
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpq.scheduler.client import Client  # noqa: E402
from interpq.settings import Settings  # noqa: E402
from interpq.specs import Benchmark  # noqa: E402
from interpq.stack.embedded import Stack  # noqa: E402

PROMPT = "Sparse autoencoders find interpretable features in activations."
BARE_APP = textwrap.dedent(
    """
    import os, requests
    from celery import Celery
    app = Celery("bare", broker=os.environ["BROKER"])
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_acks_late=True, worker_prefetch_multiplier=1)
    URL = os.environ["PROVIDER"] + "/embeddings"

    @app.task(name="bare.call", bind=True, rate_limit=os.environ["RATE"], max_retries=None)
    def call(self):
        r = requests.post(URL, json={"model": "all-MiniLM-L6-v2", "input": os.environ["PROMPT"]},
                          timeout=30)
        if r.status_code == 429:
            raise self.retry(countdown=float(r.headers.get("Retry-After", 1)))
        r.raise_for_status()
    """
)


def server(url: str, path: str, body: dict | None = None) -> dict:
    root = url[: -len("/v1")]
    resp = (
        requests.post(root + path, json=body, timeout=10)
        if body is not None
        else requests.get(root + path, timeout=10)
    )
    return resp.json()


def measure(provider_url: str, run) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Run ``run`` (workers already answering) against fresh server stats."""
    server(provider_url, "/stats/reset", {})
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    stats = server(provider_url, "/stats")
    n_ok = int(stats["by_status"].get("200", 0))
    span_s = (stats["last_ok_unix_s"] or 0.0) - (stats["first_unix_s"] or 0.0)
    rate = n_ok / span_s if span_s > 0 else 0.0
    return {"ok_rps": rate, "n_429": stats["n_429"], "max_sent_1s": stats["max_sent_in_1s"],
            "max_ok_1s": stats["max_accepted_in_1s"], "wall_s": wall, "n_ok": n_ok}  # fmt: skip


@contextmanager
def bare_workers(tmp: Path, broker: str, provider_url: str, rate: str, workers: int) -> Iterator:
    """Bare Celery workers with ``rate_limit=rate``; yields their app once all answer a ping."""
    (tmp / "bare_app.py").write_text(BARE_APP)
    env = {**os.environ, "BROKER": broker, "PROVIDER": provider_url, "RATE": rate,
           "PROMPT": PROMPT, "PYTHONPATH": str(tmp)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bare_app",
                "worker",
                "-P",
                "solo",
                "-Q",
                "bare",
                "-n",
                f"bare{i}@%h",
                "--without-mingle",
                "--without-gossip",
                "-l",
                "ERROR",
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for i in range(workers)
    ]
    sys.path.insert(0, str(tmp))
    os.environ.update(BROKER=broker, PROVIDER=provider_url, RATE=rate, PROMPT=PROMPT)
    import importlib

    import bare_app  # type: ignore[import-not-found]

    importlib.reload(bare_app)
    try:
        while len(bare_app.app.control.ping(timeout=0.5) or []) < workers:
            pass
        yield bare_app.app
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def run_bare(app, provider_url: str, n: int) -> None:  # type: ignore[no-untyped-def]
    """Send ``n`` calls; done when the server has answered n of them with 200."""
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bare.call", queue="bare", producer=producer)
    while server(provider_url, "/stats")["by_status"].get("200", 0) < n:
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rps", type=float, default=20, help="server-side limit L (requests/s)")
    ap.add_argument("--calls", type=int, default=400, help="calls per configuration")
    ap.add_argument("--workers", type=int, default=8, help="worker processes")
    args = ap.parse_args()
    L, n, w = args.rps, args.calls, args.workers
    tmp = Path(tempfile.mkdtemp(prefix="interpq-rl-"))
    tokens_per_call = 14  # what the local provider reports for PROMPT (checked below)
    prov = tmp / "providers.toml"
    prov.write_text(
        f"[providers.local]\nrpm = {int(L * 60)}\ntpm = 100000000\nmax_concurrency = 64\n"
    )
    os.environ["INTERPQ_PROVIDERS"] = str(prov)
    stack = Stack(tmp / "stack", api_workers=w, api_concurrency=2, compute_workers=0,
                  flower=False, provider_args=["--preload", "--rate-limit-rps", str(L)])  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    with stack:
        url = stack.provider_url
        assert url is not None
        usage = requests.post(
            url + "/embeddings", json={"model": "all-MiniLM-L6-v2", "input": PROMPT}, timeout=30
        ).json()["usage"]
        tokens_per_call = int(usage["prompt_tokens"])
        broker = stack.env["INTERPQ_BROKER_URL"]
        for name, rate in (("(a) Celery rate_limit=L", f"{L:g}/s"),
                           ("(b) Celery rate_limit=L/8", f"{L / w:g}/s")):  # fmt: skip
            with bare_workers(tmp, broker, url, rate, w) as app:
                results[name] = measure(url, lambda app=app: run_bare(app, url, n))
        client = Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))

        def ours() -> None:
            b = client.submit(
                [
                    Benchmark(
                        provider="local",
                        models=["all-MiniLM-L6-v2"],
                        endpoint="embeddings",
                        prompt=PROMPT,
                        requests=n,
                        concurrency=2 * w,
                    )
                ],
                name="rl",
            )
            status = b.wait(timeout_s=3600)
            assert status.counts == {"succeeded": 1}, b.results()[0].error

        results["(c) interpq limiter"] = measure(url, ours)
    # (d): tokens/min binding at half of what L requests/s would use
    tpm = int(tokens_per_call * L * 60 / 2)
    prov.write_text(f"[providers.local]\nrpm = {int(L * 60)}\ntpm = {tpm}\nmax_concurrency = 64\n")
    stack = Stack(tmp / "stack2", api_workers=w, api_concurrency=2, compute_workers=0,
                  flower=False, provider_args=["--preload", "--rate-limit-rps", str(L)])  # fmt: skip
    with stack:
        url = stack.provider_url
        client = Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))
        results["(d) interpq, tpm binding"] = measure(url, ours)  # type: ignore[arg-type]
    print(f"\nserver limit L = {L:g} req/s (sliding 1 s window), {w} worker processes, "
          f"{n} calls each, {os.cpu_count()} cores\n")  # fmt: skip
    print(f"{'':28}{'ok req/s':>9}{'of L':>7}{'429s':>7}{'sent/1s':>9}{'ok/1s':>7}{'wall s':>8}")
    for name, r in results.items():
        print(
            f"{name:28}{r['ok_rps']:9.2f}{r['ok_rps'] / L:7.0%}{r['n_429']:7d}"
            f"{r['max_sent_1s']:9d}{r['max_ok_1s']:7d}{r['wall_s']:8.1f}"
        )
    print("sent/1s, ok/1s: the most requests received (429s included) / accepted in any 1 s")
    d = results["(d) interpq, tpm binding"]
    print(
        f"\n(d) tpm = {tpm} ({tokens_per_call} tokens/call): achieved "
        f"{d['ok_rps'] * tokens_per_call * 60:.0f} tokens/min = "
        f"{d['ok_rps'] * tokens_per_call * 60 / tpm:.0%} of tpm"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
