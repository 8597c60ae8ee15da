"""The transaction validator: every class of bad input gets its reason code, good records come
out typed exactly, and rejected rows carry no typed value that could move the watermark."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from fraudstream import schemas
from spark_job.kafka_source import RawBatch, load_decoder
from spark_job.validation import (
    ERROR_COLUMNS,
    EVENT_TIME,
    TRANSACTION_DECODER,
    TRANSACTION_ROW_SCHEMA,
    TRANSACTION_SPARK_SCHEMA,
    TYPED_COLUMNS,
    ValidationLimits,
    classify,
    decode_transactions,
    raw_text,
)

NOW = datetime(2026, 11, 22, 10, 20, 0, tzinfo=UTC)
LIMITS = ValidationLimits(max_value_bytes=20_000, future_tolerance_seconds=300.0)

GOOD: dict[str, Any] = {
    "transaction_id": "6f1c0000", "user_id": "u0042", "amount": 42.50, "currency": "EUR",
    "timestamp": "2026-11-22T10:15:30.123Z", "location": "Lyon", "payment_method": "PayPal",
    "merchant_id": "m017", "device_ip": "203.0.113.7", "is_fraud": False, "fraud_pattern": None,
}


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode()


def with_(**changes: Any) -> bytes:
    return encode({**GOOD, **changes})


def without(name: str) -> bytes:
    return encode({k: v for k, v in GOOD.items() if k != name})


def reason_of(value: bytes | None, now: datetime = NOW) -> str | None:
    typed, reason, detail = classify(value, now, LIMITS)
    assert (typed is None) == (reason is not None)
    if reason is not None:
        assert detail, "a rejection must say why"
    return reason


# --- good records ---------------------------------------------------------------------------------


def test_good_record_is_typed_exactly() -> None:
    typed, reason, detail = classify(encode(GOOD), NOW, LIMITS)
    assert reason is None and detail is None
    assert typed == {
        "transaction_id": "6f1c0000", "user_id": "u0042", "amount": 42.5, "currency": "EUR",
        EVENT_TIME: datetime(2026, 11, 22, 10, 15, 30, 123000, tzinfo=UTC), "location": "Lyon",
        "payment_method": "PayPal", "merchant_id": "m017", "device_ip": "203.0.113.7",
        "is_fraud": False, "fraud_pattern": None,
    }
    assert list(typed) == list(TYPED_COLUMNS)


def test_optional_ground_truth_fields_may_be_absent_or_set() -> None:
    bare = {k: v for k, v in GOOD.items() if k not in schemas.OPTIONAL_FIELDS}
    typed, reason, _ = classify(encode(bare), NOW, LIMITS)
    assert reason is None and typed is not None
    assert typed["is_fraud"] is None and typed["fraud_pattern"] is None
    typed, reason, _ = classify(with_(is_fraud=True, fraud_pattern="velocity"), NOW, LIMITS)
    assert reason is None and typed is not None
    assert typed["is_fraud"] is True and typed["fraud_pattern"] == "velocity"


def test_integer_amount_becomes_a_double() -> None:
    typed, _, _ = classify(with_(amount=3500), NOW, LIMITS)
    assert typed is not None and typed["amount"] == 3500.0 and type(typed["amount"]) is float


def test_offset_timestamps_are_converted_to_utc() -> None:
    typed, _, _ = classify(with_(timestamp="2026-11-22T12:15:30.5+02:00"), NOW, LIMITS)
    assert typed is not None
    assert typed[EVENT_TIME] == datetime(2026, 11, 22, 10, 15, 30, 500000, tzinfo=UTC)
    assert typed[EVENT_TIME].utcoffset() == timedelta(0)


def test_every_payment_method_of_the_contract_is_accepted() -> None:
    for method in schemas.PAYMENT_METHODS:
        assert reason_of(with_(payment_method=method)) is None


@pytest.mark.parametrize("amount", [0.01, 1e-9, 5e-324])
def test_tiny_positive_amount_is_valid(amount: float) -> None:
    assert reason_of(with_(amount=amount)) is None


def test_timestamp_exactly_at_the_future_tolerance_is_accepted() -> None:
    edge = NOW + timedelta(seconds=LIMITS.future_tolerance_seconds)
    assert reason_of(with_(timestamp=edge.isoformat())) is None
    just_over = edge + timedelta(milliseconds=1)
    assert reason_of(with_(timestamp=just_over.isoformat())) == schemas.FUTURE_TIMESTAMP


def test_value_of_exactly_the_size_limit_is_accepted() -> None:
    value = encode(GOOD)
    limits = ValidationLimits(max_value_bytes=len(value))
    assert classify(value, NOW, limits)[1] is None
    assert classify(value, NOW, ValidationLimits(max_value_bytes=len(value) - 1))[1] == (
        schemas.VALUE_TOO_LARGE
    )


# --- every class of bad input ---------------------------------------------------------------------

BAD: list[tuple[str, bytes | None, str]] = [
    ("null value (tombstone)", None, schemas.EMPTY_VALUE),
    ("empty value", b"", schemas.EMPTY_VALUE),
    ("too large", encode({**GOOD, "location": "x" * 30_000}), schemas.VALUE_TOO_LARGE),
    ("invalid utf-8", b'{"user_id": "\xff\xfe"}', schemas.INVALID_UTF8),
    ("utf-8 encoded surrogate", b'{"user_id": "\xed\xa0\x80"}', schemas.INVALID_UTF8),
    ("not json", b"hello", schemas.INVALID_JSON),
    ("truncated json", encode(GOOD)[:-7], schemas.INVALID_JSON),
    ("trailing garbage", encode(GOOD) + b"}", schemas.INVALID_JSON),
    ("single quotes", b"{'amount': 1}", schemas.INVALID_JSON),
    ("deeply nested", b"[" * 5000 + b"]" * 5000, schemas.INVALID_JSON),
    ("NaN amount", encode(GOOD).replace(b"42.5", b"NaN"), schemas.INVALID_AMOUNT),
    ("Infinity amount", encode(GOOD).replace(b"42.5", b"Infinity"), schemas.INVALID_AMOUNT),
    ("-Infinity amount", encode(GOOD).replace(b"42.5", b"-Infinity"), schemas.INVALID_AMOUNT),
    ("1e400 amount", encode(GOOD).replace(b"42.5", b"1e400"), schemas.INVALID_AMOUNT),
    ("NaN elsewhere", encode(GOOD).replace(b'"Lyon"', b"NaN"), schemas.INVALID_JSON),
    ("NaN in an extra field", encode({**GOOD, "x": 1}).replace(b'"x": 1', b'"x": NaN'),
     schemas.INVALID_JSON),
    ("1e400 elsewhere", encode(GOOD).replace(b'"Lyon"', b"1e400"), schemas.INVALID_JSON),
    ("duplicate key", encode(GOOD)[:-1] + b', "amount": 1}', schemas.DUPLICATE_KEY),
    ("duplicate key in a nested object", encode(GOOD)[:-1] + b', "x": {"a": 1, "a": 2}}',
     schemas.DUPLICATE_KEY),
    ("array", b"[1, 2]", schemas.NOT_AN_OBJECT),
    ("number", b"42", schemas.NOT_AN_OBJECT),
    ("string", b'"hello"', schemas.NOT_AN_OBJECT),
    ("null", b"null", schemas.NOT_AN_OBJECT),
    ("empty object", b"{}", schemas.MISSING_FIELD),
    ("empty transaction_id", with_(transaction_id=""), schemas.MISSING_FIELD),
    ("blank user_id", with_(user_id="  "), schemas.MISSING_FIELD),
    ("amount as string", with_(amount="42.5"), schemas.WRONG_TYPE),
    ("amount as bool", with_(amount=True), schemas.WRONG_TYPE),
    ("amount null", with_(amount=None), schemas.WRONG_TYPE),
    ("user_id as number", with_(user_id=42), schemas.WRONG_TYPE),
    ("location as list", with_(location=["Lyon"]), schemas.WRONG_TYPE),
    ("timestamp as epoch number", with_(timestamp=1795000000), schemas.WRONG_TYPE),
    ("is_fraud as string", with_(is_fraud="false"), schemas.WRONG_TYPE),
    ("is_fraud as number", with_(is_fraud=0), schemas.WRONG_TYPE),
    ("is_fraud null", with_(is_fraud=None), schemas.WRONG_TYPE),
    ("fraud_pattern as number", with_(fraud_pattern=3), schemas.WRONG_TYPE),
    ("unknown field", with_(extra="x"), schemas.UNKNOWN_FIELD),
    ("amount zero", with_(amount=0), schemas.INVALID_AMOUNT),
    ("amount zero float", with_(amount=0.0), schemas.INVALID_AMOUNT),
    ("amount negative zero", with_(amount=-0.0), schemas.INVALID_AMOUNT),
    ("amount negative", with_(amount=-5), schemas.INVALID_AMOUNT),
    ("unparseable timestamp", with_(timestamp="yesterday"), schemas.INVALID_TIMESTAMP),
    ("empty timestamp", with_(timestamp=""), schemas.INVALID_TIMESTAMP),
    ("timestamp without timezone", with_(timestamp="2026-11-22T10:15:30"),
     schemas.INVALID_TIMESTAMP),
    ("impossible date", with_(timestamp="2026-02-30T10:15:30Z"), schemas.INVALID_TIMESTAMP),
    ("epoch zero", with_(timestamp="1970-01-01T00:00:00Z"), schemas.INVALID_TIMESTAMP),
    ("just before 2000", with_(timestamp="1999-12-31T23:59:59.999Z"), schemas.INVALID_TIMESTAMP),
    ("year 10000 in UTC", with_(timestamp="9999-12-31T23:59:59-01:00"),
     schemas.INVALID_TIMESTAMP),
    ("year 9999", with_(timestamp="9999-12-31T23:59:59Z"), schemas.FUTURE_TIMESTAMP),
    ("an hour ahead", with_(timestamp="2026-11-22T11:20:00Z"), schemas.FUTURE_TIMESTAMP),
    ("payment method in other case", with_(payment_method="paypal"),
     schemas.INVALID_PAYMENT_METHOD),
    ("unknown payment method", with_(payment_method="cash"), schemas.INVALID_PAYMENT_METHOD),
]


@pytest.mark.parametrize(("value", "reason"), [(v, r) for _, v, r in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_input_gets_its_reason_code(value: bytes | None, reason: str) -> None:
    assert reason_of(value) == reason


def test_every_reason_code_of_the_contract_is_exercised() -> None:
    assert {reason for _, _, reason in BAD} == set(schemas.REASON_CODES)


@pytest.mark.parametrize("name", list(schemas.REQUIRED_FIELDS))
def test_missing_field_names_the_field(name: str) -> None:
    typed, reason, detail = classify(without(name), NOW, LIMITS)
    assert typed is None and reason == schemas.MISSING_FIELD
    assert detail is not None and name in detail


@pytest.mark.parametrize("name", list(schemas.TRANSACTION_FIELDS))
def test_wrong_type_names_the_field(name: str) -> None:
    # A list is the wrong JSON type for every field of the contract.
    typed, reason, detail = classify(with_(**{name: [1]}), NOW, LIMITS)
    assert typed is None and reason == schemas.WRONG_TYPE
    assert detail is not None and name in detail


def test_missing_field_wins_over_an_unknown_one() -> None:
    # A misspelt field: reporting the missing one tells the producer what to fix.
    record = {k: v for k, v in GOOD.items() if k != "amount"} | {"amout": 1}
    _, reason, detail = classify(encode(record), NOW, LIMITS)
    assert reason == schemas.MISSING_FIELD and detail is not None and "amount" in detail


def test_unknown_field_detail_names_it() -> None:
    _, reason, detail = classify(with_(colour="red"), NOW, LIMITS)
    assert reason == schemas.UNKNOWN_FIELD and detail is not None and "colour" in detail


def test_future_check_uses_the_given_clock() -> None:
    value = with_(timestamp="2026-11-22T11:20:00Z")
    assert reason_of(value, NOW) == schemas.FUTURE_TIMESTAMP
    assert reason_of(value, NOW + timedelta(hours=1)) is None


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        classify(encode(GOOD), datetime(2026, 11, 22), LIMITS)  # noqa: DTZ001


# --- raw_value of rejected records ----------------------------------------------------------------


def test_raw_text_keeps_short_values_and_replaces_bad_bytes() -> None:
    assert raw_text(b'{"a": 1', 100) == '{"a": 1'
    assert raw_text(b"ab\xffcd", 100) == "ab\ufffdcd"
    assert raw_text(None, 100) == ""


def test_raw_text_truncates_long_values_with_a_marker() -> None:
    value = ("é" * 50_000).encode()
    text = raw_text(value, 10_000)
    assert text.startswith("é" * 10_000)
    assert text[10_000:] == f"...[truncated, {len(value)} bytes in total]"
    assert raw_text(b"x" * 10_000, 10_000) == "x" * 10_000


# --- the columnar decoder -------------------------------------------------------------------------


def raw_batch(values: list[bytes | None]) -> RawBatch:
    n = len(values)
    keys = ([b"u0042", None, b"\xffkey", b"k"] * n)[:n]
    return RawBatch(
        topic="transactions", partition=2, keys=keys, values=values,
        offsets=list(range(100, 100 + n)),
        timestamps_ms=[1_795_000_000_123 + i for i in range(n - 1)] + [-1],
    )


def test_decode_transactions_types_valid_rows_and_nulls_rejected_ones() -> None:
    future = with_(timestamp="9999-12-31T23:59:59Z")
    values = [encode(GOOD), future, b"x" * 50_000, with_(amount=1, user_id="u7")]
    batch = decode_transactions(raw_batch(values), NOW, LIMITS)

    assert batch.schema.equals(TRANSACTION_ROW_SCHEMA)
    rows = batch.to_pylist()
    assert [r["offset"] for r in rows] == [100, 101, 102, 103]
    assert {r["partition"] for r in rows} == {2} and {r["topic"] for r in rows} == {"transactions"}
    assert [r["key"] for r in rows] == ["u0042", None, "\ufffdkey", "k"]
    assert rows[0]["kafka_timestamp"] == datetime(2026, 11, 18, 11, 6, 40, 123000, tzinfo=UTC)
    assert rows[3]["kafka_timestamp"] is None

    good, far_future, too_large, small = rows
    assert good["error_reason"] is None and good["error_detail"] is None
    assert good["raw_value"] is None
    assert good[EVENT_TIME] == datetime(2026, 11, 22, 10, 15, 30, 123000, tzinfo=UTC)
    assert good["amount"] == 42.5 and good["is_fraud"] is False
    assert small["amount"] == 1.0 and small["user_id"] == "u7"

    assert far_future["error_reason"] == schemas.FUTURE_TIMESTAMP
    assert too_large["error_reason"] == schemas.VALUE_TOO_LARGE
    for rejected, value in ((far_future, future), (too_large, b"x" * 50_000)):
        # No typed value at all: a bad timestamp must never reach the watermark.
        assert all(rejected[column] is None for column in TYPED_COLUMNS)
        assert rejected["error_detail"]
        assert rejected["raw_value"] == raw_text(value, LIMITS.raw_value_max_chars)
    assert far_future["raw_value"] == future.decode()
    assert too_large["raw_value"].endswith("[truncated, 50000 bytes in total]")


def test_decoder_output_matches_the_spark_schema() -> None:
    from pyspark.sql.pandas.types import to_arrow_schema

    assert to_arrow_schema(TRANSACTION_SPARK_SCHEMA, timezone="UTC").equals(TRANSACTION_ROW_SCHEMA)
    assert TRANSACTION_ROW_SCHEMA.field(EVENT_TIME).type == pa.timestamp("us", tz="UTC")
    assert TRANSACTION_ROW_SCHEMA.names[-3:] == list(ERROR_COLUMNS)


def test_source_decoder_is_built_from_options() -> None:
    decoder = load_decoder(TRANSACTION_DECODER, {"max_value_bytes": "10",
                                                 "future_tolerance_seconds": "0"})
    assert decoder.schema == TRANSACTION_SPARK_SCHEMA
    batch = decoder.decode(raw_batch([encode(GOOD)]))
    assert batch.column("error_reason").to_pylist() == [schemas.VALUE_TOO_LARGE]


def test_limits_from_options_reject_bad_numbers() -> None:
    assert ValidationLimits.from_options({}) == ValidationLimits()
    assert ValidationLimits.from_options({"max_value_bytes": "5"}).max_value_bytes == 5
    with pytest.raises(ValueError, match=r"decoder\.max_value_bytes"):
        ValidationLimits.from_options({"max_value_bytes": "lots"})
    with pytest.raises(ValueError, match=r"decoder\.future_tolerance_seconds"):
        ValidationLimits.from_options({"future_tolerance_seconds": "-1"})
