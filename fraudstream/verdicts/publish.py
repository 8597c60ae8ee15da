"""Publish verdicts to the ``fraud-verdicts`` topic (key ``alert_id``, value the contract JSON)
for downstream systems.

The database is the source of truth; the topic is a copy that can always be rebuilt from it
(``republish``). Publishing waits for the broker's acknowledgement, so "published" means the
broker has the record.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fraudstream.kafka import BrokerUnavailable, ensure_topics, wait_for_broker
from fraudstream.topics import TopicSpec
from fraudstream.verdicts.model import Verdict
from fraudstream.verdicts.store import RecordedVerdict, VerdictStore

__all__ = ["VerdictPublishError", "VerdictPublisher"]

#: One partition: verdicts come at the pace of people, and a single partition keeps every
#: reader's view in the order they were published.
PARTITIONS = 1


class VerdictPublishError(RuntimeError):
    """The broker did not take a verdict. ``recorded`` is set when the verdict is nevertheless
    in the database (it then only needs re-publishing)."""

    def __init__(self, message: str, *, topic: str, recorded: RecordedVerdict | None = None
                 ) -> None:
        super().__init__(message)
        self.topic = topic
        self.recorded = recorded


class VerdictPublisher:
    """Write verdicts to one topic (created with one partition if missing). Reuses one producer
    across calls; safe to share between threads."""

    def __init__(self, client_config: Mapping[str, Any], topic: str, timeout: float = 15.0
                 ) -> None:
        # librdkafka logs through Python logging (quiet unless configured), so an unreachable
        # broker is reported once, by the exception, not by a stream of connection errors.
        self.client_config: dict[str, Any] = {"logger": logging.getLogger("librdkafka"),
                                              **client_config}
        self.topic = topic
        self.timeout = timeout
        self._producer: Producer | None = None
        self._topic_ready = False
        self._lock = threading.Lock()

    def publish(self, verdict: Verdict) -> None:
        """Publish one verdict and wait for the broker's acknowledgement."""
        self._send([verdict])

    def republish(self, store: VerdictStore) -> int:
        """Publish every recorded verdict again, oldest first (the store's history order), so
        the newest record per key on the topic is the verdict in force in the store. Returns
        how many were published."""
        verdicts = store.history()
        self._send(verdicts)
        return len(verdicts)

    def close(self) -> None:
        """Deliver anything still queued and drop the producer."""
        with self._lock:
            if self._producer is not None:
                self._producer.flush(self.timeout)
                self._producer = None

    def __enter__(self) -> VerdictPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fail(self, reason: str) -> VerdictPublishError:
        return VerdictPublishError(f"publishing to topic {self.topic!r}: {reason}",
                                   topic=self.topic)

    def _ensure_topic(self) -> None:
        if self._topic_ready:
            return
        try:
            admin = wait_for_broker(self.client_config, self.timeout)
            ensure_topics(admin, [TopicSpec(self.topic, PARTITIONS)], timeout=self.timeout)
        except BrokerUnavailable as exc:
            raise self._fail(str(exc)) from None
        except KafkaException as exc:
            raise self._fail(f"cannot create the topic ({exc})") from None
        self._topic_ready = True

    def _producer_for_send(self) -> Producer:
        if self._producer is None:
            self._producer = Producer({
                **self.client_config,
                "acks": "all",
                # Plain retries in order: one request in flight keeps a key's records in order.
                "enable.idempotence": "false",
                "max.in.flight.requests.per.connection": "1",
                "linger.ms": "5",
                # A record not delivered in time fails, instead of lingering in the queue and
                # appearing later, after the caller was told it was not published.
                "message.timeout.ms": str(max(1, round(self.timeout * 1000))),
                "client.id": "fraudstream-verdicts",
            })
        return self._producer

    def _send(self, verdicts: Sequence[Verdict]) -> None:
        with self._lock:
            self._ensure_topic()
            producer = self._producer_for_send()
            errors: list[KafkaError] = []
            delivered = 0

            def on_delivery(error: KafkaError | None, _message: Message) -> None:
                nonlocal delivered
                if error is None:
                    delivered += 1
                else:
                    errors.append(error)

            try:
                for verdict in verdicts:
                    self._produce(producer, verdict, on_delivery)
                remaining = producer.flush(self.timeout + 5)
            except KafkaException as exc:
                self._producer = None
                raise self._fail(str(exc)) from None
            if remaining or errors or delivered < len(verdicts):
                self._producer = None  # nothing of a failed call may be delivered later
                missing = len(verdicts) - delivered
                reason = errors[0].str() if errors else f"no acknowledgement within " \
                                                        f"{self.timeout:g} s"
                raise self._fail(f"{missing} of {len(verdicts)} not acknowledged ({reason})")

    def _produce(self, producer: Producer, verdict: Verdict, on_delivery: Any) -> None:
        while True:
            try:
                producer.produce(self.topic, key=verdict.alert_id.encode(),
                                 value=verdict.to_json().encode(), on_delivery=on_delivery)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.5)
