"""Feature interpretation at SAE scale under a provider's rate limit: interpq vs in-process.

One local provider (``interpq serve``, scripted chat answers) rejects any request over L per
sliding second with 429 + Retry-After. Feature records of N features (synthetic sparse
latents, collected by the same core code as the FeatureRecords job) are explained and scored
(detection: 5 activating + 5 silent contexts in one prompt), i.e. 2·N chat requests, by:

  (a) interpq: an Explain and a Score job (12 parts each) on three api worker processes
      (4 threads each) under the global limiter (rpm = 60·L, default safety margin);
  (b) delphi / SAEBench style: three processes, each an ``asyncio.Semaphore(10)`` over
      httpx, explaining then scoring its third of the features, with delphi's OpenRouter
      client semantics (one attempt; on an error sleep 1 s and give up: the feature is lost);
  (c) the same, retrying a 429 after its Retry-After up to 3 attempts (the OpenAI client's
      default ``max_retries=2``).

Reported from the server's counts: successful requests per second over the run (from the
first request's arrival to the last one's) as a fraction of L, 429s, the most requests accepted
and sent in any 1 s window, and features explained and scored.

    python benchmarks/autointerp.py                          # N=2000, L=40
    python benchmarks/autointerp.py --features 300 --rps 20  # quicker
    python benchmarks/autointerp.py --database-url postgresql+psycopg://...  # PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpq.core.autointerp import (  # noqa: E402
    RecordSet,
    RecordSettings,
    collect,
    detection_samples,
    explainer_messages,
    finish,
    held_out,
    parse_explanation,
    parse_predictions,
    scorer_messages,
)
from interpq.scheduler.client import Client  # noqa: E402
from interpq.settings import Settings  # noqa: E402
from interpq.specs import Explain, Score  # noqa: E402
from interpq.stack.embedded import Stack  # noqa: E402

MODEL = "judge"
SCRIPT = {"rules": [
    {"match": "^Latent explanation", "replies": ["[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]"]},
    {"match": "", "replies": ["[EXPLANATION]: Tokens of one synthetic pattern."]},
]}  # fmt: skip
SETTINGS = RecordSettings(n_top=10, n_sample=20, n_quantiles=5, n_negative=10,
                          context_left=12, context_right=3)  # fmt: skip
N_EXAMPLES = 10


def make_records(n_features: int, path: Path, seed: int = 0) -> RecordSet:
    """Records of ``n_features`` features over synthetic sparse latents (each fires on ~2 %
    of 7,200 tokens), collected as the FeatureRecords job does."""
    g = torch.Generator().manual_seed(seed)
    n_texts, length = 300, 24
    text_id = torch.arange(n_texts).repeat_interleave(length)
    position = torch.arange(length).repeat(n_texts)

    def batches() -> Any:
        for lo in range(0, n_texts * length, 2400):
            n = min(2400, n_texts * length - lo)
            fire = torch.rand(n, n_features, generator=g) < 0.02
            x = torch.where(fire, torch.rand(n, n_features, generator=g) * 5, 0.0)
            sl = slice(lo, lo + n)
            yield x, {"text_id": text_id[sl], "position": position[sl],
                      "token_id": (text_id[sl] * 7 + position[sl]) % 500}  # fmt: skip

    partial = collect(lambda t: t, batches(), n_features, SETTINGS)
    words = [f" w{i}" for i in range(500)]
    records = finish(partial, SETTINGS, lambda ids: [words[i] for i in ids], {"synthetic": True})
    records.save(path)
    return records


# ---- the server ---------------------------------------------------------------------------


def server(stack: Stack, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = stack.provider_url[: -len("/v1")] + path  # type: ignore[index]
    resp = requests.post(url, json=body, timeout=10) if body is not None else requests.get(
        url, timeout=10)  # fmt: skip
    resp.raise_for_status()
    out: dict[str, Any] = resp.json()
    return out


def rate(stats: dict[str, Any], rps: float) -> dict[str, Any]:
    """Successful requests per second over the run: from the first request's arrival to the
    last request's (any answer), as the server saw them."""
    span = (stats["last_unix_s"] or 0) - (stats["first_unix_s"] or 0)
    ok = int(stats["by_status"].get("200", 0))
    achieved = ok / span if span > 0 else 0.0
    return {"requests": stats["n_requests"], "ok": ok, "n_429": stats["n_429"],
            "span_s": round(span, 1), "achieved_rps": round(achieved, 2),
            "fraction_of_L": round(achieved / rps, 3),
            "max_accepted_in_1s": stats["max_accepted_in_1s"],
            "max_sent_in_1s": stats["max_sent_in_1s"]}  # fmt: skip


# ---- (a) interpq ------------------------------------------------------------------------------


def run_interpq(stack: Stack, records: Path, n: int, rps: float) -> dict[str, Any]:
    client = Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))
    explain = Explain(name="explain", records=str(records), provider="local", model=MODEL,
                      parts=12, n_examples=N_EXAMPLES, max_tokens=40)  # fmt: skip
    score = Score(name="score", explanations=explain, provider="local", model=MODEL,
                  scorers=["detection"], n_active=5, n_negative=5, examples_per_prompt=10,
                  parts=12, max_tokens=40)  # fmt: skip
    server(stack, "/stats/reset", {})
    t0 = time.monotonic()
    batch = client.submit([explain, score], name="autointerp-bench")
    status = batch.wait(timeout_s=3600)
    wall = time.monotonic() - t0
    res = {r.name: r for r in batch.results()}
    out = rate(server(stack, "/stats"), rps)
    out.update(wall_s=round(wall, 1), states=status.counts,
               explained=res["explain"].result["n_ok"] if res["explain"].result else 0,
               scored=res["score"].result["scorers"]["detection"]["n_features"]
               if res["score"].result else 0)  # fmt: skip
    return out


# ---- (b, c) in-process, as delphi / SAEBench ------------------------------------------------


async def _feature(client: Any, url: str, sem: asyncio.Semaphore, records: RecordSet, f: int,
                   attempts: int, rejected: list[int]) -> tuple[bool, bool]:  # fmt: skip
    async def chat(messages: list[dict[str, str]]) -> str | None:
        payload = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0.0}
        for _ in range(attempts):
            async with sem:
                try:
                    r = await client.post(url, json=payload, timeout=100)
                    if r.status_code == 200:
                        return str(r.json()["choices"][0]["message"]["content"])
                    wait = float(r.headers.get("Retry-After", 1)) if r.status_code == 429 else 1
                    rejected[0] += r.status_code == 429
                except Exception:  # noqa: BLE001 - as delphi: log and retry
                    wait = 1.0
            await asyncio.sleep(wait)
        return None

    top = records.examples(f, "top")[:N_EXAMPLES]
    text = await chat(explainer_messages([(c.tokens, c.acts) for c in top]))
    explanation = parse_explanation(text or "")
    if explanation is None:
        return False, False
    samples = detection_samples(held_out(records.examples(f, "sample"), top),
                                records.examples(f, "negative"), 5, 5, seed=f)  # fmt: skip
    answer = await chat(scorer_messages("detection", explanation, [s.text for s in samples]))
    return True, parse_predictions(answer or "", len(samples)) is not None


def _process(base_url: str, records_path: str, features: list[int], attempts: int,
             out: Any) -> None:  # fmt: skip
    import httpx

    records = RecordSet.load(records_path)

    async def main() -> tuple[int, int, int]:
        sem = asyncio.Semaphore(10)
        rejected = [0]
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
            url = base_url + "/chat/completions"
            done = await asyncio.gather(*(
                _feature(client, url, sem, records, f, attempts, rejected) for f in features
            ))  # fmt: skip
        return sum(e for e, _ in done), sum(s for _, s in done), rejected[0]

    out.put(asyncio.run(main()))


def run_in_process(
    stack: Stack, records: Path, n: int, rps: float, attempts: int
) -> dict[str, Any]:
    server(stack, "/stats/reset", {})
    queue: Any = mp.get_context("spawn").Queue()
    thirds = [list(range(n))[i::3] for i in range(3)]
    procs = [mp.get_context("spawn").Process(
        target=_process, args=(stack.provider_url, str(records), part, attempts, queue))
        for part in thirds]  # fmt: skip
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    wall = time.monotonic() - t0
    out = rate(server(stack, "/stats"), rps)
    out.update(wall_s=round(wall, 1), explained=sum(g[0] for g in got),
               scored=sum(g[1] for g in got))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=2000)
    ap.add_argument("--rps", type=float, default=40.0, help="the server's limit L (requests/s)")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the server's added latency")
    ap.add_argument("--database-url", default=None, help="default: SQLite in the work dir")
    ap.add_argument("--skip", choices=["interpq", "in-process"], action="append", default=[])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="interpq-autointerp-bench-"))
    records = work / "records"
    t0 = time.monotonic()
    make_records(args.features, records)
    print(f"records of {args.features} features in {time.monotonic() - t0:.1f} s → {records}")
    (work / "script.json").write_text(json.dumps(SCRIPT))
    (work / "providers.toml").write_text(
        f"[providers.local]\nrpm = {int(args.rps * 60)}\ntpm = 1000000000\nmax_concurrency = 64\n"
        f'[providers.local.models."{MODEL}"]\ninput_usd_per_mtok = 0.0\noutput_usd_per_mtok = 0.0\n'
    )
    os.environ["INTERPQ_PROVIDERS"] = str(work / "providers.toml")
    stack = Stack(work / "stack", api_workers=3, api_concurrency=4, compute_workers=0,
                  flower=False, database_url=args.database_url,
                  provider_args=["--rate-limit-rps", str(args.rps), "--script",
                                 str(work / "script.json"), "--added-latency-ms",
                                 str(args.latency_ms)])  # fmt: skip
    rows: dict[str, dict[str, Any]] = {}
    with stack:
        if "interpq" not in args.skip:
            rows["interpq (3 api workers, global limiter)"] = run_interpq(
                stack, records, args.features, args.rps
            )
        if "in-process" not in args.skip:
            rows["in-process (3 × Semaphore(10), delphi: 1 attempt)"] = run_in_process(
                stack, records, args.features, args.rps, attempts=1
            )
            rows["in-process (3 × Semaphore(10), 3 attempts + Retry-After)"] = run_in_process(
                stack, records, args.features, args.rps, attempts=3
            )
    print(
        f"\nN = {args.features} features, 2·N chat requests; L = {args.rps:g} requests/s "
        f"(sliding 1 s window), {args.latency_ms:g} ms added latency"
    )
    for name, r in rows.items():
        print(f"\n{name}\n  " + "\n  ".join(f"{k}: {v}" for k, v in r.items()))
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
