"""The four fraud rules: pure Python, no Spark, no Kafka.

Semantics (../shared/SPEC.md): every count is over one user's transactions, in event time, over
*any* span of the stated length — inclusive, so four transactions whose first and last are
exactly 60 s apart fire ``velocity``. Hopping windows miss bursts that straddle their
boundaries; here the condition is evaluated at every transaction, over the span that ends at it.

Episodes: for a windowed rule the condition C(t) ("the span ending at t holds more than N
transactions") is true on a union of intervals of event time. Each maximal interval is one
episode and yields exactly one alert, emitted when the transaction that first makes C true is
processed; its evidence is the span ending at that transaction. A burst that keeps going extends
its episode; a new burst after C lapsed opens a new episode and gets a new alert.

``UserRuleState`` is the per-user state handler used by the streaming job (through
``applyInPandasWithState``); it processes arrivals incrementally and bounds its memory with the
watermark. ``high_value_alert`` needs no window and fires for late events too; ``BucketState``
fires it once per transaction id its users' state still holds.
"""

from __future__ import annotations

import json
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from fraudstream import schemas
from fraudstream.settings import DetectorSettings

MICROS = 1_000_000


@dataclass(frozen=True)
class RuleConfig:
    """Rule thresholds and spans; spans in microseconds of event time."""

    high_value_amount: float = 3500.0
    velocity_count: int = 3
    velocity_window_us: int = 60 * MICROS
    multi_location_count: int = 2
    multi_location_window_us: int = 120 * MICROS
    paypal_micro_count: int = 3
    paypal_micro_amount: float = 50.0
    paypal_micro_window_us: int = 240 * MICROS

    @classmethod
    def from_settings(cls, settings: DetectorSettings) -> RuleConfig:
        return cls(
            high_value_amount=settings.high_value_amount,
            velocity_count=settings.velocity_count,
            velocity_window_us=round(settings.velocity_window_seconds * MICROS),
            multi_location_count=settings.multi_location_count,
            multi_location_window_us=round(settings.multi_location_window_seconds * MICROS),
            paypal_micro_count=settings.paypal_micro_count,
            paypal_micro_amount=settings.paypal_micro_amount,
            paypal_micro_window_us=round(settings.paypal_micro_window_seconds * MICROS),
        )

    @property
    def max_window_us(self) -> int:
        return max(self.velocity_window_us, self.multi_location_window_us,
                   self.paypal_micro_window_us)

    def window_us(self, rule: str) -> int:
        return {
            schemas.VELOCITY: self.velocity_window_us,
            schemas.MULTI_LOCATION: self.multi_location_window_us,
            schemas.PAYPAL_MICRO: self.paypal_micro_window_us,
        }[rule]

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's state depends on (compared at start-up)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Tx(NamedTuple):
    """The fields the rules read. Ordered by (event time, id) so ties sort deterministically."""

    event_us: int
    transaction_id: str
    amount: float
    location: str
    payment_method: str
    kafka_us: int  # Kafka record timestamp: when the event reached the broker (for latency)


class RuleAlert(NamedTuple):
    rule: str
    user_id: str
    evidence: tuple[Tx, ...]
    trigger: Tx  # the transaction that made the rule true
    reason: str


def _fmt_seconds(us: int) -> str:
    seconds = us / MICROS
    return f"{seconds:g}"


def relevant(rule: str, tx: Tx, config: RuleConfig) -> bool:
    if rule == schemas.PAYPAL_MICRO:
        return tx.payment_method == schemas.PAYPAL and tx.amount < config.paypal_micro_amount
    return True


def evaluate_window(rule: str, window: Sequence[Tx], config: RuleConfig) -> int | None:
    """If the rule holds over ``window`` (the span ending at its last element), return the event
    time until which it keeps holding with no further transactions; else None."""
    span = config.window_us(rule)
    if rule == schemas.MULTI_LOCATION:
        latest: dict[str, int] = {}
        for tx in window:
            latest[tx.location] = max(latest.get(tx.location, tx.event_us), tx.event_us)
        need = config.multi_location_count
        if len(latest) < need:
            return None
        return sorted(latest.values(), reverse=True)[need - 1] + span
    limit = config.velocity_count if rule == schemas.VELOCITY else config.paypal_micro_count
    if len(window) <= limit:
        return None
    return window[-(limit + 1)].event_us + span


def describe(rule: str, evidence: Sequence[Tx], config: RuleConfig) -> str:
    if rule == schemas.MULTI_LOCATION:
        places = sorted({tx.location for tx in evidence})
        return (f"{len(places)} locations within {_fmt_seconds(config.multi_location_window_us)} s"
                f" (fires at {config.multi_location_count}): {', '.join(places)}")
    if rule == schemas.VELOCITY:
        return (f"{len(evidence)} transactions within {_fmt_seconds(config.velocity_window_us)} s"
                f" (limit {config.velocity_count})")
    return (f"{len(evidence)} PayPal payments under {config.paypal_micro_amount:g} within "
            f"{_fmt_seconds(config.paypal_micro_window_us)} s (limit {config.paypal_micro_count})")


def _previous_other_location(txs: Sequence[Tx]) -> list[int]:
    """For each index k, the largest j < k whose location differs from txs[k]'s (-1 if none):
    a span [start, k] holds two locations exactly when that index is >= start."""
    out: list[int] = []
    last_change = -1
    for index, tx in enumerate(txs):
        if index and tx.location != txs[index - 1].location:
            last_change = index - 1
        out.append(last_change)
    return out


def high_value_alert(user_id: str, tx: Tx, config: RuleConfig) -> RuleAlert | None:
    if tx.amount > config.high_value_amount:
        reason = f"amount {tx.amount:.2f} above {config.high_value_amount:g}"
        return RuleAlert(schemas.HIGH_VALUE, user_id, (tx,), tx, reason)
    return None


@dataclass
class UserRuleState:
    """Per-user state for the windowed rules.

    ``buffer`` holds the user's recent transactions sorted by (event time, id); ``episodes`` maps
    each rule to the [start, end] event-time intervals of episodes already alerted. Both are
    pruned with the watermark: a transaction that can still arrive is not older than the
    watermark, so its span reaches back at most ``max_window`` before it.
    """

    buffer: list[Tx] = field(default_factory=list)
    episodes: dict[str, list[list[int]]] = field(default_factory=dict)

    def process(self, user_id: str, arrivals: Iterable[Tx], config: RuleConfig,
                rules: Sequence[str] = schemas.STATEFUL_RULES) -> tuple[list[RuleAlert], int]:
        """Add arrivals; return (new alerts, duplicates ignored). A transaction id already in the
        buffer is a resend and is not counted twice."""
        seen = {tx.transaction_id for tx in self.buffer}
        fresh: list[Tx] = []
        duplicates = 0
        for tx in sorted(arrivals):
            if tx.transaction_id in seen:
                duplicates += 1
                continue
            seen.add(tx.transaction_id)
            fresh.append(tx)
            insort(self.buffer, tx)
        if not fresh:
            return [], duplicates
        earliest_new = fresh[0].event_us
        alerts: list[RuleAlert] = []
        for rule in rules:
            alerts.extend(self._evaluate(user_id, rule, earliest_new, config))
        return alerts, duplicates

    def _evaluate(self, user_id: str, rule: str, earliest_new: int, config: RuleConfig
                  ) -> list[RuleAlert]:
        span = config.window_us(rule)
        if rule == schemas.PAYPAL_MICRO:
            candidates = [tx for tx in self.buffer if relevant(rule, tx, config)]
        else:
            candidates = self.buffer
        # Cheap necessary conditions first: most users most of the time satisfy none.
        if rule == schemas.MULTI_LOCATION:
            limit = 0
            if len({tx.location for tx in candidates}) < config.multi_location_count:
                return []
            previous_other = _previous_other_location(candidates)
        else:
            limit = config.velocity_count if rule == schemas.VELOCITY else config.paypal_micro_count
            if len(candidates) <= limit:
                return []
        times = [tx.event_us for tx in candidates]
        count = len(candidates)
        episodes = self.episodes.setdefault(rule, [])
        alerts: list[RuleAlert] = []
        # An arrival at time t changes only spans that end at or after t.
        first = bisect_left(times, earliest_new)
        start = bisect_left(times, times[first] - span) if first < count else 0
        for end_index in range(first, count):
            end_us = times[end_index]
            while times[start] < end_us - span:
                start += 1
            # Ties: every transaction at the same instant belongs to the span ending there.
            stop = end_index + 1
            while stop < count and times[stop] == end_us:
                stop += 1
            if rule != schemas.MULTI_LOCATION:
                if stop - start <= limit:
                    continue
            elif config.multi_location_count == 2 and previous_other[stop - 1] < start:
                continue  # one location only in this span
            window = candidates[start:stop]
            holds_until = evaluate_window(rule, window, config)
            if holds_until is None:
                continue
            merged = False
            for episode in episodes:
                if end_us <= episode[1] and holds_until >= episode[0]:
                    episode[0] = min(episode[0], end_us)
                    episode[1] = max(episode[1], holds_until)
                    merged = True
                    break
            if not merged:
                episodes.append([end_us, holds_until])
                episodes.sort()
                evidence = tuple(window)
                alerts.append(RuleAlert(rule, user_id, evidence, candidates[end_index],
                                        describe(rule, evidence, config)))
        if not episodes:
            del self.episodes[rule]
        return alerts

    def prune(self, watermark_us: int, config: RuleConfig) -> None:
        """Keep a transaction while a span ending at or after the watermark can still hold it,
        for some rule it counts toward (PayPal micro-payments are kept longest)."""
        every_tx_from = watermark_us - max(config.velocity_window_us,
                                           config.multi_location_window_us)
        micro_from = watermark_us - config.paypal_micro_window_us
        self.buffer = [tx for tx in self.buffer if tx.event_us >= every_tx_from or (
            tx.event_us >= micro_from and relevant(schemas.PAYPAL_MICRO, tx, config))]
        for rule, episodes in list(self.episodes.items()):
            episodes[:] = [e for e in episodes if e[1] >= watermark_us]
            if not episodes:
                del self.episodes[rule]

    @property
    def empty(self) -> bool:
        return not self.buffer and not self.episodes

    @property
    def latest_event_us(self) -> int | None:
        return self.buffer[-1].event_us if self.buffer else None

    # Spark keeps the state as one JSON string: compact, and readable when debugging a checkpoint.
    def to_json(self) -> str:
        return json.dumps({"b": [list(tx) for tx in self.buffer], "e": self.episodes},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> UserRuleState:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(buffer=[Tx(*row) for row in data["b"]], episodes=data["e"])


@dataclass
class BucketState:
    """The windowed rules' state of every user in one hash bucket of user_id.

    Spark's stateful operator is keyed by bucket rather than by user: its per-key cost (a pandas
    frame and a state round trip per key and batch) would otherwise dominate, as one batch
    touches thousands of users. Rule semantics stay per user (``UserRuleState``).

    A batch touches few of a bucket's users, so each user's state is kept as its own JSON text
    (``stored``) next to the event time until which it can matter, and parsed into ``users``
    only when the batch has transactions for that user: the cost of a batch follows the batch,
    not the whole state (at 1,000 tx/s the state holds ~180k transactions). Untouched users are
    dropped unparsed once the watermark passes their retention; their older transactions are
    pruned when they are next touched (spans never reach back to them, so keeping them longer
    changes no alert).
    """

    users: dict[str, UserRuleState] = field(default_factory=dict)
    #: user_id -> [retain_until_us, UserRuleState JSON] for users not parsed in this batch.
    stored: dict[str, list[Any]] = field(default_factory=dict)

    def get(self, user_id: str) -> UserRuleState | None:
        """The user's state, parsed on first use; None if the bucket holds nothing for them."""
        user = self.users.get(user_id)
        if user is None and user_id in self.stored:
            user = self.users[user_id] = UserRuleState.from_json(self.stored.pop(user_id)[1])
        return user

    def process(self, arrivals: dict[str, list[Tx]], config: RuleConfig,
                late: dict[str, list[Tx]] | None = None) -> tuple[list[RuleAlert], int]:
        """Feed each user's on-time arrivals to their state; return (alerts, duplicates ignored).

        ``high_value`` fires for arrivals and for ``late`` transactions (behind the watermark,
        kept out of the windowed rules) alike, once per transaction id the user's state still
        holds: a resend in a later batch is the same evidence and must not alert twice.
        """
        alerts: list[RuleAlert] = []
        duplicates = 0
        for user_id, txs in arrivals.items():
            user = self.get(user_id)
            if user is None:
                user = self.users[user_id] = UserRuleState()
            known = _high_value_ids(user, txs, config)
            found, dup = user.process(user_id, txs, config)
            alerts.extend(_high_value_alerts(user_id, txs, known, config))
            alerts.extend(found)
            duplicates += dup
        for user_id, txs in (late or {}).items():
            user = self.get(user_id)
            known = _high_value_ids(user, txs, config) if user else set()
            alerts.extend(_high_value_alerts(user_id, txs, known, config))
        return alerts, duplicates

    def prune(self, watermark_us: int, config: RuleConfig) -> None:
        """Drop what no transaction at or after ``watermark_us`` can reach: pruned in parsed
        users, whole users among the stored ones."""
        for user_id in list(self.users):
            user = self.users[user_id]
            user.prune(watermark_us, config)
            if user.empty:
                del self.users[user_id]
        self.stored = {user_id: entry for user_id, entry in self.stored.items()
                       if entry[0] >= watermark_us}

    @property
    def empty(self) -> bool:
        return not self.users and not self.stored

    @staticmethod
    def _retain_until(user: UserRuleState, config: RuleConfig) -> int:
        """A watermark beyond this leaves the user's state empty after pruning."""
        until = [end for episodes in user.episodes.values() for _, end in episodes]
        if user.latest_event_us is not None:
            until.append(user.latest_event_us + config.max_window_us)
        return max(until, default=0)

    def to_json(self, config: RuleConfig) -> str:
        entries = dict(self.stored)
        for user_id, user in self.users.items():
            entries[user_id] = [self._retain_until(user, config), user.to_json()]
        return json.dumps(entries, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> BucketState:
        return cls(stored=json.loads(text)) if text else cls()


def _high_value_ids(user: UserRuleState, txs: Sequence[Tx], config: RuleConfig) -> set[str]:
    """The ids ``user`` already holds, if any of ``txs`` is above the high-value amount."""
    if any(tx.amount > config.high_value_amount for tx in txs):
        return {tx.transaction_id for tx in user.buffer}
    return set()


def _high_value_alerts(user_id: str, txs: Sequence[Tx], known: set[str], config: RuleConfig
                       ) -> list[RuleAlert]:
    alerts = []
    for tx in txs:
        if tx.transaction_id not in known:
            alert = high_value_alert(user_id, tx, config)
            if alert is not None:
                known.add(tx.transaction_id)
                alerts.append(alert)
    return alerts


# --- alert records ------------------------------------------------------------------------------


def us_to_datetime(us: int) -> datetime:
    return datetime.fromtimestamp(us / MICROS, tz=UTC)


def alert_record(alert: RuleAlert, detected_at: datetime) -> dict[str, Any]:
    """The SPEC alert as a dict with datetime values (format them for JSON at the edge)."""
    evidence = alert.evidence
    ids = [tx.transaction_id for tx in evidence]
    locations = sorted({tx.location for tx in evidence})
    return {
        "alert_id": schemas.alert_id(alert.rule, alert.user_id, ids),
        "rule": alert.rule,
        "user_id": alert.user_id,
        "window_start": us_to_datetime(min(tx.event_us for tx in evidence)),
        "window_end": us_to_datetime(max(tx.event_us for tx in evidence)),
        "transaction_count": len(evidence),
        "total_amount": round(sum(tx.amount for tx in evidence), 2),
        "locations": locations,
        "transaction_ids": ids,
        "reason": alert.reason,
        "detected_at": detected_at,
    }
