"""The detection plan on static input in a real Spark session, checked against the oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from fraudstream import schemas
from fraudstream.rules import RuleSet, default_definitions
from fraudstream.rules.oracle import expected_alerts
from spark_job.batch import BatchProcessor, DetectorOutputs
from spark_job.detection_input import (
    DETECTION_INPUT_SCHEMA,
    RULE_RECORD,
    pack,
    rule_record_text,
)
from spark_job.plan import balanced_bucket_keys, build_detection_plan
from spark_job.sinks import ListSink
from spark_job.validation import TRANSACTION_ROW_SCHEMA, TRANSACTION_SPARK_SCHEMA

BASE = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DEFAULTS = RuleSet.of(default_definitions())


def tx(user: str, seconds: float, *, amount: float = 20.0, location: str = "Lyon",
       method: str = "card") -> dict[str, Any]:
    return {
        "transaction_id": f"{user}-{seconds:08.3f}", "user_id": user, "amount": amount,
        "currency": "EUR", "timestamp": schemas.format_timestamp(BASE + timedelta(seconds=seconds)),
        "location": location, "payment_method": method, "merchant_id": "m001",
        "device_ip": "203.0.113.9", "is_fraud": False, "fraud_pattern": None,
    }


def decoded_row(record: dict[str, Any], offset: int) -> dict[str, Any]:
    event_time = schemas.parse_timestamp(record["timestamp"])
    row = {k: v for k, v in record.items() if k != "timestamp"}
    row.update(key=record["user_id"], topic="transactions", partition=0, offset=offset,
               kafka_timestamp=event_time, event_time=event_time, error_reason=None,
               error_detail=None, raw_value=None)
    return row


def rejected_row(offset: int, reason: str) -> dict[str, Any]:
    row = dict.fromkeys(TRANSACTION_SPARK_SCHEMA.fieldNames())
    row.update(topic="transactions", partition=0, offset=offset, kafka_timestamp=BASE,
               error_reason=reason, error_detail="test", raw_value="{oops")
    return row


# Bursts placed at many offsets against 30-s boundaries, and the just-below-threshold cases.
CASES: list[dict[str, Any]] = []
for i, offset in enumerate([0, 5, 14.5, 29.999, 30, 31, 45, 59.5]):
    CASES += [tx(f"burst{i}", offset + 15 * k) for k in range(4)]  # 4 in 45 s
CASES += [tx("three", s) for s in (0, 20, 40)]  # 3 in 60 s: no alert
CASES += [tx("spread", s) for s in (0, 20, 40, 65)]  # 4 spanning 65 s: no alert
CASES += [tx("edge60", s) for s in (0, 20, 40, 60)]  # 4 spanning exactly 60 s: alert
CASES += [tx("pp50", s * 30, amount=50.0, method="PayPal") for s in range(5)]  # 50.00 isn't micro
CASES += [tx("pp", s * 50, amount=12.5, method="PayPal") for s in range(4)]  # 4 in 150 s
CASES += [tx("hv3500", 0, amount=3500.0), tx("hv", 0, amount=3500.01)]
CASES += [tx("cities130", 0, location="Lyon"), tx("cities130", 130, location="Paris")]
CASES += [tx("cities", 0, location="Lyon"), tx("cities", 100, location="Paris")]
# Out of order within the watermark: the earliest event of the burst arrives last.
CASES += [tx("late", s) for s in (10, 20, 30)] + [tx("late", 0)]


@pytest.fixture(scope="module")
def alerts_from_plan(spark) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    rows = [decoded_row(r, i) for i, r in enumerate(CASES)]
    rows += [rejected_row(10_000, schemas.INVALID_JSON), rejected_row(10_001, schemas.EMPTY_VALUE)]
    # Two chunks, as the source would yield them: rule rows and one archive row each.
    half = len(rows) // 2
    chunks = [pack(pa.Table.from_pylist(part, schema=TRANSACTION_ROW_SCHEMA))
              for part in (rows[:half], rows[half:])]
    frame = spark.createDataFrame(pa.Table.from_batches(chunks))
    alerts, dlq = ListSink(), ListSink()
    BatchProcessor(DetectorOutputs(alerts=[alerts], dlq=[dlq]))(
        build_detection_plan(frame, initial_rules=DEFAULTS, watermark_seconds=60,
                             horizon_seconds=600), 0)
    return alerts.records, dlq.records


def test_plan_matches_the_oracle_exactly(alerts_from_plan) -> None:  # type: ignore[no-untyped-def]
    alerts, _ = alerts_from_plan
    expected = {(a["rule"], a["user_id"], a["alert_id"]) for a in expected_alerts(CASES)}
    assert {(a["rule"], a["user_id"], a["alert_id"]) for a in alerts} == expected


def test_boundary_cases(alerts_from_plan) -> None:  # type: ignore[no-untyped-def]
    alerts, _ = alerts_from_plan
    by_user: dict[str, list[str]] = {}
    for alert in alerts:
        by_user.setdefault(alert["user_id"], []).append(alert["rule"])
    assert all(by_user.get(f"burst{i}") == [schemas.VELOCITY] for i in range(8))
    for quiet in ("three", "spread", "pp50", "hv3500", "cities130"):
        assert quiet not in by_user, quiet
    assert by_user["edge60"] == [schemas.VELOCITY]
    assert by_user["pp"] == [schemas.PAYPAL_MICRO]
    assert by_user["hv"] == [schemas.HIGH_VALUE]
    assert by_user["cities"] == [schemas.MULTI_LOCATION]
    assert by_user["late"] == [schemas.VELOCITY]


def test_alerts_carry_the_contract_fields(alerts_from_plan) -> None:  # type: ignore[no-untyped-def]
    alerts, _ = alerts_from_plan
    velocity = next(a for a in alerts if a["user_id"] == "edge60")
    assert set(velocity) == set(schemas.ALERT_FIELDS)
    assert velocity["transaction_count"] == 4
    assert velocity["window_end"] - velocity["window_start"] == timedelta(seconds=60)
    assert velocity["reason"] == "4 transactions within 60 s (limit 3)"
    assert velocity["detected_at"].tzinfo is not None


def test_rejected_rows_go_to_the_dead_letter_sinks(alerts_from_plan) -> None:  # type: ignore[no-untyped-def]
    _, dlq = alerts_from_plan
    assert sorted(r["reason"] for r in dlq) == [schemas.EMPTY_VALUE, schemas.INVALID_JSON]
    assert {r["source_offset"] for r in dlq} == {10_000, 10_001}


def rule_rows(spark, records: list[tuple[str | None, bytes | None]]):  # type: ignore[no-untyped-def]
    """Rule record rows as the source on the rules topic yields them."""
    rows = [{**dict.fromkeys(DETECTION_INPUT_SCHEMA.fieldNames()),
             RULE_RECORD: rule_record_text(key.encode() if key else None, value, offset)}
            for offset, (key, value) in enumerate(records)]
    return spark.createDataFrame(rows, DETECTION_INPUT_SCHEMA)


def test_rule_records_reach_every_bucket_and_are_reported_once(spark) -> None:  # type: ignore[no-untyped-def]
    """The rules stream is copied to every state bucket: a changed velocity (more than 2 in
    60 s), an added rule of the same kind and a refused record, applied before the batch's
    transactions; the alerts are the oracle's under those rules, and each record is reported
    once, whatever the number of buckets."""
    defaults = default_definitions()
    velocity = defaults[1].changed(version=2, updated_by="test", params={
        "count": 2, "window_seconds": 60})
    wide = velocity.changed(version=1, updated_by="test", rule_id="velocity_wide",
                            params={"count": 5, "window_seconds": 600})
    records = [(d.rule_id, d.to_json().encode()) for d in defaults]
    records += [(velocity.rule_id, velocity.to_json().encode()),
                (wide.rule_id, wide.to_json().encode()), ("broken", b"{not json")]
    rows = [decoded_row(r, i) for i, r in enumerate(CASES)]
    frame = spark.createDataFrame(pa.Table.from_batches(
        [pack(pa.Table.from_pylist(rows, schema=TRANSACTION_ROW_SCHEMA))]))
    alerts, dlq, changes = ListSink(), ListSink(), ListSink()
    BatchProcessor(DetectorOutputs(alerts=[alerts], dlq=[dlq], rule_changes=[changes]))(
        build_detection_plan(frame, rules_input=rule_rows(spark, records), watermark_seconds=60,
                             horizon_seconds=600, state_buckets=8), 0)
    in_force = [*defaults[:1], velocity, *defaults[2:], wide]
    expected = {(a["rule"], a["rule_version"], a["alert_id"])
                for a in expected_alerts(CASES, in_force)}
    assert {(a["rule"], a["rule_version"], a["alert_id"]) for a in alerts.records} == expected
    assert any(rule == "velocity" and version == 2 for rule, version, _ in expected)
    assert [(c["rule_id"], c["status"]) for c in changes.records] == [
        *[(d.rule_id, "applied") for d in defaults], ("velocity", "applied"),
        ("velocity_wide", "applied"), ("broken", "refused")]
    assert "not valid JSON" in changes.records[-1]["reason"]


@pytest.mark.parametrize(("buckets", "partitions"), [(32, 2), (12, 4), (5, 3)])
def test_state_buckets_spread_evenly_over_the_shuffle_partitions(spark, buckets: int,  # type: ignore[no-untyped-def]
                                                                 partitions: int) -> None:
    """Spark's own hash partitioning places bucket b on partition b mod partitions."""
    keys = balanced_bucket_keys(buckets, partitions)
    frame = spark.createDataFrame([(key,) for key in keys], "key long").repartition(
        partitions, "key")
    placed = frame.rdd.mapPartitionsWithIndex(
        lambda index, rows: [(row.key, index) for row in rows]).collectAsMap()
    assert [placed[key] for key in keys] == [b % partitions for b in range(buckets)]
    assert min(keys) >= 0 and len(set(keys)) == buckets
