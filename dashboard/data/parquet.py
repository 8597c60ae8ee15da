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

import pyarrow as pa
from pyarrow.fs import FileSystem

from fraudstream.datasets import (
    DLQ_SCHEMA,
    TRANSACTIONS_SCHEMA,
    first_of_each,
    list_dataset,
    read_parquet_file,
)
from fraudstream.storage import StoragePath, storage_path

__all__ = [
    "DLQ_VIEW_SCHEMA",
    "TRANSACTION_VIEW_SCHEMA",
    "DatasetCache",
]

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

    def __init__(self, root: StoragePath | str, dataset: str, schema: pa.Schema) -> None:
        self.root = storage_path(root)
        self.dataset = dataset
        self.schema = schema
        self.version = 0
        self._table = schema.empty_table()
        self._files: dict[str, tuple[_Signature, pa.Table]] = {}
        self._unreadable: dict[str, _Signature] = {}
        self._lock = threading.Lock()

    def refresh(self) -> tuple[pa.Table, int]:
        """Pick up new, replaced and deleted files; returns the table and its version."""
        with self._lock:
            fs, files = list_dataset(self.root, self.dataset)
            signatures = {f.path: (f.mtime_ns, f.size) for f in files}
            to_read = [path for path, signature in signatures.items()
                       if (known := self._files.get(path)) is None or known[0] != signature]
            to_read = [path for path in to_read if self._unreadable.get(path) != signatures[path]]
            read = dict(zip(to_read, self._read(fs, to_read), strict=True))
            current: dict[str, tuple[_Signature, pa.Table]] = {}
            unreadable: dict[str, _Signature] = {}
            for path, signature in signatures.items():  # history order, for first_of_each
                if path in read:
                    table = read[path]
                    if table is None:
                        unreadable[path] = signature
                    else:
                        current[path] = (signature, table)
                elif (known := self._files.get(path)) is not None and known[0] == signature:
                    current[path] = known
                elif self._unreadable.get(path) == signature:
                    unreadable[path] = signature  # warned once; retried when it changes
            self._unreadable = unreadable
            if any(read.get(path) is not None for path in read) or \
                    list(current) != list(self._files):
                self._files = current
                tables = [table for _, table in current.values()]
                self._table = (first_of_each(pa.concat_tables(tables), self.dataset) if tables
                               else self.schema.empty_table())
                self.version += 1
            return self._table, self.version

    def _read(self, fs: FileSystem, paths: list[str]) -> list[pa.Table | None]:
        read = partial(read_parquet_file, schema=self.schema, filesystem=fs)
        if len(paths) <= 1:
            return [read(path) for path in paths]
        with ThreadPoolExecutor(_READERS) as pool:
            return list(pool.map(read, paths))
