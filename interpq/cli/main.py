"""``interpq``: the command line. Every error is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from interpq.cli.status import REPAIR_HELP, cmd_repair, cmd_status
from interpq.errors import InterpqError

EPILOG = """\
configuration (environment or .env): INTERPQ_BROKER_URL, INTERPQ_DATABASE_URL (default
sqlite:///interpq.db), INTERPQ_ARTIFACTS_DIR, INTERPQ_PROVIDERS (TOML providers file),
INTERPQ_FLOWER_USER / INTERPQ_FLOWER_PASSWORD. Provider keys are read from the variable the
provider names (e.g. HOLYSHEEP_API_KEY) and never stored.

quick start:  interpq demo            (everything embedded, ends by itself)
              interpq up              (same stack, kept running; prints the exports)
              interpq submit batch.yaml --wait
              interpq results --since 24h --provider P --plot latency.png
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from interpq.reports.tables import jobs_table, latency_table
    from interpq.scheduler.client import Client
    from interpq.settings import Settings
    from interpq.stack.demo import demo_jobs, science_summary
    from interpq.stack.embedded import Stack

    stop_on_signals()
    t0 = time.monotonic()
    workdir = Path(args.workdir)
    print(f"interpq demo: starting an embedded stack in {workdir.resolve()} ...", flush=True)
    stack = Stack(
        workdir,
        api_concurrency=8,
        compute_workers=2,
        flower=not args.no_flower,
        provider_args=["--preload"],
    )
    try:
        with stack:
            print(f"  broker   {stack.env['INTERPQ_BROKER_URL']} (embedded Redis)")
            print(f"  database {stack.env['INTERPQ_DATABASE_URL']}")
            print(f"  provider {stack.provider_url} (local models; chat model has random weights)")
            if stack.flower_url:
                print(f"  flower   {stack.flower_url}  {_flower_auth(stack)}")
            client = Client(Settings(**_settings_kwargs(stack.env)))
            batch = client.submit(demo_jobs(args.requests), name="demo")
            print(f"submitted batch {batch.name} ({batch.id})", flush=True)
            batch.wait(progress=True, timeout_s=args.timeout)
            results = batch.results()
            print()
            print(jobs_table(results))
            print()
            print("latency per model (ms; percentiles over successful calls, linear interpolation)")
            print(latency_table(results))
            print()
            print(science_summary(results))
    except KeyboardInterrupt:  # the stack's __exit__ has stopped every child by now
        print(f"\ndemo interrupted after {time.monotonic() - t0:.1f} s; every process stopped.")
        return 130
    print(f"\ndemo finished in {time.monotonic() - t0:.1f} s; every process stopped.")
    print(f"inspect it later: INTERPQ_DATABASE_URL={stack.env['INTERPQ_DATABASE_URL']} "
          f"interpq results {batch.id}")  # fmt: skip
    return 0 if all(r.state == "succeeded" for r in results) else 1


def _settings_kwargs(env: dict[str, str]) -> dict[str, str]:
    prefix = "INTERPQ_"
    return {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}


def _flower_auth(stack: Any) -> str:
    """Flower's credentials for the terminal: a generated password is shown, a chosen one not."""
    if stack.flower_password_generated:
        return (f"user {stack.flower_user}  password {stack.flower_password}  (generated; set "
                "INTERPQ_FLOWER_USER / INTERPQ_FLOWER_PASSWORD to choose)")  # fmt: skip
    return f"user {stack.flower_user}  password from INTERPQ_FLOWER_PASSWORD"


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` (once; later ones are ignored while the
    stack stops), whatever this process inherited: a shell that starts a command in the
    background leaves SIGINT ignored, and SIGTERM's default would skip every cleanup."""
    import signal

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def cmd_up(args: argparse.Namespace) -> int:
    from interpq.stack.embedded import Stack

    stop_on_signals()
    stack = Stack(
        Path(args.workdir),
        api_workers=args.api_workers,
        compute_workers=args.compute_workers,
        flower=not args.no_flower,
        provider_args=["--preload"],
    )
    with stack:
        print("interpq stack is up. In another shell:\n")
        print(stack.exports())
        if stack.flower_url:
            print(f"\nFlower: {stack.flower_url}  {_flower_auth(stack)}")
        print(f"logs: {stack.workdir / 'logs'}\nCtrl-C stops everything.", flush=True)
        try:
            while all(p.popen.poll() is None for p in stack.procs):
                time.sleep(0.5)
            dead = [p.name for p in stack.procs if p.popen.poll() is not None]
            print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping ...")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from interpq.queue.app import get_app
    from interpq.settings import get_settings

    get_app()  # fails with a clear message when no broker is configured
    settings = get_settings()
    queues = args.queues
    concurrency = args.concurrency or (
        settings.api_concurrency if queues == "api" else settings.compute_concurrency
    )
    pool = args.pool or ("threads" if queues == "api" else "prefork")
    name = args.name or f"{queues.replace(',', '-')}-{os.getpid()}@%h"
    argv = [
        sys.executable, "-m", "celery", "-A", "interpq.queue.app", "worker",
        "-Q", queues, "-P", pool, "-c", str(concurrency), "-n", name, "-l", args.loglevel,
    ]  # fmt: skip
    os.execv(sys.executable, argv)  # exec: signals reach Celery directly
    return 0  # pragma: no cover


def cmd_flower(args: argparse.Namespace) -> int:
    from interpq.queue.app import get_app
    from interpq.settings import get_settings

    get_app()
    settings = get_settings()
    user = settings.flower_user or "interpq"
    password = settings.flower_password
    if not password:
        password = secrets.token_urlsafe(12)
        print(f"Flower basic auth: user {user} password {password} "
              "(set INTERPQ_FLOWER_USER / INTERPQ_FLOWER_PASSWORD to choose)", flush=True)  # fmt: skip
    os.environ["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    argv = [
        sys.executable, "-m", "celery", "-A", "interpq.queue.app", "flower",
        f"--address={args.address}", f"--port={args.port}",
    ]  # fmt: skip
    print(f"Flower on http://{args.address}:{args.port}", flush=True)
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_serve(argv: list[str]) -> int:
    from interpq.providers.local.server import main

    return main(argv)


def cmd_submit(args: argparse.Namespace) -> int:
    from interpq.cli.loop import print_results
    from interpq.scheduler.client import Client, load_batch_file

    spec = load_batch_file(args.file)
    batch = Client().submit(spec)
    print(f"submitted batch {batch.name} ({batch.id}): {len(spec.jobs)} jobs")
    if not args.wait:
        return 0
    status = batch.wait(progress=not args.no_progress, timeout_s=args.timeout)
    results = batch.results()
    if args.jsonl:
        _write_feature_jsonl(args.jsonl, results)
    print_results(results, top=args.top, errors=args.errors)
    return 0 if status.ok else 1


def _write_feature_jsonl(path: str, results: Any) -> None:
    """``--jsonl``: one JSON line per explained feature (its explanation and scores)."""
    from interpq.reports.interpretations import feature_records

    lines = feature_records(results)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    print(f"{len(lines)} explained features → {path}", file=sys.stderr)


def cmd_results(args: argparse.Namespace) -> int:
    from interpq.cli.loop import print_results
    from interpq.errors import SpecError
    from interpq.scheduler.client import Client

    if args.since is not None:
        return _results_since(args)
    if args.batch is None:
        raise SpecError("results: give a BATCH (id or name), or --since 24h for latency over time")
    if args.provider or args.plot:
        raise SpecError("results: --provider and --plot go with --since (latency over time)")
    results = Client().batch(args.batch).results()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
        return 0
    if args.jsonl:
        _write_feature_jsonl(args.jsonl, results)
    print_results(results, top=args.top, errors=args.errors)
    return 0


def _results_since(args: argparse.Namespace) -> int:
    from interpq.reports.history import history_table, latency_history, plot_history
    from interpq.scheduler.client import Client
    from interpq.specs.durations import parse_since

    since = parse_since(args.since)
    rows = latency_history(Client().engine, since, provider=args.provider, batch=args.batch)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
    else:
        print(f"latency per run since {since:%Y-%m-%d %H:%M:%S} UTC (ms; percentiles over "
              "successful calls)")  # fmt: skip
        print(history_table(rows))
    if args.plot:
        if not rows:
            print("no plot written: nothing to plot", file=sys.stderr)
            return 1
        path = plot_history(rows, args.plot)
        print(f"plot: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    from interpq.scheduler.periodic import load_schedule, run_beat

    if args.check and args.schedule is None:
        raise InterpqError("beat --check needs --schedule FILE")
    if args.check:
        from interpq.providers.config import load_providers
        from interpq.settings import get_settings

        entries = load_schedule(args.schedule, load_providers(get_settings()))
        for e in entries:
            when = f"every {e.every}" if e.every else f"cron {e.cron!r} (UTC)"
            print(f"{e.name}: {when}, batch {e.batch['name']!r}, "
                  f"{len(e.batch.get('jobs') or [])} jobs")  # fmt: skip
        return 0
    run_beat(args.schedule, args.state, args.loglevel)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from interpq.models.db import current_revision, make_engine, upgrade
    from interpq.settings import get_settings

    engine = make_engine(get_settings().resolved_database_url())
    upgrade(engine, args.revision)
    print(f"database at revision {current_revision(engine)}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from interpq.specs import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="interpq",
        description="A distributed job queue for batched interpretability experiments.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run everything embedded, submit a demo batch, print results")
    d.add_argument("--workdir", default="interpq-demo", help="database, artifacts, logs (kept)")
    d.add_argument("--requests", type=int, default=40, help="requests per model (default 40)")
    d.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    d.add_argument("--no-flower", action="store_true", help="do not start Flower")
    d.set_defaults(fn=cmd_demo)

    u = sub.add_parser("up", help="start the embedded stack and keep it running (Ctrl-C stops)")
    u.add_argument("--workdir", default="interpq-stack", help="database, artifacts, logs (kept)")
    u.add_argument("--api-workers", type=int, default=1, help="api worker processes")
    u.add_argument("--compute-workers", type=int, default=1, help="compute worker processes")
    u.add_argument("--no-flower", action="store_true", help="do not start Flower")
    u.set_defaults(fn=cmd_up)

    w = sub.add_parser("worker", help="start one Celery worker against INTERPQ_BROKER_URL")
    w.add_argument("--queues", "-Q", default="api", choices=["api", "compute", "api,compute"],
                   metavar="QUEUES",
                   help="api, compute or api,compute (default api). api: model API calls "
                   "(threads); compute: CPU/GPU work (processes)")  # fmt: skip
    w.add_argument("--concurrency", "-c", type=int, default=None,
                   help="threads (api) or processes (compute); default from settings")  # fmt: skip
    w.add_argument("--pool", "-P", default=None, choices=["threads", "prefork", "solo"],
                   help="Celery pool (default: threads for api, prefork for compute)")  # fmt: skip
    w.add_argument("--name", "-n", default=None, help="node name (default QUEUE-PID@host)")
    w.add_argument("--loglevel", "-l", default="INFO",
                   help="DEBUG, INFO, WARNING, ERROR (default INFO)")  # fmt: skip
    w.set_defaults(fn=cmd_worker)

    f = sub.add_parser("flower", help="start Flower (basic auth) against INTERPQ_BROKER_URL")
    f.add_argument("--address", default="127.0.0.1", help="listen address (default localhost)")
    f.add_argument("--port", type=int, default=5555, help="listen port (default 5555)")
    f.set_defaults(fn=cmd_flower)

    sub.add_parser("serve", help="run the local OpenAI-compatible provider (see serve --help)",
                   add_help=False)  # fmt: skip

    s = sub.add_parser("submit", help="submit a YAML or JSON batch file")
    s.add_argument("file", help="batch file: {name, max_cost_usd, jobs: [...]} (see `schema`)")
    s.add_argument("--wait", action="store_true", help="wait with a progress bar, print results")
    s.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    s.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    s.add_argument("--errors", action="store_true",
                   help="with --wait: print every failed or cancelled job's error whole")  # fmt: skip
    s.add_argument("--top", type=int, default=5, metavar="N",
                   help="with --wait, feature interpretation: the N best and worst features")  # fmt: skip
    s.add_argument("--jsonl", metavar="FILE", default=None,
                   help="with --wait, feature interpretation: one JSON line per explained "
                   "feature")  # fmt: skip
    s.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", help="job counts by state, for one batch or the newest ones")
    st.add_argument("batch", nargs="?", help="batch id or name (default: the newest batches)")
    st.add_argument("--limit", type=int, default=10)
    st.set_defaults(fn=cmd_status)

    rp = sub.add_parser("repair", help="publish again the queued/running work that no broker "
                        "message, run lease or worker accounts for (beat does it by itself)",
                        description=REPAIR_HELP)  # fmt: skip
    rp.add_argument("batch", nargs="?", help="batch id or name (default: every batch)")
    rp.add_argument("--settle", type=float, default=2.0,
                    help="seconds between the two looks that must both miss a part (default 2)")  # fmt: skip
    rp.set_defaults(fn=cmd_repair)

    r = sub.add_parser("results", help="a batch's jobs and latency percentiles per model, "
                       "or (--since) latency over time")  # fmt: skip
    r.add_argument("batch", nargs="?",
                   help="batch id or name (the newest batch of that name); with --since: "
                   "only the batches of that id or name, optional")  # fmt: skip
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.add_argument("--errors", action="store_true",
                   help="print every failed or cancelled job's error whole")  # fmt: skip
    r.add_argument(
        "--top",
        type=int,
        default=5,
        metavar="N",
        help="feature interpretation: the N best and worst features per scorer",
    )
    r.add_argument("--jsonl", metavar="FILE", default=None,
                   help="feature interpretation: write one JSON line per explained feature "
                   "(explanation, who wrote it, its scores and who judged them)")  # fmt: skip
    r.add_argument("--since", default=None,
                   help="latency percentiles of every run since then: 24h, 7d, or an ISO "
                   "date/time (UTC)")  # fmt: skip
    r.add_argument("--provider", default=None, help="with --since: only this provider")
    r.add_argument("--plot", metavar="FILE", default=None,
                   help="with --since: also write a PNG of p50/p95 over time per model")  # fmt: skip
    r.set_defaults(fn=cmd_results)

    b = sub.add_parser("beat", help="run Celery beat: the reconciler, and periodic batches "
                       "from a schedule file")  # fmt: skip
    b.add_argument("--schedule", default=None, metavar="FILE",
                   help="YAML/JSON: entries of {name, every: 1h | cron: '0 * * * *', batch}; "
                   "without it beat runs only the reconciler (see `interpq repair --help`)")  # fmt: skip
    b.add_argument("--state", default="interpq-beat-schedule", metavar="FILE",
                   help="where beat remembers each entry's last run (a writable path)")  # fmt: skip
    b.add_argument("--check", action="store_true",
                   help="check the schedule file, print its entries and exit")  # fmt: skip
    b.add_argument("--loglevel", "-l", default="INFO",
                   help="DEBUG, INFO, WARNING, ERROR (default INFO)")  # fmt: skip
    b.set_defaults(fn=cmd_beat)

    db = sub.add_parser("db", help="database migrations")
    dbs = db.add_subparsers(dest="db_command", required=True)
    up = dbs.add_parser("upgrade", help="apply Alembic migrations to INTERPQ_DATABASE_URL")
    up.add_argument("revision", nargs="?", default="head",
                    help="Alembic revision to upgrade to (default head, the newest)")  # fmt: skip
    up.set_defaults(fn=cmd_db)

    from interpq.cli.loop import add_commands

    add_commands(sub)

    sc = sub.add_parser("schema", help="print the JSON schema of batch files and job specs")
    sc.set_defaults(fn=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `interpq status | head`: the reader left; end quietly
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a command killed by it
    except InterpqError as exc:
        print(f"interpq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TimeoutError as exc:  # batch.wait(timeout_s=...) ran out
        print(f"interpq: error: {exc or 'timed out'}", file=sys.stderr)
        return 3
    except Exception as exc:  # the broker or the database away: one line, not a traceback
        line = _infrastructure_error(exc)
        if line is None:
            raise
        print(f"interpq: error: {line}", file=sys.stderr)
        return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _infrastructure_error(exc: Exception) -> str | None:
    """One line for an unreachable Redis or database (passwords masked), else None."""
    import redis
    import sqlalchemy.exc
    from kombu.exceptions import OperationalError as KombuOperationalError

    from interpq.providers.openai_http import redact
    from interpq.scheduler.client import _redact
    from interpq.settings import get_settings

    settings = get_settings()
    if isinstance(exc, redis.RedisError | KombuOperationalError):
        what = f"cannot reach the broker at {_redact(settings.broker_url)}"
    elif isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        what = f"cannot use the database at {_redact(settings.database_url)}"
        exc = getattr(exc, "orig", None) or exc  # the driver's message, not the SQL
    else:
        return None
    detail = " ".join(str(exc).split())
    for url in (settings.broker_url, settings.database_url):
        detail = redact(detail, _password(url))
    return f"{what} ({type(exc).__name__}: {detail[:200]}); is it running?"


def _password(url: str | None) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(url).password if url else None


if __name__ == "__main__":
    sys.exit(main())
