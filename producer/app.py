"""The Kafka side of the producer: pacing, idempotent delivery, status lines, clean shutdown.

Records come from the seeded generator (event time = wall clock) or from a JSON-lines replay
file. Every record is keyed by ``user_id`` so one user's events stay ordered in one partition.
Exit codes: 0 when everything sent was delivered; 1 when the broker is unreachable or messages
failed or were still undelivered after the flush timeout (2, bad settings, comes from the CLI).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fraudstream.kafka import BrokerUnavailable, ensure_topics, wait_for_broker
from fraudstream.schemas import RULES
from fraudstream.settings import ProducerSettings
from fraudstream.topics import DEFAULT_TRANSACTIONS_PARTITIONS, TopicSpec
from producer.generator import (
    EVADING,
    TransactionGenerator,
    encode_transaction,
    iter_replay,
    scenario_rates,
    users_needed,
)

__all__ = [
    "PRODUCER_DEFAULTS",
    "producer_config",
    "run",
]

log = logging.getLogger("producer")

#: Records produced per pacing step; large enough to amortise the loop, small enough to keep
#: status lines and signals responsive.
BATCH = 1000
#: Longest single wait, so signals and status lines are handled promptly.
MAX_WAIT_S = 0.1
#: Period of the slow and fast swings of the varying rate.
RATE_PERIODS_S = (300.0, 47.0)
_UNBOUNDED = 1 << 62

#: Defaults for the idempotent producer; the operator's ``client_overrides`` win.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 262_144,
    "client.id": "fraudstream-producer",
}


def producer_config(settings: ProducerSettings, on_delivery: Callable[..., None] | None = None,
                    on_error: Callable[[KafkaError], None] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {**PRODUCER_DEFAULTS, **settings.client_config()}
    if on_error is not None:
        config["error_cb"] = on_error
    if on_delivery is not None:
        # One global callback, called for failures only: successes are counted without a
        # Python call per message (delivered = sent - failed - still queued).
        config["on_delivery"] = on_delivery
        config["delivery.report.only.error"] = True
    return config


class RateSchedule:
    """Cumulative number of records due since the start: a fixed rate, a smooth swing between
    rate_min and rate_max (unset rate), or unlimited (rate 0)."""

    def __init__(self, settings: ProducerSettings) -> None:
        self.fixed = settings.rate
        self.low, self.high = settings.rate_min, settings.rate_max
        self.unlimited = settings.rate == 0
        self._due = 0.0
        self._last = 0.0

    def rate_at(self, elapsed: float) -> float:
        if self.fixed is not None:
            return self.fixed
        slow, fast = (0.5 - 0.5 * math.cos(2 * math.pi * elapsed / p) for p in RATE_PERIODS_S)
        return self.low + (self.high - self.low) * (0.7 * slow + 0.3 * fast)

    @property
    def fastest(self) -> float:
        """Upper bound of the rate, used to judge whether an episode can finish in time."""
        return math.inf if self.unlimited else (self.fixed or self.high)

    def due(self, elapsed: float, sent: int) -> float:
        """Records that should have been sent by ``elapsed`` seconds. A backlog beyond one
        second's worth (a stall) is forgiven rather than caught up in a burst."""
        if self.unlimited:
            return math.inf
        rate = self.rate_at(elapsed)
        self._due += rate * max(0.0, elapsed - self._last)
        self._last = elapsed
        self._due = min(self._due, sent + max(1.0, rate))
        return self._due


#: Delivery errors after which this producer instance can never deliver again. Tansu answers the
#: epoch bump librdkafka makes after a message timeout with PRODUCER_FENCED, for good.
FATAL_DELIVERY_ERRORS = frozenset({KafkaError.PRODUCER_FENCED})


@dataclass
class Counters:
    sent: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    fatal: KafkaError | None = None

    def delivered(self, queued: int) -> int:
        """Acknowledged messages, given how many the client still holds (len(producer)):
        a message leaves the client only once acknowledged or failed."""
        return self.sent - self.failed - queued

    def on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            return
        self.failed += 1
        if err.fatal() or err.code() in FATAL_DELIVERY_ERRORS:
            self.fatal = self.fatal or err
        name = err.name()
        self.errors[name] = self.errors.get(name, 0) + 1
        if self.errors[name] == 1:
            log.error("delivery failed: %s (further %s errors are only counted)", err, name)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ProducerApp:
    """One producer run. ``run()`` returns the process exit code."""

    def __init__(self, settings: ProducerSettings) -> None:
        self.settings = settings
        self.counters = Counters()
        self.schedule = RateSchedule(settings)
        self.stopping = False
        self.generator: TransactionGenerator | None = None
        self._now_ms = 0
        self._budget = 0
        self._end_wall_ms = math.inf
        self._last_status = (0.0, 0)

    # --- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        settings = self.settings
        log.info("settings: %s", settings.redacted())
        if not self._broker_ready():
            return 1
        producer = Producer(
            producer_config(settings, self.counters.on_delivery, self._on_error),
            logger=logging.getLogger("librdkafka"),
        )
        self._install_signal_handlers()
        records = self._records()
        started = time.monotonic()
        self._last_status = (started, 0)
        if settings.duration is not None:
            self._end_wall_ms = _wall_ms() + settings.duration * 1000
        try:
            self._pump(producer, records, started)
        except KafkaException as exc:
            log.error("producer failed: %s", exc)
            self.stopping = True
        return self._finish(producer, started)

    def _broker_ready(self) -> bool:
        settings = self.settings
        try:
            admin = wait_for_broker(settings.client_config(), settings.connect_timeout)
        except BrokerUnavailable as exc:
            log.error("cannot reach Kafka: %s; check KAFKA_BOOTSTRAP_SERVERS", exc)
            return False
        topic = settings.transactions_topic
        try:
            ensure_topics(admin, [TopicSpec(topic, DEFAULT_TRANSACTIONS_PARTITIONS)])
        except KafkaException as exc:
            # Restricted accounts may not create topics; a missing topic then fails on send.
            log.warning("could not check/create topic %s: %s", topic, exc)
        return True

    def _on_error(self, err: KafkaError) -> None:
        """Client-level errors. A fatal one (e.g. the idempotent producer was fenced) makes
        every later send fail, so the run stops instead of failing forever."""
        if err.fatal():
            log.error("fatal producer error: %s; stopping", err)
            self.stopping = True
        else:
            log.warning("kafka: %s", err)

    def _install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if self.stopping:
                raise KeyboardInterrupt  # second signal: give up on the clean flush
            log.info("%s received: stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    # --- records ------------------------------------------------------------------------------

    def _records(self) -> Callable[[int], tuple[bytes | None, bytes] | None]:
        """A function giving the next record (None: the source has nothing more to say)."""
        settings = self.settings
        if settings.from_file is not None:
            log.info("replaying %s", settings.from_file)
            replay: Iterator[tuple[bytes | None, bytes]] = iter_replay(settings.from_file)
            return lambda _budget: next(replay, None)

        generator = TransactionGenerator(
            users=settings.users, merchants=settings.merchants,
            fraud_ratio=settings.fraud_ratio, seed=settings.seed,
            scenario_rates=scenario_rates(settings.hard_negative_scale, settings.evading_scale),
        )
        self.generator = generator
        log.info("generator: %d users, %d merchants, fraud ratio %.3f, hard negatives x%g, "
                 "evading fraud x%g, seed %d (pass --seed %d to replay this stream)",
                 settings.users, settings.merchants, settings.fraud_ratio,
                 settings.hard_negative_scale, settings.evading_scale, generator.seed,
                 generator.seed)
        peak = self.schedule.fastest
        wanted = (users_needed(peak, settings.fraud_ratio, generator.scenario_rates)
                  if math.isfinite(peak) else 0)
        if settings.users < wanted:
            log.warning("%d users are too few for %.0f tx/s (want >= %d): extra users will be "
                        "created to keep normal traffic rule-free", settings.users, peak, wanted)
        bounded = settings.count is not None or settings.duration is not None
        deadline = self._deadline if bounded else None

        def next_record(budget: int) -> tuple[bytes | None, bytes] | None:
            # budget: records this run may still send (_UNBOUNDED without --count).
            now = _wall_ms()
            if budget <= generator.pending:
                tx = generator.pop_due(now)  # only finish episodes already under way
                if tx is None:
                    return None
            else:
                self._now_ms, self._budget = now, budget
                tx = generator.next_at(now, deadline)
            return tx["user_id"].encode(), encode_transaction(tx)

        return next_record

    def _deadline(self, pending: int) -> float:
        """Latest event time for episode events, so that every labelled episode is complete
        before the run ends (by --count at the fastest rate, or by --duration)."""
        slack = self._budget - 1 - pending
        if slack < 0:
            return -math.inf
        by_count = math.inf
        if self.settings.count is not None:
            by_count = self._now_ms + slack * 1000 / self.schedule.fastest
        return min(by_count, self._end_wall_ms)

    # --- the loop -----------------------------------------------------------------------------

    def _pump(self, producer: Producer, records: Callable[[int], tuple[bytes | None, bytes] | None],
              started: float) -> None:
        settings = self.settings
        counters = self.counters
        generator = self.generator
        topic = settings.transactions_topic
        count = settings.count
        end_mono = started + settings.duration if settings.duration is not None else math.inf
        next_status = started + settings.status_interval
        produce, poll = producer.produce, producer.poll

        while not self.stopping:
            if counters.fatal is not None:
                log.error("the producer cannot deliver any more (%s); stopping", counters.fatal)
                return
            now = time.monotonic()
            if now >= next_status:
                self._status(producer, now)
                next_status = now + settings.status_interval
            pending = generator.pending if generator is not None else 0
            budget = _UNBOUNDED if count is None else count - counters.sent
            if now >= end_mono:
                budget = min(budget, pending)
            if budget <= 0:
                return
            if budget <= pending:
                # The run's end is reached: only finish the episodes already under way.
                nxt = generator.next_pending_ms() if generator is not None else None
                wait = (nxt - _wall_ms()) / 1000 if nxt is not None else 0.0
                if wait > 0:
                    poll(min(wait, MAX_WAIT_S, max(0.0, next_status - now)))
                    continue
                allowed = 1.0
            else:
                rate = self.schedule.rate_at(now - started)
                allowed = min(budget - pending, BATCH,
                              self.schedule.due(now - started, counters.sent) - counters.sent)
                if allowed < 1:
                    wait = (1.0 - allowed) / rate if rate > 0 else MAX_WAIT_S
                    poll(max(0.0, min(wait, MAX_WAIT_S, next_status - now, end_mono - now)))
                    continue
            for _ in range(int(allowed)):
                record = records(budget)
                if record is None:
                    if generator is None:
                        return  # end of the replay file
                    break
                key, value = record
                while True:
                    try:
                        produce(topic, value, key)
                        break
                    except BufferError:
                        poll(MAX_WAIT_S)  # local queue full: let deliveries drain it
                counters.sent += 1
                budget -= 1
            poll(0)

    def _status(self, producer: Producer, now: float) -> None:
        last_time, last_sent = self._last_status
        rate = (self.counters.sent - last_sent) / max(now - last_time, 1e-9)
        self._last_status = (now, self.counters.sent)
        c = self.counters
        queued = len(producer)
        log.info("sent=%d delivered=%d failed=%d in_flight=%d rate=%.1f tx/s%s", c.sent,
                 c.delivered(queued), c.failed, queued, rate, self._episode_summary())

    def _episode_summary(self) -> str:
        generator = self.generator
        if generator is None:
            return ""
        started = " ".join(f"{rule}={generator.episodes_started[rule]}" for rule in RULES)
        mix = generator.scenarios_started
        evading = sum(mix[name] for name in EVADING)
        scenarios = f" hard_negatives={sum(mix.values()) - evading} evading={evading}"
        extra = f" extra_users={generator.extra_users}" if generator.extra_users else ""
        return f" episodes: {started}{scenarios}{extra}"

    def _finish(self, producer: Producer, started: float) -> int:
        settings = self.settings
        c = self.counters
        log.info("flushing %d in-flight messages (timeout %.0f s)", len(producer),
                 settings.flush_timeout)
        try:
            undelivered = producer.flush(settings.flush_timeout)
        except KeyboardInterrupt:
            undelivered = len(producer)
        elapsed = time.monotonic() - started
        unsent = self.generator.pending if self.generator else 0
        log.info("totals: sent=%d delivered=%d failed=%d undelivered=%d in %.1f s (%.0f tx/s)%s",
                 c.sent, c.delivered(undelivered), c.failed, undelivered, elapsed,
                 c.sent / elapsed if elapsed > 0 else 0.0, self._episode_summary())
        if unsent:
            log.warning("%d events of fraud episodes under way were not sent (stopped early)",
                        unsent)
        if undelivered:
            log.error("%d messages were still undelivered after %.0f s", undelivered,
                      settings.flush_timeout)
        if c.failed:
            log.error("%d messages failed delivery: %s", c.failed, c.errors)
        return 1 if undelivered or c.failed else 0


def run(settings: ProducerSettings) -> int:
    return ProducerApp(settings).run()
