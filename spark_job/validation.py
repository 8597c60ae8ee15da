"""Validate and decode transaction records: the contract's "bad input" (docs/contract.md), one
reason code per class.

Runs inside the Kafka source (``decoder`` option = ``TRANSACTION_DECODER`` for plain decoded
rows; the detector wraps it, see ``spark_job.detection_input``), so every record
leaves the source either typed (``error_reason`` null) or rejected with a reason code from
``fraudstream.schemas``, a human-readable detail and the original value as text. Rejected rows
carry no typed field at all; in particular ``event_time`` is null, so a record with a
far-future timestamp can never move the watermark.

Choices the contract leaves open, and why:
- ``NaN``/``Infinity``/``-Infinity`` are not JSON (Python's parser accepts them by default):
  in ``amount`` they are ``invalid_amount``, anywhere else ``invalid_json``. A number too large
  for a double (``1e400``) is ``invalid_amount`` in ``amount`` and ``invalid_json`` in another
  top-level field.
- An empty or blank ``transaction_id``/``user_id`` is ``missing_field``: the value is absent
  in all but form, and alerts and per-user state cannot be keyed by it.
- Event times before 2000-01-01 are ``invalid_timestamp``: the watermark would drop them as late
  anyway, and such a value (epoch 0, a year 1970 default) means a broken clock, not a payment.
- A timestamp exactly ``future_tolerance_seconds`` ahead is accepted; later is rejected. The
  check uses the clock of the Python worker at read time, so whether a record counts as "future"
  depends on when it is read: a replayed batch read much later may accept a record it rejected
  the first time.
- Fields outside the contract are ``unknown_field``: the contract sends them to the DLQ
  rather than silently dropping data a producer thought it was sending.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pyarrow as pa
from pyspark.sql.types import (
    BooleanType,
    DataType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from fraudstream.schemas import (
    DUPLICATE_KEY,
    EMPTY_VALUE,
    FUTURE_TIMESTAMP,
    INVALID_AMOUNT,
    INVALID_JSON,
    INVALID_PAYMENT_METHOD,
    INVALID_TIMESTAMP,
    INVALID_UTF8,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    OPTIONAL_FIELDS,
    PAYMENT_METHODS,
    REQUIRED_FIELDS,
    TRANSACTION_FIELDS,
    UNKNOWN_FIELD,
    VALUE_TOO_LARGE,
    WRONG_TYPE,
    parse_timestamp,
)
from fraudstream.settings import DetectorSettings
from spark_job.kafka_source import RawBatch, arrow_schema

__all__ = [
    "ERROR_COLUMNS",
    "ERROR_REASON",
    "EVENT_TIME",
    "KAFKA_TIMESTAMP",
    "TRANSACTION_DECODER",
    "TRANSACTION_ROW_SCHEMA",
    "TRANSACTION_SPARK_SCHEMA",
    "TYPED_COLUMNS",
    "TransactionDecoder",
    "ValidationLimits",
    "classify",
    "decode_transactions",
    "raw_text",
]

# --- JSON fields the checks single out (asserted to be in the contract below) -------------------

AMOUNT_FIELD: Final = "amount"
TIMESTAMP_FIELD: Final = "timestamp"
PAYMENT_METHOD_FIELD: Final = "payment_method"
#: Identifiers that must not be empty: alerts and per-user state are keyed by them.
ID_FIELDS: Final = ("transaction_id", "user_id")
assert {AMOUNT_FIELD, TIMESTAMP_FIELD, PAYMENT_METHOD_FIELD, *ID_FIELDS} <= set(REQUIRED_FIELDS)

# --- output columns -------------------------------------------------------------------------------

KEY: Final = "key"
TOPIC: Final = "topic"
PARTITION: Final = "partition"
OFFSET: Final = "offset"
KAFKA_TIMESTAMP: Final = "kafka_timestamp"
#: The JSON ``timestamp`` parsed to UTC; null for rejected rows.
EVENT_TIME: Final = "event_time"
ERROR_REASON: Final = "error_reason"
ERROR_DETAIL: Final = "error_detail"
RAW_VALUE: Final = "raw_value"

METADATA_COLUMNS: Final = (KEY, TOPIC, PARTITION, OFFSET, KAFKA_TIMESTAMP)
#: Typed transaction columns, in the contract's field order (``timestamp`` -> ``event_time``).
TYPED_COLUMNS: Final = tuple(EVENT_TIME if f == TIMESTAMP_FIELD else f for f in TRANSACTION_FIELDS)
ERROR_COLUMNS: Final = (ERROR_REASON, ERROR_DETAIL, RAW_VALUE)


def _spark_type(name: str, json_types: tuple[type, ...]) -> DataType:
    if name == TIMESTAMP_FIELD:
        return TimestampType()
    if float in json_types:
        return DoubleType()
    if bool in json_types:
        return BooleanType()
    return StringType()


_FIELD_TYPES = {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}

#: Rows the transactions decoder yields (every column nullable).
TRANSACTION_SPARK_SCHEMA: Final = StructType(
    [StructField(KEY, StringType()), StructField(TOPIC, StringType()),
     StructField(PARTITION, IntegerType()), StructField(OFFSET, LongType()),
     StructField(KAFKA_TIMESTAMP, TimestampType())]
    + [StructField(column, _spark_type(field, _FIELD_TYPES[field]))
       for column, field in zip(TYPED_COLUMNS, TRANSACTION_FIELDS, strict=True)]
    + [StructField(column, StringType()) for column in ERROR_COLUMNS]
)
#: The same as Arrow (what the decoder returns; timestamps are timestamp[us, tz=UTC]).
TRANSACTION_ROW_SCHEMA: Final = arrow_schema(TRANSACTION_SPARK_SCHEMA)
#: The same as a DDL string.
TRANSACTION_DDL: Final = ", ".join(
    f"`{f.name}` {f.dataType.simpleString()}" for f in TRANSACTION_SPARK_SCHEMA.fields
)

#: ``decoder`` option value of the Kafka source for the transactions topic.
TRANSACTION_DECODER: Final = "spark_job.validation:transaction_decoder"

# --- limits -------------------------------------------------------------------------------------

_DETECTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DetectorSettings)}
#: Earlier event times are invalid (see the module docstring).
EARLIEST_EVENT_TIME: Final = datetime(2000, 1, 1, tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class ValidationLimits:
    """Thresholds of the checks; the source rebuilds them in each worker from the
    ``decoder.*`` options (``from_options``)."""

    max_value_bytes: int = _DETECTOR_DEFAULTS["max_value_bytes"]
    future_tolerance_seconds: float = _DETECTOR_DEFAULTS["future_tolerance_seconds"]
    #: ``raw_value`` keeps at most this many characters of a rejected value.
    raw_value_max_chars: int = 10_000
    earliest_event_time: datetime = EARLIEST_EVENT_TIME

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ValidationLimits:
        """From the decoder options (``decoder.`` prefix already removed by the source)."""
        values: dict[str, Any] = {}
        for name, kind in (("max_value_bytes", int), ("future_tolerance_seconds", float),
                           ("raw_value_max_chars", int)):
            text = options.get(name)
            if text is None:
                continue
            try:
                value = kind(str(text).strip())
            except ValueError:
                raise ValueError(
                    f"option decoder.{name}: expected a number, got {text!r}"
                ) from None
            if value < 0 or (kind is float and not math.isfinite(value)):
                raise ValueError(f"option decoder.{name}: must be a finite number >= 0")
            values[name] = value
        return cls(**values)


# --- JSON parsing -------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NonStandardConstant(ValueError):
    pass


class _Constant(float):
    """NaN/Infinity read by the lenient parser, remembered as such."""

    name: str

    def __new__(cls, name: str) -> _Constant:
        value = super().__new__(cls, float(name))
        value.name = name
        return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise _NonStandardConstant(name)


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_reject_constant)
_LENIENT = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_Constant)

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
                    float: "a number", bool: "a boolean", type(None): "null", _Constant: "a number"}


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _expected(json_types: tuple[type, ...]) -> str:
    names = dict.fromkeys(_JSON_TYPE_NAMES[t] for t in json_types)
    return " or ".join(names)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


Outcome = tuple[list[Any] | None, str | None, str | None]

_REQUIRED_ITEMS: Final = tuple(REQUIRED_FIELDS.items())
_OPTIONAL_ITEMS: Final = tuple(OPTIONAL_FIELDS.items())
_REQUIRED_NAMES: Final = frozenset(REQUIRED_FIELDS)
_KNOWN_NAMES: Final = frozenset(TRANSACTION_FIELDS)


def _parse(text: str) -> Outcome:
    """Why ``text`` does not parse strictly (called only after it failed to)."""
    try:
        _STRICT.decode(text)
    except _DuplicateKey as exc:
        return None, DUPLICATE_KEY, f"duplicate key {_short(exc.key)}"
    except _NonStandardConstant:
        return _parse_with_constants(text)
    except json.JSONDecodeError as exc:
        return None, INVALID_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, INVALID_JSON, "nested too deeply"
    raise AssertionError("a value that failed to parse parsed on the second attempt")


def _parse_with_constants(text: str) -> Outcome:
    """Slow path for the rare record with NaN/Infinity: find out whether it is the amount."""
    try:
        obj = _LENIENT.decode(text)
    except _DuplicateKey as exc:
        return None, DUPLICATE_KEY, f"duplicate key {_short(exc.key)}"
    except json.JSONDecodeError as exc:
        return None, INVALID_JSON, f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return None, INVALID_JSON, "nested too deeply"
    if isinstance(obj, dict) and isinstance(obj.get(AMOUNT_FIELD), _Constant):
        amount = obj[AMOUNT_FIELD]
        return None, INVALID_AMOUNT, f"{AMOUNT_FIELD} is {amount.name}, must be a finite number"
    return None, INVALID_JSON, "NaN, Infinity and -Infinity are not valid JSON"


_GET_REQUIRED: Final = operator.itemgetter(*REQUIRED_FIELDS)
#: Every tuple of JSON types a valid record's required fields can have (amount: int or float).
_VALID_SIGNATURES: Final = frozenset(itertools.product(*REQUIRED_FIELDS.values()))
_AMOUNT_INDEX: Final = list(REQUIRED_FIELDS).index(AMOUNT_FIELD)
_TIMESTAMP_INDEX: Final = list(REQUIRED_FIELDS).index(TIMESTAMP_FIELD)
_PAYMENT_INDEX: Final = list(REQUIRED_FIELDS).index(PAYMENT_METHOD_FIELD)
_ID_INDEXES: Final = tuple(list(REQUIRED_FIELDS).index(name) for name in ID_FIELDS)
assert (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) == TRANSACTION_FIELDS


def _diagnose(obj: dict[str, Any]) -> Outcome:
    """The structural error of an object the fast path refused, checked in a fixed order."""
    if not obj.keys() >= _REQUIRED_NAMES:
        missing = [name for name in REQUIRED_FIELDS if name not in obj]
        return None, MISSING_FIELD, "missing required field(s): " + ", ".join(missing)
    present = [(name, allowed) for name, allowed in _REQUIRED_ITEMS]
    present += [(name, allowed) for name, allowed in _OPTIONAL_ITEMS if name in obj]
    for name, allowed in present:
        field = obj[name]
        if type(field) not in allowed:
            if type(field) is float and not math.isfinite(field) and name != AMOUNT_FIELD:
                return None, INVALID_JSON, f"{name}: number out of range"
            return None, WRONG_TYPE, (f"{name} must be {_expected(allowed)}, got "
                                      f"{_json_type(field)} {_short(field, 40)}")
    unknown = sorted(k for k in obj if k not in _KNOWN_NAMES)
    if unknown:
        return None, UNKNOWN_FIELD, "unknown field(s): " + ", ".join(_short(k, 40) for k in unknown)
    raise AssertionError(f"no structural error in a refused record: {sorted(obj)}")


def _validate(value: bytes | None, latest: datetime, limits: ValidationLimits) -> Outcome:
    """Typed values in TYPED_COLUMNS order, or None with a reason code and a detail.

    Hot path (runs for every record): the common case is checked with C-level operations
    (one itemgetter, one set lookup of the type signature); anything unusual goes to
    ``_diagnose``, which decides the reason in a fixed order.
    """
    if not value:
        return None, EMPTY_VALUE, "value is null (tombstone)" if value is None else "value is empty"
    if len(value) > limits.max_value_bytes:
        return None, VALUE_TOO_LARGE, (f"value has {len(value)} bytes, limit "
                                       f"{limits.max_value_bytes}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, INVALID_UTF8, f"not valid UTF-8 at byte {exc.start}: {exc.reason}"
    try:
        obj = _STRICT.decode(text)
    except ValueError:  # JSON errors, duplicate keys, NaN/Infinity: find out which
        return _parse(text)
    except RecursionError:
        return None, INVALID_JSON, "nested too deeply"
    if type(obj) is not dict:
        return None, NOT_AN_OBJECT, f"top-level JSON value is {_json_type(obj)}, not an object"

    try:
        fields = list(_GET_REQUIRED(obj))
    except KeyError:
        return _diagnose(obj)
    if tuple(map(type, fields)) not in _VALID_SIGNATURES:
        return _diagnose(obj)
    for name, allowed in _OPTIONAL_ITEMS:
        field = obj.get(name)
        if name in obj and type(field) not in allowed:
            return _diagnose(obj)
        fields.append(field)
    if len(obj) > len(REQUIRED_FIELDS) and not obj.keys() <= _KNOWN_NAMES:
        return _diagnose(obj)

    for index in _ID_INDEXES:
        identifier = fields[index]
        if not identifier or identifier.isspace():
            return None, MISSING_FIELD, f"{ID_FIELDS[_ID_INDEXES.index(index)]} is empty"

    raw_amount = fields[_AMOUNT_INDEX]
    amount = float(raw_amount)
    if not math.isfinite(amount):
        return None, INVALID_AMOUNT, f"{AMOUNT_FIELD} is out of range, must be a finite number"
    if amount <= 0:
        return None, INVALID_AMOUNT, f"{AMOUNT_FIELD} is {raw_amount!r}, must be > 0"
    fields[_AMOUNT_INDEX] = amount

    stamp = fields[_TIMESTAMP_INDEX]
    try:
        # fraudstream.schemas.parse_timestamp, inlined: skipping astimezone for "Z" is a
        # measurable share of the per-record cost.
        event_time = datetime.fromisoformat(stamp)
        if event_time.tzinfo is not UTC:
            event_time = parse_timestamp(stamp)
    except (ValueError, OverflowError) as exc:
        return None, INVALID_TIMESTAMP, f"{TIMESTAMP_FIELD} {_short(stamp)}: {exc}"
    if event_time < limits.earliest_event_time:
        return None, INVALID_TIMESTAMP, (f"{TIMESTAMP_FIELD} {_short(stamp)} is before "
                                         f"{limits.earliest_event_time:%Y-%m-%d}")
    if event_time > latest:
        ahead = (event_time - latest).total_seconds() + limits.future_tolerance_seconds
        return None, FUTURE_TIMESTAMP, (
            f"{TIMESTAMP_FIELD} {_short(stamp)} is {ahead:.0f} s ahead of the detector's clock "
            f"(tolerance {limits.future_tolerance_seconds:g} s)"
        )
    fields[_TIMESTAMP_INDEX] = event_time

    method = fields[_PAYMENT_INDEX]
    if method not in PAYMENT_METHODS:
        return None, INVALID_PAYMENT_METHOD, (f"{PAYMENT_METHOD_FIELD} {_short(method)} is not "
                                              f"one of {', '.join(PAYMENT_METHODS)}")
    return fields, None, None


def classify(
    value: bytes | None, now: datetime, limits: ValidationLimits | None = None
) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """Check one record value: ``(typed fields, None, None)`` when valid (keyed by output
    column, ``event_time`` a UTC datetime), else ``(None, reason code, detail)``."""
    if now.tzinfo is None:
        raise ValueError("now must carry a timezone")
    limits = limits or ValidationLimits()
    latest = now + timedelta(seconds=limits.future_tolerance_seconds)
    typed, reason, detail = _validate(value, latest, limits)
    if typed is None:
        return None, reason, detail
    return dict(zip(TYPED_COLUMNS, typed, strict=True)), None, None


def raw_text(value: bytes | None, max_chars: int) -> str:
    """A rejected value as text for the DLQ: undecodable bytes replaced, long values cut with a
    marker that says how long the original was."""
    if value is None:
        return ""
    head = value[: max_chars * 4 + 4]  # a character is at most 4 bytes
    text = head.decode("utf-8", "replace")
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}...[truncated, {len(value)} bytes in total]"


_TYPED_ARROW_TYPES: Final = tuple(TRANSACTION_ROW_SCHEMA.field(c).type for c in TYPED_COLUMNS)
_NULL_ROW: Final = (None,) * len(TYPED_COLUMNS)


def decode_transactions(raw: RawBatch, now: datetime, limits: ValidationLimits) -> pa.RecordBatch:
    """Validate and type a chunk of records: one row per record, in order, with schema
    TRANSACTION_ROW_SCHEMA. ``now`` is the detector's clock for the future-timestamp check."""
    if now.tzinfo is None:
        raise ValueError("now must carry a timezone")
    latest = now + timedelta(seconds=limits.future_tolerance_seconds)
    max_chars = limits.raw_value_max_chars
    rows: list[Sequence[Any]] = []
    reasons: list[str | None] = []
    details: list[str | None] = []
    raws: list[str | None] = []
    for value in raw.values:
        typed, reason, detail = _validate(value, latest, limits)
        if typed is None:
            rows.append(_NULL_ROW)
            raws.append(raw_text(value, max_chars))
        else:
            rows.append(typed)
            raws.append(None)
        reasons.append(reason)
        details.append(detail)
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(TYPED_COLUMNS)
    arrays = [raw.key_array(), raw.topic_array(), raw.partition_array(), raw.offset_array(),
              raw.timestamp_array()]
    arrays += [pa.array(column, arrow_type)
               for column, arrow_type in zip(columns, _TYPED_ARROW_TYPES, strict=True)]
    arrays += [pa.array(reasons, pa.string()), pa.array(details, pa.string()),
               pa.array(raws, pa.string())]
    return pa.RecordBatch.from_arrays(arrays, schema=TRANSACTION_ROW_SCHEMA)


@dataclasses.dataclass(frozen=True)
class TransactionDecoder:
    """The Kafka source's decoder for the transactions topic (see ``transaction_decoder``)."""

    limits: ValidationLimits

    @property
    def schema(self) -> StructType:
        return TRANSACTION_SPARK_SCHEMA

    def decode(self, raw: RawBatch) -> pa.RecordBatch:
        # The worker's clock at read time (see the module docstring).
        return decode_transactions(raw, datetime.now(UTC), self.limits)


def transaction_decoder(options: Mapping[str, str]) -> TransactionDecoder:
    """Decoder factory named by TRANSACTION_DECODER; options: ``max_value_bytes``,
    ``future_tolerance_seconds``, ``raw_value_max_chars`` (as ``decoder.<name>`` on the source)."""
    return TransactionDecoder(ValidationLimits.from_options(options))
