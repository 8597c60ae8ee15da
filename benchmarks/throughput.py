"""Backfill throughput: ``python -m spark_job --available-now`` on two preloaded topics.

Two seeded streams (40k and 240k transactions by default, 100 tx/s of event time, 5000 users,
2 % fraud episodes, event times ending about now) are preloaded into their own topics of a
private broker. Each backfill is timed from process start to exit, on fresh checkpoint and
Parquet folders. The headline figure is the *marginal* rate (n_large - n_small) /
(t_large - t_small): JVM start-up, Spark session, query planning and the final commit are paid
by both runs and cancel out, leaving the cost of the extra transactions through validation,
all four rules and every sink. Alerts written to Parquet are compared with the plain-Python
oracle; any difference is reported loudly and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import Report, add_detector_args, base_parser, format_table, say, work_dir
from benchmarks.workload import (
    DataSpec,
    compare_alerts,
    detector_command,
    generate,
    loud_mismatch,
    metrics_path,
    oracle_by_id,
    parquet_alerts,
    preload,
    read_json_lines,
    summarize_batches,
)
from fraudstream.features import HISTORY_SECONDS
from fraudstream.rules import MICROS, RuleDefinition
from fraudstream.rules.store import RulesTopic
from fraudstream.testing import create_topics, fresh_topics, log_tail, run_timed, running_broker

__all__ = [
    "Dataset",
    "add_data_args",
    "data_settings",
    "main",
    "marginal",
    "prepare_datasets",
    "run_spark_backfill",
    "table",
]

NAME = "throughput"
DEFAULT_SIZES = (40_000, 240_000)
QUICK_SIZES = (3_000, 9_000)


@dataclass
class Dataset:
    """One preloaded topic and the alerts the oracle expects from it."""

    spec: DataSpec
    topic: str
    expected: dict[str, dict[str, Any]]
    preload: dict[str, Any]
    generate_seconds: float
    oracle_seconds: float

    def describe(self) -> dict[str, Any]:
        by_rule: dict[str, int] = {}
        for alert in self.expected.values():
            by_rule[alert["rule"]] = by_rule.get(alert["rule"], 0) + 1
        return {"data": self.spec.as_dict(), "topic": self.topic, "preload": self.preload,
                "generate_seconds": self.generate_seconds,
                "oracle_seconds": self.oracle_seconds,
                "expected_alerts": len(self.expected), "expected_by_rule": by_rule}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help=f"transactions in the two backfills (default {DEFAULT_SIZES}, "
                             f"--quick {QUICK_SIZES})")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="event-time rate of the generated streams, tx/s")
    parser.add_argument("--users", type=int, default=5000, help="generator users")
    parser.add_argument("--fraud-ratio", type=float, default=0.02, help="generator fraud ratio")
    parser.add_argument("--repeats", type=int, default=1,
                        help="backfills per size; the median wall time is used")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one backfill may take before it is stopped")
    parser.add_argument("--rules-file", type=Path, default=None, metavar="FILE",
                        help="rule definitions (JSON/YAML, as the backtest takes) in force "
                             "instead of the defaults; the oracle judges with the same "
                             "definitions (and no model: an ml_score rule never fires there)")


def rules_of(args: argparse.Namespace) -> list[RuleDefinition] | None:
    """The definitions of ``--rules-file``, validated as the detector validates them against
    the shortest retention it accepts (``HISTORY_SECONDS``)."""
    if args.rules_file is None:
        return None
    from spark_job.backtest import BacktestError, read_rules_file

    try:
        return read_rules_file(args.rules_file, HISTORY_SECONDS * MICROS)
    except BacktestError as exc:
        raise SystemExit(f"--rules-file: {exc}") from None


def sizes_of(args: argparse.Namespace) -> tuple[int, int]:
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    small, large = sorted(sizes)
    if small == large:
        raise SystemExit("--sizes: the two backfills need different sizes")
    return small, large


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    rules = rules_of(args)
    return {"sizes": list(sizes_of(args)), "rate": args.rate, "users": args.users,
            "fraud_ratio": args.fraud_ratio, "seed": args.seed, "partitions": args.partitions,
            "rules": None if rules is None else [d.summary() for d in rules]}


def prepare_datasets(bootstrap: str, args: argparse.Namespace) -> list[Dataset]:
    """Generate, compute the oracle and preload each size into its own topic."""
    out = []
    for size in sizes_of(args):
        spec = DataSpec(count=size, rate=args.rate, users=args.users,
                        fraud_ratio=args.fraud_ratio, seed=args.seed)
        started = time.monotonic()
        transactions = generate(spec)
        generated = time.monotonic() - started
        started = time.monotonic()
        expected = oracle_by_id(transactions, rules_of(args))
        oracle = time.monotonic() - started
        topic = f"tx-{size}-{uuid.uuid4().hex[:6]}"
        create_topics(bootstrap, [topic], args.partitions)
        loaded = preload(bootstrap, topic, transactions)
        say(f"preloaded {size:,} transactions into {topic} in {loaded['seconds']} s "
            f"({len(expected):,} alerts expected)")
        out.append(Dataset(spec, topic, expected, loaded, round(generated, 2), round(oracle, 2)))
    return out


def run_spark_backfill(bootstrap: str, dataset: Dataset, work: Path, args: argparse.Namespace
                       ) -> dict[str, Any]:
    """One timed ``--available-now`` run on fresh folders and fresh output topics."""
    topics = fresh_topics(bootstrap, f"spark-{dataset.spec.count}", args.partitions,
                          transactions=dataset.topic)
    run_dir = work / f"spark-{dataset.spec.count}-{uuid.uuid4().hex[:6]}"
    extra = list(args.detector_arg)
    rules = rules_of(args)
    if rules is not None:
        # A rules topic of this run's own, holding the file's definitions before the start.
        rules_topic = RulesTopic({"bootstrap.servers": bootstrap}, f"{topics.alerts}-rules")
        for definition in rules:
            rules_topic.publish(definition)
        extra.append(f"--rules-topic={rules_topic.topic}")
    cmd = detector_command(bootstrap, topics, run_dir, available_now=True, extra_args=extra)
    say(f"backfill of {dataset.spec.count:,} transactions: {' '.join(cmd[1:3])} ...")
    seconds, code = run_timed(cmd, run_dir / "detector.log", args.timeout)
    lines = read_json_lines(metrics_path(run_dir / "parquet"))
    comparison = compare_alerts(parquet_alerts(run_dir / "parquet"), dataset.expected)
    metrics = summarize_batches(lines)
    result = {
        "engine": "spark", "size": dataset.spec.count, "wall_seconds": round(seconds, 3),
        "exit_code": code, "average_tx_per_second": round(dataset.spec.count / seconds, 1),
        "rows_seen": metrics["input_rows"],
        "all_rows_seen": metrics["input_rows"] == dataset.spec.count,
        "alerts": comparison, "detector_metrics": metrics, "metrics_lines": lines,
        "command": cmd,
    }
    if code != 0:
        result["log_tail"] = log_tail(run_dir / "detector.log")
        say(f"detector exited {code}:\n{result['log_tail']}")
    loud_mismatch(f"spark backfill of {dataset.spec.count}", comparison)
    say(f"  {seconds:.1f} s, alerts {comparison['found']}/{comparison['expected']}, "
        f"match={comparison['match']}")
    return result


def marginal(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median wall time per size and the marginal rate between the two sizes."""
    by_size: dict[int, list[float]] = {}
    for run in runs:
        if run["exit_code"] == 0:
            by_size.setdefault(run["size"], []).append(run["wall_seconds"])
    if len(by_size) < 2:
        return {"marginal_tx_per_second": None, "note": "a backfill failed"}
    (small, t_small), (large, t_large) = sorted(
        (size, statistics.median(times)) for size, times in by_size.items())
    extra = t_large - t_small
    out = {
        "small": small, "large": large,
        "small_wall_seconds": round(t_small, 3), "large_wall_seconds": round(t_large, 3),
        "marginal_tx_per_second": round((large - small) / extra, 1) if extra > 0 else None,
        "fixed_cost_seconds_estimate": (round(t_small - small * extra / (large - small), 2)
                                        if extra > 0 else None),
    }
    if extra <= 0:
        out["note"] = ("the larger backfill was not slower: start-up noise swamps the extra "
                       "work (sizes too close, or a busy machine); no marginal rate")
    return out


def table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for run in runs:
        metrics = run.get("detector_metrics") or {}
        alerts = run["alerts"]
        rows.append([
            run["engine"], run["size"], run["wall_seconds"], run["average_tx_per_second"],
            f"{alerts['found']}/{alerts['expected']}", "yes" if alerts["match"] else "NO",
            metrics.get("batches"), metrics.get("batch_seconds_total"),
            metrics.get("rows_per_second_overall"), run["exit_code"],
        ])
    return format_table(["engine", "transactions", "wall s", "avg tx/s", "alerts found/expected",
                         "= oracle", "batches", "batch s", "batch rows/s", "exit"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    add_data_args(parser)
    add_detector_args(parser)
    args = parser.parse_args(argv)
    settings = {**data_settings(args), "repeats": args.repeats,
                "detector_args": args.detector_arg, "timeout": args.timeout}
    report = Report(NAME, args, settings)
    runs: list[dict[str, Any]] = []
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        datasets = prepare_datasets(broker.bootstrap_servers, args)
        for _ in range(args.repeats):
            for dataset in datasets:
                runs.append(run_spark_backfill(broker.bootstrap_servers, dataset, work, args))
    summary = marginal(runs)
    summary["all_match_oracle"] = all(run["alerts"]["match"] for run in runs)
    summary["all_exit_zero"] = all(run["exit_code"] == 0 for run in runs)
    written = report.finish(summary=summary, datasets=[d.describe() for d in datasets],
                               runs=runs)
    print(table(runs))
    print(f"\nmarginal rate: {summary.get('marginal_tx_per_second')} tx/s "
          f"(({summary.get('large')} - {summary.get('small')}) / "
          f"({summary.get('large_wall_seconds')} - {summary.get('small_wall_seconds')}) s)")
    print(f"results: {written}")
    return 0 if summary["all_match_oracle"] and summary["all_exit_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
