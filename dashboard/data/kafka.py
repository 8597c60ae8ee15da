"""Kafka for the dashboard: a live tail of the alerts topic and a small topic browser.

The tail uses ``assign()`` on every partition, never a group join: a join costs ~23 s on the
embedded broker, commits nothing useful, and would show up as a consumer group of its own.
Reachability is checked with a metadata request on every poll, so the page can say "broker
unreachable" within one refresh and recover by itself when the broker comes back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from fraudstream.datasets import ALERTS_SCHEMA
from fraudstream.schemas import parse_timestamp

__all__ = [
    "QUIET",
    "AlertTail",
    "TailStatus",
    "decode_alert",
    "last_messages",
    "topics_view",
]

log = logging.getLogger(__name__)

_TIMESTAMP_FIELDS = ("window_start", "window_end", "detected_at")
#: librdkafka settings for the dashboard's short-lived and tailing clients: quiet reconnects
#: (the page shows the state; the log would otherwise get a line per attempt) and no commits.
QUIET = {"log_level": 2, "log.connection.close": False, "reconnect.backoff.ms": 500,
         "reconnect.backoff.max.ms": 10_000}


def _consumer(client_config: Mapping[str, str], **extra: Any) -> Consumer:
    return Consumer({
        **client_config, **QUIET, "group.id": f"fraudstream-dashboard-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False, "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest", **extra,
    })


def text_of(raw: bytes | str | None) -> str | None:
    """Bytes from the wire as text; undecodable bytes stay visible as ``\\xNN``."""
    if raw is None or isinstance(raw, str):
        return raw
    return raw.decode("utf-8", errors="backslashreplace")


def decode_alert(raw: bytes | str | None) -> dict[str, Any] | None:
    """An alert JSON value as a row of ``ALERTS_SCHEMA``, or None if it is not an alert."""
    try:
        value = json.loads(raw) if raw is not None else None
        if not isinstance(value, dict) or not all(
            isinstance(value.get(name), str) and value[name]
            for name in ("alert_id", "rule", "user_id")
        ):
            return None
        row = {name: value.get(name) for name in ALERTS_SCHEMA.names}
        for name in _TIMESTAMP_FIELDS:
            row[name] = parse_timestamp(row[name]) if row[name] is not None else None
        row["transaction_count"] = int(row["transaction_count"] or 0)
        row["total_amount"] = float(row["total_amount"] or 0.0)
        for name in ("locations", "transaction_ids"):
            row[name] = [str(item) for item in row[name] or []]
        row["reason"] = None if row["reason"] is None else str(row["reason"])
        # Tolerated, not required: alerts published before rules had versions carry none.
        version = row["rule_version"]
        whole = isinstance(version, int) and not isinstance(version, bool)
        row["rule_version"] = version if whole and 0 < version < 2**63 else None
        # Null where no model was loaded (and absent from alerts of older detectors); a value
        # that is not a probability is not shown as one.
        score = row["risk_score"]
        valid = isinstance(score, int | float) and not isinstance(score, bool) \
            and 0.0 <= score <= 1.0
        row["risk_score"] = float(score) if valid else None
        reasons = row["score_reasons"]
        row["score_reasons"] = ([str(item) for item in reasons if item is not None]
                                if isinstance(reasons, list) else None)
        return row
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True)
class TailStatus:
    address: str
    reachable: bool
    error: str | None
    consumed: int
    invalid: int


class AlertTail:
    """The newest ``max_alerts`` alerts of the topic, deduplicated by ``alert_id``.

    Created once per process (the pages keep it in ``st.cache_resource``) and polled on every
    refresh; each poll fetches only what arrived since the last one. Thread-safe.
    """

    def __init__(self, client_config: Mapping[str, str], topic: str, max_alerts: int,
                 timeout: float = 2.0, drain_seconds: float = 1.0) -> None:
        self.address = client_config.get("bootstrap.servers", "?")
        self.topic = topic
        self.max_alerts = max_alerts
        self.timeout = timeout
        self.drain_seconds = drain_seconds
        self._consumer = _consumer(client_config)
        self._assigned: set[int] = set()
        self._first_wait = 0.0
        self._alerts: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._reachable = False
        self._error: str | None = "not connected yet"
        self._consumed = 0
        self._invalid = 0
        self._frame_version = -1
        self._version = 0
        self._frame = ALERTS_SCHEMA.empty_table().to_pandas()
        self._lock = threading.Lock()

    def poll(self) -> tuple[pd.DataFrame, TailStatus]:
        """Fetch what is new; returns the buffered alerts (oldest first) and the status.

        The frame is shared between callers: treat it as read-only.
        """
        with self._lock:
            if self._connect():
                self._drain()
            if self._frame_version != self._version:
                rows = list(self._alerts.values())
                self._frame = pa.Table.from_pylist(rows, schema=ALERTS_SCHEMA).to_pandas()
                self._frame_version = self._version
            status = TailStatus(self.address, self._reachable, self._error, self._consumed,
                                self._invalid)
            return self._frame, status

    def holds(self, alert_id: str) -> bool:
        """Whether this alert is among the buffered ones, without fetching anything: a verdict
        may be given on any alert the pages were shown."""
        with self._lock:
            return alert_id in self._alerts

    def _connect(self) -> bool:
        """Check the broker and assign partitions not assigned yet; False if unreachable."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=self.timeout)
        except KafkaException as exc:
            self._set_state(False, str(exc.args[0]) if exc.args else str(exc))
            return False
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            self._set_state(True, f"topic {self.topic}: {topic.error if topic else 'missing'}")
            return False
        new = sorted(set(topic.partitions) - self._assigned)
        if new:
            self._consumer.incremental_assign([self._start(p) for p in new])
            self._assigned.update(new)
            self._first_wait = self.timeout  # the first fetch of new partitions takes a moment
        self._set_state(True, None)
        return True

    def _start(self, partition: int) -> TopicPartition:
        """Start ``max_alerts`` before the end: older alerts are in the Parquet history.

        The embedded broker may under-report the end, which only makes the tail read more.
        """
        tp = TopicPartition(self.topic, partition)
        try:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout)
        except KafkaException:
            return TopicPartition(self.topic, partition, OFFSET_BEGINNING)
        return TopicPartition(self.topic, partition, max(low, high - self.max_alerts))

    def _drain(self) -> None:
        """Take what librdkafka has fetched in the background since the last poll.

        ``consume`` blocks until it has ``num_messages`` or the timeout passes, so only the first
        poll after an assignment waits (for one message at most); later polls never block.
        """
        wait, self._first_wait = self._first_wait, 0.0
        if wait:
            for message in self._consumer.consume(num_messages=1, timeout=wait):
                self._add(message)
        deadline = time.monotonic() + self.drain_seconds
        while time.monotonic() < deadline:
            messages = self._consumer.consume(num_messages=1000, timeout=0)
            if not messages:
                return
            for message in messages:
                self._add(message)

    def _add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("alerts tail: %s", error)
            return
        self._consumed += 1
        alert = decode_alert(message.value())
        if alert is None:
            self._invalid += 1
            return
        if alert["alert_id"] in self._alerts:
            return
        self._alerts[alert["alert_id"]] = alert
        while len(self._alerts) > self.max_alerts:
            self._alerts.popitem(last=False)
        self._version += 1

    def _set_state(self, reachable: bool, error: str | None) -> None:
        if reachable != self._reachable:
            if reachable:
                log.info("Kafka broker reachable at %s", self.address)
            else:
                log.warning("Kafka broker unreachable at %s: %s", self.address, error)
        self._reachable = reachable
        self._error = error


# --- topic browser ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicsView:
    """Partitions with their reported offsets, and consumer groups with lag."""

    partitions: pd.DataFrame  # topic, partition, leader, earliest, latest, messages
    groups: pd.DataFrame  # group, state, topic, partition, committed, latest, lag
    errors: list[str]


PARTITION_COLUMNS = ("topic", "partition", "leader", "earliest", "latest", "messages")
GROUP_COLUMNS = ("group", "state", "topic", "partition", "committed", "latest", "lag")


def topics_view(client_config: Mapping[str, str], timeout: float = 5.0) -> TopicsView:
    """Topics, partitions and offsets as the broker reports them; consumer groups and lag.

    Raises KafkaException only if the broker is unreachable; problems with one group are
    reported in ``errors`` and the rest is still shown.
    """
    consumer = _consumer(client_config)
    try:
        metadata = consumer.list_topics(timeout=timeout)
        rows = []
        for name in sorted(metadata.topics):
            for partition, info in sorted(metadata.topics[name].partitions.items()):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(name, partition), timeout=timeout, cached=False)
                rows.append((name, partition, info.leader, low, high, max(high - low, 0)))
    finally:
        consumer.close()
    partitions = pd.DataFrame(rows, columns=list(PARTITION_COLUMNS))
    groups, errors = _groups(client_config, partitions, timeout)
    return TopicsView(partitions, groups, errors)


def _groups(client_config: Mapping[str, str], partitions: pd.DataFrame, timeout: float
            ) -> tuple[pd.DataFrame, list[str]]:
    admin = AdminClient({**client_config, **QUIET})
    latest = {(t, p): h for t, p, h in
              partitions[["topic", "partition", "latest"]].itertuples(index=False)}
    errors: list[str] = []
    try:
        listing = admin.list_consumer_groups(request_timeout=timeout).result(timeout=timeout)
    except (KafkaException, TimeoutError) as exc:
        return pd.DataFrame(columns=list(GROUP_COLUMNS)), [f"listing consumer groups: {exc}"]
    errors += [f"listing consumer groups: {error}" for error in listing.errors]
    rows = []
    for group in sorted(listing.valid, key=lambda g: g.group_id):
        state = getattr(group.state, "name", str(group.state))
        try:
            futures = admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group.group_id)], request_timeout=timeout)
            committed = futures[group.group_id].result(timeout=timeout).topic_partitions or []
        except (KafkaException, TimeoutError) as exc:
            errors.append(f"offsets of group {group.group_id}: {exc}")
            continue
        if not committed:
            rows.append((group.group_id, state, None, None, None, None, None))
        for tp in committed:
            high = latest.get((tp.topic, tp.partition))
            offset = tp.offset if tp.offset >= 0 else None
            lag = max(high - offset, 0) if high is not None and offset is not None else None
            rows.append((group.group_id, state, tp.topic, tp.partition, offset, high, lag))
    frame = pd.DataFrame(rows, columns=list(GROUP_COLUMNS))
    for column in ("partition", "committed", "latest", "lag"):
        frame[column] = frame[column].astype("Int64")
    return frame, errors


@dataclass(frozen=True)
class MessageView:
    partition: int
    offset: int
    timestamp: datetime | None
    key: str | None
    value: str | None
    parsed: Any  # the value as JSON, or None if it is not JSON


def last_messages(client_config: Mapping[str, str], topic: str, partitions: list[int],
                  count: int, timeout: float = 5.0, read_seconds: float = 5.0
                  ) -> list[MessageView]:
    """The newest ``count`` messages of the given partitions, newest first.

    Reading starts ``count`` before the reported end and continues to the real end (the
    embedded broker may report less than there is), so the result is the true tail.
    """
    consumer = _consumer(client_config, **{"enable.partition.eof": True})
    kept: dict[int, deque[MessageView]] = {p: deque(maxlen=count) for p in partitions}
    try:
        starts = []
        for partition in partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout, cached=False)
            starts.append(TopicPartition(topic, partition, max(low, high - count)))
        consumer.assign(starts)
        pending = set(partitions)
        deadline = time.monotonic() + read_seconds
        while pending and time.monotonic() < deadline:
            messages = consumer.consume(num_messages=500, timeout=0.5)
            if not messages:
                break
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                    continue
                kept[message.partition()].append(_view(message))
    finally:
        consumer.close()
    newest = sorted((m for q in kept.values() for m in q),
                    key=lambda m: (m.timestamp or datetime.min.replace(tzinfo=UTC), m.offset),
                    reverse=True)
    return newest[:count]


def _view(message: Message) -> MessageView:
    kind, millis = message.timestamp()
    value = text_of(message.value())
    try:
        parsed = json.loads(value) if value is not None else None
    except ValueError:
        parsed = None
    return MessageView(
        partition=message.partition(), offset=message.offset(),
        timestamp=datetime.fromtimestamp(millis / 1000, UTC) if kind and millis >= 0 else None,
        key=text_of(message.key()), value=value, parsed=parsed,
    )
