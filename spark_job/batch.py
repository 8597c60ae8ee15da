"""The foreachBatch step: split one micro-batch of tagged rows into bronze, DLQ and alerts.

Called by Spark once per micro-batch (and again, with the same id and rows, if the batch is
replayed after a crash). Everything here is idempotent on ``batch_id``; see ``spark_job.sinks``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame

from fraudstream import datasets, schemas
from fraudstream.rules import REFUSED
from spark_job.detection_input import ARCHIVE, unpack
from spark_job.memory import handled_rows
from spark_job.plan import KIND_ALERT, KIND_ARCHIVE, KIND_RULE, KIND_STATS, RULE_CHANGE
from spark_job.sinks import ParquetBatchSink, RecordSink, write_all
from spark_job.validation import TRANSACTION_ROW_SCHEMA

__all__ = [
    "BatchOutcome",
    "BatchProcessor",
    "DetectorOutputs",
    "percentile",
]

log = logging.getLogger(__name__)

BRONZE_ARROW_SCHEMA = datasets.TRANSACTIONS_SCHEMA
BRONZE_COLUMNS = tuple(BRONZE_ARROW_SCHEMA.names)
assert all(BRONZE_ARROW_SCHEMA.field(name) == TRANSACTION_ROW_SCHEMA.field(name)
           for name in BRONZE_COLUMNS), "bronze columns drifted from the decoder's"
DLQ_COLUMNS = ("key", "topic", "partition", "offset", "kafka_timestamp", "error_reason",
               "error_detail", "raw_value")


@dataclass
class BatchOutcome:
    """What one batch produced; merged with Spark's progress into a metrics line."""

    batch_id: int
    #: Records decoded from the transactions topic (valid and rejected).
    records: int = 0
    dlq_rows: int = 0
    late_rows: int = 0
    duplicate_rows: int = 0
    alerts: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    sink_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Rules-topic records this batch applied (or refused): in the input, not transactions.
    rule_changes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DetectorOutputs:
    """Where a batch goes: record sinks for alerts, rejected records and rule changes, and the
    folder of the bronze dataset (valid transactions, one Parquet file per batch)."""

    alerts: Sequence[RecordSink]
    dlq: Sequence[RecordSink]
    bronze_dir: Path | None = None
    rule_changes: Sequence[RecordSink] = ()


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return round(ordered[index], 1)


class BatchProcessor:
    """Callable given to ``foreachBatch``.

    The batch's rows come to the driver once, as Arrow (one Spark job per batch): alerts,
    counters and the archived chunks of decoded records (``spark_job.detection_input``), which
    are unpacked here into the rejected records and the valid rows, written as bronze Parquet
    by the driver. A second Spark job per batch (a distributed Parquet write from a persisted
    frame) cost more than the whole transfer at these volumes.
    """

    def __init__(self, outputs: DetectorOutputs) -> None:
        self.outputs = outputs
        self.outcomes: dict[int, BatchOutcome] = {}
        self.bronze = (ParquetBatchSink(outputs.bronze_dir, BRONZE_ARROW_SCHEMA)
                       if outputs.bronze_dir is not None else None)

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        started = time.monotonic()
        table = batch.toArrow()
        collected = time.monotonic()
        outcome = self.process_table(table, batch_id)
        outcome.stage_seconds = {"compute": collected - started, **outcome.stage_seconds}
        outcome.sink_seconds = time.monotonic() - started
        self.outcomes[batch_id] = outcome
        del table
        handled_rows(outcome.records)

    def process_table(self, table: pa.Table, batch_id: int) -> BatchOutcome:
        """Split one batch of tagged rows (the plan's output, as Arrow) and write every sink."""
        stages: dict[str, float] = {}
        mark = time.monotonic()
        kind = table.column("kind")
        archives = table.filter(pc.equal(kind, KIND_ARCHIVE)).column(ARCHIVE)
        transactions = unpack(cell.as_buffer() for cell in archives if cell.is_valid)
        is_valid = pc.is_null(transactions.column("error_reason"))
        valid = transactions.filter(is_valid)
        rejected = transactions.filter(pc.invert(is_valid)).select(list(DLQ_COLUMNS)).to_pylist()
        alerts, triggers = _alerts_of(table.filter(pc.equal(kind, KIND_ALERT)))
        changes = [json.loads(text) for text in
                   table.filter(pc.equal(kind, KIND_RULE)).column(RULE_CHANGE).to_pylist()]
        changes.sort(key=lambda change: change["offset"])
        stats = table.filter(pc.equal(kind, KIND_STATS))
        late_rows = int(pc.sum(stats.column("late_rows")).as_py() or 0)
        duplicate_rows = int(pc.sum(stats.column("duplicate_rows")).as_py() or 0)

        rejected_at = datetime.now(UTC)
        dlq_records = []
        for record in rejected:
            record["kafka_timestamp"] = _utc(record["kafka_timestamp"])
            record["rejected_at"] = rejected_at
            dlq_records.append(_kafka_dlq_record(record))
        stages["split"] = time.monotonic() - mark

        mark = time.monotonic()
        if self.bronze is not None:
            self.bronze.write_table(batch_id, valid)
        stages["bronze"] = time.monotonic() - mark
        mark = time.monotonic()
        if changes:
            applied_at = datetime.now(UTC)
            for change in changes:
                change["applied_at"] = applied_at
                _log_change(change)
            write_all(self.outputs.rule_changes, batch_id, changes)
        write_all(self.outputs.dlq, batch_id, dlq_records)
        write_all(self.outputs.alerts, batch_id, alerts)
        published = datetime.now(UTC)
        stages["sinks"] = time.monotonic() - mark

        outcome = BatchOutcome(batch_id=batch_id, records=transactions.num_rows,
                               dlq_rows=len(dlq_records),
                               late_rows=late_rows, duplicate_rows=duplicate_rows,
                               stage_seconds=stages, rule_changes=changes)
        for alert, trigger in zip(alerts, triggers, strict=True):
            outcome.alerts[alert["rule"]] += 1
            if trigger is not None:
                outcome.latencies_ms.append((published - trigger).total_seconds() * 1000)
        return outcome


#: The plan's column of each alert field (the user's is renamed there, next to the input's).
_ALERT_COLUMN_OF = {name: "alert_user_id" if name == "user_id" else name
                    for name in schemas.ALERT_FIELDS}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _python_values(column: pa.ChunkedArray) -> list[Any]:
    """A column as Python values, timestamps as UTC datetimes (naive ones hold UTC: the session
    time zone is UTC). Built from epoch microseconds, because pyarrow's own conversion of
    zone-aware timestamps cost more than the rest of an alert storm's split."""
    if pa.types.is_timestamp(column.type):
        micros = column.cast(pa.timestamp("us", column.type.tz), safe=False).cast(pa.int64())
        return [None if us is None else _EPOCH + timedelta(microseconds=us)
                for us in micros.to_pylist()]
    return column.to_pylist()


def _alerts_of(rows: pa.Table) -> tuple[list[dict[str, Any]], list[datetime | None]]:
    """The contract's alerts among one batch's tagged rows, ordered by detection time, rule and
    user, and the Kafka timestamp of each one's trigger (for the latency metric)."""
    rows = rows.take(pc.sort_indices(rows, [("detected_at", "ascending"), ("rule", "ascending"),
                                            ("alert_user_id", "ascending")]))
    columns = [_python_values(rows.column(_ALERT_COLUMN_OF[name]))
               for name in schemas.ALERT_FIELDS]
    alerts = [dict(zip(schemas.ALERT_FIELDS, values, strict=True))
              for values in zip(*columns, strict=True)]
    return alerts, _python_values(rows.column("trigger_kafka_timestamp"))


def _log_change(change: dict[str, Any]) -> None:
    """One loud line per rules record: what is in force now, or why a definition was refused."""
    rule = change["rule_id"] or "?"
    version = f" v{change['version']}" if change["version"] is not None else ""
    if change["status"] == REFUSED:
        log.warning("rule %s%s refused (offset %s): %s; the previous version stays in force",
                    rule, version, change["offset"], change["reason"])
        return
    if change["version"] is None:
        log.warning("rule %s %s (offset %s)", rule, change["status"], change["offset"])
        return
    before = (f" (was v{change['previous_version']} {change['previous_params']})"
              if change["previous_version"] is not None else "")
    state = "" if change["enabled"] else " disabled"
    log.warning("rule %s%s %s%s by %s: %s %s%s", rule, version, change["status"], state,
                change["updated_by"], change["kind"], change["params"], before)


def _kafka_dlq_record(record: dict[str, Any]) -> dict[str, Any]:
    """DLQ record with both the Parquet columns and the contract's DLQ JSON fields."""
    return {
        **record,
        "reason": record["error_reason"],
        "error": record["error_detail"],
        "source_topic": record["topic"],
        "source_partition": record["partition"],
        "source_offset": record["offset"],
    }
