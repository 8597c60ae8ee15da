"""The generator's scenario mix (docs/traffic.md): hard negatives trip the rule they imitate at
their documented rate (``TRIP_RATES``) and no other, night shifts trip nothing, evading fraud
never trips its rule, the labels say which is which, a rate of 0 switches a scenario off, the
stream stays deterministic, and the default mix makes every rule's precision and recall fall
below 1 as measured by ``fraudstream.quality.quality_report`` over the oracle's alerts.

Trip rates are measured with one scenario alone at a high rate (8 % of events) on a slow
simulated clock (5 tx/s, so the long scenarios fit in the stream), which gives hundreds of
episodes and nothing else that could fire. Tolerance: 0.08 around the documented
rate, over three binomial standard deviations for 300 episodes at rate 1/2 (the seeds are fixed,
so the test is deterministic; the margin is there so that a reseed does not fail it)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import pandas as pd
import pytest

from fraudstream.quality import quality_report, rule_spans
from fraudstream.rules.oracle import expected_alerts
from fraudstream.schemas import RULES, Transaction, parse_timestamp
from fraudstream.settings import DetectorSettings, ProducerSettings, SettingsError, load_settings
from producer.generator import (
    CITY_UTC_OFFSET,
    DEFAULT_SCENARIO_RATES,
    EVADING,
    HARD_NEGATIVES,
    IMITATES,
    ISOLATION_MS,
    LEGIT_NIGHT_SHIFT,
    NIGHT_FROM_HOUR,
    NIGHT_TO_HOUR,
    NO_SCENARIOS,
    SCENARIOS,
    TRIP_RATES,
    TransactionGenerator,
    scenario_rates,
    to_ms,
    users_needed,
)

#: 10:00 UTC is 02:00-05:00 in the US cities: night shifts can start there.
START = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
#: 15:00 UTC is day in every city of the generator (07:00 in Los Angeles, 17:00 in Helsinki).
DAY = datetime(2026, 11, 22, 15, 0, tzinfo=UTC)
TOLERANCE = 0.08
ALONE_RATE = 0.08
RATE = 5.0

IMITATING = [name for name in HARD_NEGATIVES if IMITATES[name] is not None]


def alone(name: str, rate: float = ALONE_RATE) -> dict[str, float]:
    return {**NO_SCENARIOS, name: rate}


def generate_alone(name: str, count: int = 8000, seed: int = 7, start: datetime = START,
                   users: int = 0) -> tuple[TransactionGenerator, list[Transaction]]:
    """Only scenario ``name`` (no fraud episodes, no other scenario) over normal traffic."""
    rates = alone(name)
    generator = TransactionGenerator(users=max(users, users_needed(RATE, 0.0, rates)),
                                     fraud_ratio=0.0, seed=seed, scenario_rates=rates)
    return generator, generator.generate(count, start, rate=RATE)


def episodes_of(events: Sequence[Transaction], pattern: str) -> list[list[Transaction]]:
    """Events labelled ``pattern``, per user, split where a gap exceeds the silence that
    separates two episodes of one user."""
    by_user: dict[str, list[Transaction]] = defaultdict(list)
    for tx in events:
        if tx["fraud_pattern"] == pattern:
            by_user[tx["user_id"]].append(tx)
    out: list[list[Transaction]] = []
    for txs in by_user.values():
        txs.sort(key=lambda tx: tx["timestamp"])
        current = [txs[0]]
        for tx in txs[1:]:
            if to_ms(parse_timestamp(tx["timestamp"])) - to_ms(
                    parse_timestamp(current[-1]["timestamp"])) > ISOLATION_MS:
                out.append(current)
                current = []
            current.append(tx)
        out.append(current)
    return out


def report_of(events: Sequence[Transaction]) -> pd.DataFrame:
    """The quality report of the four rules over the oracle's alerts."""
    alerts = pd.DataFrame(expected_alerts(events),
                          columns=["alert_id", "rule", "user_id", "transaction_ids"])
    frame = pd.DataFrame(list(events)).rename(columns={"timestamp": "event_time"})
    return quality_report(frame, alerts, rule_spans(DetectorSettings())).loc[list(RULES)]


def local_hour(tx: Transaction) -> int:
    moment = to_ms(parse_timestamp(tx["timestamp"])) + CITY_UTC_OFFSET[tx["location"]] * 3_600_000
    return moment // 3_600_000 % 24


# --- hard negatives ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMITATING)
def test_hard_negative_trips_the_rule_it_imitates_at_the_documented_rate(name: str) -> None:
    generator, events = generate_alone(name)
    rule = IMITATES[name]
    found = episodes_of(events, name)
    assert len(found) == generator.scenarios_started[name] >= 300
    episode_of = {tx["transaction_id"]: k for k, ep in enumerate(found) for tx in ep}
    alerts = expected_alerts(events)
    assert {a["rule"] for a in alerts} == {rule}, "it trips its rule and no other"
    tripped = Counter()
    for alert in alerts:
        owners = {episode_of.get(i) for i in alert["transaction_ids"]}
        assert len(owners) == 1 and None not in owners, "evidence lies within one episode"
        tripped[owners.pop()] += 1
    assert set(tripped.values()) == {1}, "a tripped episode raises one alert"
    measured = len(tripped) / len(found)
    assert abs(measured - TRIP_RATES[name]) <= TOLERANCE, (name, measured, len(found))
    assert generator.pending == 0


@pytest.mark.parametrize("name", HARD_NEGATIVES)
def test_hard_negatives_are_labelled_legitimate(name: str) -> None:
    _, events = generate_alone(name, count=3000)
    labelled = [tx for tx in events if tx["fraud_pattern"] is not None]
    assert labelled, name
    assert all(tx["fraud_pattern"] == name and tx["is_fraud"] is False for tx in labelled)
    assert name not in RULES


def test_night_shift_pays_at_local_night_and_trips_nothing() -> None:
    # Only the US cities (10 of 42) are at night: enough users that some are always free there.
    generator, events = generate_alone(LEGIT_NIGHT_SHIFT, users=3000)
    shifts = episodes_of(events, LEGIT_NIGHT_SHIFT)
    assert len(shifts) == generator.scenarios_started[LEGIT_NIGHT_SHIFT] >= 300
    assert expected_alerts(events) == []
    hours = Counter(local_hour(tx) for ep in shifts for tx in ep)
    assert all(h >= NIGHT_FROM_HOUR or h < NIGHT_TO_HOUR for h in hours), hours
    assert all(2 <= len(ep) <= 3 and len({tx["location"] for tx in ep}) == 1 for ep in shifts)


def test_no_night_shift_starts_while_it_is_day_everywhere() -> None:
    generator, events = generate_alone(LEGIT_NIGHT_SHIFT, count=3000, start=DAY)
    assert generator.scenarios_started[LEGIT_NIGHT_SHIFT] == 0
    assert {tx["fraud_pattern"] for tx in events} == {None}


# --- evading fraud -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EVADING))
def test_evading_fraud_never_trips_its_rule(name: str) -> None:
    generator, events = generate_alone(name, count=6000)
    rule = EVADING[name]
    assert expected_alerts(events) == [], "no rule fires at all"
    labelled = [tx for tx in events if tx["fraud_pattern"] is not None]
    assert all(tx["fraud_pattern"] == rule and tx["is_fraud"] is True for tx in labelled)
    report = report_of(events)
    started = generator.scenarios_started[name]
    assert started >= 100
    # One labelled episode per scenario as quality_report splits them, none detected.
    assert report.loc[rule, "episodes"] == started
    assert report.loc[rule, "detected_episodes"] == 0 and report.loc[rule, "recall"] == 0.0
    assert generator.episodes_started == dict.fromkeys(RULES, 0), "not counted as rule episodes"


# --- switches, determinism, the default mix -----------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_rate_zero_disables_a_scenario(name: str) -> None:
    generator = TransactionGenerator(users=2000, seed=3, scenario_rates={name: 0})
    events = generator.generate(3000, START, rate=RATE)
    started = generator.scenarios_started
    assert started[name] == 0
    assert sum(started.values()) > 0
    if name in HARD_NEGATIVES:
        assert name not in {tx["fraud_pattern"] for tx in events}


def test_scales_select_the_default_rates() -> None:
    assert scenario_rates() == dict(DEFAULT_SCENARIO_RATES)
    assert scenario_rates(0, 0) == dict(NO_SCENARIOS)
    doubled = scenario_rates(2.0, 0.0)
    assert all(doubled[n] == 2 * DEFAULT_SCENARIO_RATES[n] for n in HARD_NEGATIVES)
    assert all(doubled[n] == 0 for n in EVADING)
    assert set(TRIP_RATES) == set(SCENARIOS) == set(DEFAULT_SCENARIO_RATES)
    assert not set(SCENARIOS) & set(RULES), "scenario names are not rule ids"


def test_the_mix_is_deterministic_per_seed() -> None:
    def run(seed: int) -> list[Transaction]:
        return TransactionGenerator(users=1500, seed=seed).generate(4000, START, rate=RATE)

    first, again, other = run(5), run(5), run(6)
    assert first == again and first != other
    assert len({tx["fraud_pattern"] for tx in first} & set(HARD_NEGATIVES)) >= 3
    clock = [to_ms(START) + 37 * i for i in range(3000)]
    a, b = TransactionGenerator(users=800, seed=9), TransactionGenerator(users=800, seed=9)
    assert [a.next_at(t) for t in clock] == [b.next_at(t) for t in clock]


def test_producer_settings_select_the_scales_and_refuse_bad_values() -> None:
    settings, _ = load_settings(ProducerSettings, [], {})
    assert (settings.hard_negative_scale, settings.evading_scale) == (1.0, 1.0)
    settings, _ = load_settings(ProducerSettings, ["--evading-scale", "0"],
                                {"PRODUCER_HARD_NEGATIVE_SCALE": "2.5"})
    assert (settings.hard_negative_scale, settings.evading_scale) == (2.5, 0.0)
    for argv, environ, key in (
            ([], {"PRODUCER_HARD_NEGATIVE_SCALE": "-1"}, "PRODUCER_HARD_NEGATIVE_SCALE"),
            (["--evading-scale", "11"], {}, "PRODUCER_EVADING_SCALE"),
            (["--hard-negative-scale", "lots"], {}, "--hard-negative-scale")):
        with pytest.raises(SettingsError) as error:
            load_settings(ProducerSettings, argv, environ)
        assert key in error.value.key


@pytest.fixture(scope="module")
def default_mix() -> tuple[TransactionGenerator, list[Transaction]]:
    generator = TransactionGenerator(seed=1)
    return generator, generator.generate(20_000, START, rate=10)


def test_default_mix_gives_every_rule_precision_and_recall_below_one(
        default_mix: tuple[TransactionGenerator, list[Transaction]]) -> None:
    generator, events = default_mix
    report = report_of(events)
    for rule in RULES:
        row = report.loc[rule]
        assert 0.4 < row["precision"] < 0.9, (rule, row.to_dict())
        assert 0.5 < row["recall"] < 1.0, (rule, row.to_dict())
    assert all(generator.scenarios_started.values()), generator.scenarios_started
    assert generator.pending == 0 and generator.extra_users == 0


def test_default_mix_alerts_come_from_one_episode_labelled_their_rule_or_its_imitator(
        default_mix: tuple[TransactionGenerator, list[Transaction]]) -> None:
    _, events = default_mix
    label = {tx["transaction_id"]: tx["fraud_pattern"] for tx in events}
    imitator: Mapping[str, str] = {rule: name for name, rule in IMITATES.items() if rule}
    for alert in expected_alerts(events):
        labels = {label[i] for i in alert["transaction_ids"]}
        assert labels in ({alert["rule"]}, {imitator[alert["rule"]]}), alert
