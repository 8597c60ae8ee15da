"""Output adapters. Each one states its contract for a replayed micro-batch.

Spark replays a batch whose commit did not reach the checkpoint with the same offsets, so the
same input and (the alert ids being deterministic) the same alerts. Sinks make that safe:

- Parquet sinks write under their epoch's folder (``<dataset>/epoch=<id>/``, see
  ``fraudstream.datasets``) and replace the file of ``batch_id=<N>`` whole, so a replay leaves
  exactly one copy (exactly-once in Parquet), and no other run's files are ever touched.
- Kafka sinks use an idempotent producer and wait for every delivery before the batch may
  commit; a replay may publish an alert again, so Kafka is at-least-once with ``alert_id`` as the
  deduplication key (the console consumer and the dashboard deduplicate on it).
- ``ListSink`` collects records in memory for tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import KafkaError, Producer
from pyarrow import fs as pafs

from fraudstream import datasets, schemas
from fraudstream.datasets import PART_FILE, batch_folder
from fraudstream.rules.kinds import ansi_colour
from fraudstream.storage import StoragePath, filesystem, is_remote

__all__ = [
    "ALERT_ARROW_SCHEMA",
    "DLQ_ARROW_SCHEMA",
    "ConsoleAlertSink",
    "KafkaJsonSink",
    "ListSink",
    "ParquetBatchSink",
    "RecordSink",
    "write_all",
]

log = logging.getLogger(__name__)

Record = dict[str, Any]

#: The Parquet datasets' schemas (shared with their readers).
ALERT_ARROW_SCHEMA = datasets.ALERTS_SCHEMA
DLQ_ARROW_SCHEMA = datasets.DLQ_SCHEMA


class RecordSink(Protocol):
    """Receives one micro-batch's records; must be idempotent for a repeated ``batch_id``."""

    def write(self, batch_id: int, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


class SinkError(RuntimeError):
    """An output could not be written; the batch must not commit (it will be replayed)."""


class ParquetBatchSink:
    """One Parquet file per batch at ``<root>/batch_id=<N>/part-0.parquet``; an empty batch
    leaves no folder (and removes one a previous attempt wrote). ``root`` is one epoch's folder
    of a dataset: only this run replays into it.

    Atomic on both kinds of storage: a local file is written to a temporary name and renamed
    into place; an S3 object becomes visible whole when its upload completes, so it is written
    straight to its key (``fraudstream.storage``)."""

    def __init__(self, root: StoragePath, schema: pa.Schema) -> None:
        self.root = root
        self.schema = schema
        self.remote = is_remote(root)

    def write(self, batch_id: int, records: Sequence[Record]) -> None:
        table = pa.Table.from_pylist([{k: r.get(k) for k in self.schema.names} for r in records],
                                     schema=self.schema)
        self.write_table(batch_id, table)

    def write_table(self, batch_id: int, table: pa.Table) -> None:
        """The same contract for rows already in Arrow (selected and cast to the schema)."""
        folder = batch_folder(self.root, batch_id)
        if self.remote:
            self._write_remote(folder, table)
            return
        assert isinstance(folder, Path)
        if not table.num_rows:
            shutil.rmtree(folder, ignore_errors=True)
            return
        table = table.select(self.schema.names).cast(self.schema)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".part-0.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, temporary)
        os.replace(temporary, folder / PART_FILE)

    def _write_remote(self, folder: StoragePath, table: pa.Table) -> None:
        fs, path = filesystem(folder)
        try:
            if not table.num_rows:
                if fs.get_file_info(path).type != pafs.FileType.NotFound:
                    fs.delete_dir(path)
                return
            table = table.select(self.schema.names).cast(self.schema)
            pq.write_table(table, f"{path}/{PART_FILE}", filesystem=fs)
        except OSError as exc:
            raise SinkError(f"cannot write {folder}/{PART_FILE}: {exc}") from exc

    def close(self) -> None:
        pass


class KafkaJsonSink:
    """JSON records to a topic with an idempotent producer; ``write`` returns only when every
    record is acknowledged (acks=all), and raises SinkError otherwise."""

    def __init__(self, client_config: Mapping[str, str], topic: str, key_field: str,
                 fields: Sequence[str], delivery_timeout_s: float = 120.0) -> None:
        self.topic = topic
        self.key_field = key_field
        self.fields = tuple(fields)
        self.delivery_timeout_s = delivery_timeout_s
        self.producer = Producer({
            **client_config,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": int(delivery_timeout_s * 1000),
        })
        self.published = 0

    def write(self, batch_id: int, records: Sequence[Record]) -> None:
        if not records:
            return
        errors: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                errors.append(error)

        # A batch's alerts share few distinct times (one detection time per state bucket):
        # each is formatted once.
        texts: dict[datetime, str] = {}

        def ready(value: Any) -> Any:
            if not isinstance(value, datetime):
                return value
            text = texts.get(value)
            if text is None:
                text = texts[value] = schemas.format_timestamp(value)
            return text

        for record in records:
            key = record.get(self.key_field)
            payload = json.dumps({name: ready(record.get(name)) for name in self.fields},
                                 separators=(",", ":"), ensure_ascii=False)
            while True:
                try:
                    self.producer.produce(self.topic, key=key, value=payload.encode(),
                                          on_delivery=on_delivery)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        deadline = time.monotonic() + self.delivery_timeout_s + 5
        remaining = self.producer.flush(self.delivery_timeout_s)
        while remaining and time.monotonic() < deadline:
            remaining = self.producer.flush(1.0)
        if errors or remaining:
            first = errors[0] if errors else "delivery timed out"
            raise SinkError(f"batch {batch_id}: {len(errors) + remaining} of {len(records)} "
                            f"records not delivered to {self.topic}: {first}")
        self.published += len(records)

    def close(self) -> None:
        self.producer.flush(10)


def format_alert_line(alert: Mapping[str, Any], colour: bool) -> str:
    detected = alert["detected_at"]
    when = schemas.format_timestamp(detected) if isinstance(detected, datetime) else str(detected)
    version = alert.get("rule_version")
    label = alert["rule"] if version is None else f"{alert['rule']} v{version}"
    rule = f"{label:<18}"
    if colour:
        rule = f"\033[{ansi_colour(alert['rule'])}m{rule}\033[0m"
    return (f"ALERT {when} {rule} user={alert['user_id']:<8} "
            f"amount={alert['total_amount']:>10.2f} tx={alert['transaction_count']:<3} "
            f"{alert['reason']}")


class ConsoleAlertSink:
    """Readable alert lines on stdout (the detector's console output)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() and "NO_COLOR" not in os.environ

    def write(self, batch_id: int, records: Sequence[Record]) -> None:
        if not records:
            return
        # One write per batch: a print per alert cost more than formatting it.
        self.stream.write("".join(f"{format_alert_line(record, self.colour)}\n"
                                  for record in records))
        self.stream.flush()

    def close(self) -> None:
        pass


class ListSink:
    """In-memory sink for tests: remembers every write, keyed by batch id like the real ones."""

    def __init__(self) -> None:
        self.batches: dict[int, list[Record]] = {}
        self.writes = 0

    def write(self, batch_id: int, records: Sequence[Record]) -> None:
        self.writes += 1
        self.batches[batch_id] = list(records)

    @property
    def records(self) -> list[Record]:
        return [r for batch in self.batches.values() for r in batch]

    def close(self) -> None:
        pass


def write_all(sinks: Iterable[RecordSink], batch_id: int, records: Sequence[Record]) -> None:
    for sink in sinks:
        sink.write(batch_id, records)
