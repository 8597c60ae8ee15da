"""The Parquet datasets under ``parquet_data/``: their schemas, their layout, and the one reader.

Layout (the durable history; nothing here is ever replaced by another run)::

    <dataset>/epoch=<epoch id>/batch_id=<n>/part-0.parquet        one micro-batch of one run
    <dataset>/epoch=<epoch id>/compacted=<a>-<b>/part-0.parquet   batches a..b of that run, merged
    <dataset>/batch_id=<n>/part-0.parquet                          written before epochs existed

An *epoch* is one checkpoint's life (``spark_job.epochs``): a new ``CHECKPOINT_DIR`` or a broker
reset starts a new one, so batch ids that restart at 0 land in a new folder instead of replacing
the earlier run's. Within an epoch a replayed batch rewrites only its own file (the same input
gives the same rows), which keeps Parquet exactly-once under crashes.

Reading (``dataset_files`` / ``read_dataset``): every epoch, in order of its id (ids sort by
start time), batches in numeric order; a ``batch_id`` folder covered by a committed
``compacted`` folder of the same epoch is skipped (compaction writes the merged file first, then
deletes the batches, so a reader sees each row once at every moment); names starting with ``_``
or ``.`` are writers' temporary files and never data. Two epochs may hold the same item (a new
checkpoint re-reading the same topic), so readers keep the first row per identity
(``IDENTITY``).

The root is a local folder or an ``s3://`` URL (``fraudstream.storage``); listing and reading go
through one pyarrow filesystem either way. Column names follow the contracts in
``fraudstream.schemas``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from fraudstream.schemas import (
    ALERT_FIELDS,
    ALERTS_DATASET,
    DLQ_DATASET,
    RULE_CHANGES_DATASET,
    TRANSACTIONS_DATASET,
)
from fraudstream.storage import StoragePath, filesystem, storage_path

__all__ = [
    "ALERTS_SCHEMA",
    "DLQ_SCHEMA",
    "PART_FILE",
    "RULE_CHANGES_SCHEMA",
    "TRANSACTIONS_SCHEMA",
    "batch_folder",
    "conform",
    "dataset_files",
    "epoch_folder",
    "first_of_each",
    "list_dataset",
    "read_dataset",
    "read_parquet_file",
]

log = logging.getLogger(__name__)

_TS: Final = pa.timestamp("us", tz="UTC")

#: ``parquet_data/alerts/``: one row per alert, the contract's alert fields.
ALERTS_SCHEMA: Final = pa.schema([
    ("alert_id", pa.string()), ("rule", pa.string()), ("rule_version", pa.int64()),
    ("user_id", pa.string()),
    ("window_start", _TS), ("window_end", _TS), ("transaction_count", pa.int64()),
    ("total_amount", pa.float64()), ("locations", pa.list_(pa.string())),
    ("transaction_ids", pa.list_(pa.string())), ("reason", pa.string()), ("detected_at", _TS),
    ("risk_score", pa.float64()), ("score_reasons", pa.list_(pa.string())),
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


#: What makes two rows of a dataset the same item (alert ids are deterministic; a transaction id
#: is the producer's; a rejected record is its Kafka coordinates; a rules record its offset and
#: text). Readers keep the first row per identity across epochs.
IDENTITY: Final[dict[str, tuple[str, ...]]] = {
    ALERTS_DATASET: ("alert_id",),
    TRANSACTIONS_DATASET: ("transaction_id",),
    DLQ_DATASET: ("topic", "partition", "offset", "kafka_timestamp"),
    RULE_CHANGES_DATASET: ("offset", "raw", "status"),
}

EPOCH_PREFIX: Final = "epoch="
BATCH_PREFIX: Final = "batch_id="
COMPACTED_PREFIX: Final = "compacted="
PART_FILE: Final = "part-0.parquet"
_COMPACTED = re.compile(r"^compacted=(\d+)-(\d+)$")


def epoch_folder(parquet_dir: StoragePath, dataset: str, epoch: str) -> StoragePath:
    """Where one epoch of a dataset keeps its batch folders."""
    return storage_path(parquet_dir) / dataset / f"{EPOCH_PREFIX}{epoch}"


def batch_folder(epoch_root: StoragePath, batch_id: int) -> StoragePath:
    return epoch_root / f"{BATCH_PREFIX}{batch_id}"


@dataclass(frozen=True)
class DataFile:
    """One committed Parquet file: its path inside the filesystem, size and modification time
    (together they identify a version: files are replaced whole, never appended to)."""

    path: str
    size: int
    mtime_ns: int


def _folder_order(name: str) -> tuple[int, str, int]:
    """Legacy batch folders first, then epochs by id; batches by number, not by text."""
    if name.startswith(BATCH_PREFIX):
        number = name[len(BATCH_PREFIX):]
        return (0, "", int(number) if number.isdigit() else -1)
    match = _COMPACTED.match(name)
    if match:
        return (0, "", int(match[1]))
    return (1, name, 0)


def _list_files(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    for attempt in range(3):
        try:
            return [info for info in fs.get_file_info(selector)
                    if info.type == pafs.FileType.File]
        except FileNotFoundError:  # a folder deleted while listing (compaction): list again
            if attempt == 2:
                raise
    return []


def list_dataset(root: StoragePath | str, dataset: str
                 ) -> tuple[pafs.FileSystem, list[DataFile]]:
    """The committed Parquet files of one dataset in history order (see the module docstring),
    with the filesystem to read them from. Works on a local folder and on ``s3://``."""
    fs, base_path = filesystem(root)
    if isinstance(fs, pafs.LocalFileSystem):
        base_path = str(Path(base_path).absolute())
    base = f"{base_path.rstrip('/')}/{dataset}"
    entries: list[tuple[list[str], pafs.FileInfo]] = []
    covered: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for info in _list_files(fs, base):
        parts = info.path[len(base) + 1:].split("/")
        if any(part.startswith(("_", ".")) for part in parts) or not parts[-1].endswith(
                ".parquet"):
            continue
        if len(parts) >= 2 and parts[-1] == PART_FILE and (match := _COMPACTED.match(parts[-2])):
            covered.setdefault(tuple(parts[:-2]), []).append((int(match[1]), int(match[2])))
        entries.append((parts, info))
    files = []
    for parts, info in entries:
        if len(parts) >= 2 and parts[-2].startswith(BATCH_PREFIX):
            number = parts[-2][len(BATCH_PREFIX):]
            ranges = covered.get(tuple(parts[:-2]), ())
            if number.isdigit() and any(a <= int(number) <= b for a, b in ranges):
                continue
        key = (tuple(_folder_order(part) for part in parts[:-1]), parts[-1])
        files.append((key, DataFile(info.path, info.size or 0, info.mtime_ns or 0)))
    files.sort(key=lambda item: item[0])
    return fs, [data_file for _, data_file in files]


def dataset_files(root: Path, dataset: str) -> list[Path]:
    """``list_dataset`` for a local folder, as paths."""
    _, files = list_dataset(root, dataset)
    return [Path(data_file.path) for data_file in files]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order and of its types."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table[field.name]
            columns.append(column if column.type == field.type
                           else column.cast(field.type, safe=False))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def read_parquet_file(
    path: Path | str, schema: pa.Schema, row_filter: pc.Expression | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pa.Table | None:
    """One file conformed to ``schema`` (missing columns become nulls, types are cast), or None
    with a logged warning if the file is unreadable or vanished (compacted away) meanwhile."""
    try:
        with pq.ParquetFile(str(path), filesystem=filesystem) as parquet_file:
            present = [name for name in schema.names if name in parquet_file.schema_arrow.names]
            table = parquet_file.read(columns=present)
        table = conform(table, schema)
        return table.filter(row_filter) if row_filter is not None else table
    except FileNotFoundError:
        return None
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("skipping unreadable Parquet file %s: %s", path, exc)
        return None


def first_of_each(table: pa.Table, dataset: str) -> pa.Table:
    """``table`` without repeats: the first row of each identity (``IDENTITY``), order kept.
    A table lacking the identity columns, or a dataset without one, is returned as it is."""
    keys = IDENTITY.get(dataset)
    if not keys or table.num_rows < 2 or not set(keys) <= set(table.column_names):
        return table
    numbered = table.select(list(keys)).append_column(
        "__row", pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(list(keys), use_threads=False).aggregate([("__row", "min")])
    rows = first.column("__row_min")
    if len(rows) == table.num_rows:
        return table
    return table.take(pc.take(rows, pc.sort_indices(rows)))


def read_dataset(
    root: StoragePath | str, dataset: str, schema: pa.Schema,
    row_filter: pc.Expression | None = None, *, distinct: bool = True,
) -> pa.Table:
    """Every committed row of a dataset as one table with ``schema`` (empty if none), each item
    once (``distinct``; identity columns are read for it even when ``schema`` leaves them out)."""
    keys = IDENTITY.get(dataset, ()) if distinct else ()
    extra = [name for name in keys if name not in schema.names]
    source = {ALERTS_DATASET: ALERTS_SCHEMA, TRANSACTIONS_DATASET: TRANSACTIONS_SCHEMA,
              DLQ_DATASET: DLQ_SCHEMA, RULE_CHANGES_DATASET: RULE_CHANGES_SCHEMA}.get(dataset)
    read_schema = schema
    if extra and source is not None:
        read_schema = pa.schema([*schema, *(source.field(name) for name in extra)])
    fs, files = list_dataset(root, dataset)
    tables = [table for data_file in files
              if (table := read_parquet_file(data_file.path, read_schema, row_filter, fs))
              is not None]
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    if distinct:
        table = first_of_each(table, dataset)
    return table.select(schema.names)
