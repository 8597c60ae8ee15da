"""The risk model: its quality, its training time, and what scoring costs the detector.

1. **Quality and training time.** A seeded stream of the default traffic (1,000,000
   transactions by default: fraud episodes, the legitimate look-alikes that fool the rules,
   fraud built to slip under them) is written as bronze Parquet and ``python -m
   spark_job.train`` is timed from process start to exit. The figures come from the version it
   saves (``metrics.json``): hold-out AUC, precision at recall 0.9, the rules on the same
   hold-out, and rules alone vs rules + model at the rules' recall.
2. **Cost of scoring.** The throughput benchmark (backfill, marginal rate) and the latency
   benchmark (live, send -> alert) run back to back with that model (``--models-dir``) and
   without it, on the same machine in the same run; the ratios on/off are the result (more than
   15 % slower is a defect). With the default rules the detector scores the alert triggers
   only; a third backfill ("every") adds an ``ml_score`` rule, which makes it score every
   transaction. Its threshold, 1.0, is one no score reaches, so its alerts stay those the
   oracle (which has no model) expects and the run is still checked alert by alert. Their own
   JSON goes to this run's work folder, so ``benchmarks/results`` keeps one latest file per
   benchmark.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.backtest import write_bronze
from benchmarks.common import (
    DataSpec,
    Report,
    base_parser,
    child_env,
    format_table,
    generate,
    log_tail,
    run_timed,
    say,
    work_dir,
)
from fraudstream.model import METRICS_FILE, model_versions
from fraudstream.rules import default_definitions

NAME = "model"
DEFAULT_COUNT = 1_000_000
QUICK_COUNT = 20_000
#: The share of the live figures scoring may cost before it counts as a defect.
ALLOWED_SLOWDOWN = 0.15


def train(parquet: Path, models: Path, work: Path, timeout: float, extra: Sequence[str]
          ) -> dict[str, Any]:
    log = work / "train.log"
    cmd = [sys.executable, "-m", "spark_job.train", "--parquet-dir", str(parquet),
           "--models-dir", str(models), "--verdicts-url", f"sqlite:///{work / 'none.db'}",
           *extra]
    say(f"training: {' '.join(cmd[1:3])} ...")
    wall, code = run_timed(cmd, log, timeout, child_env())
    versions = model_versions(models)
    metrics = (json.loads((versions[-1] / METRICS_FILE).read_text())
               if code == 0 and versions else None)
    if metrics is None:
        say(f"training exited {code}:\n{log_tail(log)}")
    return {"exit_code": code, "wall_seconds": round(wall, 2), "command": cmd,
            "version": versions[-1].name if versions else None, "metrics": metrics,
            "log_tail": log_tail(log, 12)}


def sub_benchmark(name: str, args: Sequence[str], work: Path, label: str, timeout: float
                  ) -> dict[str, Any] | None:
    """Run ``python -m benchmarks.<name>`` with its results in ``work/<label>``."""
    results = work / label
    log = work / f"{label}.log"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--results-dir", str(results), *args]
    say(f"{label}: {' '.join(cmd[1:])}")
    _, code = run_timed(cmd, log, timeout, child_env())
    latest = results / f"{name}-latest.json"
    if code != 0 or not latest.exists():
        say(f"{label} exited {code}:\n{log_tail(log)}")
    return json.loads(latest.read_text()) if latest.exists() else None


def in_batch_seconds(result: Mapping[str, Any] | None) -> float | None:
    """The detector's own time inside batches for the larger backfill: the marginal rate of a
    single repeat is at the mercy of start-up noise, this is not."""
    runs = [run for run in (result or {}).get("runs", []) if run.get("exit_code") == 0]
    if not runs:
        return None
    largest = max(runs, key=lambda run: run["size"])
    return (largest.get("detector_metrics") or {}).get("batch_seconds_total")


def scoring_rules_file(work: Path) -> Path:
    """The default rules plus an ``ml_score`` rule that never fires (threshold 1.0): in force,
    it makes the detector score every transaction."""
    path = work / "rules-with-ml-score.json"
    items = [{"rule_id": d.rule_id, "kind": d.kind, "params": dict(d.params)}
             for d in default_definitions()]
    items.append({"rule_id": "ml_score", "kind": "ml_score", "params": {"threshold": 1.0}})
    path.write_text(json.dumps(items, indent=2))
    return path


def ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 3) if on and off else None


def latency_p95(result: Mapping[str, Any] | None, rate: str, rule: str) -> float | None:
    entry = ((result or {}).get("summary") or {}).get(rate) or {}
    value = entry.get(rule)
    return value.get("p95") if isinstance(value, Mapping) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None,
                        help=f"stored transactions to train on (default {DEFAULT_COUNT:,}, "
                             f"--quick {QUICK_COUNT:,})")
    parser.add_argument("--rate", type=float, default=100.0, help="event-time rate, tx/s")
    parser.add_argument("--users", type=int, default=5000, help="generator users")
    parser.add_argument("--fraud-ratio", type=float, default=0.02, help="generator fraud ratio")
    parser.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m spark_job.train (repeatable)")
    parser.add_argument("--skip-cost", action="store_true",
                        help="measure the model only, not the detector with and without it")
    parser.add_argument("--throughput-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m benchmarks.throughput")
    parser.add_argument("--latency-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m benchmarks.latency")
    parser.add_argument("--timeout", type=float, default=7200.0,
                        help="seconds each step may take before it is stopped")
    args = parser.parse_args(argv)
    count = args.count or (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    spec = DataSpec(count=count, rate=args.rate, users=args.users,
                    fraud_ratio=args.fraud_ratio, seed=args.seed)
    report = Report(NAME, args, {"count": count, "rate": args.rate, "users": args.users,
                                 "fraud_ratio": args.fraud_ratio, "train_args": args.train_arg,
                                 "throughput_args": args.throughput_arg,
                                 "latency_args": args.latency_arg})
    with work_dir(args, NAME) as work:
        started = time.monotonic()
        transactions = generate(spec)
        parquet, models = work / "parquet", work / "models"
        files = write_bronze(parquet, transactions, 100_000)
        say(f"{count:,} transactions as bronze ({files} files) in "
            f"{time.monotonic() - started:.1f} s")
        del transactions
        training = train(parquet, models, work, args.timeout, args.train_arg)
        cost: dict[str, Any] = {}
        if not args.skip_cost and training["version"]:
            quick = ["--quick"] if args.quick else []
            model_arg = f"--detector-arg=--models-dir={models}"
            for label, extra in (("off", []), ("on", [model_arg])):
                cost[f"throughput_{label}"] = sub_benchmark(
                    "throughput", [*quick, *extra, *args.throughput_arg], work,
                    f"throughput-{label}", args.timeout)
                cost[f"latency_{label}"] = sub_benchmark(
                    "latency", [*quick, *extra, *args.latency_arg], work, f"latency-{label}",
                    args.timeout)
            every = [f"--rules-file={scoring_rules_file(work)}", model_arg]
            cost["throughput_every"] = sub_benchmark(
                "throughput", [*quick, *every, *args.throughput_arg], work, "throughput-every",
                args.timeout)

    metrics = training["metrics"] or {}
    comparison = metrics.get("comparison") or {}

    def marginal(label: str) -> float | None:
        result = cost.get(f"throughput_{label}") or {}
        return (result.get("summary") or {}).get("marginal_tx_per_second")

    summary: dict[str, Any] = {
        "transactions": count, "training_wall_seconds": training["wall_seconds"],
        "version": training["version"], "algorithm": metrics.get("algorithm"),
        "auc": metrics.get("auc"),
        "precision_at_recall_0_9": metrics.get("precision_at_recall_0_9"),
        "rules": metrics.get("rules"), "comparison": comparison,
        "candidates": metrics.get("candidates"),
    }
    if cost:
        on, off = marginal("on"), marginal("off")
        summary["backfill_marginal_tx_per_second"] = {"off": off, "on": on,
                                                      "on_over_off": ratio(on, off)}
        busy_on = in_batch_seconds(cost.get("throughput_on"))
        busy_off = in_batch_seconds(cost.get("throughput_off"))
        busy_every = in_batch_seconds(cost.get("throughput_every"))
        summary["backfill_in_batch_seconds"] = {"off": busy_off, "on": busy_on,
                                                "on_over_off": ratio(busy_on, busy_off)}
        summary["backfill_every_transaction_scored"] = {
            "in_batch_seconds": busy_every, "over_off": ratio(busy_every, busy_off),
            "marginal_tx_per_second": marginal("every"),
            "matches_oracle": ((cost.get("throughput_every") or {}).get("summary")
                               or {}).get("all_match_oracle")}
        latency: dict[str, Any] = {}
        rates = ((cost.get("latency_off") or {}).get("summary") or {}).keys()
        for rate in rates:
            for rule in ("high_value", "velocity"):
                p95_on = latency_p95(cost.get("latency_on"), rate, rule)
                p95_off = latency_p95(cost.get("latency_off"), rate, rule)
                latency[f"{rate} tx/s {rule}"] = {"p95_off_s": p95_off, "p95_on_s": p95_on,
                                                  "on_over_off": ratio(p95_on, p95_off)}
        summary["latency_p95"] = latency
        # Slowdown factors (> 1: slower with the model): in-batch time and latency, on/off.
        slower = [value for value in
                  [summary["backfill_in_batch_seconds"]["on_over_off"],
                   summary["backfill_every_transaction_scored"]["over_off"],
                   *(v["on_over_off"] for v in latency.values())]
                  if value is not None]
        summary["within_allowed_slowdown"] = (all(v <= 1 + ALLOWED_SLOWDOWN for v in slower)
                                              if slower else None)
    stamped, _ = report.finish(summary=summary, training=training,
                               cost={k: (v or {}).get("summary") for k, v in cost.items()})

    print(format_table(
        ["transactions", "train s", "algorithm", "AUC", "precision@0.9 recall",
         "rules precision", "rules recall"],
        [[count, training["wall_seconds"], metrics.get("algorithm"), metrics.get("auc"),
          metrics.get("precision_at_recall_0_9"),
          (metrics.get("rules") or {}).get("precision"),
          (metrics.get("rules") or {}).get("recall")]]))
    if comparison:
        print(format_table(
            ["at the rules' recall", "precision", "recall"],
            [[name.replace("_", " "), (comparison.get(name) or {}).get("precision"),
              (comparison.get(name) or {}).get("recall")]
             for name in ("rules_alone", "model_alone", "rules_plus_model")]))
    if cost:
        print(format_table(
            ["figure", "model off", "model on", "on/off"],
            [["backfill marginal tx/s", *summary["backfill_marginal_tx_per_second"].values()],
             ["backfill in-batch s (larger)", *summary["backfill_in_batch_seconds"].values()],
             ["  ... every transaction scored (ml_score)", busy_off, busy_every,
              summary["backfill_every_transaction_scored"]["over_off"]],
             *[[f"p95 s, {name}", v["p95_off_s"], v["p95_on_s"], v["on_over_off"]]
               for name, v in summary["latency_p95"].items()]]))
    print(f"results: {stamped}")
    return 0 if training["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
