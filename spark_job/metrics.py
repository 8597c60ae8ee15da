"""Per-batch status: one readable log line and one JSON line (``BatchMetrics``) per micro-batch.

Spark's own progress (input rows, duration, watermark, rows dropped by the watermark) arrives in
a StreamingQueryListener after the batch commits; the batch step's own counts (DLQ rows, alerts
per rule, latencies) are merged in by batch id.

The JSON-lines file is bounded: before a line would take it past ``max_bytes`` it is rotated like
logrotate's numbered files (``detector.jsonl`` -> ``detector.jsonl.1`` -> ... -> ``.3``, the
oldest dropped), each step an atomic ``os.replace``. Readers follow the rotation
(``dashboard.data.metrics``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.sql.streaming import StreamingQueryListener

from fraudstream import schemas
from fraudstream.model import ModelSource
from spark_job.batch import BatchOutcome, BatchProcessor, percentile

__all__ = [
    "METRICS_BACKUPS",
    "METRICS_MAX_BYTES",
    "MetricsListener",
    "append_line",
    "rotate",
    "rotated_path",
]

log = logging.getLogger(__name__)

#: The metrics file is rotated before a line would make it larger than this.
METRICS_MAX_BYTES = 10 * 1024 * 1024
#: Rotated files kept (``<file>.1`` is the newest of them).
METRICS_BACKUPS = 3


def rotated_path(path: Path, number: int) -> Path:
    """The ``number``-th rotated file of ``path`` (``detector.jsonl.1`` is the newest)."""
    return path.with_name(f"{path.name}.{number}")


def rotate(path: Path, backups: int = METRICS_BACKUPS) -> None:
    """Shift ``path.(n-1)`` to ``path.n`` (dropping the oldest) and ``path`` to ``path.1``, each
    with one atomic rename, so a reader never sees a file cut short or two copies of a line."""
    for number in range(backups, 1, -1):
        older = rotated_path(path, number - 1)
        if older.exists():
            os.replace(older, rotated_path(path, number))
    if backups > 0:
        os.replace(path, rotated_path(path, 1))
    else:
        path.unlink()


def append_line(path: Path, line: str, max_bytes: int = METRICS_MAX_BYTES,
                backups: int = METRICS_BACKUPS) -> None:
    """Append one line (with its newline) to ``path``, rotating first when the line would take a
    non-empty file past ``max_bytes``."""
    data = line.encode("utf-8")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if size and size + len(data) > max_bytes:
        rotate(path, backups)
    with path.open("ab") as fh:
        fh.write(data)


def _offsets(value: Any) -> dict[str, int]:
    if isinstance(value, str):
        value = json.loads(value)
    return {str(k): int(v) for k, v in (value or {}).items()}


def records_between_offsets(progress: Mapping[str, Any]) -> int:
    """Records the batch consumed, from the source's offset range. Spark's numInputRows counts
    every scan of the source, and the plan scans it once per branch of its union."""
    total = 0
    try:
        for source in progress.get("sources") or []:
            start, end = _offsets(source.get("startOffset")), _offsets(source.get("endOffset"))
            total += sum(max(0, offset - start.get(p, 0)) for p, offset in end.items())
    except (TypeError, ValueError, AttributeError):
        return int(progress.get("numInputRows") or 0)
    return total


def metrics_line(progress: Mapping[str, Any], outcome: BatchOutcome | None) -> schemas.BatchMetrics:
    """Build the JSON-lines record from Spark's progress dict and the batch's own outcome."""
    # Rules-topic records are input too, but not transactions.
    input_rows = records_between_offsets(progress) - (len(outcome.rule_changes) if outcome else 0)
    duration_ms = (progress.get("durationMs") or {}).get("triggerExecution") or 0
    # The rules' operator sees late rows (it counts them itself); Spark drops none.
    late = outcome.late_rows if outcome else 0
    dlq = outcome.dlq_rows if outcome else 0
    latencies = outcome.latencies_ms if outcome else []
    watermark = (progress.get("eventTime") or {}).get("watermark")
    if watermark and watermark.startswith("1970-01-01"):
        watermark = None
    seconds = duration_ms / 1000
    return {
        "batch_id": int(progress.get("batchId", -1)),
        "written_at": schemas.format_timestamp(datetime.now(UTC)),
        "input_rows": input_rows,
        "valid_rows": input_rows - dlq,
        "dlq_rows": dlq,
        "late_rows": late,
        "alerts": {**dict.fromkeys(schemas.RULES, 0), **(outcome.alerts if outcome else {})},
        "batch_seconds": round(seconds, 3),
        "rows_per_second": round(input_rows / seconds, 1) if seconds > 0 else 0.0,
        "watermark": watermark,
        "latency_ms_p50": percentile(latencies, 0.50),
        "latency_ms_p95": percentile(latencies, 0.95),
        "latency_ms_max": round(max(latencies), 1) if latencies else None,
        "latency_ms_histogram": schemas.latency_histogram(latencies),
        "duplicate_rows": outcome.duplicate_rows if outcome else 0,
        "stage_seconds": stage_seconds(progress, outcome),
    }


def stage_seconds(progress: Mapping[str, Any], outcome: BatchOutcome | None) -> dict[str, float]:
    stages = {f"spark.{name}": round(ms / 1000, 3)
              for name, ms in (progress.get("durationMs") or {}).items()
              if name != "triggerExecution"}
    if outcome:
        stages.update({name: round(sec, 3) for name, sec in outcome.stage_seconds.items()})
    return stages


def status_text(line: schemas.BatchMetrics) -> str:
    alerts = " ".join(f"{rule}={n}" for rule, n in line["alerts"].items() if n) or "none"
    latency = (f" latency p50/p95={line['latency_ms_p50']:.0f}/{line['latency_ms_p95']:.0f} ms"
               if line["latency_ms_p50"] is not None and line["latency_ms_p95"] is not None else "")
    return (f"batch {line['batch_id']}: {line['input_rows']} rows in {line['batch_seconds']:.2f} s"
            f" ({line['rows_per_second']:.0f} rows/s), alerts: {alerts}, dlq={line['dlq_rows']}, "
            f"late={line['late_rows']}, watermark={line['watermark'] or '-'}{latency}{_slow(line)}")


def _slow(line: schemas.BatchMetrics) -> str:
    """The stages that took a noticeable share of the batch, slowest first."""
    stages = sorted(((sec, name) for name, sec in line.get("stage_seconds", {}).items()
                     if sec >= 0.05), reverse=True)
    return (" time: " + ", ".join(f"{name.removeprefix('spark.')}={sec:.2f}s"
                                  for sec, name in stages)) if stages else ""


class MetricsListener(StreamingQueryListener):
    """Writes a metrics line and logs a status line for every completed batch; the metrics file
    is rotated when it would grow past ``max_bytes`` (``backups`` rotated files are kept)."""

    def __init__(self, processor: BatchProcessor, path: Path,
                 max_bytes: int = METRICS_MAX_BYTES, backups: int = METRICS_BACKUPS,
                 models: ModelSource | None = None) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.processor = processor
        self.models = models
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.last: schemas.BatchMetrics | None = None
        self.batches = 0
        self.totals: dict[str, int] = {"input_rows": 0, "dlq_rows": 0, "late_rows": 0}
        self.alert_totals: dict[str, int] = dict.fromkeys(schemas.RULES, 0)
        #: Set once Spark delivered the query's end (its last callback into Python).
        self.terminated = threading.Event()

    def onQueryStarted(self, event: Any) -> None:
        log.info("query %s started (run %s)", event.name, event.runId)

    def onQueryProgress(self, event: Any) -> None:
        progress = json.loads(event.progress.json)
        batch_id = int(progress.get("batchId", -1))
        outcome = self.processor.outcomes.pop(batch_id, None)
        if outcome is None and not progress.get("numInputRows"):
            return  # an idle trigger: nothing ran, nothing to report
        line = metrics_line(progress, outcome)
        if self.models is not None:
            scorer = self.models.current()
            line["model"] = scorer.summary if scorer is not None else None
        with self.lock:
            append_line(self.path, json.dumps(line, separators=(",", ":")) + "\n",
                        self.max_bytes, self.backups)
            self.last = line
            self.batches += 1
            for key in self.totals:
                self.totals[key] += int(line[key])  # type: ignore[literal-required]
            for rule, count in line["alerts"].items():
                self.alert_totals[rule] = self.alert_totals.get(rule, 0) + count
        log.info("%s", status_text(line))

    def onQueryIdle(self, event: Any) -> None:
        pass

    def onQueryTerminated(self, event: Any) -> None:
        self.terminated.set()
        if event.exception:
            log.error("query terminated with an error: %s", event.exception.splitlines()[0])

    def summary(self) -> str:
        with self.lock:
            alerts = ", ".join(f"{r}={n}" for r, n in self.alert_totals.items())
            return (f"{self.batches} batches, {self.totals['input_rows']} rows, alerts: {alerts}, "
                    f"dlq={self.totals['dlq_rows']}, late={self.totals['late_rows']}")
