"""The Quix Streams peer: the default rules with the same semantics (docs/contract.md), as a
Quix application.

Run by ``benchmarks.quix_peer`` under an interpreter that has quixstreams
(``python -m benchmarks.quix_app --help``). To keep the semantics identical it reuses the
detector's pure pieces — ``spark_job.validation.classify`` (bad input goes to the DLQ topic) and
the rule core's engine, ``fraudstream.rules.engine.BucketState`` over the default rules (version
1), holding one user at a time: the user's ``UserState`` is kept in Quix state under the message
key, i.e. the user — and only the streaming machinery differs: record-at-a-time processing,
RocksDB state (with a changelog topic unless --no-changelog), consumer-group offsets, Kafka
output through Quix's producer. The rules are fixed at start (no rules topic).

Watermark: per partition, the newest event time seen minus ``--watermark-seconds`` (a user's
events all live in one partition, so in-order data is never late). Events older than it skip the
windowed rules (per-transaction rules such as high_value still fire) and are counted, as in the
detector. Each user's transactions are kept for ``--retention-seconds`` behind the watermark, as
the detector keeps them.

``--expect N`` stops the application after N input messages (a backfill, like the detector's
``--available-now``); without it the application runs until SIGTERM. A JSON line with counters
goes to ``--progress-file`` at the first message, then at most once per second, and at exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fraudstream import schemas
from fraudstream.rules.definition import default_definitions
from fraudstream.rules.engine import BucketState, RuleAlert, UserState, alert_record
from fraudstream.rules.kinds import MICROS, Tx
from fraudstream.rules.ruleset import RuleSet
from fraudstream.settings import DetectorSettings
from spark_job.validation import ValidationLimits, classify, raw_text

__all__ = ["main"]

STATE_KEY = "rules"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
KIND = "_kind"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quix_app",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--transactions-topic", required=True)
    parser.add_argument("--alerts-topic", required=True)
    parser.add_argument("--dlq-topic", required=True)
    parser.add_argument("--consumer-group", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--expect", type=int, default=0,
                        help="stop after this many input messages (0: run until SIGTERM)")
    parser.add_argument("--processing-guarantee", default="at-least-once",
                        choices=("at-least-once", "exactly-once"))
    parser.add_argument("--changelog", action=argparse.BooleanOptionalAction, default=True,
                        help="back the state with a changelog topic (Quix's default)")
    parser.add_argument("--commit-interval", type=float, default=5.0,
                        help="Quix checkpoint interval, s (Quix's default 5)")
    parser.add_argument("--session-timeout-ms", type=int, default=6000,
                        help="consumer session timeout (the local broker's group join waits "
                             "for it: ~23 s with librdkafka's default 45000)")
    parser.add_argument("--watermark-seconds", type=float, default=60.0)
    parser.add_argument(
        "--retention-seconds", type=float,
        default=DetectorSettings.__dataclass_fields__["retention_seconds"].default,
        help="event time each user's transactions stay in state (the detector's default)")
    parser.add_argument("--progress-file", default=None)
    parser.add_argument("--idle-timeout", type=float, default=0.0,
                        help="with --expect: give up after this many seconds without a message")
    parser.add_argument("--loglevel", default="WARNING")
    return parser.parse_args(argv)


class RulesStep:
    """The stateful function: one input message -> zero or more output records."""

    def __init__(self, ruleset: RuleSet, watermark_seconds: float,
                 retention_seconds: float) -> None:
        self.ruleset = ruleset
        self.delay_us = round(watermark_seconds * MICROS)
        self.horizon_us = round(retention_seconds * MICROS)
        self.limits = ValidationLimits()
        self.newest_us: dict[int, int] = {}
        self.counts = {"processed": 0, "valid": 0, "dlq": 0, "late": 0, "alerts": 0,
                       "duplicates": 0}
        self.alerts_by_rule: dict[str, int] = {d.rule_id: 0 for d in ruleset.active}

    def _alert(self, alert: RuleAlert, now: datetime) -> dict[str, Any]:
        self.counts["alerts"] += 1
        self.alerts_by_rule[alert.rule] = self.alerts_by_rule.get(alert.rule, 0) + 1
        return {**schemas.to_json_ready(alert_record(alert, now)), KIND: "alert"}

    def __call__(self, value: bytes | None, key: Any, timestamp: int, headers: Any,
                 state: Any) -> list[dict[str, Any]]:
        from quixstreams import message_context

        context = message_context()
        now = datetime.now(UTC)
        typed, reason, detail = classify(value, now, self.limits)
        if typed is None:
            self.counts["dlq"] += 1
            return [{KIND: "dlq", "reason": reason, "error": detail,
                     "source_topic": context.topic, "source_partition": context.partition,
                     "source_offset": context.offset,
                     "raw_value": raw_text(value, self.limits.raw_value_max_chars),
                     "rejected_at": schemas.format_timestamp(now)}]
        self.counts["valid"] += 1
        event_us = (typed["event_time"] - EPOCH) // ONE_MICROSECOND
        tx = Tx(event_us, typed["transaction_id"], float(typed["amount"]), typed["location"],
                typed["payment_method"], int(timestamp) * 1000)
        user = typed["user_id"]
        # A bucket of one user: the same engine as the detector's, over Quix's per-key state.
        bucket = BucketState(ruleset=self.ruleset)
        stored = state.get(STATE_KEY)
        if stored is not None:
            bucket.users[user] = UserState.from_json(stored)
        partition = context.partition
        newest = self.newest_us.get(partition)
        watermark = newest - self.delay_us if newest is not None else None
        if watermark is not None and event_us < watermark:
            # Behind the watermark: per-transaction rules only; the state is not changed.
            self.counts["late"] += 1
            alerts, _ = bucket.process({}, {user: [tx]})
            return [self._alert(alert, now) for alert in alerts]
        alerts, duplicates = bucket.process({user: [tx]})
        self.counts["duplicates"] += duplicates
        newest = max(newest or event_us, event_us)
        self.newest_us[partition] = newest
        bucket.prune(newest - self.delay_us, self.horizon_us)
        kept = bucket.users.get(user)
        if kept is None or kept.empty:
            state.delete(STATE_KEY)
        else:
            state.set(STATE_KEY, kept.to_json())
        return [self._alert(alert, now) for alert in alerts]


def strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != KIND}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from quixstreams import Application

    logging.basicConfig(level=args.loglevel)
    step = RulesStep(RuleSet.of(default_definitions()), args.watermark_seconds,
                     args.retention_seconds)
    progress = Path(args.progress_file) if args.progress_file else None
    started = time.time()
    last_write = 0.0
    last_message = time.monotonic()
    app: Application | None = None

    def write_progress(final: bool = False) -> None:
        if progress is None:
            return
        line = {"t": time.time(), "since_start_s": round(time.time() - started, 3),
                **step.counts, "alerts_by_rule": step.alerts_by_rule, "final": final}
        with progress.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def on_processed(_topic: str, _partition: int, _offset: int) -> None:
        nonlocal last_write, last_message
        step.counts["processed"] += 1
        last_message = time.monotonic()
        if step.counts["processed"] == 1 or last_message - last_write >= 1.0:
            last_write = last_message
            write_progress()
        if args.expect and step.counts["processed"] >= args.expect and app is not None:
            app.stop()

    app = Application(
        broker_address=args.bootstrap_servers,
        consumer_group=args.consumer_group,
        auto_offset_reset="earliest",
        processing_guarantee=args.processing_guarantee,
        use_changelog_topics=args.changelog,
        state_dir=args.state_dir,
        commit_interval=args.commit_interval,
        consumer_extra_config={"session.timeout.ms": args.session_timeout_ms,
                               "heartbeat.interval.ms": max(100, args.session_timeout_ms // 6)},
        on_message_processed=on_processed,
        loglevel=args.loglevel,
    )
    source = app.topic(args.transactions_topic, key_deserializer="str",
                       value_deserializer="bytes")
    alerts_topic = app.topic(args.alerts_topic, key_serializer="str", value_serializer="json")
    dlq_topic = app.topic(args.dlq_topic, key_serializer="str", value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(step, stateful=True, metadata=True, expand=True)
    alerts = sdf.filter(lambda r: r[KIND] == "alert").apply(strip)
    alerts.to_topic(alerts_topic, key=lambda r: r["user_id"])
    dlq = sdf.filter(lambda r: r[KIND] == "dlq").apply(strip)
    dlq.to_topic(dlq_topic)
    try:
        if args.expect and args.idle_timeout:
            app.run(timeout=args.idle_timeout)
        else:
            app.run()
    finally:
        write_progress(final=True)
    if args.expect and step.counts["processed"] < args.expect:
        print(f"stopped after {step.counts['processed']} of {args.expect} messages",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
