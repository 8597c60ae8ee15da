"""The rule core (``fraudstream.rules``) against its brute-force oracle and the contract.

The oracle evaluates the span ending at every transaction by a full scan with each kind's own
``holds``; the engine is incremental (two pointers, pruning by watermark and retention horizon,
lazy per-user JSON). Fed batch by batch as the detector feeds it, the engine must raise exactly
the oracle's alerts whenever the oracle's docstring says they agree: no event behind the
watermark, and no batch older than the previous one. Random streams under random parameters
find what hand-picked cases miss; the hand-picked cases pin the contract's boundaries (inclusive
spans, ties, episodes, resends, rule changes, refused definitions) so a failure reads clearly.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from fraudstream import schemas
from fraudstream.features import FEATURE_NAMES, FEATURE_SET
from fraudstream.model import MODEL_FORMAT, Scorer
from fraudstream.rules import (
    APPLIED,
    DELETED,
    KINDS,
    MICROS,
    REFUSED,
    BucketState,
    RuleAlert,
    RuleChange,
    RuleSet,
    SpanKind,
    TransactionKind,
    Tx,
    UserState,
    alert_record,
    default_definitions,
    kind_of,
)
from fraudstream.rules.definition import DEFAULTS_AUTHOR
from fraudstream.rules.oracle import expected_alerts, expected_alerts_piecewise

BASE = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
BASE_US = int(BASE.timestamp()) * MICROS
STAMP = "2026-12-01T10:00:00.000Z"
HORIZON_US = 600 * MICROS

#: A real model (logistic regression on the amount alone: 0.12 at 0, 0.5 at 1000, 0.99 at
#: 3500) so ``ml_score`` rules fire in these runs; the oracle gets the same scores per id.
AMOUNT_MODEL = Scorer.from_json({
    "format": MODEL_FORMAT, "version": "amount-only", "algorithm": "logistic_regression",
    "feature_set": FEATURE_SET, "features": list(FEATURE_NAMES),
    "coefficients": [0.002] + [0.0] * (len(FEATURE_NAMES) - 1), "intercept": -2.0,
    "means": [0.0] * len(FEATURE_NAMES)}, Path("amount-only"))


def amount_score(amount: float) -> float:
    return float(AMOUNT_MODEL.score([[amount] + [0.0] * (len(FEATURE_NAMES) - 1)])[0])
DETECTED_AT = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

Record = dict[str, Any]
RuleRecord = tuple[str | None, str | bytes | None, int | None]
AlertKey = tuple[str, int, str, str, tuple[str, ...]]


# --- building transactions and definitions ------------------------------------------------------


def us(seconds: float) -> int:
    """Seconds to integer microseconds: exact span boundaries need integer arithmetic."""
    return round(seconds * MICROS)


def tx(seconds: float = 0.0, *, at_us: int | None = None, user: str = "u1",
       amount: float = 20.0, location: str = "Lyon", method: str = "card",
       tx_id: str | None = None) -> Record:
    """A contract transaction ``seconds`` (or ``at_us`` microseconds) after BASE.

    The timestamp is an aware datetime rather than contract text because the text keeps only
    milliseconds, and the random streams use microsecond times."""
    offset = us(seconds) if at_us is None else at_us
    return {
        "transaction_id": tx_id or f"{user}-{offset}-{location}-{method}-{amount}",
        "user_id": user, "amount": amount, "currency": "EUR",
        "timestamp": BASE + timedelta(microseconds=offset), "location": location,
        "payment_method": method, "merchant_id": "m001", "device_ip": "203.0.113.7",
    }


def to_tx(record: Record) -> Tx:
    """What the detector hands the engine for one record (Unix-epoch microseconds)."""
    offset = (record["timestamp"] - BASE) // timedelta(microseconds=1)
    return Tx(BASE_US + offset, record["transaction_id"], float(record["amount"]),
              record["location"], record["payment_method"], BASE_US + offset)


def definition(rule_id: str, kind: str | None = None, version: int = 1, *,
               enabled: bool = True, updated_by: str = "tester", **params: Any) -> Record:
    """A definition as published on ``fraud-rules`` (kind defaults to the rule_id)."""
    kind = kind or rule_id
    return {"rule_id": rule_id, "kind": kind, "version": version, "enabled": enabled,
            "params": params or dict(KINDS[kind].defaults), "updated_at": STAMP,
            "updated_by": updated_by}


def rule_record(data: Record) -> RuleRecord:
    return data["rule_id"], json.dumps(data), None


def tombstone(rule_id: str) -> RuleRecord:
    return rule_id, None, None


def default_dicts() -> list[Record]:
    return [d.to_dict() for d in default_definitions()]


# --- driving the engine as the detector does ----------------------------------------------------


@dataclass
class Driver:
    """Feeds a ``BucketState`` the way the detector's state step does, one micro-batch at a
    time: rule records first, then the batch's transactions (those behind the watermark as
    ``late``), then pruning at the new watermark and a JSON round trip of the whole bucket, so
    every test also checks that nothing the engine needs is lost between batches."""

    horizon_us: int = HORIZON_US
    delay_us: int = 60 * MICROS
    bucket: BucketState = field(default_factory=BucketState)
    max_us: int | None = None
    alerts: list[RuleAlert] = field(default_factory=list)
    changes: list[RuleChange] = field(default_factory=list)
    #: (the records of each batch, the rule set in force for it): the oracle's phases.
    phases: list[tuple[list[Record], RuleSet]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    #: Late transactions not seen before: the oracle would count them, the engine must not.
    late_fresh: int = 0
    duplicates: int = 0

    @property
    def watermark_us(self) -> int | None:
        return None if self.max_us is None else self.max_us - self.delay_us

    def rules(self, *records: RuleRecord) -> list[RuleChange]:
        changes = self.bucket.apply_rules(records, self.horizon_us)
        self.changes.extend(changes)
        return changes

    def batch(self, records: Sequence[Record]) -> list[RuleAlert]:
        watermark = self.watermark_us
        arrivals: dict[str, list[Tx]] = {}
        late: dict[str, list[Tx]] = {}
        for record in records:
            item = to_tx(record)
            is_late = watermark is not None and item.event_us < watermark
            (late if is_late else arrivals).setdefault(record["user_id"], []).append(item)
            if is_late and item.transaction_id not in self.seen:
                self.late_fresh += 1
            self.seen.add(item.transaction_id)
            self.max_us = item.event_us if self.max_us is None else max(self.max_us,
                                                                         item.event_us)
        self.phases.append((list(records), self.bucket.ruleset))
        alerts, duplicates = self.bucket.process(arrivals, late, scorer=AMOUNT_MODEL)
        self.duplicates += duplicates
        self.alerts.extend(alerts)
        if self.watermark_us is not None:
            self.bucket.prune(self.watermark_us, self.horizon_us)
        self.bucket = BucketState.from_json(self.bucket.to_json(self.horizon_us))
        return alerts

    def keys(self) -> list[AlertKey]:
        return engine_keys(self.alerts)

    def expected(self) -> list[AlertKey]:
        """The oracle with one phase per batch (each batch judged by the rules in force)."""
        return oracle_keys(expected_alerts_piecewise(self.phases, self.scores()))

    def scores(self) -> dict[str, float]:
        """What the model scored each transaction: the oracle's input for ml_score rules."""
        return {record["transaction_id"]: amount_score(float(record["amount"]))
                for records, _ in self.phases for record in records}


def engine_keys(alerts: Iterable[RuleAlert]) -> list[AlertKey]:
    """Sorted, not a set: the engine must not raise the same alert twice either."""
    out = []
    for alert in alerts:
        record = alert_record(alert, DETECTED_AT)
        out.append((alert.rule, alert.version, alert.user_id, record["alert_id"],
                    tuple(record["transaction_ids"])))
    return sorted(out)


def oracle_keys(alerts: Iterable[Mapping[str, Any]]) -> list[AlertKey]:
    return sorted((a["rule"], a["rule_version"], a["user_id"], a["alert_id"],
                   tuple(a["transaction_ids"])) for a in alerts)


def run(batches: Sequence[Sequence[Record]], definitions: Sequence[Record] | None = None,
        **driver_args: Any) -> Driver:
    """The engine over ``batches`` under ``definitions`` (default: the four default rules)."""
    driver = Driver(**driver_args)
    changes = driver.rules(*map(rule_record, default_dicts() if definitions is None
                                else definitions))
    assert {c.status for c in changes} == {APPLIED}, [c.describe() for c in changes]
    for batch in batches:
        driver.batch(batch)
    return driver


def fired(driver: Driver) -> list[str]:
    return sorted(alert.rule for alert in driver.alerts)


def one_batch(*records: Record) -> list[list[Record]]:
    return [list(records)]


# --- ported boundary cases: spans are inclusive, over any span, one alert per episode ------------


@pytest.mark.parametrize("offset", [0.0, 7.5, 15.0, 29.9, 30.0, 30.1, 44.0, 59.999])
def test_velocity_burst_found_wherever_it_sits_against_window_boundaries(offset: float) -> None:
    """Any span counts, so a burst must not be split by fixed 30 s / 60 s window edges."""
    driver = run(one_batch(*(tx(offset + 12 * i) for i in range(4))))  # 4 in 36 s
    assert fired(driver) == [schemas.VELOCITY]


def test_velocity_span_is_inclusive_at_both_ends() -> None:
    assert fired(run(one_batch(tx(0), tx(20), tx(40)))) == []  # 3 in 60 s: at the limit
    assert fired(run(one_batch(tx(0), tx(20), tx(40), tx(65)))) == []  # 4 spanning 65 s
    driver = run(one_batch(tx(0), tx(20), tx(40), tx(60)))
    assert fired(driver) == [schemas.VELOCITY]
    assert driver.alerts[0].reason == "4 transactions within 60 s (limit 3)"  # contract wording


def test_fractional_window_boundary_is_exact_to_the_microsecond() -> None:
    """Windows are stored in integer microseconds so 0.5 s ends exactly at 0.5 s."""
    rules = [definition("velocity", count=2, window_seconds=0.5)]
    assert fired(run(one_batch(tx(0), tx(0.25), tx(0.5)), rules)) == ["velocity"]
    assert fired(run(one_batch(tx(0), tx(0.25), tx(at_us=500_001)), rules)) == []


def test_ties_all_belong_to_the_span_ending_at_their_instant() -> None:
    """Transactions at the same instant are all in the span: evidence holds every one of
    them, and they make one episode, not one alert per tie."""
    same = [tx(10, tx_id=f"t{i}") for i in range(5)]
    driver = run(one_batch(*same))
    assert fired(driver) == ["velocity"]
    assert sorted(t.transaction_id for t in driver.alerts[0].evidence) == [
        f"t{i}" for i in range(5)]
    assert driver.keys() == oracle_keys(expected_alerts(same))


def test_the_engine_docstring_example() -> None:
    """count 3 / 60 s: a..e in 40 s are one episode (one alert a..d); f..i after the lapse
    open a second one."""
    times = [(0, "a"), (10, "b"), (20, "c"), (30, "d"), (40, "e"), (200, "f"), (210, "g"),
             (220, "h"), (230, "i")]
    driver = run([[tx(t, tx_id=name)] for t, name in times])
    assert [[t.transaction_id for t in a.evidence] for a in driver.alerts] == [
        ["a", "b", "c", "d"], ["f", "g", "h", "i"]]
    assert [a.trigger.transaction_id for a in driver.alerts] == ["d", "i"]


def test_an_episode_ends_the_moment_the_span_drops_to_the_limit() -> None:
    """d at 60 s fires with a..d and the condition holds until a leaves the span (60 s).
    A fifth transaction at the same instant joins that episode; one at 61 s finds the
    condition lapsed in between (spans ending in (60 s, 61 s) hold only b, c, d) and opens
    a new episode, exactly as the oracle's maximal intervals say."""
    base = [tx(t, tx_id=name) for t, name in [(0, "a"), (20, "b"), (40, "c"), (60, "d")]]
    tie = run(one_batch(*base, tx(60, tx_id="e")))
    assert [[t.transaction_id for t in a.evidence] for a in tie.alerts] == [
        ["a", "b", "c", "d", "e"]]
    later = [*base, tx(61, tx_id="e")]
    lapsed = run([[r] for r in later])
    assert [[t.transaction_id for t in a.evidence] for a in lapsed.alerts] == [
        ["a", "b", "c", "d"], ["b", "c", "d", "e"]]
    assert lapsed.keys() == oracle_keys(expected_alerts(later))


def test_one_burst_one_alert_and_a_new_burst_after_lapse_alerts_again() -> None:
    burst = [tx(i * 2.0) for i in range(20)]
    assert fired(run(one_batch(*burst))) == [schemas.VELOCITY]
    again = burst + [tx(300 + i * 2.0) for i in range(5)]
    assert fired(run(one_batch(*again))) == [schemas.VELOCITY, schemas.VELOCITY]
    # Same answer when the bursts arrive one transaction per batch.
    assert fired(run([[r] for r in again])) == [schemas.VELOCITY, schemas.VELOCITY]


def test_sustained_activity_is_one_episode_while_the_condition_holds() -> None:
    steady = [tx(i * 10.0) for i in range(60)]  # 7 per minute for 10 minutes: never lapses
    assert fired(run([[r] for r in steady])) == [schemas.VELOCITY]


def test_users_are_counted_apart() -> None:
    records = [tx(i, user=user) for i in range(3) for user in ("u1", "u2")]
    assert fired(run(one_batch(*records))) == []


def test_high_value_is_strict() -> None:
    assert fired(run(one_batch(tx(0, amount=3500.0)))) == []
    assert fired(run(one_batch(tx(0, amount=3500.01)))) == [schemas.HIGH_VALUE]


def test_multi_location_boundaries() -> None:
    assert fired(run(one_batch(tx(0, location="Lyon"), tx(130, location="Paris")))) == []
    close = run(one_batch(tx(0, location="Lyon"), tx(120, location="Paris")))
    assert fired(close) == [schemas.MULTI_LOCATION]
    assert close.alerts[0].reason == "2 locations within 120 s (fires at 2): Lyon, Paris"


def test_multi_location_count_three_needs_three_places() -> None:
    rules = [definition("multi_location", count=3, window_seconds=60)]
    two = [tx(0, location="Lyon"), tx(10, location="Paris"), tx(20, location="Lyon")]
    assert fired(run(one_batch(*two), rules)) == []
    three = [*two, tx(60, location="Nice")]
    assert fired(run(one_batch(*three), rules)) == ["multi_location"]
    assert fired(run(one_batch(*two[1:], tx(71, location="Nice")), rules)) == []


def test_paypal_micro_boundaries() -> None:
    at_limit = [tx(i * 30, amount=50.0, method="PayPal") for i in range(6)]
    assert fired(run(one_batch(*at_limit))) == []  # 50.00 is not "under 50"
    micro = [tx(i * 30, amount=49.99, method="PayPal") for i in range(4)]  # 4 in 90 s
    assert fired(run(one_batch(*micro))) == [schemas.PAYPAL_MICRO]
    spread = [tx(i * 80, amount=10, method="PayPal") for i in range(4)]  # 4 spanning 240 s
    assert fired(run(one_batch(*spread))) == [schemas.PAYPAL_MICRO]
    wider = [tx(i * 81, amount=10, method="PayPal") for i in range(4)]  # spanning 243 s
    assert fired(run(one_batch(*wider))) == []
    cards = [tx(i * 30, amount=10, method="card") for i in range(3)]
    mixed = [*cards, tx(100, amount=10, method="PayPal")]  # only PayPal payments count
    assert fired(run(one_batch(*mixed), [definition("paypal_micro", count=1, amount=50,
                                                    window_seconds=240)])) == []


def test_thresholds_come_from_the_definitions() -> None:
    strict = [definition("velocity", count=1, window_seconds=5)]
    assert fired(run(one_batch(tx(0), tx(5)), strict)) == ["velocity"]
    assert fired(run(one_batch(tx(0), tx(6)), strict)) == []


def test_out_of_order_arrival_within_the_watermark() -> None:
    """A late (but on-time) event that arrives before the alert it changes is counted."""
    in_order = [tx(0), tx(5), tx(10), tx(20)]
    shuffled = [in_order[0], in_order[2], in_order[3], in_order[1]]  # t=5 arrives last
    driver = run([[r] for r in shuffled])
    assert driver.late_fresh == 0
    assert driver.keys() == oracle_keys(expected_alerts(in_order))
    assert fired(driver) == [schemas.VELOCITY]


def test_resent_transaction_does_not_count_twice() -> None:
    records = [tx(0, tx_id="a"), tx(10, tx_id="b"), tx(20, tx_id="c")]
    driver = run([[r] for r in [*records, dict(records[2]), dict(records[0])]])
    assert driver.alerts == []
    assert driver.duplicates == 2


def test_state_is_bounded_by_the_watermark_and_horizon() -> None:
    """Nothing older than the watermark minus the horizon survives, so state stays bounded;
    a user left behind is dropped whole, parsed or not."""
    user = UserState()
    user.add(to_tx(tx(i * 2.0)) for i in range(10))
    ruleset = RuleSet.of(default_definitions())
    assert user.evaluate("u1", user.buffer[0].event_us, ruleset.windowed)
    assert user.episodes
    last_us = user.buffer[-1].event_us
    until = user.retain_until(HORIZON_US)
    user.prune(last_us + HORIZON_US, HORIZON_US, ruleset.episode_keys)
    assert [t.event_us for t in user.buffer] == [last_us]  # exactly at the horizon: kept
    user.prune(until + 1, HORIZON_US, ruleset.episode_keys)
    assert user.empty

    driver = run(one_batch(*(tx(i * 2.0, user="old") for i in range(10))))
    assert driver.bucket.stored and not driver.bucket.users  # parsed lazily
    driver.batch([tx(2000, user="new")])
    assert set(driver.bucket.stored) == {"new"}


# --- random streams under random parameters against the oracle ----------------------------------

LOCATIONS = ("Lyon", "Paris", "Nice", "Lille")
METHODS = ("card", "PayPal", "PayPal", "apple_pay", "bank_transfer")
#: Around every threshold the random rules use, so strictness at the boundary is exercised.
AMOUNTS = (5.0, 19.99, 20.0, 49.99, 50.0, 75.49, 75.5, 100.0, 100.01, 999.99, 1000.0, 3500.0,
           3500.01)
#: Windows on a quarter-second grid (event times often share it, so spans end exactly on a
#: transaction) and arbitrary ones to the millisecond or microsecond.
GRID_WINDOWS = (0.25, 0.5, 1.0, 2.5, 7.75, 10.0, 30.0, 60.0, 90.5)
MAX_WINDOW_S = 120


def random_window(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(GRID_WINDOWS)
    if roll < 0.85:
        return rng.randint(1, 90_000) / 1000
    return rng.randint(1, 90_000_000) / MICROS


def random_params(rng: random.Random, kind: str) -> dict[str, Any]:
    """Valid params for ``kind``, spread over the ranges the random streams can trip."""
    if kind == "high_value":
        return {"amount": rng.choice([100.0, 999.99, 3500.0])}
    if kind == "velocity":
        return {"count": rng.randint(1, 5), "window_seconds": random_window(rng)}
    if kind == "multi_location":
        return {"count": rng.randint(2, 3), "window_seconds": random_window(rng)}
    if kind == "ml_score":  # AMOUNT_MODEL: 0.5 at an amount of 1000, 0.9 at ~2100
        return {"threshold": rng.choice([0.5, 0.5, 0.9, 0.3])}
    assert kind == "paypal_micro"
    return {"count": rng.randint(1, 4), "amount": rng.choice([20.0, 49.99, 50.0, 75.5]),
            "window_seconds": random_window(rng)}


@dataclass
class StreamShape:
    """How one seed's stream looks: users, time grain, density and batching."""

    users: tuple[str, ...]
    locations: tuple[str, ...]
    quantum_us: int
    mean_gap_s: float
    cross_batch_ties: bool
    resend_rate: float


def random_shape(rng: random.Random) -> StreamShape:
    return StreamShape(
        users=tuple(f"u{i}" for i in range(rng.randint(1, 3))),
        locations=LOCATIONS[:rng.randint(2, 4)],
        quantum_us=rng.choice([1, 1000, 250_000, 250_000]),
        mean_gap_s=rng.choice([0.3, 1.5, 4.0]),
        cross_batch_ties=rng.random() < 0.5,
        resend_rate=rng.choice([0.0, 0.05, 0.15]),
    )


def random_batch(rng: random.Random, driver: Driver, shape: StreamShape, counter: list[int],
                 history: list[Record]) -> list[Record]:
    """One micro-batch: events at or after the latest one so far (strictly after unless the
    shape allows ties across batches), shuffled within the batch, plus a few resends of
    transactions the engine still holds (some now behind the watermark)."""
    cursor = 0 if driver.max_us is None else driver.max_us - BASE_US
    out: list[Record] = []
    for position in range(rng.randint(1, 25)):
        gap = 0 if rng.random() < 0.15 else rng.expovariate(1 / shape.mean_gap_s)
        step = round(gap * MICROS / shape.quantum_us) * shape.quantum_us
        if position == 0 and driver.max_us is not None and not shape.cross_batch_ties:
            step = max(step, shape.quantum_us)
        cursor += step
        counter[0] += 1
        out.append(tx(at_us=cursor, user=rng.choice(shape.users),
                      amount=rng.choice(AMOUNTS), location=rng.choice(shape.locations),
                      method=rng.choice(METHODS), tx_id=f"t{counter[0]}"))
    if driver.watermark_us is not None:
        held_from = driver.watermark_us - driver.horizon_us
        candidates = [r for r in history if to_tx(r).event_us >= held_from]
        out += [dict(rng.choice(candidates)) for _ in range(len(out))
                if candidates and rng.random() < shape.resend_rate]
    if rng.random() < shape.resend_rate:
        out.append(dict(rng.choice(out)))  # a duplicate within the batch
    rng.shuffle(out)
    history.extend(out)
    return out


@dataclass
class StreamRun:
    driver: Driver
    records: list[Record]
    ruleset: RuleSet
    shape: StreamShape


@cache
def random_stream_run(seed: int) -> StreamRun:
    """One seed: every kind, one or two rules of each (e.g. ``velocity`` and ``velocity_b``)
    under random params, over a random stream fed in random batches. Cached so the coverage
    check reuses the runs instead of repeating them."""
    rng = random.Random(seed)
    definitions = [definition(rule_id, kind, **random_params(rng, kind))
                   for kind in KINDS
                   for rule_id in [kind, f"{kind}_b"][:rng.randint(1, 2)]]
    max_window = max(d["params"].get("window_seconds", 0) for d in definitions)
    # The horizon is sometimes exactly the widest window: the tightest pruning allowed.
    horizon_us = us(max_window * rng.choice([1.0, 1.0, 1.5, 3.0]))
    delay_us = rng.choice([0, us(1), us(max_window), us(60)])
    driver = run([], definitions, horizon_us=horizon_us, delay_us=delay_us)
    shape = random_shape(rng)
    counter = [0]
    history: list[Record] = []
    for _ in range(rng.randint(4, 14)):
        driver.batch(random_batch(rng, driver, shape, counter, history))
    return StreamRun(driver, history, driver.bucket.ruleset, shape)


RANDOM_SEEDS = range(40)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_engine_matches_oracle_on_random_streams(seed: int) -> None:
    result = random_stream_run(seed)
    driver = result.driver
    assert driver.late_fresh == 0, "the stream must keep to the oracle's premise"
    assert driver.keys() == driver.expected()
    if not result.shape.cross_batch_ties:
        # With no tie across batches, batching cannot matter: one phase gives the same.
        scores = {r["transaction_id"]: amount_score(float(r["amount"])) for r in result.records}
        assert driver.keys() == oracle_keys(expected_alerts(result.records, result.ruleset,
                                                            scores))


def test_random_streams_exercise_every_kind_ties_resends_and_episodes() -> None:
    """Guards the random test against becoming vacuous when the generator is tuned."""
    by_kind: Counter[str] = Counter()
    multi_rule_kinds: set[str] = set()
    duplicates = 0
    for seed in RANDOM_SEEDS:
        result = random_stream_run(seed)
        ruleset = result.ruleset
        for alert in result.driver.alerts:
            by_kind[ruleset.rules[alert.rule].kind] += 1
            if alert.rule.endswith("_b"):
                multi_rule_kinds.add(ruleset.rules[alert.rule].kind)
        duplicates += result.driver.duplicates
    assert set(by_kind) == set(KINDS), by_kind
    assert min(by_kind.values()) >= 10, by_kind
    assert multi_rule_kinds == set(KINDS)
    assert duplicates > 0


# --- rule changes between phases ----------------------------------------------------------------


def test_a_change_closes_open_episodes_and_the_burst_alerts_again_under_the_new_version() -> None:
    """A burst straddling a change: v1 alerted; after the change the burst is judged afresh,
    and its next qualifying transaction opens a v2 episode (evidence from before the change
    included); later transactions of the burst extend that episode."""
    driver = run([], [definition("velocity", count=3, window_seconds=60)])
    burst = [tx(t, tx_id=f"b{t}") for t in range(0, 45, 5)]
    driver.batch(burst[:4])  # 0..15
    changes = driver.rules(rule_record(definition("velocity", version=2, count=4,
                                                  window_seconds=60)))
    assert [c.status for c in changes] == [APPLIED]
    driver.batch(burst[4:6])  # 20, 25
    driver.rules(rule_record(definition("velocity", version=3, updated_by="other",
                                        count=4, window_seconds=60)))  # same params
    driver.batch(burst[6:])  # 30..40
    assert [(a.version, [t.transaction_id for t in a.evidence]) for a in driver.alerts] == [
        (1, ["b0", "b5", "b10", "b15"]),
        (2, ["b0", "b5", "b10", "b15", "b20"]),
        (3, ["b0", "b5", "b10", "b15", "b20", "b25", "b30"]),
    ]
    assert driver.keys() == driver.expected()
    # No open episode of a replaced version survives pruning.
    user = driver.bucket.get("u1")
    assert user is not None and set(user.episodes) == {"velocity#3"}


def test_disabled_deleted_added_and_recreated_rules() -> None:
    driver = run([], default_dicts())

    def burst(at: float, size: int = 4) -> list[tuple[str, int]]:
        """Rule and version of the alerts a burst of ``size`` at ``at`` s raises."""
        before = len(driver.alerts)
        driver.batch([tx(at + i, location=LOCATIONS[i % 2]) for i in range(size)])
        return sorted((a.rule, a.version) for a in driver.alerts[before:])

    assert burst(0) == [("multi_location", 1), ("velocity", 1)]
    changes = driver.rules(
        rule_record(definition("velocity", version=2, enabled=False)),
        tombstone("multi_location"),
        rule_record(definition("velocity_10m", "velocity", count=5, window_seconds=600)),
    )
    assert [c.status for c in changes] == [APPLIED, DELETED, APPLIED]
    # Only the new 10-minute rule fires (at the 6th transaction: more than 5), and its span
    # reaches the first burst.
    assert burst(100) == [("velocity_10m", 1)]
    assert [t.event_us - BASE_US for t in driver.alerts[-1].evidence] == [
        us(t) for t in (0, 1, 2, 3, 100, 101)]

    changes = driver.rules(
        rule_record(definition("multi_location", version=1)),
        rule_record(definition("multi_location", version=2)),
        rule_record(definition("velocity", version=3, enabled=True)),
    )
    assert [c.status for c in changes] == [REFUSED, APPLIED, APPLIED]
    # velocity_10m's episode is still open (more than 5 within 600 s until 702 s): extended,
    # not alerted again.
    assert burst(300) == [("multi_location", 2), ("velocity", 3)]
    assert burst(1400, 6) == [("multi_location", 2), ("velocity", 3), ("velocity_10m", 1)]
    assert driver.phases[0][1].rules["velocity"].version == 1
    assert driver.keys() == driver.expected()


def test_whole_history_of_the_change_tests_agrees_with_the_oracle() -> None:
    """The deterministic change sequence above, compared alert for alert with the oracle."""
    driver = run([], default_dicts())
    for phase, records in enumerate([
        [rule_record(definition("velocity", version=2, count=2, window_seconds=30))],
        [tombstone("velocity"),
         rule_record(definition("multi_location", version=2, count=3, window_seconds=90))],
        [rule_record(definition("velocity", version=3, count=1, window_seconds=5))],
    ]):
        for batch in range(3):
            start = phase * 200 + batch * 20
            driver.batch([tx(start + i * 3, location=LOCATIONS[(i + batch) % 3],
                             method=METHODS[i % 2], amount=AMOUNTS[i % len(AMOUNTS)])
                          for i in range(6)])
        assert {c.status for c in driver.rules(*records)} <= {APPLIED, DELETED}
    driver.batch([tx(1000 + i) for i in range(3)])
    assert driver.keys() == driver.expected()
    assert {a.version for a in driver.alerts if a.rule == "velocity"} == {1, 2, 3}


@dataclass
class Model:
    """The rules a test believes are in force, to generate valid and invalid changes."""

    ruleset: RuleSet = field(default_factory=RuleSet)
    counter: int = 0


def random_change(rng: random.Random, model: Model, horizon_us: int
                  ) -> tuple[RuleRecord, str]:
    """One ``fraud-rules`` record and the status it must get."""
    rules = model.ruleset.rules
    retired = model.ruleset.retired
    existing = sorted(rules)
    windowed = sorted(r for r, d in rules.items() if d.windowed)
    ops = ["add"]
    if existing:
        ops += ["params", "params", "disable_or_enable", "delete", "kind", "bump", "stale"]
    if windowed:
        ops.append("too_wide")
    if retired:
        ops.append("recreate")
    op = rng.choice(ops)
    if op == "add":
        model.counter += 1
        kind = rng.choice(list(KINDS))
        return rule_record(definition(f"{kind}_{model.counter}", kind,
                                      **random_params(rng, kind))), APPLIED
    if op == "recreate":
        rule_id = rng.choice(sorted(retired))
        kind = rng.choice(list(KINDS))
        version = retired[rule_id] + rng.choice([1, 2])
        return rule_record(definition(rule_id, kind, version,
                                      **random_params(rng, kind))), APPLIED
    if op == "too_wide":
        current = rules[rng.choice(windowed)]
        params = {**current.params, "window_seconds": horizon_us / MICROS + 0.001}
        return rule_record(definition(current.rule_id, current.kind, current.version + 1,
                                      **params)), REFUSED
    current = rules[rng.choice(existing)]
    if op == "delete":
        return tombstone(current.rule_id), DELETED
    version = current.version + rng.choice([1, 1, 1, 4])
    params = dict(current.params)
    kind = current.kind
    enabled = current.enabled
    status = APPLIED
    if op == "params":
        params = random_params(rng, kind)
    elif op == "kind":
        kind = rng.choice([k for k in KINDS if k != current.kind])
        params = random_params(rng, kind)
    elif op == "disable_or_enable":
        enabled = not enabled
    elif op == "stale":
        version = rng.randint(1, current.version)
        status = REFUSED
    return rule_record(definition(current.rule_id, kind, version, enabled=enabled,
                                  updated_by=f"analyst {op}", **params)), status


@dataclass
class PiecewiseRun:
    driver: Driver
    shape: StreamShape
    statuses: Counter[str]


@cache
def random_piecewise_run(seed: int) -> PiecewiseRun:
    """Phases of random changes (params, kind, disable/enable, add, delete, re-create, and
    refused ones), each phase's records applied before its batches. Cached for the coverage
    check."""
    rng = random.Random(1000 + seed)
    horizon_us = us(MAX_WINDOW_S)
    driver = Driver(horizon_us=horizon_us, delay_us=rng.choice([0, us(2), us(60)]))
    model = Model()
    shape = random_shape(rng)
    counter = [0]
    history: list[Record] = []
    statuses: Counter[str] = Counter()
    for phase in range(rng.randint(3, 6)):
        records: list[tuple[RuleRecord, str]] = []
        for _ in range(len(KINDS) if phase == 0 else rng.randint(1, 3)):
            # Each change is drawn from the rules as the previous one left them.
            record, status = random_change(rng, model, horizon_us)
            model.ruleset, change = model.ruleset.apply(*record[:2], horizon_us)
            assert change.status == status, change.describe()
            records.append((record, status))
        changes = driver.rules(*(record for record, _ in records))
        assert [c.status for c in changes] == [status for _, status in records]
        statuses.update(c.status for c in changes)
        assert driver.bucket.ruleset.to_json() == model.ruleset.to_json()
        for _ in range(rng.randint(1, 4)):
            driver.batch(random_batch(rng, driver, shape, counter, history))
    return PiecewiseRun(driver, shape, statuses)


PIECEWISE_SEEDS = range(25)


@pytest.mark.parametrize("seed", PIECEWISE_SEEDS)
def test_engine_matches_piecewise_oracle_under_random_rule_changes(seed: int) -> None:
    result = random_piecewise_run(seed)
    driver = result.driver
    assert driver.late_fresh == 0
    assert driver.keys() == driver.expected()
    if not result.shape.cross_batch_ties:
        # Group batches into the rule phases: the oracle's phases need not be batches.
        grouped: list[tuple[list[Record], RuleSet]] = []
        for records, ruleset in driver.phases:
            if grouped and grouped[-1][1] == ruleset:
                grouped[-1][0].extend(records)
            else:
                grouped.append((list(records), ruleset))
        assert driver.keys() == oracle_keys(expected_alerts_piecewise(grouped, driver.scores()))


def test_random_rule_changes_exercise_every_status_and_later_versions() -> None:
    """Guards the piecewise test against becoming vacuous: changes of every outcome happen,
    and rules fire under versions after their first."""
    statuses: Counter[str] = Counter()
    versions: Counter[int] = Counter()
    for seed in PIECEWISE_SEEDS:
        result = random_piecewise_run(seed)
        statuses += result.statuses
        versions.update(alert.version for alert in result.driver.alerts)
    assert set(statuses) == {APPLIED, DELETED, REFUSED}, statuses
    assert sum(n for version, n in versions.items() if version > 1) >= 20, versions


# --- the retention horizon ----------------------------------------------------------------------


def test_a_widened_window_sees_transactions_from_before_the_change_within_the_horizon() -> None:
    driver = run([], [definition("velocity", count=3, window_seconds=60)],
                 horizon_us=HORIZON_US, delay_us=us(60))
    before = [tx(t, tx_id=f"pre{t}") for t in (0, 100, 200, 300)]
    for record in before:
        driver.batch([record])
    assert driver.alerts == []  # 100 s apart: never 4 within 60 s
    changes = driver.rules(rule_record(definition("velocity", version=2, count=3,
                                                  window_seconds=400)))
    assert [c.status for c in changes] == [APPLIED]
    driver.batch([tx(350, tx_id="post350")])
    assert [(a.rule, a.version) for a in driver.alerts] == [("velocity", 2)]
    evidence = [t.transaction_id for t in driver.alerts[0].evidence]
    assert evidence == ["pre0", "pre100", "pre200", "pre300", "post350"]
    assert driver.keys() == driver.expected()

    # Later, the horizon lets the oldest go: watermark 940 s keeps 340 s and after.
    driver.batch([tx(1000, tx_id="post1000")])
    user = driver.bucket.get("u1")
    assert user is not None
    assert [t.transaction_id for t in user.buffer] == ["post350", "post1000"]


def test_a_transaction_exactly_the_horizon_behind_the_watermark_is_still_held() -> None:
    """The tightest case the contract allows: horizon = window, no watermark delay, and a
    transaction tying the watermark. Its span reaches back exactly to watermark - horizon, so
    a transaction there must survive pruning, both in a parsed user ("a") and in a user kept
    only as stored JSON ("c")."""
    rules = [definition("velocity", count=2, window_seconds=60)]
    driver = run([[tx(0, user="a", tx_id="a0"), tx(0, user="c", tx_id="c0"),
                   tx(0, user="c", tx_id="c0'")],
                  [tx(30, user="a", tx_id="a30"), tx(60, user="b", tx_id="b60")]],
                 rules, horizon_us=us(60), delay_us=0)
    assert driver.alerts == []
    assert driver.watermark_us == BASE_US + us(60)
    driver.batch([tx(60, user="a", tx_id="a60"), tx(60, user="c", tx_id="c60")])
    assert sorted([t.transaction_id for t in a.evidence] for a in driver.alerts) == [
        ["a0", "a30", "a60"], ["c0", "c0'", "c60"]]
    assert driver.keys() == driver.expected()


def test_an_episode_ending_exactly_at_the_watermark_can_still_be_extended() -> None:
    """An episode that holds until the watermark instant is still open for a transaction
    tying the watermark: pruning it there would raise a second alert for one burst."""
    rules = [definition("paypal_micro", count=3, amount=50, window_seconds=60)]
    micro = [tx(t, amount=10.0, method="PayPal", tx_id=f"p{t}") for t in (0, 10, 20, 30)]
    # The card payment at 60 s is not counted: it touches the user (parsed, pruned in place)
    # and moves the watermark to 60 s, the instant the episode ends (0 s + 60 s).
    driver = run([micro, [tx(60, tx_id="card60")]], rules, horizon_us=us(60), delay_us=0)
    assert [a.trigger.transaction_id for a in driver.alerts] == ["p30"]
    user = driver.bucket.get("u1")
    assert user is not None and user.episodes == {"paypal_micro#1": [[us(30) + BASE_US,
                                                                      us(60) + BASE_US]]}
    driver.batch([tx(60, amount=10.0, method="PayPal", tx_id="p60")])
    assert [a.trigger.transaction_id for a in driver.alerts] == ["p30"]
    assert driver.keys() == driver.expected()


def test_a_window_beyond_the_horizon_is_refused_and_the_old_one_stays() -> None:
    driver = run([], [definition("velocity", count=3, window_seconds=60)],
                 horizon_us=us(300))
    changes = driver.rules(rule_record(definition("velocity", version=2, count=3,
                                                  window_seconds=301)))
    assert changes[0].status == REFUSED
    assert "exceeds the retention horizon of 300 s" in (changes[0].reason or "")
    driver.batch([tx(t) for t in (0, 100, 200, 300)])
    assert driver.alerts == []
    assert driver.bucket.ruleset.rules["velocity"].version == 1


# --- definitions: refused and accepted ----------------------------------------------------------


def valid(**changes: Any) -> Record:
    """Version 3 of ``velocity`` (2 is in force in ``in_force``) with ``changes``."""
    return {**definition("velocity", version=3, count=5, window_seconds=60), **changes}


def text(data: Any) -> str:
    """JSON text; ``json.dumps`` writes NaN and Infinity as the bare literals JSON forbids."""
    return json.dumps(data)


def without(*names: str) -> Record:
    return {k: v for k, v in valid().items() if k not in names}


def params(**values: Any) -> Record:
    return valid(params={"count": 5, "window_seconds": 60, **values})


REFUSALS: list[tuple[str, str | None, str | bytes | None, str]] = [
    ("unknown kind", "velocity", text(valid(kind="teleport")), "unknown kind 'teleport'"),
    ("missing param", "velocity", text(valid(params={"count": 5})),
     "params: window_seconds missing"),
    ("unknown param", "velocity", text(params(colour=1)),
     "params: colour not a parameter of velocity"),
    ("params not an object", "velocity", text(valid(params=[5, 60])),
     "params: expected an object, got a list"),
    ("negative count", "velocity", text(params(count=-1)), "params.count: must be >= 1, got -1"),
    ("zero count", "velocity", text(params(count=0)), "params.count: must be >= 1, got 0"),
    ("multi_location count 1", "velocity",
     text(valid(kind="multi_location", params={"count": 1, "window_seconds": 60})),
     "params.count: must be >= 2, got 1"),
    ("zero window", "velocity", text(params(window_seconds=0)),
     "params.window_seconds: must be > 0, got 0"),
    ("negative window", "velocity", text(params(window_seconds=-5)),
     "params.window_seconds: must be > 0, got -5"),
    ("zero paypal amount", "velocity",
     text(valid(kind="paypal_micro", params={"count": 3, "amount": 0, "window_seconds": 60})),
     "params.amount: must be > 0, got 0"),
    ("NaN literal", "velocity", text(params(count=math.nan)),
     "not valid JSON: NaN is not a number JSON allows"),
    ("Infinity literal", "velocity", text(params(window_seconds=math.inf)),
     "not valid JSON: Infinity is not a number JSON allows"),
    ("-Infinity literal", "velocity", text(params(window_seconds=-math.inf)),
     "not valid JSON: -Infinity is not a number JSON allows"),
    ("overflowing number", "velocity", text(params()).replace('"window_seconds": 60',
                                                              '"window_seconds": 1e999'),
     "params.window_seconds: must be a finite number, got inf"),
    ("string for a number", "velocity", text(params(count="5")),
     "params.count: expected a number, got a string"),
    ("bool for a number", "velocity", text(params(count=True)),
     "params.count: expected a number, got a boolean"),
    ("null for a number", "velocity", text(params(window_seconds=None)),
     "params.window_seconds: expected a number, got null"),
    ("fractional count", "velocity", text(params(count=2.5)),
     "params.count: expected a whole number, got 2.5"),
    ("bad JSON", "velocity", '{"rule_id": "velocity", "kind": ', "not valid JSON"),
    ("invalid UTF-8", "velocity", b'{"rule_id": "\xff"}', "not valid JSON"),
    ("empty value", "velocity", "", "not valid JSON"),
    ("not an object", "velocity", text([valid()]), "a definition must be a JSON object"),
    ("a bare string", "velocity", text("velocity"), "a definition must be a JSON object"),
    ("missing field", "velocity", text(without("updated_by")), "missing field: updated_by"),
    ("missing fields", "velocity", text(without("updated_by", "enabled")),
     "missing fields: enabled, updated_by"),
    ("unknown field", "velocity", text(valid(colour="red")), "unknown field: colour"),
    ("bad updated_at", "velocity", text(valid(updated_at="yesterday")),
     "updated_at: expected an ISO-8601 time with a zone, got 'yesterday'"),
    ("updated_at without zone", "velocity", text(valid(updated_at="2026-12-01T10:00:00")),
     "updated_at: expected an ISO-8601 time with a zone"),
    ("empty updated_by", "velocity", text(valid(updated_by="  ")),
     "updated_by: expected the name of who made the change"),
    ("updated_by too long", "velocity", text(valid(updated_by="x" * 201)),
     "updated_by: longer than 200 characters"),
    ("version zero", "velocity", text(valid(version=0)),
     "version: expected a whole number >= 1, got 0"),
    ("version as text", "velocity", text(valid(version="3")),
     "version: expected a whole number >= 1, got '3'"),
    ("version as bool", "velocity", text(valid(version=True)),
     "version: expected a whole number >= 1, got True"),
    ("enabled as text", "velocity", text(valid(enabled="yes")),
     "enabled: expected true or false, got 'yes'"),
    ("bad rule_id", "bad id", text(valid(rule_id="bad id")), "rule_id: expected 1-64 letters"),
    ("stale version (same)", "velocity", text(valid(version=2)),
     "stale version 2: version 2 in force; publish version 3"),
    ("stale version (lower)", "velocity", text(valid(version=1)),
     "stale version 1: version 2 in force; publish version 3"),
    ("window beyond the horizon", "velocity", text(params(window_seconds=600.5)),
     "window of 600.5 s exceeds the retention horizon of 600 s"),
    ("key differs from rule_id", "velocity_10m", text(valid()),
     "record key 'velocity_10m' differs from rule_id 'velocity'"),
    ("tombstone of an unknown rule", "nope", None, "no such rule to delete"),
    ("tombstone without a key", None, None, "a deletion (null value) needs the rule_id as its key"),
    ("too large", "velocity", text(valid(updated_by="x" * 70_000)),
     "definition larger than 65536 bytes"),
]


def in_force() -> RuleSet:
    """The default rules with ``velocity`` at version 2 (so stale versions can be lower)."""
    ruleset = RuleSet.of(default_definitions())
    ruleset, change = ruleset.apply("velocity", text(definition("velocity", version=2,
                                                                count=4, window_seconds=60)),
                                    HORIZON_US)
    assert change.status == APPLIED
    return ruleset


@pytest.mark.parametrize(("key", "value", "reason"),
                         [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_invalid_definitions_are_refused_and_change_nothing(
        key: str | None, value: str | bytes | None, reason: str) -> None:
    before = in_force()
    snapshot = before.to_json()
    after, change = before.apply(key, value, HORIZON_US, offset=7)
    assert change.status == REFUSED
    assert reason in (change.reason or ""), change.reason
    assert after is before
    assert after.to_json() == snapshot
    assert after.rules["velocity"].version == 2
    assert change.offset == 7
    assert reason in change.describe()
    assert change.describe().startswith(f"rule {change.rule_id or '?'}")


def test_a_refused_definition_leaves_the_previous_version_firing_in_the_engine() -> None:
    driver = run([], [definition("velocity", count=3, window_seconds=60)])
    changes = driver.rules(("velocity", text(definition("velocity", version=2, count="5",
                                                        window_seconds=60)), 3),
                           ("velocity", '{"nope', 4))
    assert [c.status for c in changes] == [REFUSED, REFUSED]
    assert changes[0].raw is not None and '"count": "5"' in changes[0].raw
    driver.batch([tx(t) for t in (0, 1, 2, 3)])
    assert [(a.rule, a.version) for a in driver.alerts] == [("velocity", 1)]


def test_a_version_may_grow_by_more_than_one() -> None:
    ruleset, change = in_force().apply("velocity", text(valid(version=7)), HORIZON_US)
    assert change.status == APPLIED
    assert change.previous is not None and change.previous.version == 2
    assert ruleset.rules["velocity"].version == 7
    assert ruleset.rules["velocity"].params == {"count": 5, "window_seconds": 60.0}


def test_a_recreated_rule_continues_the_numbering_of_the_deleted_one() -> None:
    ruleset, change = in_force().apply("velocity", None, HORIZON_US)
    assert change.status == DELETED
    assert "velocity" not in ruleset.rules and ruleset.retired == {"velocity": 2}
    ruleset = RuleSet.from_json(json.loads(json.dumps(ruleset.to_json())))  # survives a restart
    for stale in (1, 2):
        same, refused = ruleset.apply("velocity", text(valid(version=stale)), HORIZON_US)
        assert same is ruleset and refused.status == REFUSED
        assert refused.reason == (f"stale version {stale}: version 2 was the last before it "
                                  "was deleted; publish version 3")
    again, change = ruleset.apply("velocity", text(valid(version=3)), HORIZON_US)
    assert change.status == APPLIED and change.previous is None
    assert again.rules["velocity"].version == 3 and again.retired == {}
    again, change = again.apply("velocity", None, HORIZON_US)
    assert again.retired == {"velocity": 3}


def test_the_same_record_applied_twice_is_refused_the_second_time() -> None:
    """A replayed batch re-reads its rule records: the second read must change nothing."""
    record = text(valid())
    once, first = in_force().apply("velocity", record, HORIZON_US)
    twice, second = once.apply("velocity", record, HORIZON_US)
    assert (first.status, second.status) == (APPLIED, REFUSED)
    assert twice is once


# --- per-transaction kind -----------------------------------------------------------------------


def test_high_value_fires_for_late_transactions_which_windowed_rules_ignore() -> None:
    rules = [definition("high_value"), definition("velocity", count=1, window_seconds=200)]
    driver = run([[tx(100, tx_id="on-time")]], rules, delay_us=us(60))
    assert driver.watermark_us == BASE_US + us(40)
    driver.batch([tx(10, amount=5000.0, tx_id="late")])
    assert driver.late_fresh == 1
    assert [(a.rule, a.trigger.transaction_id) for a in driver.alerts] == [("high_value", "late")]
    assert driver.alerts[0].reason == "amount 5000.00 above 3500"
    user = driver.bucket.get("u1")
    assert user is not None and [t.transaction_id for t in user.buffer] == ["on-time"]


def test_high_value_fires_once_per_transaction_held() -> None:
    big = tx(0, amount=5000.0, tx_id="big")
    driver = run([[big, dict(big)]], [definition("high_value")], delay_us=us(60))
    assert len(driver.alerts) == 1
    driver.batch([dict(big)])  # resent on time in a later batch
    driver.batch([tx(100, tx_id="later")])  # watermark 40 s: "big" is now late but held
    driver.batch([dict(big)])  # resent behind the watermark
    assert driver.late_fresh == 0
    assert [a.trigger.transaction_id for a in driver.alerts] == ["big"]
    late = tx(20, amount=6000.0, tx_id="late")
    driver.batch([late, dict(late)])  # two copies of a late one in the same batch
    assert [a.trigger.transaction_id for a in driver.alerts] == ["big", "late"]


def test_two_high_value_rules_fire_independently() -> None:
    rules = [definition("high_value"), definition("high_value_1k", "high_value", amount=1000)]
    driver = run([[tx(0, amount=4000.0, tx_id="a"), tx(1, amount=2000.0, tx_id="b"),
                   tx(2, amount=1000.0, tx_id="c")],
                  [tx(100, tx_id="d")],
                  [tx(3, amount=3500.01, tx_id="late")]], rules, delay_us=us(60))
    assert sorted((a.rule, a.trigger.transaction_id) for a in driver.alerts) == [
        ("high_value", "a"), ("high_value", "late"),
        ("high_value_1k", "a"), ("high_value_1k", "b"), ("high_value_1k", "late")]


# --- shapes: changes, alert records, defaults, the kind registry --------------------------------

RECORD_FIELDS = {"rule_id", "status", "reason", "version", "kind", "enabled", "params",
                 "previous_version", "previous_params", "updated_at", "updated_by", "raw",
                 "offset"}


def test_rule_change_describe_and_to_record() -> None:
    """The log line and the history row are what operators read: check their shape."""
    empty = RuleSet()
    ruleset, new = empty.apply("velocity", text(definition("velocity")), HORIZON_US, offset=1)
    assert new.describe() == ("rule velocity v1 applied by tester: more than 3 transactions "
                              "within 60 s (new)")
    ruleset, changed = ruleset.apply("velocity", text(definition(
        "velocity", version=2, enabled=False, count=5, window_seconds=30)), HORIZON_US, 2)
    assert changed.describe() == ("rule velocity v2 applied by tester (disabled): more than 5 "
                                  "transactions within 30 s (was v1: more than 3 transactions "
                                  "within 60 s)")
    ruleset, deleted = ruleset.apply("velocity", None, HORIZON_US, 3)
    assert deleted.describe() == "rule velocity deleted (was v2)"
    _, refused = ruleset.apply("velocity", "x" * 3000, HORIZON_US, 4)
    assert refused.describe().startswith("rule velocity refused: not valid JSON")

    for change in (new, changed, deleted, refused):
        record = change.to_record()
        assert set(record) == RECORD_FIELDS
        json.dumps(record)  # a flat, serialisable row
    row = changed.to_record()
    assert (row["status"], row["version"], row["kind"], row["enabled"]) == (
        APPLIED, 2, "velocity", False)
    assert json.loads(row["params"]) == {"count": 5, "window_seconds": 30.0}
    assert (row["previous_version"], json.loads(row["previous_params"])) == (
        1, {"count": 3, "window_seconds": 60.0})
    assert (row["updated_at"], row["updated_by"], row["offset"]) == (STAMP, "tester", 2)
    row = deleted.to_record()
    assert (row["status"], row["version"], row["kind"], row["previous_version"]) == (
        DELETED, None, "velocity", 2)
    row = refused.to_record()
    assert (row["status"], row["version"], row["offset"]) == (REFUSED, None, 4)
    assert row["raw"] == "x" * 2000  # truncated
    assert new.to_record()["previous_version"] is None


def test_alert_record_matches_the_contract() -> None:
    records = [tx(t, amount=10.0 + t, location=loc, tx_id=f"t{t}")
               for t, loc in [(0, "Lyon"), (20, "Paris"), (40, "Lyon"), (60, "Lyon")]]
    driver = run(one_batch(*records), [definition("velocity")])
    alert = alert_record(driver.alerts[0], DETECTED_AT)
    assert alert == {
        "alert_id": schemas.alert_id("velocity", "u1", ["t0", "t20", "t40", "t60"]),
        "rule": "velocity", "rule_version": 1, "user_id": "u1",
        "window_start": BASE, "window_end": BASE + timedelta(seconds=60),
        "transaction_count": 4, "total_amount": 160.0, "locations": ["Lyon", "Paris"],
        "transaction_ids": ["t0", "t20", "t40", "t60"],
        "reason": "4 transactions within 60 s (limit 3)", "detected_at": DETECTED_AT,
        "risk_score": amount_score(70.0),  # the trigger, t60
        "score_reasons": alert["score_reasons"],
    }
    assert alert["score_reasons"] and alert["score_reasons"][0].startswith("amount 70.00")


def test_default_definitions_are_each_kinds_defaults() -> None:
    defaults = default_definitions()
    # ml_score needs a model first: a team turns it on, an empty topic does not get it.
    assert [d.rule_id for d in defaults] == [k for k in KINDS if k != "ml_score"]
    for rule in defaults:
        assert (rule.kind, rule.version, rule.enabled, rule.updated_by) == (
            rule.rule_id, 1, True, DEFAULTS_AUTHOR)
        assert dict(rule.params) == dict(KINDS[rule.kind].defaults)
    # The contract's default numbers.
    assert {d.rule_id: d.summary() for d in defaults} == {
        "high_value": "one transaction above 3500",
        "velocity": "more than 3 transactions within 60 s",
        "multi_location": "2 or more locations within 120 s",
        "paypal_micro": "more than 3 PayPal payments under 50 within 240 s",
    }
    tuned = {d.rule_id: d for d in default_definitions({"velocity": {"count": 5}})}
    assert tuned["velocity"].params == {"count": 5, "window_seconds": 60.0}


def test_kind_registry() -> None:
    """Every kind declares what the dashboard and console need, and belongs to one family."""
    colours = set()
    for name, kind in KINDS.items():
        assert kind.name == name and kind_of(name) is kind
        assert re.fullmatch(r"#[0-9a-f]{6}", kind.colour), name
        assert re.fullmatch(r"\d+(;\d+)*", kind.ansi), name
        assert kind.title
        colours.add(kind.colour)
        assert isinstance(kind, SpanKind | TransactionKind)
        assert [p.name for p in kind.params] == list(kind.defaults)
        assert kind.validate(kind.defaults) == dict(kind.defaults)
    assert len(colours) == len(KINDS)
    with pytest.raises(KeyError, match=r"unknown kind 'teleport' \(known: high_value, velocity"):
        kind_of("teleport")
