"""The foreachBatch step: split one micro-batch of tagged rows into bronze, DLQ and alerts.

Called by Spark once per micro-batch (and again, with the same id and rows, if the batch is
replayed after a crash). Everything here is idempotent on ``batch_id``; see ``spark_job.sinks``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from fraudstream import schemas
from spark_job.plan import KIND_ALERT, KIND_STATS, KIND_TX
from spark_job.rules import MICROS, RuleConfig, Tx, alert_record, high_value_alert
from spark_job.sinks import RecordSink, batch_folder, write_all

log = logging.getLogger(__name__)

BRONZE_COLUMNS = (
    "transaction_id", "user_id", "amount", "currency", "event_time", "location",
    "payment_method", "merchant_id", "device_ip", "is_fraud", "fraud_pattern",
    "key", "topic", "partition", "offset", "kafka_timestamp",
)
DLQ_COLUMNS = ("key", "topic", "partition", "offset", "kafka_timestamp", "error_reason",
               "error_detail", "raw_value")


@dataclass
class BatchOutcome:
    """What one batch produced; merged with Spark's progress into a metrics line."""

    batch_id: int
    dlq_rows: int = 0
    late_rows: int = 0
    duplicate_rows: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    sink_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class DetectorOutputs:
    """Where a batch goes. ``bronze_dir`` is written by Spark (distributed); the small outputs
    (alerts, rejected records) are collected to the driver and go through record sinks."""

    alerts: Sequence[RecordSink]
    dlq: Sequence[RecordSink]
    bronze_dir: Path | None = None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _to_us(value: datetime) -> int:
    moment = _utc(value)
    assert moment is not None
    return round(moment.timestamp() * MICROS)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return round(ordered[index], 1)


class BatchProcessor:
    """Callable given to ``foreachBatch``."""

    def __init__(self, config: RuleConfig, outputs: DetectorOutputs) -> None:
        self.config = config
        self.outputs = outputs
        self.outcomes: dict[int, BatchOutcome] = {}

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        batch.persist()
        try:
            outcome = self._process(batch, batch_id)
        finally:
            batch.unpersist()
        outcome.sink_seconds = time.monotonic() - started
        self.outcomes[batch_id] = outcome

    def _process(self, batch: DataFrame, batch_id: int) -> BatchOutcome:
        kind = F.col("kind")
        is_tx = kind == KIND_TX
        rejected = is_tx & F.col("error_reason").isNotNull()
        high_value = is_tx & F.col("error_reason").isNull() & (
            F.col("amount") > F.lit(self.config.high_value_amount))
        stages: dict[str, float] = {}
        mark = time.monotonic()
        # One small collect carries everything the driver-side sinks need.
        interesting = batch.where(
            (kind == KIND_ALERT) | (kind == KIND_STATS) | rejected | high_value).collect()

        rejected_at = datetime.now(UTC)
        dlq_records: list[dict[str, Any]] = []
        alerts: list[dict[str, Any]] = []
        late_rows = duplicate_rows = 0
        for row in interesting:
            record = row.asDict()
            if record["kind"] == KIND_STATS:
                late_rows += record["late_rows"] or 0
                duplicate_rows += record["duplicate_rows"] or 0
            elif record["kind"] == KIND_ALERT:
                alert = {name: record[name] for name in schemas.ALERT_FIELDS if name != "user_id"}
                alert["user_id"] = record["alert_user_id"]
                for name in ("window_start", "window_end", "detected_at"):
                    alert[name] = _utc(alert[name])
                alert["_trigger_kafka_timestamp"] = _utc(record["trigger_kafka_timestamp"])
                alerts.append(alert)
            elif record["error_reason"] is not None:
                dlq = {name: record[name] for name in DLQ_COLUMNS}
                dlq["kafka_timestamp"] = _utc(dlq["kafka_timestamp"])
                dlq["rejected_at"] = rejected_at
                dlq_records.append(dlq)
            else:
                tx = Tx(_to_us(record["event_time"]), record["transaction_id"],
                        float(record["amount"]), record["location"], record["payment_method"],
                        _to_us(record["kafka_timestamp"]))
                found = high_value_alert(record["user_id"], tx, self.config)
                if found:
                    alert = alert_record(found, datetime.now(UTC))
                    alert["_trigger_kafka_timestamp"] = _utc(record["kafka_timestamp"])
                    alerts.append(alert)
        # A resent transaction can repeat a high_value alert inside one batch.
        alerts = list({a["alert_id"]: a for a in alerts}.values())
        alerts.sort(key=lambda a: (a["detected_at"], a["rule"], a["user_id"]))

        stages["collect"] = time.monotonic() - mark
        mark = time.monotonic()
        if self.outputs.bronze_dir is not None:
            target = batch_folder(self.outputs.bronze_dir, batch_id)
            valid = batch.where(is_tx & F.col("error_reason").isNull()).select(*BRONZE_COLUMNS)
            valid.write.mode("overwrite").parquet(str(target))

        stages["bronze"] = time.monotonic() - mark
        mark = time.monotonic()
        write_all(self.outputs.dlq, batch_id, [_kafka_dlq_record(r) for r in dlq_records])
        public_alerts = [{k: v for k, v in a.items() if not k.startswith("_")} for a in alerts]
        write_all(self.outputs.alerts, batch_id, public_alerts)

        published = datetime.now(UTC)
        stages["sinks"] = time.monotonic() - mark
        outcome = BatchOutcome(batch_id=batch_id, dlq_rows=len(dlq_records),
                               late_rows=late_rows, duplicate_rows=duplicate_rows,
                               stage_seconds=stages)
        for alert in alerts:
            outcome.alerts[alert["rule"]] += 1
            trigger = alert["_trigger_kafka_timestamp"]
            if trigger is not None:
                outcome.latencies_ms.append((published - trigger).total_seconds() * 1000)
        return outcome


def _kafka_dlq_record(record: dict[str, Any]) -> dict[str, Any]:
    """DLQ record with both the Parquet columns and the SPEC's DLQ JSON fields."""
    return {
        **record,
        "reason": record["error_reason"],
        "error": record["error_detail"],
        "source_topic": record["topic"],
        "source_partition": record["partition"],
        "source_offset": record["offset"],
    }
