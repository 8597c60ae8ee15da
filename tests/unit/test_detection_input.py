"""The detector's source layout: rule rows for valid records, one archive row per chunk."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from fraudstream import schemas
from spark_job.detection_input import (
    ARCHIVE,
    DETECTION_INPUT_ARROW_SCHEMA,
    DETECTION_INPUT_DECODER,
    RULE_COLUMNS,
    RULE_RECORD,
    RULE_RECORD_DECODER,
    detection_input_decoder,
    pack,
    read_rule_record,
    unpack,
)
from spark_job.kafka_source import RawBatch, load_decoder
from spark_job.validation import TRANSACTION_ROW_SCHEMA, TransactionDecoder, ValidationLimits

GOOD = {
    "transaction_id": "t1", "user_id": "u1", "amount": 42.5, "currency": "EUR",
    "timestamp": "2026-01-05T10:15:30.123Z", "location": "Lyon", "payment_method": "PayPal",
    "merchant_id": "m017", "device_ip": "203.0.113.7", "is_fraud": False, "fraud_pattern": None,
}


def raw(values: list[bytes | None]) -> RawBatch:
    n = len(values)
    return RawBatch("transactions", 1, [b"u1"] * n, values, list(range(50, 50 + n)),
                    [1_795_000_000_000 + i for i in range(n)])


VALUES = [json.dumps({**GOOD, "transaction_id": "t1"}).encode(), b"{oops", None,
          json.dumps({**GOOD, "transaction_id": "t2", "amount": 9000}).encode()]


def test_rule_rows_for_valid_records_then_one_archive_row_holding_every_record() -> None:
    decoded = TransactionDecoder(ValidationLimits()).decode(raw(VALUES))
    batch = pack(decoded)
    assert batch.schema.equals(DETECTION_INPUT_ARROW_SCHEMA)
    assert batch.num_rows == 3  # two valid records and the archive row
    assert batch.column("transaction_id").to_pylist() == ["t1", "t2", None]
    assert batch.column("amount").to_pylist() == [42.5, 9000.0, None]
    archive = batch.column(ARCHIVE)
    assert archive.null_count == 2 and archive[2].is_valid
    assert batch.column("event_time")[2].as_py() is None, "archive rows never move the watermark"
    assert unpack([archive[2].as_py()]).equals(pa.Table.from_batches([decoded]))


def test_unpack_keeps_chunk_order_and_skips_nulls() -> None:
    decoder = TransactionDecoder(ValidationLimits())
    first, second = decoder.decode(raw(VALUES[:2])), decoder.decode(raw(VALUES[2:]))
    cells = [pack(first).column(ARCHIVE)[-1].as_buffer(), None,
             pack(second).column(ARCHIVE)[-1].as_buffer()]
    table = unpack(cells)
    assert table.schema == TRANSACTION_ROW_SCHEMA
    assert table.num_rows == 4
    assert pc.count(table.column("error_reason")).as_py() == 2
    assert table.column("error_reason").to_pylist()[1:3] == [schemas.INVALID_JSON,
                                                             schemas.EMPTY_VALUE]
    assert unpack([]).num_rows == 0


def test_an_all_rejected_chunk_still_archives_its_records() -> None:
    batch = pack(TransactionDecoder(ValidationLimits()).decode(raw([b"[]", b""])))
    assert batch.num_rows == 1
    assert unpack([batch.column(ARCHIVE)[0].as_py()]).num_rows == 2


def test_pack_refuses_rows_that_are_not_decoded_transactions() -> None:
    with pytest.raises(ValueError, match="TRANSACTION_ROW_SCHEMA"):
        pack(pa.table({"user_id": ["u1"]}))


def test_the_source_builds_the_decoder_from_its_option_and_limits() -> None:
    decoder = load_decoder(DETECTION_INPUT_DECODER, {"max_value_bytes": "10"})
    assert decoder == detection_input_decoder({"max_value_bytes": "10"})
    batch = decoder.decode(raw([json.dumps(GOOD).encode()]))  # longer than 10 bytes
    archived = unpack([batch.column(ARCHIVE)[-1].as_py()])
    assert archived.column("error_reason").to_pylist() == [schemas.VALUE_TOO_LARGE]
    assert batch.num_rows == 1
    assert [*RULE_COLUMNS, ARCHIVE, RULE_RECORD] == DETECTION_INPUT_ARROW_SCHEMA.names


def test_rules_topic_records_become_rule_record_rows_valid_or_not() -> None:
    """Every record of the rules topic is passed on (the state step judges it), with its key,
    its value as text (invalid UTF-8 replaced) and its offset; a deletion keeps its null."""
    decoder = load_decoder(RULE_RECORD_DECODER, {})
    batch = decoder.decode(RawBatch("fraud-rules", 0, [b"velocity", b"gone", b"bad"],
                                    [b'{"rule_id": "velocity"}', None, b"\xff{"], [7, 8, 9],
                                    [0, 0, 0]))
    assert batch.schema.equals(DETECTION_INPUT_ARROW_SCHEMA)
    assert batch.column(ARCHIVE).null_count == 3 and batch.column("event_time").null_count == 3
    records = [read_rule_record(cell) for cell in batch.column(RULE_RECORD).to_pylist()]
    assert records == [("velocity", '{"rule_id": "velocity"}', 7), ("gone", None, 8),
                       ("bad", "\ufffd{", 9)]
    assert pack(TransactionDecoder(ValidationLimits()).decode(raw(VALUES))).column(
        RULE_RECORD).null_count == 3, "transaction rows carry no rule record"
