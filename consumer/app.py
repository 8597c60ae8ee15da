"""The Kafka side of the console consumer: tail the alerts topic and print each alert once.

Partitions are assigned directly (no consumer group), so alerts show up within a second of
starting instead of after a group rebalance, and the console never commits offsets that could
disturb another reader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from consumer.render import (
    MalformedAlert,
    SeenIds,
    format_alert,
    format_totals,
    format_verdict_tag,
    format_warning,
    json_line,
    matches,
    parse_alert,
)
from fraudstream.kafka import BrokerUnavailable, wait_for_broker
from fraudstream.settings import ConsumerSettings

__all__ = ["run"]

if TYPE_CHECKING:  # the verdict store (SQLAlchemy) is imported only when verdicts are shown
    from fraudstream.verdicts import RecordedVerdict, VerdictStore

log = logging.getLogger("consumer")

#: Longest block in consume(), so signals and the idle timeout are handled promptly.
POLL_SECONDS = 0.5
BATCH = 500


class AlertConsole:
    """One console run. ``run()`` returns the process exit code.

    With a verdict store (``--show-verdicts``) each line ends with the alert's current
    verdict, read from the database once per batch of records, so a verdict given while the
    console runs shows on the next alerts printed.
    """

    def __init__(self, settings: ConsumerSettings, *, color: bool, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, verdicts: VerdictStore | None = None) -> None:
        self.settings = settings
        self.color = color
        self.verdicts = verdicts
        self._current: dict[str, RecordedVerdict] = {}
        self._store_failing = False
        self.out = out
        self.err = err
        self.stopping = False
        self.seen = SeenIds()
        self.per_rule: Counter[str] = Counter()
        self.duplicates = 0
        self.malformed = 0
        self.shown = 0

    def run(self) -> int:
        settings = self.settings
        try:
            admin = wait_for_broker(settings.client_config(), settings.connect_timeout)
        except BrokerUnavailable as exc:
            log.error("cannot reach Kafka: %s; check KAFKA_BOOTSTRAP_SERVERS", exc)
            return 1
        self._install_signal_handlers()
        started = time.monotonic()
        partitions = self._wait_for_partitions(admin, started)
        if partitions is None:
            self._print_totals()
            return 0
        consumer = Consumer({
            # Required by librdkafka even without subscribe(); never joined or committed.
            "group.id": f"fraudstream-console-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest" if settings.from_beginning else "latest",
            "fetch.wait.max.ms": 100,
            "client.id": "fraudstream-consumer",
            **settings.client_config(),  # the operator's client_overrides win
        }, logger=logging.getLogger("librdkafka"))
        try:
            consumer.assign(self._start_positions(consumer, partitions))
            log.info("reading %s partitions %s from %s%s", settings.alerts_topic, partitions,
                     "the beginning" if settings.from_beginning else "the end",
                     self._filters())
            return self._loop(consumer, started)
        finally:
            consumer.close()
            self._print_totals()

    def _filters(self) -> str:
        parts = [f"rule={self.settings.rule}" if self.settings.rule else "",
                 f"user={self.settings.user}" if self.settings.user else ""]
        shown = " ".join(p for p in parts if p)
        return f" (only {shown})" if shown else ""

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _wait_for_partitions(self, admin: AdminClient, started: float) -> list[int] | None:
        """Partition ids of the alerts topic, waiting while it does not exist yet (the
        detector or broker may create it later). None if stopped or idle first."""
        topic = self.settings.alerts_topic
        announced = False
        while not self.stopping and not self._idle(started):
            try:
                metadata = admin.list_topics(timeout=5)
            except KafkaException as exc:
                log.warning("metadata request failed: %s", exc)
                metadata = None
            info = metadata.topics.get(topic) if metadata is not None else None
            if info is not None and info.error is None and info.partitions:
                return sorted(info.partitions)
            if not announced:
                log.info("topic %s does not exist yet; waiting for it", topic)
                announced = True
            time.sleep(POLL_SECONDS)
        return None

    def _start_positions(self, consumer: Consumer, partitions: list[int]
                         ) -> list[TopicPartition]:
        """Offset 0 with --from-beginning, else the end each partition reports now (resolved
        here, so an alert produced after the 'reading' line is never skipped). Brokers whose
        reported end lags the true end (Tansu reports the last batch's base offset + 1) make
        the tail start a few alerts early; that is harmless, those alerts are simply shown."""
        topic = self.settings.alerts_topic
        if self.settings.from_beginning:
            return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        positions = []
        for p in partitions:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)
                positions.append(TopicPartition(topic, p, high))
            except KafkaException as exc:
                log.warning("cannot read the end of partition %d (%s); starting at 'latest'",
                            p, exc)
                positions.append(TopicPartition(topic, p, OFFSET_END))
        return positions

    def _idle(self, since: float) -> bool:
        timeout = self.settings.idle_timeout
        return timeout is not None and time.monotonic() - since >= timeout

    def _loop(self, consumer: Consumer, started: float) -> int:
        settings = self.settings
        last_alert = started
        while not self.stopping:
            if self._idle(last_alert):
                log.info("no alerts for %.1f s: exiting", settings.idle_timeout)
                return 0
            messages = consumer.consume(BATCH, timeout=POLL_SECONDS)
            if self.verdicts is not None:
                self._current = self._verdicts_of(messages)
            try:
                for message in messages:
                    if self._handle(message):
                        last_alert = time.monotonic()
                        if settings.max_alerts is not None and self.shown >= settings.max_alerts:
                            return 0
            except BrokenPipeError:
                return 0  # the reader went away (e.g. piped into head)
            except KafkaException as exc:
                log.error("fatal Kafka error: %s", exc)
                return 1
            self.out.flush()
        return 0

    def _handle(self, message: Message) -> bool:
        """Print one record if it is a new alert passing the filters; True if printed."""
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", error)
            return False
        try:
            alert = parse_alert(message.value())
        except MalformedAlert as exc:
            self.malformed += 1
            print(format_warning(f"skipped malformed alert (partition {message.partition()}, "
                                 f"offset {message.offset()}): {exc}", color=self.color),
                  file=self.err, flush=True)
            return False
        if not matches(alert, self.settings.rule, self.settings.user):
            return False
        if not self.seen.add(alert["alert_id"]):
            self.duplicates += 1
            return False
        if self.verdicts is not None:
            line = self._with_verdict(alert)
        elif self.settings.json:
            line = json_line(message.value(), alert)  # type: ignore[arg-type]
        else:
            line = format_alert(alert, color=self.color)
        print(line, file=self.out)
        self.per_rule[alert["rule"]] += 1
        self.shown += 1
        return True

    def _verdicts_of(self, messages: list[Message]) -> dict[str, RecordedVerdict]:
        """The current verdicts of the alerts in one batch (one query). A database that
        stops answering is reported once, and the alerts keep being shown without verdicts."""
        ids = set()
        for message in messages:
            if message.error() is not None:
                continue
            try:
                record = json.loads(message.value() or b"")
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("alert_id"), str):
                ids.add(record["alert_id"])
        if not ids or self.verdicts is None:
            return {}
        from fraudstream.verdicts import VerdictStoreError

        try:
            current = self.verdicts.latest(ids)
        except VerdictStoreError as exc:
            if not self._store_failing:
                print(format_warning(f"showing alerts without verdicts: {exc}",
                                     color=self.color), file=self.err, flush=True)
            self._store_failing = True
            return {}
        if self._store_failing:
            print(format_warning("verdict database answering again", color=self.color),
                  file=self.err, flush=True)
        self._store_failing = False
        return current

    def _with_verdict(self, alert: dict[str, Any]) -> str:
        """The alert's line (or JSON object, with a ``verdict`` member: the contract's verdict
        object or null) with its current verdict."""
        verdict = self._current.get(alert["alert_id"])
        if self.settings.json:
            return json.dumps({**alert, "verdict": verdict.to_dict() if verdict else None})
        line = format_alert(alert, color=self.color)
        if verdict is None:
            return line
        return f"{line}  {format_verdict_tag(verdict.verdict, verdict.analyst, color=self.color)}"

    def _print_totals(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.flush()
        print(format_totals(self.per_rule, duplicates=self.duplicates, malformed=self.malformed,
                            color=self.color), file=self.err, flush=True)


def run(settings: ConsumerSettings, *, color: bool, verdicts: VerdictStore | None = None
        ) -> int:
    return AlertConsole(settings, color=color, verdicts=verdicts).run()
