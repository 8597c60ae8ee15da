"""Rule change to first alert: how soon a definition published on the rules topic is in force in
the live detector (``python -m spark_job``, default trigger).

A private broker, fresh transactions/alerts/DLQ/rules topics and a live detector with default
settings. Traffic runs throughout so that batches are what they are in service: the generator's
stream at ``--rate`` tx/s (as in ``benchmarks.latency``) plus a probe transaction every
``--probe-interval`` s with amount ``--probe-amount`` (2000: under the default high_value amount
of 3500, so no default rule fires on it). Each probe transaction comes from a fresh user
(``bench-probe-…``): ten payments a second from one user would keep a velocity episode open.

The probe rule ``probe`` (kind high_value) is published disabled once (version 1), then the
benchmark alternates: publish it *enabled* with amount ``--probe-threshold`` (1000, so every
probe transaction fires it), wait for the first alert on the alerts topic with ``rule ==
"probe"`` and that ``rule_version``, then publish it *disabled* and wait until it has stopped
firing (a batch that started after the disable was acknowledged has completed, and no alert of
the enabled version came for ``--quiet`` s). A random pause of up to one second before each
publish spreads publish times over the trigger cycle instead of locking them to it.

latency = arrival of that first alert at an assign() consumer on the alerts topic - the wall
time just before ``RulesTopic.publish`` was called (what an operator's publish experiences; the
call includes the client's topic check and the broker's acknowledgement). It is also reported
from the moment the call returned, i.e. the broker had the record (``latency_from_ack_s``).

The detector reads the rules topic in the same micro-batches as the transactions and applies a
batch's rule records before its transactions, so publish -> first alert is bounded by the wait
for the next batch to start (up to one trigger interval, or up to one batch when batches run
longer than the trigger) plus that batch's own duration. For each change the batch that first
fired the new version is found in the detector's metrics file (``_metrics/detector.jsonl``):
how long after the acknowledgement it started and how long it ran are reported beside the
latency, with the batch durations over the whole measurement. A batch reads the sources' end
offsets in its ``latestOffset`` stage, not at its very first instant, so a batch that started
up to that stage's duration before the acknowledgement can still be the one that applied it
(``started_after_ack_s`` slightly negative).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from benchmarks.live import AlertTail, PacedSender, live_generator
from benchmarks.report import Report, add_detector_args, base_parser, format_table, say, work_dir
from benchmarks.workload import detector_command, metrics_path, summarize_batches
from fraudstream import schemas
from fraudstream.rules.definition import RuleDefinition, definition_from_dict
from fraudstream.rules.kinds import HighValue
from fraudstream.rules.store import RulesTopic
from fraudstream.settings import DetectorSettings
from fraudstream.testing import (
    fresh_topics,
    log_tail,
    running_broker,
    start_process,
    stop_process,
    summarize,
    wait_until,
)
from producer.generator import encode_transaction

__all__ = ["main"]

NAME = "rule_change"
PROBE_RULE = "probe"
AUTHOR = "benchmarks.rule_change"
#: The default high_value amount: probe transactions must stay under it, or the default rule
#: would fire on them too.
DEFAULT_HIGH_VALUE = float(HighValue.defaults["amount"])


# --- probe traffic and probe alerts -----------------------------------------------------------


class ProbeSender(threading.Thread):
    """One probe transaction every ``interval`` s, event time = wall clock, each from a fresh
    user, so that whenever the probe rule is enabled every batch holds something it fires on
    and no windowed rule ever sees a probe user twice."""

    def __init__(self, bootstrap: str, topic: str, interval: float, amount: float) -> None:
        super().__init__(name="probe-sender", daemon=True)
        from producer.app import PRODUCER_DEFAULTS

        self.topic = topic
        self.interval = interval
        self.amount = amount
        self.config = {**PRODUCER_DEFAULTS, "client.id": "fraudstream-bench-probe",
                       "bootstrap.servers": bootstrap}
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def _delivered(self, error: KafkaError | None, _message: object) -> None:
        if error is None:
            self.acked += 1
        elif len(self.errors) < 10:
            self.errors.append(str(error))

    def _transaction(self) -> schemas.Transaction:
        self.sent += 1
        return {"transaction_id": uuid.uuid4().hex, "user_id": f"bench-probe-{self.sent:07d}",
                "amount": self.amount, "currency": "EUR",
                "timestamp": schemas.format_timestamp(datetime.now(UTC)), "location": "Paris",
                "payment_method": "card", "merchant_id": "m000", "device_ip": "198.51.100.9",
                "is_fraud": False, "fraud_pattern": None}

    def run(self) -> None:
        producer = Producer(self.config)
        due = time.monotonic()
        try:
            while not self.stopping.is_set():
                tx = self._transaction()
                producer.produce(self.topic, encode_transaction(tx), tx["user_id"].encode(),
                                 on_delivery=self._delivered)
                producer.poll(0)
                # A late tick is not made up with a burst: the schedule restarts from now.
                due = max(due + self.interval, time.monotonic())
                self.stopping.wait(max(0.0, due - time.monotonic()))
        finally:
            producer.flush(30)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


class ProbeAlerts:
    """First and last arrival, and count, of the probe rule's alerts per rule_version, parsed
    incrementally from an ``AlertTail`` (which keeps every alert of a busy topic)."""

    def __init__(self, tail: AlertTail) -> None:
        self.tail = tail
        self.parsed = 0
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.count: dict[int, int] = {}

    def refresh(self) -> None:
        items = self.tail.received[self.parsed:]
        self.parsed += len(items)
        for item in items:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                alert = json.loads(item.value)
                if alert["rule"] != PROBE_RULE:
                    continue
                version = int(alert["rule_version"])
                self.first[version] = min(self.first.get(version, item.receive_time),
                                          item.receive_time)
                self.last[version] = max(self.last.get(version, 0.0), item.receive_time)
                self.count[version] = self.count.get(version, 0) + 1

    def first_of(self, version: int) -> float | None:
        self.refresh()
        return self.first.get(version)

    def last_of(self, version: int) -> float | None:
        self.refresh()
        return self.last.get(version)


# --- the rule and the detector's batches ------------------------------------------------------


def probe_definition(version: int, enabled: bool, threshold: float) -> RuleDefinition:
    return definition_from_dict({
        "rule_id": PROBE_RULE, "kind": HighValue.name, "version": version, "enabled": enabled,
        "params": {"amount": threshold}, "updated_at": schemas.format_timestamp(datetime.now(UTC)),
        "updated_by": AUTHOR})


def batch_span(line: Mapping[str, Any]) -> tuple[float, float]:
    """(start, end) of a batch in epoch seconds: the metrics line is written when the batch
    has committed, and ``batch_seconds`` is Spark's whole trigger execution before that."""
    end = schemas.parse_timestamp(line["written_at"]).timestamp()
    return end - float(line.get("batch_seconds") or 0.0), end


def trigger_seconds(detector_args: Sequence[str]) -> float:
    """The trigger interval the detector runs with: its flag, its environment, its default."""
    for arg in detector_args:
        if arg.startswith("--trigger-seconds="):
            return float(arg.split("=", 1)[1])
    if os.environ.get("TRIGGER_SECONDS"):
        return float(os.environ["TRIGGER_SECONDS"])
    return float(DetectorSettings().trigger_seconds)


@dataclass
class Change:
    """One enable/disable cycle of the probe rule, in epoch seconds."""

    index: int
    version: int
    published_at: float  # just before RulesTopic.publish was called
    acked_at: float  # when it returned: the broker had the record
    first_alert_at: float | None = None
    disable_version: int | None = None
    disable_published_at: float | None = None
    disable_acked_at: float | None = None
    alerts: int = 0
    stopped: bool = False


class Detector:
    """``python -m spark_job`` (default settings) on fresh folders, and its metrics file.

    The metrics file is polled several times a second while the detector shares the machine,
    so it is read incrementally (new complete lines only) instead of whole each time.
    """

    def __init__(self, cmd: Sequence[str], run_dir: Path) -> None:
        self.cmd = list(cmd)
        self.run_dir = run_dir
        self.metrics_file = metrics_path(run_dir / "parquet")
        self.process: Any = None
        self._read_bytes = 0
        self._lines: list[dict[str, Any]] = []

    def start(self) -> None:
        self.process = start_process(self.cmd, self.run_dir / "detector.log")

    def lines(self) -> list[dict[str, Any]]:
        with contextlib.suppress(OSError), self.metrics_file.open("rb") as fh:
            fh.seek(self._read_bytes)
            chunk = fh.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self._read_bytes += len(complete)
            for raw in complete.splitlines():
                with contextlib.suppress(ValueError):
                    self._lines.append(json.loads(raw))
        return self._lines

    def first_batch_time(self) -> float | None:
        lines = self.lines()
        return batch_span(lines[0])[1] if lines else None

    def batch_started_after(self, moment: float) -> bool:
        """Whether a batch that started after ``moment`` has completed."""
        return any(batch_span(line)[0] >= moment for line in self.lines())

    def stop(self) -> int | None:
        return stop_process(self.process, timeout=90)


# --- the run ----------------------------------------------------------------------------------


def publish(rules: RulesTopic, definition: RuleDefinition) -> tuple[float, float]:
    """(wall time just before the call, wall time when the broker had acknowledged it)."""
    before = time.time()
    rules.publish(definition)
    return before, time.time()


def measure(bootstrap: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    topics = fresh_topics(bootstrap, "rc", args.partitions)
    rules_topic = f"rules-{topics.alerts.removeprefix('alerts-')}"
    rules = RulesTopic({"bootstrap.servers": bootstrap}, rules_topic)
    rules.ensure()
    run_dir = work / f"rule-change-{uuid.uuid4().hex[:6]}"
    cmd = detector_command(bootstrap, topics, run_dir, available_now=False,
                           extra_args=[f"--rules-topic={rules_topic}", *args.detector_arg])
    result: dict[str, Any] = {"topics": {**vars(topics), "rules": rules_topic}}
    tail = AlertTail(bootstrap, topics.alerts)
    tail.start()
    tail.ready.wait(30)
    probe_alerts = ProbeAlerts(tail)
    detector = Detector(cmd, run_dir)
    detector.start()
    sender = PacedSender(bootstrap, topics.transactions, args.rate,
                         live_generator(args.rate, args.live_fraud_ratio, args.seed))
    probes = ProbeSender(bootstrap, topics.transactions, args.probe_interval, args.probe_amount)
    sender.start()
    probes.start()
    rng = random.Random(args.seed)
    changes: list[Change] = []
    measure_from = measure_until = time.time()
    exit_code: int | None = None
    try:
        say(f"traffic at {args.rate:g} tx/s + a probe every {args.probe_interval:g} s; waiting "
            "for the detector's first batch ...")
        if not wait_until(lambda: detector.first_batch_time() is not None, args.startup_timeout,
                          interval=0.5,
                          alive=lambda: detector.process.poll() is None):
            result["error"] = "no first batch before --startup-timeout (or the detector exited)"
            result["log_tail"] = log_tail(run_dir / "detector.log")
            say(f"{result['error']}\n{result['log_tail']}")
            return result
        say(f"  first batch; warming up for {args.warmup:g} s")
        time.sleep(args.warmup)

        version = 1
        _, acked = publish(rules, probe_definition(version, False, args.probe_threshold))
        wait_until(lambda: detector.batch_started_after(acked), args.change_timeout,
                   alive=lambda: detector.process.poll() is None)
        measure_from = time.time()
        say(f"  measuring {args.changes} changes")
        for index in range(args.changes):
            if detector.process.poll() is not None:
                result["error"] = f"the detector exited ({detector.process.returncode})"
                break
            time.sleep(rng.uniform(0.0, 1.0))
            version += 1
            change = Change(index, version,
                            *publish(rules, probe_definition(version, True, args.probe_threshold)))
            changes.append(change)
            enabled = change.version

            def alerted(enabled: int = enabled) -> bool:
                return probe_alerts.first_of(enabled) is not None

            wait_until(alerted, args.change_timeout, interval=0.02,
                       alive=lambda: detector.process.poll() is None)
            change.first_alert_at = probe_alerts.first_of(enabled)

            time.sleep(rng.uniform(0.0, 1.0))
            version += 1
            change.disable_version = version
            change.disable_published_at, change.disable_acked_at = publish(
                rules, probe_definition(version, False, args.probe_threshold))
            disabled_ack = change.disable_acked_at

            def stopped(enabled: int = enabled, since: float = disabled_ack) -> bool:
                last = probe_alerts.last_of(enabled) or since
                return (detector.batch_started_after(since)
                        and time.time() - max(last, since) >= args.quiet)

            change.stopped = wait_until(stopped, args.change_timeout, interval=0.1,
                                        alive=lambda: detector.process.poll() is None)
            change.alerts = probe_alerts.count.get(enabled, 0)
            latency = (f"{change.first_alert_at - change.published_at:.2f} s"
                       if change.first_alert_at else "no alert")
            say(f"  change {index + 1}/{args.changes}: v{enabled} -> first alert {latency}")
        measure_until = time.time()
    finally:
        probes.stop()
        sender.stop()
        exit_code = detector.stop()
        tail.stop()
    probe_alerts.refresh()
    lines = [line for line in detector.lines()
             if measure_from <= batch_span(line)[1] <= measure_until]
    result.update(analyse(changes, detector.lines(), probe_alerts))
    result["exit_code"] = exit_code
    result["window_seconds"] = round(measure_until - measure_from, 1)
    result["probe_transactions"] = {"sent": probes.sent, "acked": probes.acked,
                                    "errors": probes.errors}
    result["traffic_transactions"] = {"sent": len(sender.sent), "errors": sender.errors}
    result["own_metrics"] = {"source": str(detector.metrics_file),
                             **summarize_batches(lines), "lines": lines}
    return result


def with_min(values: Sequence[float]) -> dict[str, Any]:
    """``summarize`` plus the smallest value (a bound on the best case is part of the story)."""
    return {**summarize(values), "min": round(min(values), 3) if values else None}


def applying_batch(change: Change, lines: Sequence[Mapping[str, Any]]
                   ) -> Mapping[str, Any] | None:
    """The first batch that ended after the enabling publish was acknowledged and fired the
    probe rule: the previous version had stopped firing before the publish, so this is the
    batch that applied the new version."""
    for line in lines:
        if (batch_span(line)[1] >= change.acked_at
                and (line.get("alerts") or {}).get(PROBE_RULE, 0) > 0):
            return line
    return None


def analyse(changes: Sequence[Change], lines: Sequence[Mapping[str, Any]],
            probe_alerts: ProbeAlerts) -> dict[str, Any]:
    samples = []
    latency, from_ack, publish_call, wait_batch, apply_batch = [], [], [], [], []
    for change in changes:
        sample: dict[str, Any] = {
            "version": change.version,
            "publish_call_s": round(change.acked_at - change.published_at, 4),
            "latency_s": None, "latency_from_ack_s": None, "alerts": change.alerts,
            "disable_version": change.disable_version,
            "disable_publish_call_s": (
                round(change.disable_acked_at - change.disable_published_at, 4)
                if change.disable_acked_at and change.disable_published_at else None),
            "stopped_firing": change.stopped,
        }
        publish_call.append(change.acked_at - change.published_at)
        if change.first_alert_at is not None:
            latency.append(change.first_alert_at - change.published_at)
            from_ack.append(change.first_alert_at - change.acked_at)
            sample["latency_s"] = round(latency[-1], 4)
            sample["latency_from_ack_s"] = round(from_ack[-1], 4)
            batch = applying_batch(change, lines)
            if batch is not None:
                start, _ = batch_span(batch)
                wait_batch.append(start - change.acked_at)
                apply_batch.append(float(batch["batch_seconds"]))
                sample["applying_batch"] = {
                    "batch_id": batch["batch_id"],
                    "started_after_ack_s": round(start - change.acked_at, 4),
                    "batch_seconds": batch["batch_seconds"],
                    "latest_offset_s": (batch.get("stage_seconds") or {}).get(
                        "spark.latestOffset")}
        samples.append(sample)
    enabled = {c.version for c in changes}
    under_disabled = sum(n for v, n in probe_alerts.count.items() if v not in enabled)
    return {
        "changes": len(changes),
        "measured": len(latency),
        "missing": len(changes) - len(latency),
        "latency_s": with_min(latency),
        "latency_from_ack_s": with_min(from_ack),
        "publish_call_s": with_min(publish_call),
        "applying_batch_started_after_ack_s": with_min(wait_batch),
        "applying_batch_seconds": with_min(apply_batch),
        "alerts_under_disabled_versions": under_disabled,
        "samples": samples,
    }


def headline(result: Mapping[str, Any], trigger: float) -> dict[str, Any]:
    if "error" in result and not result.get("changes"):
        return {"error": result["error"]}
    own = result.get("own_metrics") or {}
    return {
        **({"error": result["error"]} if "error" in result else {}),
        "changes": result["changes"],
        "measured": result["measured"],
        "missing": result["missing"],
        "latency_s": result["latency_s"],
        "latency_from_ack_s": result["latency_from_ack_s"],
        "alerts_under_disabled_versions": result["alerts_under_disabled_versions"],
        "trigger_seconds": trigger,
        "batch_seconds": own.get("batch_seconds"),
        "applying_batch_started_after_ack_s": result["applying_batch_started_after_ack_s"],
        "applying_batch_seconds": result["applying_batch_seconds"],
    }


def table(result: Mapping[str, Any], trigger: float) -> str:
    if "error" in result and not result.get("changes"):
        return format_table(["measure", "error"], [["publish -> first alert", result["error"]]])
    own = result.get("own_metrics") or {}
    rows = []
    for label, stats, missing in (
            ("publish call -> first alert", result["latency_s"], result["missing"]),
            ("broker ack -> first alert", result["latency_from_ack_s"], result["missing"]),
            ("publish call (to ack)", result["publish_call_s"], None),
            ("ack -> start of applying batch", result["applying_batch_started_after_ack_s"],
             None),
            ("applying batch duration", result["applying_batch_seconds"], None),
            (f"detector batch seconds (trigger {trigger:g} s)", own.get("batch_seconds") or {},
             None)):
        rows.append([label, stats.get("n"), missing, stats.get("min"), stats.get("p50"),
                     stats.get("p95"), stats.get("p99"), stats.get("max")])
    return format_table(["measure (s)", "n", "missing", "min", "p50", "p95", "p99", "max"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=None,
                        help="enabling publishes measured (default 30, --quick 4)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="background traffic from the generator, tx/s")
    parser.add_argument("--live-fraud-ratio", type=float, default=0.02,
                        help="fraud ratio of the background generator (episodes per event)")
    parser.add_argument("--probe-interval", type=float, default=0.1,
                        help="seconds between probe transactions")
    parser.add_argument("--probe-amount", type=float, default=2000.0,
                        help="amount of each probe transaction (under the default high_value "
                             f"amount {DEFAULT_HIGH_VALUE:g})")
    parser.add_argument("--probe-threshold", type=float, default=1000.0,
                        help="amount of the probe rule when enabled (under --probe-amount)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds after the first batch before the first change (Spark "
                             "start-up leaves a backlog; default 20, --quick 8)")
    parser.add_argument("--quiet", type=float, default=1.5,
                        help="after a disabling publish, seconds without an alert of the "
                             "enabled version before the next change")
    parser.add_argument("--change-timeout", type=float, default=60.0,
                        help="seconds to wait for a change's first alert (else: missing), and "
                             "for a disable to take effect")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for the detector's first batch")
    add_detector_args(parser)
    args = parser.parse_args(argv)
    args.changes = args.changes or (4 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (8.0 if args.quick else 20.0)
    if args.changes < 1:
        raise SystemExit("--changes must be >= 1")
    if not args.probe_threshold < args.probe_amount:
        raise SystemExit("--probe-threshold must be below --probe-amount, or nothing fires")
    if args.probe_amount > DEFAULT_HIGH_VALUE:
        say(f"--probe-amount {args.probe_amount:g} is above the default high_value amount "
            f"{DEFAULT_HIGH_VALUE:g}: that rule fires on every probe too")
    trigger = trigger_seconds(args.detector_arg)
    settings = {key: getattr(args, key) for key in (
        "changes", "rate", "live_fraud_ratio", "probe_interval", "probe_amount",
        "probe_threshold", "warmup", "quiet", "change_timeout", "seed", "partitions")}
    report = Report(NAME, args, {**settings, "trigger_seconds": trigger,
                                 "detector_args": args.detector_arg})
    with work_dir(args, NAME) as work, running_broker(work) as broker:
        result = measure(broker.bootstrap_servers, args, work)
    written = report.finish(summary=headline(result, trigger), result=result)
    print(table(result, trigger))
    own = (result.get("own_metrics") or {}).get("batch_seconds") or {}
    if own.get("p50") is not None:
        print(f"bound: publish -> first alert <= wait for the next batch (<= max(trigger "
              f"{trigger:g} s, a batch)) + one batch; batches here p50 {own['p50']:g} s, "
              f"max {own['max']:g} s")
    print(f"results: {written}")
    ok = ("error" not in result and result.get("exit_code") == 0 and not result["missing"]
          and not result["alerts_under_disabled_versions"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
