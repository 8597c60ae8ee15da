"""Event schemas of the external contract: transactions, alerts, DLQ records, reason codes.

Every service imports these names; nothing retypes a field name or a rule id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final, NotRequired, TypedDict

__all__ = [
    "ALERTS_DATASET",
    "ALERT_FIELDS",
    "DLQ_DATASET",
    "DLQ_FIELDS",
    "DUPLICATE_KEY",
    "EMPTY_VALUE",
    "FUTURE_TIMESTAMP",
    "HIGH_VALUE",
    "INVALID_AMOUNT",
    "INVALID_JSON",
    "INVALID_PAYMENT_METHOD",
    "INVALID_TIMESTAMP",
    "INVALID_UTF8",
    "METRICS_FILE_NAME",
    "METRICS_FOLDER",
    "MISSING_FIELD",
    "MULTI_LOCATION",
    "NOT_AN_OBJECT",
    "OPTIONAL_FIELDS",
    "PAYMENT_METHODS",
    "PAYPAL",
    "PAYPAL_MICRO",
    "REASON_CODES",
    "REQUIRED_FIELDS",
    "RULES",
    "RULE_CHANGES_DATASET",
    "TRANSACTIONS_DATASET",
    "TRANSACTION_FIELDS",
    "UNKNOWN_FIELD",
    "VALUE_TOO_LARGE",
    "VELOCITY",
    "WRONG_TYPE",
    "BatchMetrics",
    "Transaction",
    "alert_id",
    "format_timestamp",
    "latency_histogram",
    "parse_timestamp",
    "to_json_ready",
    "utc_now",
]

# --- transactions ----------------------------------------------------------------------------

PAYMENT_METHODS: Final = ("card", "PayPal", "apple_pay", "bank_transfer")
PAYPAL: Final = "PayPal"


class Transaction(TypedDict):
    transaction_id: str
    user_id: str
    amount: float
    currency: str
    timestamp: str
    location: str
    payment_method: str
    merchant_id: str
    device_ip: str
    is_fraud: bool
    fraud_pattern: str | None


#: Required fields and the JSON types each accepts (bool is never a number here).
REQUIRED_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "transaction_id": (str,),
    "user_id": (str,),
    "amount": (int, float),
    "currency": (str,),
    "timestamp": (str,),
    "location": (str,),
    "payment_method": (str,),
    "merchant_id": (str,),
    "device_ip": (str,),
}
#: Optional ground-truth fields: written by the generator, never read by the rules.
OPTIONAL_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "is_fraud": (bool,),
    "fraud_pattern": (str, type(None)),
}
TRANSACTION_FIELDS: Final = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)

# --- rules ------------------------------------------------------------------------------------
# Rule kinds, their parameters and defaults live in ``fraudstream.rules``; the ids of the four
# default rules (rule_id = kind name) are named here for code that refers to one of them.

HIGH_VALUE: Final = "high_value"
VELOCITY: Final = "velocity"
MULTI_LOCATION: Final = "multi_location"
PAYPAL_MICRO: Final = "paypal_micro"
RULES: Final = (HIGH_VALUE, VELOCITY, MULTI_LOCATION, PAYPAL_MICRO)

# --- alerts -----------------------------------------------------------------------------------


class Alert(TypedDict):
    alert_id: str
    rule: str  # the rule_id of the definition that fired
    rule_version: int
    user_id: str
    window_start: str
    window_end: str
    transaction_count: int
    total_amount: float
    locations: list[str]
    transaction_ids: list[str]
    reason: str
    detected_at: str
    #: The model's fraud probability of the triggering transaction; None with no model.
    risk_score: float | None
    #: The features that moved that score most, in words; None with no model.
    score_reasons: list[str] | None


ALERT_FIELDS: Final = tuple(Alert.__annotations__)


def alert_id(rule: str, user_id: str, transaction_ids: Iterable[str]) -> str:
    """Deterministic id: the same evidence always yields the same id, so a replay after a crash
    can be deduplicated downstream."""
    evidence = ",".join(sorted(transaction_ids))
    return hashlib.sha256(f"{rule}|{user_id}|{evidence}".encode()).hexdigest()[:32]


# --- dead-letter records ----------------------------------------------------------------------

# Reason codes for bad input (docs/contract.md, "Bad input"), one per class.
EMPTY_VALUE: Final = "empty_value"
VALUE_TOO_LARGE: Final = "value_too_large"
INVALID_UTF8: Final = "invalid_utf8"
INVALID_JSON: Final = "invalid_json"
DUPLICATE_KEY: Final = "duplicate_key"
NOT_AN_OBJECT: Final = "not_an_object"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
INVALID_AMOUNT: Final = "invalid_amount"
INVALID_TIMESTAMP: Final = "invalid_timestamp"
FUTURE_TIMESTAMP: Final = "future_timestamp"
INVALID_PAYMENT_METHOD: Final = "invalid_payment_method"
#: A field outside the contract: sent to the DLQ rather than silently dropped.
UNKNOWN_FIELD: Final = "unknown_field"
REASON_CODES: Final = (
    EMPTY_VALUE, VALUE_TOO_LARGE, INVALID_UTF8, INVALID_JSON, DUPLICATE_KEY, NOT_AN_OBJECT,
    MISSING_FIELD, WRONG_TYPE, INVALID_AMOUNT, INVALID_TIMESTAMP, FUTURE_TIMESTAMP,
    INVALID_PAYMENT_METHOD, UNKNOWN_FIELD,
)


class DeadLetter(TypedDict):
    """JSON value written to the DLQ topic (key: the original key)."""

    reason: str
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    raw_value: str
    rejected_at: str


DLQ_FIELDS: Final = tuple(DeadLetter.__annotations__)

# --- time -------------------------------------------------------------------------------------


def format_timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and a ``Z`` suffix, as in docs/contract.md."""
    if moment.tzinfo is None:
        raise ValueError("event time must carry a timezone")
    # isoformat truncates to milliseconds like the contract, and takes two thirds of
    # strftime's time (2.8 vs 4.2 µs), which counts when a batch formats many alerts.
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp that carries a timezone (``Z`` or an offset).

    Raises ValueError for anything else, including a timestamp without a timezone: event time
    with no zone is ambiguous and is rejected rather than guessed.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("timestamp must be a non-empty string")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("timestamp has no timezone")
    return moment.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_json_ready(record: dict[str, Any]) -> dict[str, Any]:
    """Copy of a record with datetimes rendered per the contract (for JSON encoding)."""
    return {k: format_timestamp(v) if isinstance(v, datetime) else v for k, v in record.items()}

# --- Parquet layout and detector metrics --------------------------------------------------------

#: Datasets under the Parquet root, written per micro-batch as
#: ``<dataset>/epoch=<id>/batch_id=<N>/part-0.parquet`` and read with
#: ``fraudstream.datasets.read_dataset`` (layout, epochs and compaction explained there).
ALERTS_DATASET: Final = "alerts"
TRANSACTIONS_DATASET: Final = "transactions"
DLQ_DATASET: Final = "dlq"
#: Every ``fraud-rules`` record the detector read: applied, deleted or refused with the reason.
RULE_CHANGES_DATASET: Final = "rule_changes"
#: Not a Parquet dataset: the detector's JSON-lines metrics live in ``_metrics/detector.jsonl``
#: (the leading underscore keeps Parquet readers out of it).
METRICS_FOLDER: Final = "_metrics"
METRICS_FILE_NAME: Final = "detector.jsonl"


#: Upper bounds (ms) of the latency histogram in the detector's metrics.
LATENCY_BUCKETS_MS: Final = (250, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000)


def latency_histogram(latencies_ms: Iterable[float]) -> dict[str, int]:
    """Alerts per latency bucket (not cumulative, so batches add up by plain summing)."""
    counts = dict.fromkeys([*map(str, LATENCY_BUCKETS_MS), "inf"], 0)
    for value in latencies_ms:
        bound = next((b for b in LATENCY_BUCKETS_MS if value <= b), None)
        counts[str(bound) if bound is not None else "inf"] += 1
    return counts


class BatchMetrics(TypedDict):
    """One JSON line per micro-batch in the detector's metrics file."""

    batch_id: int
    written_at: str  # ISO-8601 UTC
    input_rows: int
    valid_rows: int
    dlq_rows: int
    late_rows: int  # dropped from the windowed rules by the watermark
    alerts: dict[str, int]  # rule id -> alerts emitted in this batch
    batch_seconds: float
    rows_per_second: float
    watermark: str | None  # ISO-8601 UTC, None before the first event
    #: event->alert latency over this batch's alerts: detected_at minus the Kafka timestamp of
    #: the transaction that made the rule true, in milliseconds (None when no alerts)
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_max: float | None
    #: histogram of this batch's event->alert latencies: upper bound in ms (``"inf"`` last) ->
    #: alerts, bounds LATENCY_BUCKETS_MS
    latency_ms_histogram: dict[str, int]
    #: duplicate transaction ids ignored by the windowed rules (resends within the watermark)
    duplicate_rows: int
    #: where the batch's time went, seconds: Spark's phases (``spark.*``: latestOffset,
    #: queryPlanning, addBatch, walCommit, commitOffsets...) and the sink step's own
    #: (``collect``, ``bronze``, ``sinks``)
    stage_seconds: dict[str, float]
    #: the model scoring this run's transactions as the driver sees it (e.g. ``model
    #: 20261202T061500Z (gbt, hold-out AUC 0.951)``), None on rules alone
    model: NotRequired[str | None]
