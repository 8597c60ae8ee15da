"""Arrow schemas of the Parquet datasets under ``parquet_data/`` (writers and readers share them).

The detector writes these folders (``batch_id=<N>/part-0.parquet``, see ``spark_job.sinks``);
the dashboard and the quality command read them. Column names follow the contracts in
``fraudstream.schemas``.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

from fraudstream.schemas import ALERT_FIELDS

_TS: Final = pa.timestamp("us", tz="UTC")

#: ``parquet_data/alerts/``: one row per alert, the SPEC alert fields.
ALERTS_SCHEMA: Final = pa.schema([
    ("alert_id", pa.string()), ("rule", pa.string()), ("rule_version", pa.int64()),
    ("user_id", pa.string()),
    ("window_start", _TS), ("window_end", _TS), ("transaction_count", pa.int64()),
    ("total_amount", pa.float64()), ("locations", pa.list_(pa.string())),
    ("transaction_ids", pa.list_(pa.string())), ("reason", pa.string()), ("detected_at", _TS),
])
assert tuple(ALERTS_SCHEMA.names) == ALERT_FIELDS, "alert columns drifted from the contract"

#: ``parquet_data/transactions/`` (bronze): every valid transaction with its Kafka coordinates.
TRANSACTIONS_SCHEMA: Final = pa.schema([
    ("transaction_id", pa.string()), ("user_id", pa.string()), ("amount", pa.float64()),
    ("currency", pa.string()), ("event_time", _TS), ("location", pa.string()),
    ("payment_method", pa.string()), ("merchant_id", pa.string()), ("device_ip", pa.string()),
    ("is_fraud", pa.bool_()), ("fraud_pattern", pa.string()), ("key", pa.string()),
    ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()),
    ("kafka_timestamp", _TS),
])

#: ``parquet_data/dlq/``: every rejected record with its reason code and raw value.
DLQ_SCHEMA: Final = pa.schema([
    ("key", pa.string()), ("topic", pa.string()), ("partition", pa.int32()),
    ("offset", pa.int64()), ("kafka_timestamp", _TS), ("error_reason", pa.string()),
    ("error_detail", pa.string()), ("raw_value", pa.string()), ("rejected_at", _TS),
])

#: ``parquet_data/rule_changes/``: every ``fraud-rules`` record the detector read, in the order
#: applied (``RuleChange.to_record``): the durable history of the rules in force.
RULE_CHANGES_SCHEMA: Final = pa.schema([
    ("rule_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("version", pa.int64()), ("kind", pa.string()), ("enabled", pa.bool_()),
    ("params", pa.string()), ("previous_version", pa.int64()), ("previous_params", pa.string()),
    ("updated_at", pa.string()), ("updated_by", pa.string()), ("raw", pa.string()),
    ("offset", pa.int64()), ("applied_at", _TS),
])
