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
   oracle (which has no model) expects and the run is still checked alert by alert. The
   backfills run ``--cost-rounds`` times per configuration in rotating order and the medians
   are reported; the rule engine's own CPU per transaction is also measured in process (no
   Spark, best of interleaved repeats), the figure least disturbed by a noisy machine. The
   sub-benchmarks' JSON goes to this run's work folder, so ``benchmarks/results`` keeps one
   latest file per benchmark.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.backtest import write_bronze
from benchmarks.report import Report, base_parser, format_table, say, work_dir
from benchmarks.workload import DataSpec, generate
from fraudstream.model import METRICS_FILE, model_versions
from fraudstream.rules import default_definitions
from fraudstream.settings import DetectorSettings
from fraudstream.testing import child_env, log_tail, run_timed

__all__ = ["main"]

NAME = "model"
DEFAULT_COUNT = 1_000_000
QUICK_COUNT = 20_000
#: The share of the live figures scoring may cost before it counts as a defect.
ALLOWED_SLOWDOWN = 0.15
#: Transactions of the in-process engine measurement, and its batch size.
ENGINE_COUNT = 240_000
QUICK_ENGINE_COUNT = 20_000
ENGINE_BATCH = 20_000
ENGINE_REPEATS = 3
#: An ``ml_score`` rule no score reaches: in force, it makes the detector score every
#: transaction while its alerts stay those of the default rules.
NEVER_FIRING_ML_SCORE = {"rule_id": "ml_score", "kind": "ml_score", "params": {"threshold": 1.0}}


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
    items.append(NEVER_FIRING_ML_SCORE)
    path.write_text(json.dumps(items, indent=2))
    return path


def engine_cost(models: Path, spec: DataSpec) -> dict[str, Any]:
    """The rule engine's own time per transaction (``BucketState.process``, in this process,
    no Spark), without the model, with it, and with every transaction scored: the cost of
    scoring without the noise of a whole detector run. Batches of ``ENGINE_BATCH``
    transactions, split into the detector's default number of user buckets."""
    from fraudstream.model import newest_model
    from fraudstream.rules import BucketState, RuleSet, definition_from_dict
    from fraudstream.rules.oracle import as_tx

    scorer = newest_model(models)[0]
    transactions = generate(spec)
    buckets = DetectorSettings().state_buckets
    batches = []
    for start in range(0, len(transactions), ENGINE_BATCH):
        split: list[dict[str, list[Any]]] = [defaultdict(list) for _ in range(buckets)]
        for record in transactions[start:start + ENGINE_BATCH]:
            user = record["user_id"]
            split[zlib.crc32(user.encode()) % buckets][user].append(as_tx(record))
        batches.append(split)
    every = [*default_definitions(), definition_from_dict(
        {**NEVER_FIRING_ML_SCORE, "enabled": True, "version": 1,
         "updated_at": "2026-01-01T00:00:00Z", "updated_by": "benchmark"})]
    out: dict[str, Any] = {"transactions": len(transactions), "batch": ENGINE_BATCH,
                           "buckets": buckets, "repeats": ENGINE_REPEATS}
    configs = {"off": (None, default_definitions()), "on": (scorer, default_definitions()),
               "every": (scorer, every)}
    times: dict[str, list[float]] = {label: [] for label in configs}
    # CPU time of this process, interleaved repeats, the fastest kept: a shared VM's noise
    # (stolen time, other processes) only ever adds time.
    for _ in range(ENGINE_REPEATS):
        for label, (model, rules) in configs.items():
            states = [BucketState(ruleset=RuleSet.of(rules)) for _ in range(buckets)]
            alerts, seconds = 0, 0.0
            for split in batches:
                started = time.process_time()
                for state, arrivals in zip(states, split, strict=True):
                    alerts += len(state.process(arrivals, None, model)[0])
                seconds += time.process_time() - started
            times[label].append(round(seconds / len(transactions) * 1e6, 2))
            out[f"{label}_alerts"] = alerts
    for label, values in times.items():
        out[f"{label}_us"] = min(values)
        out[f"{label}_us_each"] = values
    say(f"rule engine in process: {out['off_us']} / {out['on_us']} / {out['every_us']} us per "
        "transaction (off / on / every transaction scored)")
    return out


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
    parser.add_argument("--cost-rounds", type=int, default=None,
                        help="backfills per configuration (off, on, every), in rotating "
                             "order; medians are reported (default 2, --quick 1)")
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
        engine: dict[str, Any] = {}
        if not args.skip_cost and training["version"]:
            quick = ["--quick"] if args.quick else []
            model_arg = f"--detector-arg=--models-dir={models}"
            configs = {"off": [], "on": [model_arg],
                       "every": [f"--rules-file={scoring_rules_file(work)}", model_arg]}
            rounds = args.cost_rounds or (1 if args.quick else 2)
            for number in range(rounds):
                # Each round starts with another configuration: whichever runs first on a
                # machine pays what warms up (page cache, pip's bytecode), not always "off".
                order = list(configs)[number % 3:] + list(configs)[:number % 3]
                for label in order:
                    cost.setdefault(f"throughput_{label}", []).append(sub_benchmark(
                        "throughput", [*quick, *configs[label], *args.throughput_arg], work,
                        f"throughput-{label}-{number + 1}", args.timeout))
            for label in ("off", "on"):
                cost[f"latency_{label}"] = sub_benchmark(
                    "latency", [*quick, *configs[label], *args.latency_arg], work,
                    f"latency-{label}", args.timeout)
            engine = engine_cost(models, DataSpec(
                count=QUICK_ENGINE_COUNT if args.quick else ENGINE_COUNT, rate=args.rate,
                users=args.users, fraud_ratio=args.fraud_ratio, seed=args.seed))

    metrics = training["metrics"] or {}
    comparison = metrics.get("comparison") or {}

    def median_of(label: str, value: Callable[[Mapping[str, Any] | None], float | None]
                  ) -> float | None:
        values = [v for v in map(value, cost.get(f"throughput_{label}") or []) if v]
        return round(statistics.median(values), 3) if values else None

    def marginal(result: Mapping[str, Any] | None) -> float | None:
        return ((result or {}).get("summary") or {}).get("marginal_tx_per_second")

    summary: dict[str, Any] = {
        "transactions": count, "training_wall_seconds": training["wall_seconds"],
        "version": training["version"], "algorithm": metrics.get("algorithm"),
        "auc": metrics.get("auc"),
        "precision_at_recall_0_9": metrics.get("precision_at_recall_0_9"),
        "rules": metrics.get("rules"), "comparison": comparison,
        "candidates": metrics.get("candidates"),
    }
    if cost:
        busy = {label: median_of(label, in_batch_seconds) for label in ("off", "on", "every")}
        rates = {label: median_of(label, marginal) for label in ("off", "on", "every")}
        summary["backfill_in_batch_seconds"] = {
            **busy, "on_over_off": ratio(busy["on"], busy["off"]),
            "every_over_off": ratio(busy["every"], busy["off"]),
            "each_run": {label: [in_batch_seconds(r) for r in cost[f"throughput_{label}"]]
                         for label in ("off", "on", "every")}}
        summary["backfill_marginal_tx_per_second"] = rates
        summary["backfill_matches_oracle"] = all(
            ((r or {}).get("summary") or {}).get("all_match_oracle")
            for label in ("off", "on", "every") for r in cost[f"throughput_{label}"])
        summary["engine"] = engine
        latency: dict[str, Any] = {}
        latency_rates = ((cost.get("latency_off") or {}).get("summary") or {}).keys()
        for rate in latency_rates:
            for rule in ("high_value", "velocity"):
                p95_on = latency_p95(cost.get("latency_on"), rate, rule)
                p95_off = latency_p95(cost.get("latency_off"), rate, rule)
                latency[f"{rate} tx/s {rule}"] = {"p95_off_s": p95_off, "p95_on_s": p95_on,
                                                  "on_over_off": ratio(p95_on, p95_off)}
        summary["latency_p95"] = latency
        # Slowdown factors (> 1: slower with the model): in-batch time and latency, on/off.
        slower = [value for value in
                  [summary["backfill_in_batch_seconds"]["on_over_off"],
                   summary["backfill_in_batch_seconds"]["every_over_off"],
                   *(v["on_over_off"] for v in latency.values())]
                  if value is not None]
        summary["within_allowed_slowdown"] = (all(v <= 1 + ALLOWED_SLOWDOWN for v in slower)
                                              if slower else None)
    written = report.finish(summary=summary, training=training,
                               cost={k: [(r or {}).get("summary") for r in v]
                                     if isinstance(v, list) else (v or {}).get("summary")
                                     for k, v in cost.items()})

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
            [["backfill marginal tx/s (median)", rates["off"], rates["on"],
              ratio(rates["on"], rates["off"])],
             ["backfill in-batch s, 240k (median)", busy["off"], busy["on"],
              summary["backfill_in_batch_seconds"]["on_over_off"]],
             ["  ... ml_score in force: every transaction scored", busy["off"], busy["every"],
              summary["backfill_in_batch_seconds"]["every_over_off"]],
             ["rule engine us/tx, in process", engine.get("off_us"), engine.get("on_us"),
              ratio(engine.get("on_us"), engine.get("off_us"))],
             ["  ... every transaction scored", engine.get("off_us"), engine.get("every_us"),
              ratio(engine.get("every_us"), engine.get("off_us"))],
             *[[f"p95 s, {name}", v["p95_off_s"], v["p95_on_s"], v["on_over_off"]]
               for name, v in summary["latency_p95"].items()]]))
    print(f"results: {written}")
    return 0 if training["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
