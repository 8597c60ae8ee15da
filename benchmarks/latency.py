"""Event-to-alert latency of the live detector (``python -m spark_job``, default trigger).

A sender thread produces traffic at a fixed total rate (100 tx/s, then 1000 tx/s) with event
time = wall clock: the generator's stream (normal transactions and its own fraud episodes) plus
scheduled triggers on fresh users — one high_value payment and one velocity burst (four payments
``--velocity-gap`` s apart) per second by default (``--triggers-per-second``). The generator's
episodes wait for a user idle for 250 s, so in a short run they come minutes late; the injected
ones give a steady supply of samples. The sender remembers when each transaction_id was handed
to the Kafka client (and when it was acknowledged). An assign()-based consumer on the alerts
topic stamps the arrival of every alert.

latency = alert arrival - send time of the alert's trigger transaction: the newest event time
among its ``transaction_ids`` (the one that made the rule true; for high_value the single id).

``--preload N --preload-users U`` puts a history in the detector's state first: N ordinary
transactions of a pool of U users, event times spread over the five minutes before the start
(inside every rule's retention), produced before the detector starts; its first batches read
them, and the live traffic then meets a state holding that many users (the distinct count is
reported). The oracle judges the preload and the live traffic together.

The first ``--warmup`` seconds after the detector's first batch are skipped (Spark start-up
leaves a backlog). Sampling covers triggers sent between the end of the warm-up and the end of
``--duration``; after the sender stops, the run waits (up to ``--drain`` s) for the alerts the
oracle expects from those triggers, and counts the ones that never came.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmarks.live import AlertTail, PacedSender, SentTx, TriggerInjector, live_generator
from benchmarks.report import Report, add_detector_args, base_parser, format_table, say, work_dir
from benchmarks.workload import (
    DataSpec,
    detector_command,
    generate,
    metrics_path,
    oracle_by_id,
    preload,
    read_json_lines,
    summarize_batches,
)
from fraudstream import schemas
from fraudstream.testing import (
    Topics,
    fresh_topics,
    log_tail,
    running_broker,
    start_process,
    stop_process,
    summarize,
    wait_until,
)

__all__ = [
    "HEADLINE_RULES",
    "SparkLive",
    "add_latency_args",
    "latency_settings",
    "main",
    "measure_latency",
    "resolve_latency_args",
    "table",
]

NAME = "latency"
#: The rules the latency targets are about (the others are measured and reported too).
HEADLINE_RULES = (schemas.HIGH_VALUE, schemas.VELOCITY)


class LiveProcessor(Protocol):
    """A stream processor under test, started as a subprocess on given topics."""

    engine: str
    process: Any

    def start(self) -> None: ...

    def first_output_time(self) -> float | None:
        """Wall time (epoch s) when it finished its first unit of work, None before."""

    def own_metrics(self, since: float, until: float) -> dict[str, Any]: ...

    def stop(self) -> int | None: ...

    def log_tail(self) -> str: ...


ProcessorFactory = Callable[[Topics, Path], LiveProcessor]


class SparkLive:
    """``python -m spark_job`` with its default trigger, on fresh folders."""

    engine = "spark"

    def __init__(self, bootstrap: str, topics: Topics, run_dir: Path,
                 extra_args: Sequence[str] = ()) -> None:
        self.cmd = detector_command(bootstrap, topics, run_dir, available_now=False,
                                    extra_args=extra_args)
        self.run_dir = run_dir
        self.metrics_file = metrics_path(run_dir / "parquet")
        self.process: Any = None

    def start(self) -> None:
        self.process = start_process(self.cmd, self.run_dir / "detector.log")

    def _lines(self) -> list[dict[str, Any]]:
        return read_json_lines(self.metrics_file)

    def first_output_time(self) -> float | None:
        lines = self._lines()
        if not lines:
            return None
        return schemas.parse_timestamp(lines[0]["written_at"]).timestamp()

    def own_metrics(self, since: float, until: float) -> dict[str, Any]:
        lines = [line for line in self._lines()
                 if since <= schemas.parse_timestamp(line["written_at"]).timestamp() <= until]
        return {"source": str(self.metrics_file), **summarize_batches(lines), "lines": lines}

    def stop(self) -> int | None:
        return stop_process(self.process, timeout=90)

    def log_tail(self) -> str:
        return log_tail(self.run_dir / "detector.log")


def trigger_of(ids: Sequence[str], sent: Mapping[str, SentTx]) -> SentTx | None:
    """The transaction that made the rule true: newest event time (ties: sent last)."""
    known = [sent[i] for i in ids if i in sent]
    if not known:
        return None
    return max(known, key=lambda s: (s.event_ms, s.send_time))


def measure_latency(bootstrap: str, rate: float, args: argparse.Namespace, work: Path,
                    factory: ProcessorFactory, label: str) -> dict[str, Any]:
    """One live run at ``rate`` tx/s against a fresh set of topics; returns the result dict."""
    topics = fresh_topics(bootstrap, f"lat-{label}-{int(rate)}", args.partitions)
    run_dir = work / f"latency-{label}-{int(rate)}-{uuid.uuid4().hex[:6]}"
    generator = live_generator(rate, args.live_fraud_ratio, args.seed)
    history = preload_history(bootstrap, topics.transactions, args)
    tail = AlertTail(bootstrap, topics.alerts)
    tail.start()
    tail.ready.wait(30)
    processor = factory(topics, run_dir)
    processor.start()
    injector = TriggerInjector(args.triggers_per_second, args.triggers_per_second,
                               args.velocity_gap, seed=args.seed + int(rate))
    sender = PacedSender(bootstrap, topics.transactions, rate, generator, injector)
    sender.start()
    say(f"{label} at {rate:g} tx/s: waiting for the first batch/output ...")
    result: dict[str, Any] = {"engine": processor.engine, "rate": rate, "topics": vars(topics)}
    try:
        if not wait_until(lambda: processor.first_output_time() is not None,
                          args.startup_timeout, interval=0.5,
                          alive=lambda: processor.process.poll() is None):
            result["error"] = "no first batch before --startup-timeout (or the process exited)"
            result["log_tail"] = processor.log_tail()
            say(f"{result['error']}\n{result['log_tail']}")
            return result
        first = processor.first_output_time()
        assert first is not None
        measure_from = first + args.warmup
        end_at = first + args.duration
        say(f"  first output after {first - (sender.started_at or first):.1f} s of traffic; "
            f"sampling until {args.duration:g} s after it")
        wait_until(lambda: time.time() >= end_at, args.duration + 5, interval=0.5,
                   alive=lambda: processor.process.poll() is None)
        sender.stop()
        stopped = sender.stopped_at or time.time()

        sent = dict(sender.sent)
        expected = oracle_by_id([*history, *sender.transactions])
        wanted = {}
        for alert_id, alert in expected.items():
            trigger = trigger_of(alert["transaction_ids"], sent)
            if trigger is not None and measure_from <= trigger.send_time <= stopped:
                wanted[alert_id] = alert

        def all_arrived() -> bool:
            return set(wanted) <= {a["alert_id"] for _, a in tail.alerts()}

        wait_until(all_arrived, args.drain, interval=0.5)
        drained = time.time()
    finally:
        if sender.is_alive():
            sender.stop()
        exit_code = processor.stop()
        tail.stop()
    result["exit_code"] = exit_code
    result.update(analyse(tail.alerts(), sent, expected, wanted, measure_from, stopped,
                          sender.started_at or measure_from))
    result["sent_in_window"] = sum(1 for s in sent.values() if measure_from <= s.send_time
                                   <= stopped)
    result["sent_rate_in_window"] = round(result["sent_in_window"] / max(stopped - measure_from,
                                                                         1e-9), 1)
    result["window_seconds"] = round(stopped - measure_from, 1)
    result["send_errors"] = sender.errors
    result["own_metrics"] = processor.own_metrics(measure_from, drained)
    result["users"] = generator.initial_users
    result["extra_users"] = generator.extra_users
    result["preloaded"] = len(history)
    result["preloaded_distinct_users"] = len({tx["user_id"] for tx in history})
    return result


#: Event time the preloaded history spans, ending at the detector's start.
PRELOAD_SPAN_SECONDS = 300.0


def preload_history(bootstrap: str, topic: str, args: argparse.Namespace
                    ) -> list[schemas.Transaction]:
    """``--preload`` transactions of ``--preload-users`` users on ``topic`` before the detector
    starts (none when ``--preload`` is 0); returns them for the oracle."""
    count = args.preload
    if not count:
        return []
    spec = DataSpec(count=count, rate=count / PRELOAD_SPAN_SECONDS, users=args.preload_users,
                    fraud_ratio=args.live_fraud_ratio, seed=args.seed + 1)
    history = generate(spec)
    loaded = preload(bootstrap, topic, history)
    say(f"  preloaded {count:,} transactions of up to {args.preload_users:,} users in "
        f"{loaded['seconds']} s")
    return history


def analyse(received: Sequence[tuple[float, dict[str, Any]]], sent: Mapping[str, SentTx],
            expected: Mapping[str, Mapping[str, Any]], wanted: Mapping[str, Mapping[str, Any]],
            measure_from: float, stopped: float, origin: float) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    by_rule: dict[str, list[float]] = {rule: [] for rule in schemas.RULES}
    by_rule_ack: dict[str, list[float]] = {rule: [] for rule in schemas.RULES}
    unexpected = 0
    arrived = set()
    for receive_time, alert in received:
        arrived.add(alert["alert_id"])
        if alert["alert_id"] not in expected:
            unexpected += 1
        trigger = trigger_of(alert.get("transaction_ids") or [], sent)
        if trigger is None or not measure_from <= trigger.send_time <= stopped:
            continue
        latency = receive_time - trigger.send_time
        from_ack = receive_time - trigger.ack_time if trigger.ack_time else None
        by_rule.setdefault(alert["rule"], []).append(latency)
        if from_ack is not None:
            by_rule_ack.setdefault(alert["rule"], []).append(from_ack)
        samples.append({"rule": alert["rule"], "latency_s": round(latency, 4),
                        "latency_from_ack_s": round(from_ack, 4) if from_ack else None,
                        "sent_at_s": round(trigger.send_time - origin, 3),
                        "received_at_s": round(receive_time - origin, 3)})
    missing: dict[str, int] = {rule: 0 for rule in schemas.RULES}
    for alert_id, alert in wanted.items():
        if alert_id not in arrived:
            missing[alert["rule"]] = missing.get(alert["rule"], 0) + 1
    return {
        "latency_s": {rule: summarize(values) for rule, values in by_rule.items()},
        "latency_from_ack_s": {rule: summarize(values) for rule, values in by_rule_ack.items()},
        "expected_in_window": {rule: sum(1 for a in wanted.values() if a["rule"] == rule)
                               for rule in schemas.RULES},
        "missing_in_window": missing,
        "alerts_received": len(received),
        "alerts_not_in_oracle": unexpected,
        "samples": samples,
    }


def add_latency_args(parser: argparse.ArgumentParser, default_rates: Sequence[float]) -> None:
    parser.add_argument("--rates", type=float, nargs="+", default=None,
                        help=f"send rates, tx/s (default {list(default_rates)}, --quick [100])")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of traffic after the first batch, warm-up included "
                             "(default 120, --quick 30)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds after the first batch whose triggers are not sampled "
                             "(default 20, --quick 8)")
    parser.add_argument("--drain", type=float, default=None,
                        help="at most this many seconds to wait for outstanding alerts after "
                             "the sender stops; ends once all arrived (default 120, --quick 90)")
    parser.add_argument("--live-fraud-ratio", type=float, default=0.02,
                        help="fraud ratio of the live generator (episodes per event)")
    parser.add_argument("--triggers-per-second", type=float, default=1.0,
                        help="injected high_value triggers per second, and as many velocity "
                             "bursts (0: only the generator's episodes)")
    parser.add_argument("--velocity-gap", type=float, default=2.0,
                        help="seconds between the four payments of an injected velocity burst")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for the first batch")
    parser.add_argument("--preload", type=int, default=0, metavar="N",
                        help="transactions put on the topic before the detector starts, so its "
                             "state holds their users during the run (default 0)")
    parser.add_argument("--preload-users", type=int, default=100_000, metavar="U",
                        help="users of the preloaded transactions (default 100000)")


def resolve_latency_args(args: argparse.Namespace, default_rates: Sequence[float]) -> None:
    quick = args.quick
    args.rates = args.rates or ([100.0] if quick else list(default_rates))
    args.duration = args.duration or (30.0 if quick else 120.0)
    args.warmup = args.warmup if args.warmup is not None else (8.0 if quick else 20.0)
    args.drain = args.drain or (90.0 if quick else 120.0)
    if args.warmup >= args.duration:
        raise SystemExit("--warmup must be shorter than --duration")


def latency_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"rates": args.rates, "duration": args.duration, "warmup": args.warmup,
            "drain": args.drain, "live_fraud_ratio": args.live_fraud_ratio, "seed": args.seed,
            "triggers_per_second": args.triggers_per_second, "velocity_gap": args.velocity_gap,
            "partitions": args.partitions, "preload": args.preload,
            "preload_users": args.preload_users}


def headline(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per rate: the latency quantiles of the headline rules, missing alerts, own metrics."""
    out: dict[str, Any] = {}
    for run in runs:
        if "error" in run:
            out[f"{run['rate']:g}"] = {"error": run["error"]}
            continue
        own = run.get("own_metrics") or {}
        out[f"{run['rate']:g}"] = {
            **{rule: run["latency_s"][rule] for rule in HEADLINE_RULES},
            "missing": {rule: run["missing_in_window"][rule] for rule in HEADLINE_RULES},
            "detector_latency_ms_p95_max": (own.get("latency_ms_p95") or {}).get("max"),
            "sent_rate_in_window": run["sent_rate_in_window"],
        }
    return out


def table(runs: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for run in runs:
        if "error" in run:
            rows.append([run["engine"], run["rate"], "ERROR", None, None, None, None, None, None])
            continue
        own = run.get("own_metrics") or {}
        for rule in schemas.RULES:
            stats = run["latency_s"][rule]
            if rule not in HEADLINE_RULES and not stats["n"]:
                continue
            rows.append([run["engine"], run["rate"], rule, stats["n"],
                         run["missing_in_window"][rule], stats["p50"], stats["p95"],
                         stats["p99"], stats["max"]])
        if own.get("latency_ms_p95"):
            rows.append([run["engine"], run["rate"], "(detector metrics, ms: median batch p50, "
                         "max batch p95, max)", own.get("batches"), None,
                         own["latency_ms_p50"]["p50"], own["latency_ms_p95"]["max"], None,
                         own["latency_ms_max"]["max"]])
    return format_table(["engine", "tx/s", "rule", "samples", "missing", "p50 s", "p95 s",
                         "p99 s", "max s"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    add_latency_args(parser, (100.0, 1000.0))
    add_detector_args(parser)
    args = parser.parse_args(argv)
    resolve_latency_args(args, (100.0, 1000.0))
    report = Report(NAME, args, {**latency_settings(args), "detector_args": args.detector_arg})
    runs = []
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        bootstrap = broker.bootstrap_servers

        def spark(topics: Topics, run_dir: Path) -> LiveProcessor:
            return SparkLive(bootstrap, topics, run_dir, args.detector_arg)

        for rate in args.rates:
            runs.append(measure_latency(bootstrap, rate, args, work, spark, "spark"))
    written = report.finish(summary=headline(runs), runs=runs)
    print(table(runs))
    print(f"results: {written}")
    return 0 if all("error" not in run and run["exit_code"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
