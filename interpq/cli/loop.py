"""The researcher's loop on the command line: ``ls``, ``cancel``, ``retry``, ``report``.

``interpq ls`` lists batches (newest first, a name filter); ``interpq cancel BATCH [JOB ...]``
cancels a batch or some of its jobs (and what depends on them); ``interpq retry BATCH
[--set JOB.FIELD=VALUE ...]`` runs the failed and cancelled jobs again with fixes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def print_results(results: Sequence[Any], top: int = 10, errors: bool = False) -> None:
    """A finished batch in the terminal: the jobs table, latency percentiles, feature
    interpretations, the science per job kind, and (``errors``) every error in full."""
    from interpq.reports.science import errors_section, science_summary
    from interpq.reports.tables import ERROR_WIDTH, jobs_table, latency_table

    print(jobs_table(results))
    if any(r.latency for r in results):
        print()
        print(latency_table(results))
    if any(r.kind in ("explain", "score") for r in results):
        from interpq.reports.interpretations import interpretation_tables

        print()
        print(interpretation_tables(results, n=top))
    science = science_summary(results)
    if science:
        print()
        print(science)
    if errors and any(r.error for r in results):
        print("\nerrors")
        print(errors_section(results))
    elif any(len(r.error or "") > ERROR_WIDTH for r in results):
        print("\n(errors cut to fit: --errors prints them whole)")


def cmd_ls(args: argparse.Namespace) -> int:
    from interpq.reports.tables import table
    from interpq.scheduler.client import Client

    rows = []
    for b in Client().batches(args.limit, name=args.name):
        s = b.status()
        when = f"{b.created_at:%Y-%m-%d %H:%M:%S}" if b.created_at else "-"
        states = ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items())) or "-"
        rows.append([when, b.name, b.id, s.n_jobs, states, f"{b.cost_usd():.4f}"])
    headers = ("submitted (UTC)", "batch", "id", "jobs", "states", "cost $")
    print(
        table(headers, rows)
        if rows
        else "no batches" + (f" named *{args.name}*" if args.name else "")
    )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from interpq.scheduler.client import Client

    batch = Client().batch(args.batch)
    done = batch.cancel(args.jobs or None, reason=args.reason)
    if not done:
        print(f"batch {batch.name}: nothing to cancel ({batch.status().summary()})")
        return 0
    print(f"batch {batch.name}: cancelled {len(done)} job(s): {', '.join(done)} "
          "(running parts stop at their next turn or checkpoint)")  # fmt: skip
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from interpq.scheduler.client import Client
    from interpq.scheduler.control import parse_overrides

    batch = Client().batch(args.batch)
    again = batch.retry(parse_overrides(args.set))
    if not again:
        print(f"batch {batch.name}: every job succeeded; nothing to retry")
        return 0
    print(f"batch {batch.name}: running again {', '.join(again)}")
    if not args.wait:
        return 0
    status = batch.wait(progress=not args.no_progress, timeout_s=args.timeout)
    print_results(batch.results(), errors=True)
    return 0 if status.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from interpq.reports.html import write_report
    from interpq.scheduler.client import Client

    batch = Client().batch(args.batch)
    path = write_report(batch, args.output or f"{batch.name}-report.html")
    print(f"report of batch {batch.name}: {path.resolve()}")
    return 0


def add_commands(sub: Any) -> None:
    """The loop's subcommands, on ``interpq``'s subparsers."""
    ls = sub.add_parser("ls", help="list batches, newest first: time, name, states, cost")
    ls.add_argument("--name", default=None, help="only batches whose name contains this")
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    ls.set_defaults(fn=cmd_ls)

    c = sub.add_parser("cancel", help="cancel a batch, or some of its jobs and their dependents")
    c.add_argument("batch", help="batch id or name (the newest batch of that name)")
    c.add_argument("jobs", nargs="*", metavar="JOB", help="only these jobs (default: all)")
    c.add_argument("--reason", default="cancelled by the user",
                   help="stored as each job's error: 'cancelled: REASON'")  # fmt: skip
    c.set_defaults(fn=cmd_cancel)

    r = sub.add_parser("retry", help="run a batch's failed and cancelled jobs again, with fixes")
    r.add_argument("batch", help="batch id or name (the newest batch of that name)")
    r.add_argument("--set", action="append", default=[], metavar="JOB.FIELD=VALUE",
                   help="change a field of a retried job's spec (YAML value), e.g. "
                   "--set sae.batch_size=256; repeatable")  # fmt: skip
    r.add_argument("--wait", action="store_true", help="wait with a progress bar, print results")
    r.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    r.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S s")
    r.set_defaults(fn=cmd_retry)

    rep = sub.add_parser("report", help="one self-contained HTML page of a batch: jobs, "
                         "latency, SAE metrics and feature cards, patching heatmaps")  # fmt: skip
    rep.add_argument("batch", help="batch id or name (the newest batch of that name)")
    rep.add_argument("-o", "--output", default=None, metavar="FILE",
                     help="where to write it (default BATCH-report.html)")  # fmt: skip
    rep.set_defaults(fn=cmd_report)
