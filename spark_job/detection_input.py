"""What the detector's Kafka source yields: narrow rule rows plus the decoded chunks, archived.

Why this layout: Spark moves every column of every row between Arrow and its row format several
times per micro-batch (source output, shuffle, in and out of the stateful operator's Python
worker, the driver's collect). Profiling a 200k backfill showed those conversions, and pandas
handling the passed-through columns, costing several times what the rules themselves cost. So
for every chunk it decodes, the source yields:

- one *rule row* per valid transaction, with only the columns the rules read (``RULE_COLUMNS``;
  ``archive`` null), and
- one *archive row*: every rule column null, ``archive`` = the whole decoded chunk (valid and
  rejected records, every column of ``TRANSACTION_ROW_SCHEMA``) as Arrow IPC stream bytes.

Rule rows go through the shuffle and the windowed rules; archive rows pass the stateful operator
in a group of their own, untouched, and reach ``foreachBatch`` as a few large binary cells, which
the driver unpacks (``unpack``) into bronze, the dead-letter records and high-value checks. One
read of Kafka still feeds every sink, and the archive rows' null ``event_time`` never moves the
watermark.

The rules topic is read by a second instance of the same source with ``RULE_RECORD_DECODER``:
one *rule record row* per ``fraud-rules`` record (every other column null, ``rule_record`` = the
record's key, value and offset as JSON). Both streams share this schema, so the plan can union
them and the offsets of both topics sit in each micro-batch's entry of the offset log: a batch
replayed after a crash sees exactly the rule records its first attempt saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql.types import BinaryType, StringType, StructField, StructType

from spark_job.kafka_source import RawBatch, arrow_schema
from spark_job.validation import (
    ERROR_REASON,
    EVENT_TIME,
    KAFKA_TIMESTAMP,
    TRANSACTION_ROW_SCHEMA,
    TRANSACTION_SPARK_SCHEMA,
    TransactionDecoder,
    ValidationLimits,
)

__all__ = [
    "ARCHIVE",
    "DETECTION_INPUT_ARROW_SCHEMA",
    "DETECTION_INPUT_DECODER",
    "DETECTION_INPUT_SCHEMA",
    "RULE_COLUMNS",
    "RULE_RECORD",
    "RULE_RECORD_DECODER",
    "archive_bytes",
    "detection_input_decoder",
    "pack",
    "read_rule_record",
    "rule_record_text",
    "unpack",
]

#: The transaction columns the rules and the model's features read.
RULE_COLUMNS: Final = ("user_id", "transaction_id", EVENT_TIME, "amount", "location",
                       "payment_method", KAFKA_TIMESTAMP, "merchant_id", "device_ip")
ARCHIVE: Final = "archive"
RULE_RECORD: Final = "rule_record"

DETECTION_INPUT_SCHEMA: Final = StructType(
    [TRANSACTION_SPARK_SCHEMA[name] for name in RULE_COLUMNS]
    + [StructField(ARCHIVE, BinaryType()), StructField(RULE_RECORD, StringType())])
DETECTION_INPUT_ARROW_SCHEMA: Final = arrow_schema(DETECTION_INPUT_SCHEMA)

#: ``decoder`` option value of the Kafka source for the detector.
DETECTION_INPUT_DECODER: Final = "spark_job.detection_input:detection_input_decoder"
#: ``decoder`` option value of the source on the rules topic.
RULE_RECORD_DECODER: Final = "spark_job.detection_input:rule_record_decoder"


#: Archive cells are LZ4-compressed: ~5x fewer bytes to shuffle, copy and collect.
_ARCHIVE_WRITE_OPTIONS: Final = pa.ipc.IpcWriteOptions(compression="lz4")


def archive_bytes(decoded: pa.RecordBatch | pa.Table) -> bytes:
    """One decoded chunk as Arrow IPC stream bytes (what an archive cell holds)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, TRANSACTION_ROW_SCHEMA,
                           options=_ARCHIVE_WRITE_OPTIONS) as writer:
        writer.write(decoded)
    return sink.getvalue().to_pybytes()


def pack(decoded: pa.RecordBatch | pa.Table) -> pa.RecordBatch:
    """Rule rows for the valid records of a decoded chunk, then one archive row holding it all."""
    if decoded.schema != TRANSACTION_ROW_SCHEMA:
        raise ValueError("pack() takes decoded rows (TRANSACTION_ROW_SCHEMA)")
    valid = decoded.filter(pc.is_null(decoded.column(ERROR_REASON)))
    arrays = [pa.concat_arrays([*_chunks(valid.column(name)),
                                pa.nulls(1, DETECTION_INPUT_ARROW_SCHEMA.field(name).type)])
              for name in RULE_COLUMNS]
    arrays.append(pa.concat_arrays([pa.nulls(valid.num_rows, pa.binary()),
                                    pa.array([archive_bytes(decoded)], pa.binary())]))
    arrays.append(pa.nulls(valid.num_rows + 1, pa.string()))
    return pa.RecordBatch.from_arrays(arrays, schema=DETECTION_INPUT_ARROW_SCHEMA)


def rule_record_text(key: bytes | None, value: bytes | None, offset: int) -> str:
    """One rules-topic record as the JSON text of a ``rule_record`` cell (bytes that are not
    UTF-8 are replaced: such a value is refused as a definition anyway)."""
    return json.dumps({
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "value": value.decode("utf-8", "replace") if value is not None else None,
        "offset": offset,
    })


def read_rule_record(text: str) -> tuple[str | None, str | None, int]:
    """(key, value, offset) of a ``rule_record`` cell."""
    data = json.loads(text)
    return data["key"], data["value"], int(data["offset"])


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def unpack(archives: Iterable[bytes | None]) -> pa.Table:
    """The decoded rows held by archive cells, in the order given (nulls skipped)."""
    tables = [pa.ipc.open_stream(blob).read_all() for blob in archives if blob is not None]
    if not tables:
        return TRANSACTION_ROW_SCHEMA.empty_table()
    return pa.concat_tables(tables)


@dataclass(frozen=True)
class DetectionInputDecoder:
    """The Kafka source's decoder for the detector: validates like ``TransactionDecoder`` and
    yields the rule rows and the archive row of each chunk."""

    rows: TransactionDecoder

    @property
    def schema(self) -> StructType:
        return DETECTION_INPUT_SCHEMA

    def decode(self, raw: RawBatch) -> pa.RecordBatch:
        return pack(self.rows.decode(raw))


@dataclass(frozen=True)
class RuleRecordDecoder:
    """The Kafka source's decoder for the rules topic: one rule record row per record, valid or
    not (the state step judges definitions, so a refusal is recorded where it is applied)."""

    @property
    def schema(self) -> StructType:
        return DETECTION_INPUT_SCHEMA

    def decode(self, raw: RawBatch) -> pa.RecordBatch:
        rows = len(raw)
        arrays = [pa.nulls(rows, field.type) for field in DETECTION_INPUT_ARROW_SCHEMA
                  if field.name != RULE_RECORD]
        arrays.append(pa.array([rule_record_text(k, v, o) for k, v, o in
                                zip(raw.keys, raw.values, raw.offsets, strict=True)], pa.string()))
        return pa.RecordBatch.from_arrays(arrays, schema=DETECTION_INPUT_ARROW_SCHEMA)


def rule_record_decoder(options: Mapping[str, str]) -> RuleRecordDecoder:
    """Decoder factory named by RULE_RECORD_DECODER (no options)."""
    return RuleRecordDecoder()


def detection_input_decoder(options: Mapping[str, str]) -> DetectionInputDecoder:
    """Decoder factory named by DETECTION_INPUT_DECODER; same options as
    ``spark_job.validation.transaction_decoder``."""
    return DetectionInputDecoder(TransactionDecoder(ValidationLimits.from_options(options)))
