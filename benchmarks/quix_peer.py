"""Quix Streams side by side: the same rules, broker and data; throughput and latency.

The peer (``benchmarks.quix_app``) implements the four rules with the contract's semantics as a Quix
Streams application, reusing the detector's pure validation and per-user rule engine, so its
alerts must equal the oracle's exactly like ours (checked on every backfill). It runs:

* throughput: the same two seeded preloads as ``benchmarks.throughput`` (40k / 240k), timed from
  process start to exit (the app stops itself after the last input message), marginal rate;
* latency: the same live harness as ``benchmarks.latency`` at 100 tx/s.

Our figures come from ``benchmarks/results/{throughput,latency}-latest.json`` when their
settings match (``--ours latest``, the default; run those first, ``benchmarks.all`` does), from
fresh runs in this invocation on the very same topics (``--ours run``), or are left out
(``--ours skip``). Ratios: throughput ours/theirs (goal >= 1.0) and latency p95 ours/theirs.

quixstreams pins confluent-kafka < 2.13, so it may live in its own virtualenv: pass its
interpreter with --quix-python (or QUIX_PYTHON); the default is the running one.

Quix Streams on the embedded broker (Tansu 0.6), as found:
* Tansu's DescribeConfigs returns only configs set explicitly at topic creation; Quix derives
  its changelog topics from the input topic's ``retention.ms`` and fails with
  ``KeyError: 'retention.ms'`` on any stateful step. Work-around: every benchmark topic is
  created with ``retention.ms=-1`` (what memory storage does anyway).
* Consumer-group join takes ~23 s with librdkafka's default session timeout; the app sets
  ``session.timeout.ms=6000``.
* Changelog topics (compacted) and ``exactly-once`` (transactions) are accepted by the broker;
  the defaults used are Quix's own (changelog on, at-least-once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import latency as latency_bench
from benchmarks import throughput as throughput_bench
from benchmarks.report import (
    Report,
    add_detector_args,
    base_parser,
    format_table,
    quix_versions,
    read_latest,
    resolve_quix_python,
    say,
    work_dir,
)
from benchmarks.throughput import Dataset
from benchmarks.workload import compare_alerts, loud_mismatch, read_json_lines
from fraudstream.testing import (
    Topics,
    fresh_topics,
    log_tail,
    read_values,
    run_timed,
    running_broker,
    start_process,
    stop_process,
)

__all__ = ["main"]

NAME = "quix_peer"


def quix_command(args: argparse.Namespace, bootstrap: str, topics: Topics, run_dir: Path,
                 expect: int = 0) -> list[str]:
    cmd = [args.quix_python, "-W", "ignore", "-m", "benchmarks.quix_app",
           f"--bootstrap-servers={bootstrap}", f"--transactions-topic={topics.transactions}",
           f"--alerts-topic={topics.alerts}", f"--dlq-topic={topics.dlq}",
           f"--consumer-group=bench-quix-{uuid.uuid4().hex[:8]}",
           f"--state-dir={run_dir / 'state'}", f"--progress-file={run_dir / 'progress.jsonl'}",
           f"--processing-guarantee={args.processing_guarantee}",
           "--changelog" if args.changelog else "--no-changelog"]
    if expect:
        cmd += [f"--expect={expect}", f"--idle-timeout={args.idle_timeout}"]
    return cmd


class QuixLive:
    """The Quix app running until SIGTERM (latency)."""

    engine = "quix"

    def __init__(self, args: argparse.Namespace, bootstrap: str, topics: Topics,
                 run_dir: Path) -> None:
        self.cmd = quix_command(args, bootstrap, topics, run_dir)
        self.run_dir = run_dir
        self.process: Any = None

    def start(self) -> None:
        self.process = start_process(self.cmd, self.run_dir / "quix.log")

    def first_output_time(self) -> float | None:
        lines = read_json_lines(self.run_dir / "progress.jsonl")
        return float(lines[0]["t"]) if lines else None

    def own_metrics(self, since: float, until: float) -> dict[str, Any]:
        lines = read_json_lines(self.run_dir / "progress.jsonl")
        return {"source": str(self.run_dir / "progress.jsonl"),
                "last": lines[-1] if lines else None}

    def stop(self) -> int | None:
        return stop_process(self.process, timeout=60)

    def log_tail(self) -> str:
        return log_tail(self.run_dir / "quix.log")


def run_quix_backfill(bootstrap: str, dataset: Dataset, work: Path, args: argparse.Namespace
                      ) -> dict[str, Any]:
    count = dataset.spec.count
    topics = fresh_topics(bootstrap, f"quix-{count}", args.partitions, transactions=dataset.topic)
    run_dir = work / f"quix-{count}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True)
    cmd = quix_command(args, bootstrap, topics, run_dir, expect=count)
    say(f"quix backfill of {count:,} transactions ...")
    seconds, code = run_timed(cmd, run_dir / "quix.log", args.timeout)
    values = read_values(bootstrap, topics.alerts, expected=len(dataset.expected),
                         idle_seconds=5, deadline_seconds=300)
    alerts = []
    for value in values:
        with contextlib.suppress(ValueError):
            alerts.append(json.loads(value))
    comparison = compare_alerts(alerts, dataset.expected)
    progress = read_json_lines(run_dir / "progress.jsonl")
    final = progress[-1] if progress else {}
    result = {
        "engine": "quix", "size": count, "wall_seconds": round(seconds, 3), "exit_code": code,
        "average_tx_per_second": round(count / seconds, 1),
        "rows_seen": final.get("processed"), "all_rows_seen": final.get("processed") == count,
        "alerts": comparison, "progress_final": final,
        "first_message_after_s": progress[0]["since_start_s"] if progress else None,
        "command": cmd,
    }
    if code != 0:
        result["log_tail"] = log_tail(run_dir / "quix.log")
        say(f"quix app exited {code}:\n{result['log_tail']}")
    loud_mismatch(f"quix backfill of {count}", comparison)
    say(f"  {seconds:.1f} s, alerts {comparison['found']}/{comparison['expected']}, "
        f"match={comparison['match']}")
    return result


def _same(settings: Mapping[str, Any], wanted: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return all(settings.get(k) == wanted.get(k) for k in keys)


def ours_from_latest(args: argparse.Namespace, throughput_settings: Mapping[str, Any]
                     ) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None, list[str]]:
    """Our throughput summary and latency runs from the latest result files, if comparable."""
    notes = []
    results_dir = Path(args.results_dir)
    ours_tp = read_latest("throughput", results_dir)
    summary = None
    if ours_tp is None:
        notes.append("no throughput-latest.json: run python -m benchmarks.throughput first")
    elif not _same(ours_tp["settings"], throughput_settings,
                   ("sizes", "rate", "users", "fraud_ratio", "seed", "partitions")):
        notes.append("throughput-latest.json was measured on different data; not compared")
    else:
        summary = {**ours_tp["summary"], "from": str(results_dir / "throughput-latest.json"),
                   "measured_at": ours_tp.get("finished_at")}
    ours_lat = read_latest("latency", results_dir)
    runs = None
    if ours_lat is None:
        notes.append("no latency-latest.json: run python -m benchmarks.latency first")
    else:
        runs = [r for r in ours_lat["runs"] if r.get("rate") in args.rates and "error" not in r]
        if not runs:
            notes.append("latency-latest.json has no run at the same rate; not compared")
            runs = None
    return summary, runs, notes


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def compare(ours_tp: Mapping[str, Any] | None, theirs_tp: Mapping[str, Any],
            ours_lat: Sequence[Mapping[str, Any]] | None,
            theirs_lat: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "throughput_ours_tx_per_s": ours_tp.get("marginal_tx_per_second") if ours_tp else None,
        "throughput_theirs_tx_per_s": theirs_tp.get("marginal_tx_per_second"),
    }
    out["throughput_ratio_ours_over_theirs"] = ratio(out["throughput_ours_tx_per_s"],
                                                     out["throughput_theirs_tx_per_s"])
    latency: dict[str, Any] = {}
    for theirs in theirs_lat:
        if "error" in theirs:
            continue
        mine = next((r for r in ours_lat or [] if r["rate"] == theirs["rate"]), None)
        for rule in latency_bench.HEADLINE_RULES:
            t = theirs["latency_s"][rule]
            o = mine["latency_s"][rule] if mine else None
            latency[f"{rule}@{theirs['rate']:g}"] = {
                "ours_p95_s": o["p95"] if o else None, "theirs_p95_s": t["p95"],
                "ours_p99_s": o["p99"] if o else None, "theirs_p99_s": t["p99"],
                "p95_ratio_ours_over_theirs": ratio(o["p95"] if o else None, t["p95"]),
            }
    out["latency"] = latency
    return out


def table(runs: Sequence[Mapping[str, Any]], comparison: Mapping[str, Any],
          theirs_tp: Mapping[str, Any], ours_tp: Mapping[str, Any] | None) -> str:
    lines = [throughput_bench.table(runs), ""]
    lines.append(format_table(
        ["engine", "marginal tx/s", "small wall s", "large wall s"],
        [["spark (ours)", *(ours_tp.get(k) if ours_tp else None for k in
                            ("marginal_tx_per_second", "small_wall_seconds",
                             "large_wall_seconds"))],
         ["quix (theirs)", theirs_tp.get("marginal_tx_per_second"),
          theirs_tp.get("small_wall_seconds"), theirs_tp.get("large_wall_seconds")]]))
    lines.append(f"\nthroughput ours/theirs: {comparison['throughput_ratio_ours_over_theirs']}")
    rows = [[key, v["ours_p95_s"], v["theirs_p95_s"], v["ours_p99_s"], v["theirs_p99_s"],
             v["p95_ratio_ours_over_theirs"]] for key, v in comparison["latency"].items()]
    lines.append("")
    lines.append(format_table(["rule@tx/s", "ours p95 s", "theirs p95 s", "ours p99 s",
                               "theirs p99 s", "p95 ours/theirs"], rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    throughput_bench.add_data_args(parser)
    latency_bench.add_latency_args(parser, (100.0,))
    add_detector_args(parser)
    parser.add_argument("--quix-python", default=None,
                        help="interpreter with quixstreams installed [QUIX_PYTHON]")
    parser.add_argument("--processing-guarantee", default="at-least-once",
                        choices=("at-least-once", "exactly-once"))
    parser.add_argument("--changelog", action=argparse.BooleanOptionalAction, default=True,
                        help="Quix state changelog topics (Quix's default: on)")
    parser.add_argument("--idle-timeout", type=float, default=120.0,
                        help="a backfill gives up after this many seconds without a message")
    parser.add_argument("--ours", choices=("latest", "run", "skip"), default="latest",
                        help="where our figures come from (see the module doc)")
    parser.add_argument("--skip-latency", action="store_true", help="throughput only")
    args = parser.parse_args(argv)
    latency_bench.resolve_latency_args(args, (100.0,))
    args.quix_python = resolve_quix_python(args.quix_python)
    quix = quix_versions(args.quix_python)
    if quix is None:
        print(f"{args.quix_python} cannot import quixstreams: pip install -e '.[bench]' (or into "
              "a separate virtualenv, then pass --quix-python or QUIX_PYTHON)", file=sys.stderr)
        return 2
    tp_settings = throughput_bench.data_settings(args)
    settings = {**tp_settings, "repeats": args.repeats, "timeout": args.timeout,
                "latency": latency_bench.latency_settings(args),
                "processing_guarantee": args.processing_guarantee, "changelog": args.changelog,
                "ours": args.ours, "detector_args": args.detector_arg}
    report = Report(NAME, args, settings, quix_python=args.quix_python)
    runs: list[dict[str, Any]] = []
    ours_runs: list[dict[str, Any]] = []
    theirs_lat: list[dict[str, Any]] = []
    ours_lat_run: list[dict[str, Any]] = []
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        bootstrap = broker.bootstrap_servers
        datasets = throughput_bench.prepare_datasets(bootstrap, args)
        for _ in range(args.repeats):
            for dataset in datasets:
                runs.append(run_quix_backfill(bootstrap, dataset, work, args))
                if args.ours == "run":
                    ours_runs.append(
                        throughput_bench.run_spark_backfill(bootstrap, dataset, work, args))
        if not args.skip_latency:
            def quix(topics: Topics, run_dir: Path) -> QuixLive:
                run_dir.mkdir(parents=True, exist_ok=True)
                return QuixLive(args, bootstrap, topics, run_dir)

            def spark(topics: Topics, run_dir: Path) -> latency_bench.SparkLive:
                return latency_bench.SparkLive(bootstrap, topics, run_dir, args.detector_arg)

            for rate in args.rates:
                theirs_lat.append(latency_bench.measure_latency(bootstrap, rate, args, work,
                                                                quix, "quix"))
                if args.ours == "run":
                    ours_lat_run.append(latency_bench.measure_latency(bootstrap, rate, args,
                                                                      work, spark, "spark"))
    theirs_tp = throughput_bench.marginal(runs)
    notes: list[str] = []
    if args.ours == "run":
        ours_tp: dict[str, Any] | None = throughput_bench.marginal(ours_runs)
        ours_lat: list[dict[str, Any]] | None = ours_lat_run
    elif args.ours == "latest":
        ours_tp, ours_lat, notes = ours_from_latest(args, tp_settings)
    else:
        ours_tp, ours_lat = None, None
    comparison = compare(ours_tp, theirs_tp, ours_lat, theirs_lat)
    summary = {
        "quix_throughput": theirs_tp, "ours_throughput": ours_tp,
        "all_match_oracle": all(r["alerts"]["match"] for r in runs + ours_runs),
        "all_exit_zero": all(r["exit_code"] == 0 for r in runs + ours_runs),
        "comparison": comparison, "notes": notes,
        "quix_latency_s": {f"{r['rate']:g}": r.get("latency_s") for r in theirs_lat},
    }
    written = report.finish(summary=summary, datasets=[d.describe() for d in datasets],
                               runs=runs + ours_runs, latency_runs=theirs_lat + ours_lat_run)
    print(table(runs + ours_runs, comparison, theirs_tp, ours_tp))
    if theirs_lat:
        print()
        print(latency_bench.table(theirs_lat + ours_lat_run))
    for note in notes:
        print(f"note: {note}")
    print(f"results: {written}")
    ok = summary["all_match_oracle"] and summary["all_exit_zero"] and all(
        "error" not in r for r in theirs_lat + ours_lat_run)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
