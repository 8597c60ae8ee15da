"""Backtest speed: ``python -m spark_job.backtest`` over N stored transactions.

A seeded stream (1,000,000 transactions by default, 100 tx/s of event time, 5000 users, 2 %
fraud episodes) is written as bronze Parquet (``transactions/epoch=<id>/batch_id=<n>/``, one
file per 100k rows, the detector's layout) and replayed with the four default rules through the
backtest's public CLI in a subprocess: JVM start-up, reading the history, the rules in Spark
batch mode, writing the alerts and the report are all inside the wall time. The backtest's own
report splits the time into phases. Alerts are compared with the plain-Python oracle (by
default up to 300k transactions; the oracle is brute force). The rate is set beside the live
detector's backfill rate from ``benchmarks/results/throughput-latest.json`` when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.report import Report, base_parser, format_table, read_latest, say, work_dir
from benchmarks.workload import DataSpec, compare_alerts, generate, loud_mismatch, oracle_by_id
from fraudstream import datasets, schemas
from fraudstream.rules.definition import default_definitions
from fraudstream.testing import child_env, log_tail, run_timed

__all__ = [
    "bronze_table",
    "main",
    "write_bronze",
]

NAME = "backtest"
DEFAULT_COUNT = 1_000_000
QUICK_COUNT = 5_000
#: Above this many transactions the oracle is skipped unless --oracle asks for it.
ORACLE_LIMIT = 300_000
EPOCH = "20261122T000000Z-bench0"


def bronze_table(transactions: Sequence[Mapping[str, Any]], first_offset: int) -> pa.Table:
    """Generated transactions as bronze rows (``datasets.TRANSACTIONS_SCHEMA``)."""
    ts = pa.timestamp("us", tz="UTC")
    event_time = pa.array([tx["timestamp"] for tx in transactions]).cast(ts)
    columns: dict[str, Any] = {
        name: [tx[name] for tx in transactions]
        for name in ("transaction_id", "user_id", "amount", "currency", "location",
                     "payment_method", "merchant_id", "device_ip", "is_fraud", "fraud_pattern")}
    columns.update(event_time=event_time, key=columns["user_id"],
                   topic=["transactions"] * len(transactions),
                   partition=[0] * len(transactions),
                   offset=list(range(first_offset, first_offset + len(transactions))),
                   kafka_timestamp=event_time)
    schema = datasets.TRANSACTIONS_SCHEMA
    return pa.Table.from_arrays([pa.array(columns[f.name], f.type) if not isinstance(
        columns[f.name], pa.Array) else columns[f.name] for f in schema], schema=schema)


def write_bronze(parquet_dir: Path, transactions: Sequence[Mapping[str, Any]],
                 batch_rows: int) -> int:
    """The stream as bronze batch files; returns how many files."""
    epoch = datasets.epoch_folder(parquet_dir, schemas.TRANSACTIONS_DATASET, EPOCH)
    files = 0
    for batch_id, start in enumerate(range(0, len(transactions), batch_rows)):
        folder = datasets.batch_folder(epoch, batch_id)
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(bronze_table(transactions[start:start + batch_rows], start),
                       folder / datasets.PART_FILE)
        files += 1
    return files


def live_rate(results_dir: Path) -> dict[str, Any] | None:
    """The live backfill's figures from the latest throughput benchmark, if any."""
    latest = read_latest("throughput", results_dir)
    if not latest:
        return None
    summary = latest.get("summary") or {}
    large = [run for run in latest.get("runs", [])
             if run.get("size") == summary.get("large") and run.get("exit_code") == 0]
    return {
        "source": "throughput-latest.json",
        "measured_at": latest.get("started_at"),
        "quick": latest.get("quick"),
        "marginal_tx_per_second": summary.get("marginal_tx_per_second"),
        "large_backfill_size": summary.get("large"),
        "large_backfill_average_tx_per_second": (
            round(sum(r["average_tx_per_second"] for r in large) / len(large), 1)
            if large else None),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None,
                        help=f"stored transactions (default {DEFAULT_COUNT:,}, --quick "
                             f"{QUICK_COUNT:,})")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="event-time rate of the generated stream, tx/s")
    parser.add_argument("--users", type=int, default=5000, help="generator users")
    parser.add_argument("--fraud-ratio", type=float, default=0.02, help="generator fraud ratio")
    parser.add_argument("--batch-rows", type=int, default=100_000,
                        help="transactions per bronze batch file")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=None,
                        help=f"compare the alerts with the oracle (default: up to "
                             f"{ORACLE_LIMIT:,} transactions)")
    parser.add_argument("--backtest-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m spark_job.backtest (repeatable), "
                             "e.g. --backtest-arg=--shuffle-partitions=4")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds the backtest may take before it is stopped")
    args = parser.parse_args(argv)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    check_oracle = args.oracle if args.oracle is not None else count <= ORACLE_LIMIT
    spec = DataSpec(count=count, rate=args.rate, users=args.users,
                    fraud_ratio=args.fraud_ratio, seed=args.seed)
    settings = {"data": spec.as_dict(), "batch_rows": args.batch_rows, "oracle": check_oracle,
                "backtest_args": args.backtest_arg, "timeout": args.timeout}
    report = Report(NAME, args, settings)
    results_dir = Path(args.results_dir)

    with work_dir(args, NAME) as work:
        started = time.monotonic()
        transactions = generate(spec)
        generate_seconds = time.monotonic() - started
        say(f"generated {count:,} transactions in {generate_seconds:.1f} s")
        parquet = work / "parquet"
        started = time.monotonic()
        files = write_bronze(parquet, transactions, args.batch_rows)
        bronze_seconds = time.monotonic() - started
        say(f"wrote them as bronze Parquet ({files} files) in {bronze_seconds:.1f} s")
        rules = work / "rules.json"
        rules.write_text(json.dumps([d.to_dict() for d in default_definitions()], indent=1))
        out, report_path, log = work / "backtest-out", work / "report.json", work / "backtest.log"
        cmd = [sys.executable, "-m", "spark_job.backtest", "--rules", str(rules),
               "--parquet-dir", str(parquet), "--output", str(out), "--json", str(report_path),
               "--verdicts-url", f"sqlite:///{work / 'no-verdicts.db'}", *args.backtest_arg]
        say(f"backtest of {count:,} transactions: {' '.join(cmd[1:3])} ...")
        wall, code = run_timed(cmd, log, args.timeout, child_env())
        backtest_report = json.loads(report_path.read_text()) if report_path.exists() else None
        if code != 0 or backtest_report is None:
            say(f"backtest exited {code}:\n{log_tail(log)}")
        comparison = None
        if check_oracle and code == 0:
            started = time.monotonic()
            expected = oracle_by_id(transactions)
            say(f"oracle: {len(expected):,} alerts in {time.monotonic() - started:.1f} s")
            found = pq.read_table(out, columns=["alert_id", "rule", "user_id",
                                                "transaction_ids"]).to_pylist()
            comparison = compare_alerts(found, expected)
            loud_mismatch(f"backtest of {count}", comparison)
        timing = (backtest_report or {}).get("timing", {})
        run = {
            "size": count, "exit_code": code, "wall_seconds": round(wall, 3),
            "tx_per_second": round(count / wall, 1) if wall else None,
            "backtest_timing": timing,
            "rules_tx_per_second": (round(count / timing["rules_seconds"], 1)
                                    if timing.get("rules_seconds") else None),
            "startup_and_exit_seconds": (round(wall - timing["wall_seconds"], 3)
                                         if timing.get("wall_seconds") else None),
            "transactions_read": (backtest_report or {}).get("transactions"),
            "alerts": (backtest_report or {}).get("alerts"),
            "alerts_by_rule": {row["rule"]: row["alerts"]
                               for row in (backtest_report or {}).get("rules", [])},
            "quality_by_rule": {row["rule"]: {k: row.get(k) for k in ("precision", "recall")}
                                for row in (backtest_report or {}).get("rules", [])},
            "oracle": comparison,
            "generate_seconds": round(generate_seconds, 2),
            "bronze_write_seconds": round(bronze_seconds, 2), "bronze_files": files,
            "command": cmd, "log_tail": log_tail(log, 15),
        }
    live = live_rate(results_dir)
    summary = {
        "transactions": count, "wall_seconds": run["wall_seconds"],
        "tx_per_second": run["tx_per_second"],
        "rules_tx_per_second": run["rules_tx_per_second"],
        "all_read": run["transactions_read"] == count,
        "matches_oracle": None if comparison is None else comparison["match"],
        "exit_code": code, "live_backfill": live,
    }
    if live and live.get("marginal_tx_per_second") and run["tx_per_second"]:
        summary["vs_live_marginal"] = round(run["tx_per_second"]
                                            / live["marginal_tx_per_second"], 2)
    if live and live.get("large_backfill_average_tx_per_second") and run["tx_per_second"]:
        summary["vs_live_large_backfill"] = round(
            run["tx_per_second"] / live["large_backfill_average_tx_per_second"], 2)
    written = report.finish(summary=summary, run=run)

    print(format_table(
        ["transactions", "wall s", "tx/s", "read s", "Spark start s", "rules s", "rules tx/s",
         "write s",
         "startup+exit s", "alerts", "= oracle", "exit"],
        [[count, run["wall_seconds"], run["tx_per_second"], timing.get("read_seconds"),
          timing.get("spark_start_seconds"), timing.get("rules_seconds"),
          run["rules_tx_per_second"], timing.get("write_seconds"),
          run["startup_and_exit_seconds"], run["alerts"],
          "-" if comparison is None else ("yes" if comparison["match"] else "NO"), code]]))
    if live:
        print(f"\nlive backfill ({live['source']}, {live['measured_at']}): marginal "
              f"{live['marginal_tx_per_second']} tx/s, {live['large_backfill_size']} in "
              f"{live['large_backfill_average_tx_per_second']} tx/s on average; backtest "
              f"{run['tx_per_second']} tx/s end to end")
    print(f"results: {written}")
    ok = code == 0 and summary["all_read"] and summary["matches_oracle"] is not False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
