"""Duplicate transactions, end to end: a transaction resent with the same transaction_id (the same
bytes, as an at-least-once producer would) within the watermark counts once toward the windowed
rules, whether the copy arrives in the same micro-batch or in a later one.

Producer retries and replays are normal in Kafka; a velocity rule that counted a resend as a
second payment would flag honest users. Everything goes through ``python -m spark_job``.
"""

from __future__ import annotations

import json
import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from support.pipeline import (
    alert_rows,
    caught_up,
    dedup_by_alert_id,
    detector_env,
    duplicates,
    start_detector,
)

from fraudstream import schemas
from fraudstream.broker import EmbeddedBroker
from fraudstream.rules.oracle import expected_alerts
from fraudstream.testing import fresh_topics, produce, read_json, wait_for

BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def tx(user: str, seconds: float, *, amount: float = 20.0, method: str = "card"
       ) -> dict[str, Any]:
    return {
        "transaction_id": uuid.uuid4().hex, "user_id": user, "amount": amount,
        "currency": "EUR", "timestamp": schemas.format_timestamp(BASE + timedelta(seconds=seconds)),
        "location": "Lyon", "payment_method": method, "merchant_id": "m001",
        "device_ip": "203.0.113.7", "is_fraud": False, "fraud_pattern": None,
    }


def paypal(user: str, seconds: float) -> dict[str, Any]:
    return tx(user, seconds, amount=9.99, method=schemas.PAYPAL)


def record(t: dict[str, Any]) -> tuple[bytes, bytes]:
    return t["user_id"].encode(), json.dumps(t, separators=(",", ":")).encode()


@dataclass
class ResendRun:
    first: list[dict[str, Any]]
    second: list[dict[str, Any]]
    users: dict[str, list[dict[str, Any]]]
    alerts: list[dict[str, Any]]
    published: list[dict[str, Any]]


@pytest.fixture(scope="module")
def resend_run(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> ResendRun:
    """A live detector: originals with some resends (some in the same micro-batch), then, once
    those are committed, more resends in later batches."""
    # Velocity users burst at +200..+230 s; PayPal users every 70 s from +0 (never 4 in 60 s).
    # The newest event is at +230 s, so the watermark stays at +170 s: every resend of the
    # second round is within it.
    users = {
        "u-three": [tx("u-three", 200 + 10 * i) for i in range(3)],
        "u-four": [tx("u-four", 200 + 10 * i) for i in range(4)],
        "u-across": [tx("u-across", 200 + 10 * i) for i in range(3)],
        "u-pp-three": [paypal("u-pp-three", 70 * i) for i in range(3)],
        "u-pp-four": [paypal("u-pp-four", 70 * i) for i in range(4)],
        "u-rich": [tx("u-rich", 225, amount=5000.0)],
    }
    three, four, across = users["u-three"], users["u-four"], users["u-across"]
    pp_three, pp_four, rich = users["u-pp-three"], users["u-pp-four"], users["u-rich"]
    first = [*pp_three, *pp_four, three[0], three[1], three[1], four[0], four[1], four[2],
             four[2], three[2], across[0], across[1], four[3], across[2], rich[0], pp_three[2],
             pp_four[3], pp_four[3]]
    second = [across[2], across[1], four[3], four[2], pp_four[3], three[2], rich[0]]
    assert all(schemas.parse_timestamp(t["timestamp"]) >= BASE + timedelta(seconds=170)
               for t in second), "the second round of resends must be within the watermark"

    work = tmp_path_factory.mktemp("duplicates")
    names = fresh_topics(broker.bootstrap_servers, "dup", rules=True).env()
    env = detector_env(names, work, MAX_ROWS_PER_BATCH="8", CONSOLE_ALERTS="false")
    checkpoint = work / "checkpoint"
    # One partition, so micro-batches follow the list order (no event is read after a newer one
    # from another partition has already advanced the watermark past it).
    produce(broker.bootstrap_servers, names["TRANSACTIONS_TOPIC"], [record(t) for t in first],
            partition=0)
    run = start_detector(env, work / "detector.log")
    try:
        wait_for(lambda: caught_up(checkpoint, len(first)), 600,
                 "the detector to process the first sends", alive=run.alive)
        produce(broker.bootstrap_servers, names["TRANSACTIONS_TOPIC"],
                [record(t) for t in second], partition=0)
        wait_for(lambda: caught_up(checkpoint, len(first) + len(second)), 600,
                 "the detector to process the resends", alive=run.alive)
        run.process.send_signal(signal.SIGTERM)  # the driver only: a clean stop
        code = run.wait(120)
    finally:
        if run.alive():
            run.kill_and_reap()
    assert code == 0, run.tail()
    return ResendRun(first, second, users, alert_rows(work / "parquet"),
                     read_json(broker.bootstrap_servers, names["ALERTS_TOPIC"]))


def alerts_of(run: ResendRun, user: str) -> list[dict[str, Any]]:
    return [a for a in run.alerts if a["user_id"] == user]


def test_three_distinct_transactions_and_resends_do_not_fire(resend_run: ResendRun) -> None:
    for user in ("u-three", "u-across", "u-pp-three"):
        assert alerts_of(resend_run, user) == [], \
            f"{user}: 3 distinct transactions plus resends of them must not fire"


def test_four_distinct_transactions_and_resends_fire_exactly_once(resend_run: ResendRun) -> None:
    for user, rule in (("u-four", schemas.VELOCITY), ("u-pp-four", schemas.PAYPAL_MICRO)):
        alerts = alerts_of(resend_run, user)
        assert [a["rule"] for a in alerts] == [rule], f"{user}: {alerts}"
        ids = list(alerts[0]["transaction_ids"])
        assert not duplicates(ids), f"{user}: evidence repeats a transaction: {ids}"
        assert sorted(ids) == sorted(t["transaction_id"] for t in resend_run.users[user])
        assert alerts[0]["transaction_count"] == 4


def test_alerts_equal_the_oracle_that_counts_each_transaction_id_once(
        resend_run: ResendRun) -> None:
    expected = {a["alert_id"] for a in expected_alerts(resend_run.first + resend_run.second)}
    assert {a["alert_id"] for a in resend_run.alerts} == expected
    published, _ = dedup_by_alert_id(resend_run.published)
    assert set(published) == expected


def test_a_resent_high_value_transaction_leaves_one_alert_row(resend_run: ResendRun) -> None:
    """The same transaction is the same evidence and the same alert_id: a resend in a later
    micro-batch must not add a second row to Parquet (the bucket state remembers the id)."""
    rows = alerts_of(resend_run, "u-rich")
    assert [a["rule"] for a in rows] == [schemas.HIGH_VALUE], (
        f"{len(rows)} alert rows for one high_value transaction sent twice (the second copy "
        f"in a later micro-batch): alert_ids {[a['alert_id'] for a in rows]}")
