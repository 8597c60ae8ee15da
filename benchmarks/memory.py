"""Detector memory with ~100k distinct users in state at once.

Choice of traffic (a backfill, then idle): the detector keeps each user's transactions for the
retention horizon (``RETENTION_SECONDS``, 600 s by default, so that a rule added or widened
while running sees the recent past) behind the watermark (60 s behind the newest event), so the
state holds every user seen in the last ~660 s of event time. The default stream is 720k
transactions at 2000 tx/s of event time (360 s) over a pool of 105k users; the generator keeps
each user idle 21-25 s between normal transactions, so almost every user of the pool appears in
that span. The exact figure — the largest number of distinct users within any state window of
event time — is computed from the generated data and reported, so the claim "≥ 100k distinct
users in state" is checked, not assumed.

The stream is preloaded, then the live detector (``python -m spark_job``, default trigger)
catches up on it in full-size micro-batches (the worst case for memory) and idles with the whole
state held. Every 0.5 s the RSS (and PSS) of its process tree — Python driver, JVM, Python
workers — is summed from /proc. Reported: the peak, and the steady value (median over the idle
``--hold`` seconds after it caught up).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from benchmarks.process_tree import ProcessTreeSampler
from benchmarks.report import Report, add_detector_args, base_parser, format_table, say, work_dir
from benchmarks.workload import (
    DataSpec,
    detector_command,
    distinct_users_in_window,
    generate,
    metrics_path,
    preload,
    read_json_lines,
    summarize_batches,
)
from fraudstream.settings import DetectorSettings
from fraudstream.testing import (
    create_topics,
    fresh_topics,
    log_tail,
    running_broker,
    start_process,
    stop_process,
    wait_until,
)

__all__ = ["main"]

NAME = "memory"
TARGET_MB = 2048.0
DEFAULTS = {"count": 720_000, "rate": 2000.0, "users": 105_000}
QUICK = {"count": 12_000, "rate": 200.0, "users": 3000}


def state_window_ms() -> int:
    """Event time a user stays in the detector's state: the retention horizon behind the
    watermark (both the detector's defaults)."""
    fields = DetectorSettings.__dataclass_fields__
    retention_s = float(fields["retention_seconds"].default)
    watermark_s = float(fields["watermark_seconds"].default)
    return int(retention_s * 1000 + watermark_s * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None,
                        help=f"transactions (default {DEFAULTS['count']:,})")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"event-time rate of the stream (default {DEFAULTS['rate']:g})")
    parser.add_argument("--users", type=int, default=None,
                        help=f"generator users (default {DEFAULTS['users']:,})")
    parser.add_argument("--fraud-ratio", type=float, default=0.02)
    parser.add_argument("--hold", type=float, default=None,
                        help="idle seconds sampled after catching up (default 30, --quick 5)")
    parser.add_argument("--interval", type=float, default=0.5, help="sampling period, s")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed to catch up")
    add_detector_args(parser)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    count = args.count or int(sizes["count"])
    rate = args.rate or float(sizes["rate"])
    users = args.users or int(sizes["users"])
    hold = args.hold if args.hold is not None else (5.0 if args.quick else 30.0)
    spec = DataSpec(count=count, rate=rate, users=users, fraud_ratio=args.fraud_ratio,
                    seed=args.seed)
    window_ms = state_window_ms()
    settings = {"data": spec.as_dict(), "hold": hold, "interval": args.interval,
                "state_window_s": window_ms / 1000, "detector_args": args.detector_arg,
                "partitions": args.partitions}
    report = Report(NAME, args, settings)

    started = time.monotonic()
    transactions = generate(spec)
    data = {
        "generate_seconds": round(time.monotonic() - started, 1),
        "distinct_users": len({tx["user_id"] for tx in transactions}),
        "max_distinct_users_in_state_window": distinct_users_in_window(transactions, window_ms),
    }
    say(f"generated {count:,} transactions: {data['distinct_users']:,} users, at most "
        f"{data['max_distinct_users_in_state_window']:,} within {window_ms / 1000:g} s")

    result: dict[str, Any] = {}
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        bootstrap = broker.bootstrap_servers
        topic = f"tx-mem-{uuid.uuid4().hex[:6]}"
        create_topics(bootstrap, [topic], args.partitions)
        data["preload"] = preload(bootstrap, topic, transactions)
        del transactions
        topics = fresh_topics(bootstrap, "mem", args.partitions, transactions=topic)
        run_dir = work / "detector"
        cmd = detector_command(bootstrap, topics, run_dir, available_now=False,
                               extra_args=args.detector_arg)
        metrics_file = metrics_path(run_dir / "parquet")
        process = start_process(cmd, run_dir / "detector.log")
        sampler = ProcessTreeSampler(process.pid, args.interval)
        sampler.start()
        launched = time.monotonic()

        def rows_done() -> int:
            return sum(int(line.get("input_rows") or 0) for line in read_json_lines(metrics_file))

        hold_from: float | None = None
        try:
            caught_up = wait_until(lambda: rows_done() >= count, args.timeout, interval=1.0,
                                   alive=lambda: process.poll() is None)
            caught_up_at = time.monotonic() - launched
            if caught_up:
                say(f"caught up after {caught_up_at:.1f} s; holding {hold:g} s")
                hold_from = sampler.samples[-1].t if sampler.samples else 0.0
                wait_until(lambda: time.monotonic() - launched >= caught_up_at + hold, hold + 5,
                           alive=lambda: process.poll() is None)
            else:
                result["error"] = "the detector did not process every row before --timeout"
        finally:
            sampler.stop()
            exit_code = stop_process(process, timeout=90)
        if exit_code != 0 or not caught_up:
            result["log_tail"] = log_tail(run_dir / "detector.log")
            say(f"detector exit {exit_code}:\n{result['log_tail']}")
        lines = read_json_lines(metrics_file)

    samples = sampler.samples
    peak = max(samples, key=lambda s: s.rss_mb) if samples else None
    steady = [s for s in samples if hold_from is not None and s.t >= hold_from]
    result.update({
        "exit_code": exit_code,
        "caught_up": caught_up,
        "caught_up_seconds": round(caught_up_at, 1),
        "rows_processed": sum(int(line.get("input_rows") or 0) for line in lines),
        "peak_rss_mb": peak.rss_mb if peak else None,
        "peak_pss_mb": max((s.pss_mb for s in samples), default=None),
        "peak_breakdown_rss_mb": peak.by_kind_rss_mb if peak else None,
        "steady_rss_mb": round(statistics.median(s.rss_mb for s in steady), 1) if steady else None,
        "steady_pss_mb": round(statistics.median(s.pss_mb for s in steady), 1) if steady else None,
        "target_mb": TARGET_MB,
        "samples_taken": len(samples),
    })
    # A run that did not hold the full state measured nothing: no verdict.
    result["within_target"] = (result["peak_rss_mb"] <= TARGET_MB
                               if caught_up and exit_code == 0 and result["peak_rss_mb"] is not None
                               else None)
    written = report.finish(data=data, result=result,
                               detector_metrics=summarize_batches(lines),
                               samples=[vars(s) for s in samples])
    print(format_table(
        ["users in state window", "rows", "caught up s", "peak RSS MB", "steady RSS MB",
         "peak PSS MB", "steady PSS MB", "≤ 2 GiB", "exit"],
        [[data["max_distinct_users_in_state_window"], result["rows_processed"],
          result["caught_up_seconds"], result["peak_rss_mb"], result["steady_rss_mb"],
          result["peak_pss_mb"], result["steady_pss_mb"],
          {True: "yes", False: "NO", None: "-"}[result["within_target"]], exit_code]]))
    if peak:
        print(f"at peak: {peak.by_kind_rss_mb} ({peak.processes} processes)")
    print(f"results: {written}")
    return 0 if caught_up and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
