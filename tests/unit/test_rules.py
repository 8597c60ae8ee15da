"""The rule engine against the brute-force oracle, and the SPEC's boundary cases."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fraudstream import schemas
from spark_job.oracle import expected_alerts
from spark_job.rules import MICROS, RuleConfig, Tx, UserRuleState, high_value_alert

BASE = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
CONFIG = RuleConfig()


def tx(seconds: float, *, user: str = "u1", amount: float = 20.0, location: str = "Lyon",
       method: str = "card", tx_id: str | None = None) -> dict[str, Any]:
    moment = BASE + timedelta(seconds=seconds)
    return {
        "transaction_id": tx_id or f"{user}-{seconds:09.3f}-{location}-{method}",
        "user_id": user, "amount": amount, "currency": "EUR",
        "timestamp": schemas.format_timestamp(moment), "location": location,
        "payment_method": method, "merchant_id": "m001", "device_ip": "203.0.113.7",
    }


def to_tx(record: dict[str, Any]) -> Tx:
    moment = schemas.parse_timestamp(record["timestamp"])
    event_us = round(moment.timestamp() * MICROS)
    return Tx(event_us, record["transaction_id"], float(record["amount"]), record["location"],
              record["payment_method"], event_us)


def engine_alerts(records: list[dict[str, Any]], arrival_batches: int = 1,
                  config: RuleConfig = CONFIG) -> set[tuple[str, str]]:
    """Run the incremental engine over records in arrival order, split into batches."""
    states: dict[str, UserRuleState] = {}
    found: set[tuple[str, str]] = set()
    size = max(1, len(records) // arrival_batches)
    for start in range(0, len(records), size):
        batch: dict[str, list[Tx]] = {}
        for record in records[start:start + size]:
            batch.setdefault(record["user_id"], []).append(to_tx(record))
        for user, arrivals in batch.items():
            state = states.setdefault(user, UserRuleState())
            alerts, _ = state.process(user, arrivals, config)
            for arrival in arrivals:
                hv = high_value_alert(user, arrival, config)
                if hv:
                    alerts.append(hv)
            for alert in alerts:
                ids = [t.transaction_id for t in alert.evidence]
                found.add((alert.rule, schemas.alert_id(alert.rule, user, ids)))
            # Round-trip through the JSON state as Spark does between batches.
            states[user] = UserRuleState.from_json(state.to_json())
    return found


def oracle_alerts(records: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(a["rule"], a["alert_id"]) for a in expected_alerts(records, CONFIG)}


def rules_of(alerts: set[tuple[str, str]]) -> list[str]:
    return sorted(rule for rule, _ in alerts)


@pytest.mark.parametrize("offset", [0.0, 7.5, 15.0, 29.9, 30.0, 30.1, 44.0, 59.999])
def test_velocity_burst_found_wherever_it_sits_against_30s_boundaries(offset: float) -> None:
    records = [tx(offset + 12 * i) for i in range(4)]  # 4 in 36 s
    assert rules_of(engine_alerts(records)) == [schemas.VELOCITY]


def test_velocity_boundaries() -> None:
    assert engine_alerts([tx(0), tx(20), tx(40)]) == set()  # 3 in 60 s: at the limit
    assert engine_alerts([tx(0), tx(20), tx(40), tx(65)]) == set()  # 4 spanning 65 s
    assert rules_of(engine_alerts([tx(0), tx(20), tx(40), tx(60)])) == [schemas.VELOCITY]


def test_one_burst_one_alert_and_a_new_burst_after_lapse_alerts_again() -> None:
    burst = [tx(i * 2.0) for i in range(20)]
    assert rules_of(engine_alerts(burst)) == [schemas.VELOCITY]
    again = burst + [tx(300 + i * 2.0) for i in range(5)]
    assert rules_of(engine_alerts(again)) == [schemas.VELOCITY, schemas.VELOCITY]


def test_sustained_activity_is_one_episode_while_the_condition_holds() -> None:
    steady = [tx(i * 10.0) for i in range(60)]  # 7 per minute for 10 minutes: never lapses
    assert rules_of(engine_alerts(steady)) == [schemas.VELOCITY]


def test_high_value_is_strict() -> None:
    assert engine_alerts([tx(0, amount=3500.0)]) == set()
    assert rules_of(engine_alerts([tx(0, amount=3500.01)])) == [schemas.HIGH_VALUE]


def test_multi_location_boundaries() -> None:
    far_apart = [tx(0, location="Lyon"), tx(130, location="Paris")]
    assert engine_alerts(far_apart) == set()
    close = [tx(0, location="Lyon"), tx(120, location="Paris")]
    assert rules_of(engine_alerts(close)) == [schemas.MULTI_LOCATION]


def test_paypal_micro_boundaries() -> None:
    at_limit = [tx(i * 30, amount=50.0, method="PayPal") for i in range(6)]
    assert engine_alerts(at_limit) == set()  # 50.00 is not "under 50"
    micro = [tx(i * 30, amount=49.99, method="PayPal") for i in range(4)]  # 4 in 90 s
    assert rules_of(engine_alerts(micro)) == [schemas.PAYPAL_MICRO]
    spread = [tx(i * 80, amount=10, method="PayPal") for i in range(4)]  # 4 spanning 240 s
    assert rules_of(engine_alerts(spread)) == [schemas.PAYPAL_MICRO]
    wider = [tx(i * 81, amount=10, method="PayPal") for i in range(4)]  # spanning 243 s
    assert engine_alerts(wider) == set()


def test_out_of_order_arrival_within_the_watermark() -> None:
    in_order = [tx(0), tx(5), tx(10), tx(20)]
    shuffled = [in_order[0], in_order[2], in_order[3], in_order[1]]  # t=5 arrives last
    assert engine_alerts(shuffled, arrival_batches=4) == oracle_alerts(in_order)
    assert rules_of(oracle_alerts(in_order)) == [schemas.VELOCITY]


def test_resent_transaction_does_not_count_twice() -> None:
    records = [tx(0, tx_id="a"), tx(10, tx_id="b"), tx(20, tx_id="c")]
    resent = [*records, dict(records[2])]
    assert engine_alerts(resent, arrival_batches=4) == set()


def test_state_is_bounded_by_the_watermark() -> None:
    state = UserRuleState()
    state.process("u1", [to_tx(tx(i * 2.0)) for i in range(10)], CONFIG)
    assert state.episodes
    last_us = state.latest_event_us
    assert last_us is not None
    state.prune(last_us + CONFIG.max_window_us + 1, CONFIG)
    assert state.empty


def test_thresholds_come_from_config() -> None:
    strict = RuleConfig(velocity_count=1, velocity_window_us=5 * MICROS)
    assert rules_of(engine_alerts([tx(0), tx(5)], config=strict)) == [schemas.VELOCITY]
    assert engine_alerts([tx(0), tx(6)], config=strict) == set()


@pytest.mark.parametrize("seed", range(12))
def test_engine_matches_oracle_on_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    records = []
    clock = 0.0
    for i in range(400):
        clock += rng.expovariate(1 / 4.0)
        records.append(tx(
            round(clock, 3), user=f"u{rng.randrange(6)}", tx_id=f"t{i}",
            amount=rng.choice([10.0, 49.99, 50.0, 120.0, 3600.0]),
            location=rng.choice(["Lyon", "Lyon", "Lyon", "Paris"]),
            method=rng.choice(["card", "PayPal", "PayPal"]),
        ))
    expected = oracle_alerts(records)
    assert expected, "the random stream should exercise the rules"
    assert engine_alerts(records, arrival_batches=rng.choice([1, 3, 17, 400])) == expected
