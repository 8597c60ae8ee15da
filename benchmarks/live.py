"""Live traffic for the latency benchmarks: a paced sender, scheduled rule triggers on
fresh users, and a tail of the alerts topic that records when each alert arrived."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer
from confluent_kafka import TopicPartition as KafkaPartition

from benchmarks.report import DEFAULT_SEED
from fraudstream import schemas
from producer.generator import (
    HIGH_VALUE_AMOUNT,
    VELOCITY_COUNT,
    TransactionGenerator,
    encode_transaction,
    to_ms,
    users_needed,
)

# --- live traffic -----------------------------------------------------------------------------


@dataclass
class SentTx:
    send_time: float  # time.time() just before produce()
    event_ms: int
    ack_time: float | None = None


class TriggerInjector:
    """Scheduled rule triggers mixed into live traffic, each on a fresh user of its own.

    The generator's own episodes wait for a user idle for 250 s, so in a short live run they
    start minutes late; these give a steady supply of samples instead. Each high_value trigger
    is one card payment above the default rule's amount; each velocity episode is one more small
    card payment than the default rule's count (four), ``gap`` s apart in one place (the last
    makes the rule true). Fresh user ids (``bench-`` prefix) never meet normal traffic, so no
    other rule can fire for them.
    """

    def __init__(self, high_value_per_s: float, velocity_per_s: float, gap_s: float = 2.0,
                 seed: int = DEFAULT_SEED) -> None:
        import heapq
        import random

        self._heapq = heapq
        self.rng = random.Random(seed)
        self.gap_ms = int(gap_s * 1000)
        self.periods_ms = {schemas.HIGH_VALUE: 1000 / high_value_per_s if high_value_per_s
                           else None,
                           schemas.VELOCITY: 1000 / velocity_per_s if velocity_per_s else None}
        self.next_start: dict[str, float] = {}
        self.pending: list[tuple[int, int, dict[str, Any]]] = []
        self.seq = 0
        self.users = 0

    def _tx(self, user: str, pattern: str, amount: float, at_ms: int) -> dict[str, Any]:
        return {"transaction_id": f"{self.rng.getrandbits(128):032x}", "user_id": user,
                "amount": amount, "currency": "EUR", "timestamp": "", "location": "Paris",
                "payment_method": "card", "merchant_id": "m000", "device_ip": "198.51.100.7",
                "is_fraud": True, "fraud_pattern": pattern, "_due": at_ms}

    def _schedule(self, now_ms: int) -> None:
        for rule, period in self.periods_ms.items():
            if period is None:
                continue
            start = self.next_start.setdefault(rule, now_ms + period)
            while start <= now_ms:
                self.users += 1
                user = f"bench-{rule.replace('_', '')}-{self.users:06d}"
                if rule == schemas.HIGH_VALUE:
                    low = HIGH_VALUE_AMOUNT + 100
                    events = [self._tx(user, rule, round(self.rng.uniform(low, 9000), 2),
                                       int(start))]
                else:
                    events = [self._tx(user, rule, round(self.rng.uniform(5, 45), 2),
                                       int(start) + k * self.gap_ms)
                              for k in range(VELOCITY_COUNT + 1)]
                for event in events:
                    self.seq += 1
                    self._heapq.heappush(self.pending, (event["_due"], self.seq, event))
                start += period
            self.next_start[rule] = start

    def pop_due(self, now_ms: int) -> dict[str, Any] | None:
        """The next injected transaction due by ``now_ms``, stamped with event time now."""
        self._schedule(now_ms)
        if not self.pending or self.pending[0][0] > now_ms:
            return None
        event = self._heapq.heappop(self.pending)[2]
        event.pop("_due")
        event["timestamp"] = schemas.format_timestamp(
            datetime.fromtimestamp(now_ms / 1000, UTC))
        return event


class PacedSender(threading.Thread):
    """Generated transactions at a fixed rate, event time = wall clock, keyed by user.

    Remembers, per transaction_id, when it was handed to the client and when the broker
    acknowledged it, so an alert's latency can be measured from its trigger transaction.
    """

    def __init__(self, bootstrap: str, topic: str, rate: float, generator: TransactionGenerator,
                 injector: TriggerInjector | None = None,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(name="paced-sender", daemon=True)
        from producer.app import PRODUCER_DEFAULTS

        self.topic = topic
        self.rate = rate
        self.generator = generator
        self.injector = injector
        self.config = {**PRODUCER_DEFAULTS, "client.id": "fraudstream-bench",
                       **(producer_config or {}), "bootstrap.servers": bootstrap}
        self.sent: dict[str, SentTx] = {}
        self.transactions: list[schemas.Transaction] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    def _acked(self, tx_id: str, error: KafkaError | None, _message: object) -> None:
        if error is None:
            self.sent[tx_id].ack_time = time.time()
        elif len(self.errors) < 10:
            self.errors.append(str(error))

    def run(self) -> None:
        producer = Producer(self.config)
        produce, poll = producer.produce, producer.poll
        started = time.monotonic()
        self.started_at = time.time()
        budget, last = 0.0, started
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                # A stall is forgiven beyond one second's worth, never caught up in a burst.
                budget = min(budget + (now - last) * self.rate, max(1.0, self.rate))
                last = now
                while budget >= 1.0:
                    budget -= 1.0
                    now_ms = time.time_ns() // 1_000_000
                    tx = self.injector.pop_due(now_ms) if self.injector else None
                    if tx is None:
                        tx = self.generator.next_at(now_ms)
                    tx_id = tx["transaction_id"]
                    event_ms = to_ms(schemas.parse_timestamp(tx["timestamp"]))
                    self.sent[tx_id] = SentTx(time.time(), event_ms)
                    while True:
                        try:
                            produce(self.topic, encode_transaction(tx), tx["user_id"].encode(),
                                    on_delivery=functools.partial(self._acked, tx_id))
                            break
                        except BufferError:
                            poll(0.01)
                    self.transactions.append(tx)
                poll(0)
                time.sleep(max(0.0, min(0.005, (1.0 - budget) / self.rate)))
        finally:
            self.stopped_at = time.time()
            producer.flush(30)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


@dataclass
class Received:
    receive_time: float
    value: bytes


class AlertTail(threading.Thread):
    """An assign()-based reader of every partition of the alerts topic from the beginning
    (no consumer group: on this broker a group join takes ~23 s), stamping receive times."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="alert-tail", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.received: list[Received] = []
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"bench-tail-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 10, "fetch.min.bytes": 1,
        })
        try:
            partitions = sorted(consumer.list_topics(self.topic, timeout=30)
                                .topics[self.topic].partitions)
            consumer.assign([KafkaPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            self.ready.set()
            while not self.stopping.is_set():
                for message in consumer.consume(500, timeout=0.05):
                    if message.error() is None:
                        self.received.append(Received(time.time(), message.value()))
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def alerts(self) -> list[tuple[float, dict[str, Any]]]:
        """(first receive time, alert) per alert_id."""
        seen: dict[str, tuple[float, dict[str, Any]]] = {}
        for item in list(self.received):
            with contextlib.suppress(ValueError):
                alert = json.loads(item.value)
                seen.setdefault(alert["alert_id"], (item.receive_time, alert))
        return list(seen.values())


def live_generator(rate: float, fraud_ratio: float, seed: int) -> TransactionGenerator:
    users = max(5000, users_needed(rate, fraud_ratio))
    return TransactionGenerator(users=users, fraud_ratio=fraud_ratio, seed=seed)
