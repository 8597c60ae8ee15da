"""Bad input, end to end: every class of malformed record, sent as raw bytes between good records,
goes to the dead-letter topic and to ``parquet_data/dlq/`` exactly once with its reason code,
while the job runs to completion and the good records around the bad ones still alert.

The classifier itself is unit-tested in ``tests/unit/test_validation.py``; this is the tier that
proves the path through the real broker, ``python -m spark_job`` and its sinks. All records go
to one partition so that the far-future timestamps are read in the first micro-batch and the
burst after them in later ones: if a rejected timestamp moved the watermark, the burst would be
dropped as late and its alert would be missing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.pipeline import (
    alert_rows,
    detector_env,
    dlq_rows,
    metrics_lines,
    parquet_rows,
    run_detector,
)

from fraudstream import schemas
from fraudstream.rules.oracle import expected_alerts
from fraudstream.testing import produce, read_json

NOW = datetime.now(UTC).replace(microsecond=0)
#: Event time of the good records: well in the past, so none of them is "future".
BASE = NOW - timedelta(minutes=20)
#: A >1 MB value needs a producer limit above librdkafka's default (1,000,000 bytes); the
#: embedded broker (Tansu) accepts at least 5 MB per record.
PRODUCER_MAX_BYTES = 4_000_000
BIG_VALUE_BYTES = 1_100_000


def good(user: str, seconds: float, amount: float = 25.0, *, location: str = "Lyon",
         method: str = "card") -> dict[str, Any]:
    return {
        "transaction_id": uuid.uuid4().hex, "user_id": user, "amount": amount,
        "currency": "EUR", "timestamp": schemas.format_timestamp(BASE + timedelta(seconds=seconds)),
        "location": location, "payment_method": method, "merchant_id": "m001",
        "device_ip": "203.0.113.7", "is_fraud": False, "fraud_pattern": None,
    }


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def variant(**changes: Any) -> bytes:
    return encode({**good("u-bad", 0), **changes})


def without(name: str) -> bytes:
    return encode({k: v for k, v in good("u-bad", 0).items() if k != name})


def raw_amount(text: str) -> bytes:
    """A record whose amount is the literal ``text`` (non-standard JSON like NaN)."""
    value = encode({**good("u-bad", 0), "amount": 12345.5})
    assert value.count(b"12345.5") == 1
    return value.replace(b"12345.5", text.encode())


TEMPLATE = encode(good("u-bad", 0))
FAR_FUTURE = schemas.format_timestamp(NOW + timedelta(days=1))

#: (name, value, expected reason). Names are for messages; values are sent byte for byte.
BAD_INPUT: list[tuple[str, bytes | None, str]] = [
    # the contract's classes (docs/contract.md)
    ("not JSON", b"{not json", schemas.INVALID_JSON),
    ("missing required field", without("merchant_id"), schemas.MISSING_FIELD),
    ("only an id", b'{"transaction_id": "x"}', schemas.MISSING_FIELD),
    ("wrong type: user_id number", variant(user_id=42), schemas.WRONG_TYPE),
    ("non-positive amount: zero", variant(amount=0), schemas.INVALID_AMOUNT),
    ("non-positive amount: negative", variant(amount=-5.5), schemas.INVALID_AMOUNT),
    ("unparseable timestamp", variant(timestamp="yesterday"), schemas.INVALID_TIMESTAMP),
    ("timestamp 1 day ahead", variant(timestamp=FAR_FUTURE), schemas.FUTURE_TIMESTAMP),
    ("payment method outside the contract", variant(payment_method="bitcoin"),
     schemas.INVALID_PAYMENT_METHOD),
    ("payment method in the wrong case", variant(payment_method="paypal"),
     schemas.INVALID_PAYMENT_METHOD),
    # more shapes of broken input
    ("truncated JSON", TEMPLATE[: len(TEMPLATE) // 2], schemas.INVALID_JSON),
    ("JSON array", b"[1, 2, 3]", schemas.NOT_AN_OBJECT),
    ("array of one transaction", b"[" + TEMPLATE + b"]", schemas.NOT_AN_OBJECT),
    ("JSON number", b"42", schemas.NOT_AN_OBJECT),
    ("JSON string", b'"a transaction"', schemas.NOT_AN_OBJECT),
    ("JSON null", b"null", schemas.NOT_AN_OBJECT),
    ("JSON boolean", b"true", schemas.NOT_AN_OBJECT),
    ("invalid UTF-8", TEMPLATE.replace(b'"Lyon"', b'"Ly\xff\xfeon"'), schemas.INVALID_UTF8),
    ("empty value", b"", schemas.EMPTY_VALUE),
    ("null value (tombstone)", None, schemas.EMPTY_VALUE),
    ("amount NaN", raw_amount("NaN"), schemas.INVALID_AMOUNT),
    ("amount Infinity", raw_amount("Infinity"), schemas.INVALID_AMOUNT),
    ("amount -Infinity", raw_amount("-Infinity"), schemas.INVALID_AMOUNT),
    ("amount 1e400", raw_amount("1e400"), schemas.INVALID_AMOUNT),
    ("NaN outside the amount", variant(is_fraud=float("nan")), schemas.INVALID_JSON),
    ("amount as a string", variant(amount="42.50"), schemas.WRONG_TYPE),
    ("amount as a boolean", variant(amount=True), schemas.WRONG_TYPE),
    ("is_fraud as a string", variant(is_fraud="no"), schemas.WRONG_TYPE),
    ("timestamp as epoch seconds", variant(timestamp=1_763_800_000), schemas.WRONG_TYPE),
    ("empty transaction_id", variant(transaction_id=""), schemas.MISSING_FIELD),
    ("timestamp without timezone", variant(timestamp="2026-11-22T10:15:30.123"),
     schemas.INVALID_TIMESTAMP),
    ("timestamp epoch 0", variant(timestamp="1970-01-01T00:00:00.000Z"),
     schemas.INVALID_TIMESTAMP),
    ("timestamp year 9999", variant(timestamp="9999-12-31T23:59:59.999Z"),
     schemas.FUTURE_TIMESTAMP),
    ("value over 1 MB", variant(location="x" * BIG_VALUE_BYTES), schemas.VALUE_TOO_LARGE),
    ("unknown extra field", variant(coupon="WELCOME10"), schemas.UNKNOWN_FIELD),
    ("duplicate JSON key", TEMPLATE[:-1] + b',"amount":9999.0}', schemas.DUPLICATE_KEY),
    ("deeply nested", b"[" * 200_000 + b"]" * 200_000, schemas.INVALID_JSON),
]


def good_records() -> list[dict[str, Any]]:
    """A velocity burst (4 within 30 s), a high_value, and quiet traffic of other users."""
    quiet = [good(f"u-quiet-{i}", 30 * i, 10.0 + i) for i in range(8)]
    burst = [good("u-burst", 200 + 10 * i, 20.0 + i) for i in range(4)]
    rich = [good("u-rich", 215, 5000.0)]
    # In event-time order: none of them is late, so the oracle applies as it is.
    return sorted(quiet + burst + rich, key=lambda tx: tx["timestamp"])


@dataclass(frozen=True)
class Entry:
    """One record to send: a good transaction (``reason`` None) or a bad case."""

    name: str
    key: bytes | None
    value: bytes | None
    reason: str | None


def interleaved_stream() -> tuple[list[Entry], list[dict[str, Any]]]:
    """Bad records spread between the good ones, the far-future ones first (see module doc)."""
    goods = good_records()
    bads = sorted(BAD_INPUT, key=lambda case: case[2] != schemas.FUTURE_TIMESTAMP)
    per_good = -(-len(bads) // len(goods))
    entries: list[Entry] = []
    for i, tx in enumerate(goods):
        entries += [Entry(name, b"u-bad", value, reason)
                    for name, value, reason in bads[i * per_good:(i + 1) * per_good]]
        entries.append(Entry(tx["transaction_id"], tx["user_id"].encode(), encode(tx), None))
    assert sum(e.reason is not None for e in entries) == len(BAD_INPUT)
    return entries, goods


@pytest.mark.timeout(600)
def test_every_bad_record_lands_in_the_dlq_once_with_its_reason_and_good_ones_still_alert(
        unique_topics: dict[str, str], tmp_path: Path) -> None:
    assert {reason for _, _, reason in BAD_INPUT} == set(schemas.REASON_CODES), \
        "every reason code of the contract is exercised"
    entries, goods = interleaved_stream()
    topic = unique_topics["TRANSACTIONS_TOPIC"]
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    positions = produce(bootstrap, topic, [(e.key, e.value) for e in entries],
                        {"message.max.bytes": PRODUCER_MAX_BYTES}, partition=0)
    bad_at = {pos: e for pos, e in zip(positions, entries, strict=True) if e.reason is not None}

    env = detector_env(unique_topics, tmp_path, MAX_ROWS_PER_BATCH="20", CONSOLE_ALERTS="false")
    code, output = run_detector(env, tmp_path / "detector.log", "--available-now")
    assert code == 0, output[-4000:]
    parquet = tmp_path / "parquet"

    # Parquet DLQ: every bad record exactly once, with its reason; no good record.
    def check(reasons_at: dict[tuple[int, int], list[str]], where: str) -> None:
        missing = sorted(e.name for pos, e in bad_at.items() if pos not in reasons_at)
        assert not missing, f"bad records missing from {where}: {missing}"
        wrong = {bad_at[pos].name if pos in bad_at else f"good record at {pos}":
                 (got, bad_at[pos].reason if pos in bad_at else None)
                 for pos, got in reasons_at.items()
                 if pos not in bad_at or got != [bad_at[pos].reason]}
        assert not wrong, f"{where}: wrong entries, name: (reasons got, expected): {wrong}"

    dlq = dlq_rows(parquet)
    parquet_reasons: dict[tuple[int, int], list[str]] = {}
    for row in dlq:
        parquet_reasons.setdefault((row["partition"], row["offset"]), []).append(
            row["error_reason"])
    check(parquet_reasons, "parquet_data/dlq")
    assert len(dlq) == len(BAD_INPUT)

    # DLQ topic: the same, in the contract's shape, with the original bytes as text.
    letters = read_json(bootstrap, unique_topics["DLQ_TOPIC"])
    topic_reasons: dict[tuple[int, int], list[str]] = {}
    for letter in letters:
        assert set(letter) >= set(schemas.DLQ_FIELDS), sorted(letter)
        assert letter["source_topic"] == topic
        position = (letter["source_partition"], letter["source_offset"])
        topic_reasons.setdefault(position, []).append(letter["reason"])
        entry = bad_at.get(position)
        if entry is None:
            continue
        assert letter["error"], f"{entry.name}: the DLQ record must say why"
        if entry.value and len(entry.value) < 5000 and b"\xff" not in entry.value:
            assert letter["raw_value"] == entry.value.decode(), f"{entry.name}: raw value lost"
    check(topic_reasons, "the DLQ topic")

    # The good records around them: stored, and their alerts exactly as the oracle says.
    bronze = parquet_rows(parquet / schemas.TRANSACTIONS_DATASET)
    assert sorted(r["transaction_id"] for r in bronze) == sorted(g["transaction_id"]
                                                                 for g in goods)
    expected = {a["alert_id"]: a for a in expected_alerts(goods)}
    assert sorted((a["rule"], a["user_id"]) for a in expected.values()) == [
        (schemas.HIGH_VALUE, "u-rich"), (schemas.VELOCITY, "u-burst")]
    alerts = alert_rows(parquet)
    assert sorted(a["alert_id"] for a in alerts) == sorted(expected), \
        f"alerts {[(a['rule'], a['user_id']) for a in alerts]}"
    topic_alerts = read_json(bootstrap, unique_topics["ALERTS_TOPIC"])
    assert {a["alert_id"] for a in topic_alerts} == set(expected)

    # Counters and the watermark: rejected timestamps must not drag it forward.
    lines = metrics_lines(parquet)
    assert sum(line["input_rows"] for line in lines) == len(entries)
    assert sum(line["dlq_rows"] for line in lines) == len(BAD_INPUT)
    assert len(lines) >= 3, "the stream must span several micro-batches"
    newest_good = max(schemas.parse_timestamp(g["timestamp"]) for g in goods)
    watermarks = [schemas.parse_timestamp(line["watermark"]) for line in lines
                  if line.get("watermark")]
    assert watermarks, "later batches must report a watermark"
    assert max(watermarks) <= newest_good, \
        f"watermark {max(watermarks)} moved past the newest valid event {newest_good}"
    assert sum(line["late_rows"] for line in lines) == 0
