"""Backfill throughput on a Spark standalone cluster next to ``local[2]``, same data, same run.

The data sets, the oracle and the timing are those of ``benchmarks.throughput`` (two preloaded
topics, the marginal rate between them, alerts compared with the oracle). Each repeat runs the
two backfills on ``local[2]`` (driver and executors in one JVM) and then on a standalone master
with ``--workers`` workers of one core each, started here from the installed pyspark
(``spark_job.standalone``): the detector's driver and every executor are separate JVMs, so the
difference is the cost of the cluster's process boundaries on the same two cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.report import Report, add_detector_args, base_parser, format_table, say, work_dir
from benchmarks.throughput import (
    add_data_args,
    data_settings,
    marginal,
    prepare_datasets,
    run_spark_backfill,
)
from fraudstream.testing import running_broker
from spark_job.standalone import StandaloneCluster

__all__ = ["main"]

NAME = "cluster"
LOCAL = "local[2]"


def with_master(args: argparse.Namespace, master: str) -> argparse.Namespace:
    """``args`` whose detector runs on ``master``."""
    return argparse.Namespace(**{**vars(args),
                                 "detector_arg": [*args.detector_arg, f"--spark-master={master}"]})


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    add_data_args(parser)
    add_detector_args(parser)
    parser.add_argument("--workers", type=int, default=2, help="standalone workers, 1 core each")
    parser.add_argument("--worker-memory", default="1g", help="memory each worker offers")
    args = parser.parse_args(argv)
    settings = {**data_settings(args), "repeats": args.repeats, "workers": args.workers,
                "worker_memory": args.worker_memory, "detector_args": args.detector_arg,
                "timeout": args.timeout}
    report = Report(NAME, args, settings)
    runs: dict[str, list[dict[str, Any]]] = {LOCAL: [], "standalone": []}
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        datasets = prepare_datasets(broker.bootstrap_servers, args)
        with StandaloneCluster(work / "cluster", workers=args.workers,
                               memory=args.worker_memory) as cluster:
            say(f"standalone cluster {cluster.url}: {args.workers} workers")
            for _ in range(args.repeats):
                for label, master in ((LOCAL, LOCAL), ("standalone", cluster.url)):
                    for dataset in datasets:
                        run = run_spark_backfill(broker.bootstrap_servers, dataset, work,
                                                 with_master(args, master))
                        runs[label].append({**run, "master": label})
    summary = {label: marginal(found) for label, found in runs.items()}
    every = [run for found in runs.values() for run in found]
    summary["all_match_oracle"] = all(run["alerts"]["match"] for run in every)
    summary["all_exit_zero"] = all(run["exit_code"] == 0 for run in every)
    rates = [summary[label].get("marginal_tx_per_second") for label in runs]
    if all(rates):
        summary["standalone_over_local"] = round(rates[1] / rates[0], 2)
    written = report.finish(summary=summary, datasets=[d.describe() for d in datasets],
                            runs=every)
    rows = [[label, s.get("small_wall_seconds"), s.get("large_wall_seconds"),
             s.get("marginal_tx_per_second"), s.get("fixed_cost_seconds_estimate")]
            for label, s in ((label, summary[label]) for label in runs)]
    print(format_table(["master", "small wall s", "large wall s", "marginal tx/s",
                        "fixed s"], rows))
    print(f"\nstandalone / local[2]: {summary.get('standalone_over_local')}; "
          f"alerts == oracle in every run: {summary['all_match_oracle']}")
    print(f"results: {written}")
    return 0 if summary["all_match_oracle"] and summary["all_exit_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
