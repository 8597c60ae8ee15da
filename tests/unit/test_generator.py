"""The generator's ground truth: determinism, schema, and — checked by brute force over every
span — normal traffic never satisfies a rule while every injected episode satisfies exactly its
own rule, so precision and recall measured against the labels are meaningful. The exact checks
run on the clean stream (``NO_SCENARIOS``); the scenario mix (hard negatives, evading fraud) is
tested in test_hard_negatives.py."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from fraudstream.rules import default_definitions
from fraudstream.schemas import (
    HIGH_VALUE,
    MULTI_LOCATION,
    OPTIONAL_FIELDS,
    PAYMENT_METHODS,
    PAYPAL,
    PAYPAL_MICRO,
    REQUIRED_FIELDS,
    RULES,
    TRANSACTION_FIELDS,
    VELOCITY,
    Transaction,
    format_timestamp,
    parse_timestamp,
)
from fraudstream.settings import DetectorSettings
from producer import generator as gen
from producer.generator import (
    CITIES,
    CITY_COUNTRY,
    CURRENCY_BY_COUNTRY,
    HARD_NEGATIVES,
    NO_SCENARIOS,
    TransactionGenerator,
    iter_replay,
    to_ms,
    users_needed,
)

START = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

# --- a brute-force reference detector (default thresholds, inclusive any-span windows) ---------


@dataclasses.dataclass(frozen=True)
class Limits:
    high_value: float = 3500.0
    velocity_count: int = 3
    velocity_ms: int = 60_000
    location_count: int = 2
    location_ms: int = 120_000
    micro_count: int = 3
    micro_amount: float = 50.0
    micro_ms: int = 240_000


def _windows(events: Sequence[tuple[int, dict]], span_ms: int) -> Iterable[list[dict]]:
    """Every maximal group of a user's events that starts at one event and spans <= span_ms.
    Any set of events within span_ms lies inside the group that starts at its earliest."""
    for i, (start, _) in enumerate(events):
        group = []
        for at, tx in events[i:]:
            if at - start > span_ms:
                break
            group.append(tx)
        yield group


def participants(transactions: Sequence[Transaction], limits: Limits = Limits()
                 ) -> dict[str, set[str]]:
    """rule -> ids of transactions that belong to some set satisfying the rule."""
    by_user: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for tx in transactions:
        by_user[tx["user_id"]].append((to_ms(parse_timestamp(tx["timestamp"])), tx))
    hits: dict[str, set[str]] = {rule: set() for rule in RULES}
    for events in by_user.values():
        events.sort(key=lambda pair: pair[0])
        for _, tx in events:
            if tx["amount"] > limits.high_value:
                hits[HIGH_VALUE].add(tx["transaction_id"])
        for group in _windows(events, limits.velocity_ms):
            if len(group) > limits.velocity_count:
                hits[VELOCITY].update(tx["transaction_id"] for tx in group)
        for group in _windows(events, limits.location_ms):
            if len({tx["location"] for tx in group}) >= limits.location_count:
                hits[MULTI_LOCATION].update(tx["transaction_id"] for tx in group)
        micro = [(at, tx) for at, tx in events
                 if tx["payment_method"] == PAYPAL and tx["amount"] < limits.micro_amount]
        for group in _windows(micro, limits.micro_ms):
            if len(group) > limits.micro_count:
                hits[PAYPAL_MICRO].update(tx["transaction_id"] for tx in group)
    return hits


def episodes(transactions: Sequence[Transaction]) -> list[list[Transaction]]:
    """Labelled events grouped into episodes: same user and pattern, gaps under 240 s."""
    by_key: dict[tuple[str, str], list[Transaction]] = defaultdict(list)
    for tx in transactions:
        if tx["is_fraud"]:
            by_key[(tx["user_id"], tx["fraud_pattern"])].append(tx)
    out: list[list[Transaction]] = []
    for events in by_key.values():
        events.sort(key=lambda tx: tx["timestamp"])
        current = [events[0]]
        for tx in events[1:]:
            gap = parse_timestamp(tx["timestamp"]) - parse_timestamp(current[-1]["timestamp"])
            if gap > timedelta(seconds=240):
                out.append(current)
                current = []
            current.append(tx)
        out.append(current)
    return out


def span_seconds(events: Sequence[Transaction]) -> float:
    times = [parse_timestamp(tx["timestamp"]) for tx in events]
    return (max(times) - min(times)).total_seconds()


def assert_ground_truth(transactions: Sequence[Transaction]) -> dict[str, set[str]]:
    """Precision 1 and recall 1 of the labels against the brute-force detector."""
    hits = participants(transactions)
    by_id = {tx["transaction_id"]: tx for tx in transactions}
    for rule, ids in hits.items():
        wrong = [by_id[i] for i in ids if by_id[i]["fraud_pattern"] != rule]
        assert not wrong, f"{rule} fired on events not labelled {rule}: {wrong[:3]}"
    for tx in transactions:
        if tx["is_fraud"]:
            assert tx["transaction_id"] in hits[tx["fraud_pattern"]], f"undetected: {tx}"
    return hits


def _tx(n: int, seconds: float, *, amount: float = 20.0, method: str = "card",
        location: str = "Lyon", pattern: str | None = None) -> Transaction:
    return {
        "transaction_id": f"t{n}", "user_id": "u1", "amount": amount, "currency": "EUR",
        "timestamp": format_timestamp(START + timedelta(seconds=seconds)), "location": location,
        "payment_method": method, "merchant_id": "m001", "device_ip": "203.0.113.7",
        "is_fraud": pattern is not None, "fraud_pattern": pattern,
    }


def test_reference_checker_uses_inclusive_any_span_windows() -> None:
    # 4 within exactly 60 s fire velocity; 4 spanning 60.001 s do not.
    assert participants([_tx(i, s) for i, s in enumerate((0, 20, 40, 60))])[VELOCITY]
    assert not participants([_tx(i, s) for i, s in enumerate((0, 20, 40, 60.001))])[VELOCITY]
    # A span not aligned to any window boundary still counts.
    assert participants([_tx(i, s) for i, s in enumerate((0, 100, 130, 145, 159))])[VELOCITY] == {
        "t1", "t2", "t3", "t4"}
    assert participants([_tx(0, 0), _tx(1, 120, location="Oslo")])[MULTI_LOCATION]
    assert not participants([_tx(0, 0), _tx(1, 120.001, location="Oslo")])[MULTI_LOCATION]
    micro = [_tx(i, 80 * i, method=PAYPAL, amount=49.99) for i in range(4)]
    assert participants(micro)[PAYPAL_MICRO]
    assert not participants([*micro[:3], _tx(3, 240, method=PAYPAL, amount=50.0)])[PAYPAL_MICRO]
    assert not participants([_tx(0, 0, amount=3500.0)])[HIGH_VALUE]
    assert participants([_tx(0, 0, amount=3500.01)])[HIGH_VALUE] == {"t0"}
    with pytest.raises(AssertionError):
        assert_ground_truth([_tx(i, s) for i, s in enumerate((0, 20, 40, 60))])
    with pytest.raises(AssertionError):
        assert_ground_truth([_tx(0, 0, pattern=VELOCITY)])


@pytest.fixture(scope="module")
def stream() -> list[Transaction]:
    """The default generator: fraud episodes and the default scenario mix."""
    return TransactionGenerator(users=5000, fraud_ratio=0.03, seed=11).generate(
        20_000, START, rate=40)


@pytest.fixture(scope="module")
def clean_stream() -> list[Transaction]:
    """Fraud episodes only: the labels are exact ground truth of the rules."""
    return TransactionGenerator(users=5000, fraud_ratio=0.03, seed=11,
                                scenario_rates=NO_SCENARIOS).generate(20_000, START, rate=40)


# --- tests ---------------------------------------------------------------------------------------


def test_same_seed_same_stream_and_different_seed_differs() -> None:
    first = TransactionGenerator(users=500, seed=3).generate(3000, START, rate=20)
    again = TransactionGenerator(users=500, seed=3).generate(3000, START, rate=20)
    other = TransactionGenerator(users=500, seed=4).generate(3000, START, rate=20)
    assert first == again
    assert first != other
    assert len({tx["transaction_id"] for tx in first}) == 3000


def test_wall_clock_mode_is_deterministic_for_the_same_clock_readings() -> None:
    clock = [START + timedelta(milliseconds=37 * i) for i in range(2000)]
    a, b = TransactionGenerator(users=800, seed=9), TransactionGenerator(users=800, seed=9)
    assert [a.next(t) for t in clock] == [b.next(t) for t in clock]


def test_unseeded_generator_reports_its_seed_for_replay() -> None:
    first = TransactionGenerator(users=50)
    replay = TransactionGenerator(users=50, seed=first.seed)
    assert first.generate(200, START, 10) == replay.generate(200, START, 10)


def test_every_event_follows_the_contract(stream: list[Transaction]) -> None:
    assert len(stream) == 20_000
    for tx in stream:
        assert tuple(tx) == TRANSACTION_FIELDS
        for name, types in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
            assert isinstance(tx[name], types) and not (
                isinstance(tx[name], bool) and bool not in types), (name, tx)
        assert tx["amount"] > 0 and round(tx["amount"], 2) == tx["amount"]
        assert tx["payment_method"] in PAYMENT_METHODS
        assert tx["location"] in CITIES
        assert tx["timestamp"] == format_timestamp(parse_timestamp(tx["timestamp"]))
        assert tx["user_id"].startswith("u") and tx["merchant_id"].startswith("m")
        if tx["is_fraud"]:
            assert tx["fraud_pattern"] in RULES
        else:
            assert tx["fraud_pattern"] is None or tx["fraud_pattern"] in HARD_NEGATIVES
    json.dumps(stream)  # JSON-ready as is


def test_simulated_clock_runs_at_the_nominal_rate(stream: list[Transaction]) -> None:
    normal = [tx for tx in stream if tx["fraud_pattern"] is None]
    first, last = parse_timestamp(stream[0]["timestamp"]), parse_timestamp(normal[-1]["timestamp"])
    assert first == START
    assert timedelta(seconds=490) < last - first <= timedelta(seconds=500)


def test_users_keep_home_currency_device_and_mostly_their_city(stream: list[Transaction]) -> None:
    per_user: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for tx in stream:
        per_user[tx["user_id"]].add((tx["currency"], tx["device_ip"]))
    assert all(len(v) == 1 for v in per_user.values())
    currencies = Counter(tx["currency"] for tx in stream)
    assert {"EUR", "USD", "GBP"} <= set(currencies)
    assert len({tx["user_id"] for tx in stream}) > 3000


def test_labels_are_exact_ground_truth(clean_stream: list[Transaction]) -> None:
    hits = assert_ground_truth(clean_stream)
    assert all(hits[rule] for rule in RULES), "every rule must be exercised"


def test_normal_traffic_alone_never_fires_a_rule(stream: list[Transaction]) -> None:
    normal = [tx for tx in stream if tx["fraud_pattern"] is None]
    assert all(not ids for ids in participants(normal).values())


def test_the_clean_stream_holds_only_normal_traffic_and_fraud_episodes(
        clean_stream: list[Transaction]) -> None:
    assert {tx["fraud_pattern"] for tx in clean_stream} == {None, *RULES}
    assert all(tx["is_fraud"] is (tx["fraud_pattern"] is not None) for tx in clean_stream)


def test_episodes_have_the_documented_shapes(clean_stream: list[Transaction]) -> None:
    found = episodes(clean_stream)
    shapes = Counter(ep[0]["fraud_pattern"] for ep in found)
    assert all(shapes[rule] >= 20 for rule in RULES), shapes
    for ep in found:
        pattern = ep[0]["fraud_pattern"]
        amounts = [tx["amount"] for tx in ep]
        if pattern == HIGH_VALUE:
            assert len(ep) == 1 and 3500 < amounts[0] <= 12_000
        elif pattern == VELOCITY:
            assert 4 <= len(ep) <= 7 and 10 <= span_seconds(ep) <= 50
            assert len({tx["location"] for tx in ep}) == 1 and max(amounts) <= 3500
        elif pattern == MULTI_LOCATION:
            assert 2 <= len(ep) <= 3 and 30 <= span_seconds(ep) <= 100
            assert len({tx["location"] for tx in ep}) >= 2 and max(amounts) <= 3500
        else:
            assert 4 <= len(ep) <= 6 and 60 <= span_seconds(ep) <= 200
            assert all(tx["payment_method"] == PAYPAL and 1 <= tx["amount"] <= 49.99 for tx in ep)


def test_episode_counts_match_the_started_counter() -> None:
    generator = TransactionGenerator(users=3000, fraud_ratio=0.05, seed=5,
                                     scenario_rates=NO_SCENARIOS)
    events = generator.generate(8000, START, rate=20)
    assert Counter(ep[0]["fraud_pattern"] for ep in episodes(events)) == Counter(
        {k: v for k, v in generator.episodes_started.items() if v})
    assert generator.pending == 0


def test_too_few_users_for_the_rate_adds_users_instead_of_breaking_the_guarantee() -> None:
    generator = TransactionGenerator(users=100, fraud_ratio=0.05, seed=2,
                                     scenario_rates=NO_SCENARIOS)
    events = generator.generate(6000, START, rate=50)
    assert generator.extra_users > 0
    assert len({tx["user_id"] for tx in events}) > 100
    assert_ground_truth(events)


def test_long_quiet_stream_with_travel_keeps_the_guarantee() -> None:
    # Few users over a long time: each transacts often, some change city between bursts.
    generator = TransactionGenerator(users=150, fraud_ratio=0.02, seed=8, travel_probability=0.2,
                                     scenario_rates=NO_SCENARIOS)
    events = generator.generate(12_000, START, rate=4)
    assert generator.extra_users == 0
    places: dict[str, set[str]] = defaultdict(set)
    for tx in events:
        if not tx["is_fraud"]:
            places[tx["user_id"]].add(tx["location"])
    assert sum(len(p) > 1 for p in places.values()) > 20
    assert_ground_truth(events)


def test_users_needed_keeps_the_pool_sufficient() -> None:
    rate, ratio = 20, 0.05
    generator = TransactionGenerator(users=users_needed(rate, ratio), fraud_ratio=ratio, seed=6)
    generator.generate(rate * 800, START, rate=rate)
    assert generator.extra_users == 0
    assert users_needed(100, 0.0, NO_SCENARIOS) == 2500
    assert users_needed(100, 0.02, NO_SCENARIOS) > 2500
    assert users_needed(100, 0.02) > users_needed(100, 0.02, NO_SCENARIOS)
    assert users_needed(100, 0.02) <= 5000, "the default pool covers the default peak rate"


def test_wall_clock_stream_at_high_rate_keeps_the_guarantee() -> None:
    generator = TransactionGenerator(users=500, fraud_ratio=0.05, seed=4,
                                     scenario_rates=NO_SCENARIOS)
    base = to_ms(START)
    events = [generator.next_at(base + i // 20) for i in range(20_000)]  # 20 000 tx/s
    events += [generator.pop_due(0, force=True) for _ in range(generator.pending)]
    assert generator.pending == 0
    assert_ground_truth(events)


def test_deadline_refuses_episodes_that_could_not_finish() -> None:
    generator = TransactionGenerator(users=200, fraud_ratio=1.0, seed=1)
    base = to_ms(START)
    events = [generator.next_at(base + i, deadline=lambda _pending: base + 1000)
              for i in range(1000)]
    # Only the single-event pattern can finish within the deadline; the rest became normal.
    assert generator.pending == 0
    assert {tx["fraud_pattern"] for tx in events} == {HIGH_VALUE, None}
    assert sum(generator.episodes_started.values()) == generator.episodes_started[HIGH_VALUE]


def test_clock_stepping_back_does_not_break_spacing() -> None:
    generator = TransactionGenerator(users=30, fraud_ratio=0.0, seed=1,
                                     scenario_rates=NO_SCENARIOS)
    base = to_ms(START)
    clock = [base + 100 * i - (50_000 if i % 7 == 0 else 0) for i in range(3000)]
    events = [generator.next_at(t) for t in clock]
    assert all(not ids for ids in participants(events).values())


def test_rule_constants_are_the_default_rules_parameters() -> None:
    """The generator's guarantees, and the reference detector above, are built on the default
    rules (multi_location episodes are built for two places)."""
    defaults = {d.rule_id: dict(d.params) for d in default_definitions()}
    built_on = {
        HIGH_VALUE: {"amount": gen.HIGH_VALUE_AMOUNT},
        VELOCITY: {"count": gen.VELOCITY_COUNT,
                   "window_seconds": gen.VELOCITY_WINDOW_MS / 1000},
        MULTI_LOCATION: {"count": 2, "window_seconds": gen.MULTI_LOCATION_WINDOW_MS / 1000},
        PAYPAL_MICRO: {"count": gen.PAYPAL_MICRO_COUNT, "amount": gen.PAYPAL_MICRO_AMOUNT,
                       "window_seconds": gen.PAYPAL_MICRO_WINDOW_MS / 1000},
    }
    assert built_on == defaults
    limits = Limits()
    reference = {
        HIGH_VALUE: {"amount": limits.high_value},
        VELOCITY: {"count": limits.velocity_count, "window_seconds": limits.velocity_ms / 1000},
        MULTI_LOCATION: {"count": limits.location_count,
                         "window_seconds": limits.location_ms / 1000},
        PAYPAL_MICRO: {"count": limits.micro_count, "amount": limits.micro_amount,
                       "window_seconds": limits.micro_ms / 1000},
    }
    assert reference == defaults
    settings = {f.name: f.default for f in dataclasses.fields(DetectorSettings)}
    assert {rule: {name: settings[f"{rule}_{name}"] for name in params}
            for rule, params in defaults.items()} == defaults
    for value in (gen.VELOCITY_WINDOW_MS, gen.MULTI_LOCATION_WINDOW_MS, gen.PAYPAL_MICRO_WINDOW_MS,
                 gen.NORMAL_MIN_GAP_MS, gen.ISOLATION_MS):
        assert type(value) is int, "event times are whole milliseconds"


def test_cities_table_is_complete_and_plausible() -> None:
    assert 35 <= len(CITIES) <= 50
    for city, (lat, lon) in CITIES.items():
        assert -90 <= lat <= 90 and -180 <= lon <= 180
        assert CURRENCY_BY_COUNTRY[CITY_COUNTRY[city]]
    assert set(CITY_COUNTRY) == set(CITIES)


def test_to_ms_is_exact() -> None:
    for micro in (0, 999, 1000, 123_456, 999_999):
        moment = START.replace(microsecond=micro)
        assert to_ms(moment) == to_ms(START) + micro // 1000
    assert to_ms(datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == to_ms(
        datetime(2026, 1, 1, tzinfo=UTC))


def test_fast_timestamp_formatting_matches_the_contract() -> None:
    formatter = gen._TimestampFormatter()
    base = to_ms(START)
    for ms in (base, base + 1, base + 999, base + 1000, base + 86_400_123, base - 1):
        moment = datetime.fromtimestamp(ms / 1000, UTC)
        assert formatter(ms) == format_timestamp(moment)


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError):
        TransactionGenerator(users=0)
    with pytest.raises(ValueError):
        TransactionGenerator(fraud_ratio=1.5)
    with pytest.raises(ValueError, match="unknown scenario"):
        TransactionGenerator(users=10, scenario_rates={"velocity": 0.1})
    with pytest.raises(ValueError, match="legit_traveller"):
        TransactionGenerator(users=10, scenario_rates={"legit_traveller": 1.5})
    with pytest.raises(ValueError):
        TransactionGenerator(users=10).generate(10, START, rate=0)
    with pytest.raises(ValueError):
        TransactionGenerator(users=10).next(datetime(2026, 1, 1))  # noqa: DTZ001


def test_replay_sends_each_line_unchanged_keyed_by_user(tmp_path: Path) -> None:
    good = json.dumps({"user_id": "u7", "amount": 1.5})
    path = tmp_path / "replay.jsonl"
    path.write_bytes(
        f"{good}\n".encode() + b"not json\n\n" + b'{"user_id": 5}\r\n' + b"[1, 2]\n"
        + '{"user_id":"é"}'.encode()
    )
    assert list(iter_replay(path)) == [
        (b"u7", good.encode()),
        (None, b"not json"),
        (None, b'{"user_id": 5}'),
        (None, b"[1, 2]"),
        ("é".encode(), '{"user_id":"é"}'.encode()),
    ]
