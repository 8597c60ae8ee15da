"""The ``fraud-rules`` topic as a store of rule definitions: read it whole, publish to it.

An adapter at the edge of the rule core (Kafka only, no Spark): the rules CLI, the dashboard
and the detector's start-up use it to see the rules in force and to publish changes. Reading
folds every record through ``RuleSet.apply`` exactly as the detector's state step does, so
what it reports as "in force" is what the detector applies.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.rules.definition import RuleDefinition
from fraudstream.rules.ruleset import RuleChange, RuleSet
from fraudstream.topics import rules_topic_spec

__all__ = ["RuleRecord", "RulesTopic", "RulesTopicError"]


class RulesTopicError(RuntimeError):
    """The rules topic could not be read or written."""


@dataclass(frozen=True)
class RuleRecord:
    """One record of the rules topic as read."""

    key: bytes | None
    value: bytes | None
    offset: int
    timestamp_ms: int


class RulesTopic:
    """Read and write one rules topic (created on first use: 1 partition, compacted)."""

    def __init__(self, client_config: Mapping[str, str], topic: str, timeout: float = 15.0
                 ) -> None:
        self.client_config = dict(client_config)
        self.topic = topic
        self.timeout = timeout

    def ensure(self) -> None:
        admin = wait_for_broker(self.client_config, timeout=self.timeout)
        ensure_topics(admin, [rules_topic_spec(self.topic)], timeout=self.timeout)

    def read(self) -> list[RuleRecord]:
        """Every record the topic holds, oldest first (reads to the end of the partition)."""
        self.ensure()
        consumer = Consumer({
            **self.client_config,
            "group.id": f"fraudstream-rules-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": "false",
            "enable.partition.eof": "true",
            "auto.offset.reset": "earliest",
        })
        records: list[RuleRecord] = []
        try:
            consumer.assign([TopicPartition(self.topic, 0, 0)])
            deadline = time.monotonic() + self.timeout
            while True:
                if time.monotonic() > deadline:
                    raise RulesTopicError(f"reading {self.topic!r} did not reach its end within "
                                          f"{self.timeout:.0f} s")
                message = consumer.poll(0.1)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        break
                    if error.fatal() or not error.retriable():
                        raise RulesTopicError(f"reading {self.topic!r}: {error.str()}")
                    continue
                records.append(RuleRecord(message.key(), message.value(), message.offset(),
                                          message.timestamp()[1]))
        finally:
            consumer.close()
        return records

    def state(self, horizon_us: int) -> tuple[RuleSet, list[RuleChange]]:
        """The rules in force after every record, and what each record did."""
        ruleset, history = self.history(horizon_us)
        return ruleset, [change for _, change in history]

    def history(self, horizon_us: int) -> tuple[RuleSet, list[tuple[RuleRecord, RuleChange]]]:
        """Like ``state``, with each change next to its record: a deletion carries no author
        or time of its own, so the record's timestamp is the only "when" it has."""
        ruleset = RuleSet()
        history = []
        for record in self.read():
            ruleset, change = ruleset.apply(record.key, record.value, horizon_us, record.offset)
            history.append((record, change))
        return ruleset, history

    def publish(self, definition: RuleDefinition) -> int:
        """Write one definition; returns its offset once the broker has it."""
        return self._produce(definition.rule_id, definition.to_json().encode())

    def delete(self, rule_id: str) -> int:
        """Write the tombstone that deletes ``rule_id``."""
        return self._produce(rule_id, None)

    def publish_raw(self, key: str | None, value: bytes | None) -> int:
        """Write any bytes (tests of refused definitions use this)."""
        return self._produce(key, value)

    def _produce(self, key: str | None, value: bytes | None) -> int:
        self.ensure()
        producer = Producer({**self.client_config, "acks": "all", "enable.idempotence": "false",
                             "linger.ms": "0"})
        result: dict[str, object] = {}

        def delivered(err: KafkaError | None, message: object) -> None:
            result["error"] = err
            result["message"] = message

        try:
            producer.produce(self.topic, key=key.encode() if key is not None else None,
                             value=value, on_delivery=delivered)
            remaining = producer.flush(self.timeout)
        except KafkaException as exc:
            raise RulesTopicError(f"publishing to {self.topic!r}: {exc}") from None
        if remaining or "error" not in result:
            raise RulesTopicError(f"publishing to {self.topic!r}: not delivered within "
                                  f"{self.timeout:.0f} s")
        if result["error"] is not None:
            raise RulesTopicError(f"publishing to {self.topic!r}: {result['error']}")
        return int(result["message"].offset())  # type: ignore[attr-defined]
