"""The detector's Parquet history, read incrementally while the detector keeps writing it.

Files are immutable once renamed into place and a replayed batch replaces its own file whole, so
a file is identified by (path, mtime, size): each refresh lists the dataset (every epoch,
compacted folders in place of the batches they cover, ``fraudstream.datasets``) and reads only
what is new or changed; an item held by two epochs is kept once. A file that cannot be read
(still being written, corrupt) is skipped with one warning and retried once it changes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pyarrow as pa

from fraudstream.datasets import (
    DLQ_SCHEMA,
    TRANSACTIONS_SCHEMA,
    dataset_files,
    first_of_each,
    read_parquet_file,
)

#: The transaction columns the dashboard keeps in memory (evidence, amounts, quality).
TRANSACTION_VIEW_SCHEMA = pa.schema([
    TRANSACTIONS_SCHEMA.field(name) for name in (
        "transaction_id", "user_id", "amount", "currency", "event_time", "location",
        "payment_method", "merchant_id", "is_fraud", "fraud_pattern", "kafka_timestamp",
    )
])
#: The DLQ columns the dashboard reads.
DLQ_VIEW_SCHEMA = pa.schema([DLQ_SCHEMA.field(name) for name in DLQ_SCHEMA.names
                             if name != "rejected_at"])

_Signature = tuple[int, int]
#: Threads reading new files: a restart after a long run finds thousands of batch files, and
#: pyarrow releases the GIL while it decodes.
_READERS = 4


class DatasetCache:
    """One dataset kept in memory as an Arrow table with ``schema``'s columns.

    Thread-safe: one instance is shared by every browser session. ``version`` changes whenever
    the table does, so callers can memoise what they derive from it.
    """

    def __init__(self, root: Path, dataset: str, schema: pa.Schema) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.schema = schema
        self.version = 0
        self._table = schema.empty_table()
        self._files: dict[Path, tuple[_Signature, pa.Table]] = {}
        self._unreadable: dict[Path, _Signature] = {}
        self._lock = threading.Lock()

    def refresh(self) -> tuple[pa.Table, int]:
        """Pick up new, replaced and deleted files; returns the table and its version."""
        with self._lock:
            current: dict[Path, tuple[_Signature, pa.Table]] = {}
            unreadable: dict[Path, _Signature] = {}
            to_read: list[tuple[Path, _Signature]] = []
            for path in dataset_files(self.root, self.dataset):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # replaced between listing and stat
                    continue
                signature = (stat.st_mtime_ns, stat.st_size)
                known = self._files.get(path)
                if known is not None and known[0] == signature:
                    current[path] = known
                elif self._unreadable.get(path) == signature:
                    unreadable[path] = signature  # warned once; retried when it changes
                else:
                    to_read.append((path, signature))
            changed = False
            for (path, signature), table in zip(to_read, self._read([p for p, _ in to_read]),
                                                strict=True):
                if table is None:
                    unreadable[path] = signature
                else:
                    current[path] = (signature, table)
                    changed = True
            self._unreadable = unreadable
            if changed or current.keys() != self._files.keys():
                self._files = current
                tables = [table for _, table in current.values()]
                self._table = (first_of_each(pa.concat_tables(tables), self.dataset) if tables
                               else self.schema.empty_table())
                self.version += 1
            return self._table, self.version

    def _read(self, paths: list[Path]) -> list[pa.Table | None]:
        if len(paths) <= 1:
            return [read_parquet_file(path, self.schema) for path in paths]
        with ThreadPoolExecutor(_READERS) as pool:
            return list(pool.map(partial(read_parquet_file, schema=self.schema), paths))
