"""The detector's per-batch metrics (``BatchMetrics`` JSON lines), followed like ``tail -f``.

Only bytes appended since the last refresh are read; a trailing line without its newline is
left for the next refresh (the detector may be writing it). The file being replaced or truncated
starts the reading over. Recent lines are kept in a bounded buffer, totals over the whole file.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

#: Numeric fields summed over every batch of the file.
TOTAL_FIELDS = ("input_rows", "valid_rows", "dlq_rows", "late_rows")
FRAME_COLUMNS = (
    "batch_id", "written_at", "input_rows", "valid_rows", "dlq_rows", "late_rows", "alerts",
    "batch_seconds", "rows_per_second", "latency_ms_p50", "latency_ms_p95", "latency_ms_max",
)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Recent batches (oldest first, ``written_at`` as UTC datetimes) and whole-file totals."""

    batches: pd.DataFrame
    totals: dict[str, int] = field(default_factory=dict)
    invalid_lines: int = 0


class MetricsTail:
    """Incremental reader of one metrics file; thread-safe, shared by every session."""

    def __init__(self, path: Path, keep: int = 20_000) -> None:
        self.path = Path(path)
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._totals = dict.fromkeys(TOTAL_FIELDS, 0)
        self._invalid = 0
        self._offset = 0
        self._inode: int | None = None
        self._snapshot = MetricsSnapshot(_frame([]), dict(self._totals))
        self._lock = threading.Lock()

    def refresh(self) -> MetricsSnapshot:
        with self._lock:
            lines = self._read_new_lines()
            if lines is None:
                return self._snapshot
            for line in lines:
                self._add(line)
            self._snapshot = MetricsSnapshot(_frame(self._recent), dict(self._totals),
                                             self._invalid)
            return self._snapshot

    def _read_new_lines(self) -> list[bytes] | None:
        """Complete lines appended since the last call, or None if nothing changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._reset(stat.st_ino)
        if stat.st_size == self._offset:
            return None
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return complete.splitlines()

    def _reset(self, inode: int) -> None:
        self._recent.clear()
        self._totals = dict.fromkeys(TOTAL_FIELDS, 0)
        self._invalid = 0
        self._offset = 0
        self._inode = inode
        # The rebuilt snapshot must differ from the old one even if the new file is empty.
        self._snapshot = MetricsSnapshot(_frame([]), dict(self._totals))

    def _add(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            for name in TOTAL_FIELDS:
                self._totals[name] += int(record.get(name) or 0)
        except (ValueError, TypeError) as exc:
            self._invalid += 1
            if self._invalid == 1:
                log.warning("ignoring invalid line in %s: %s", self.path, exc)
            return
        self._recent.append(record)


def _frame(records: deque[dict[str, Any]] | list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(records), columns=list(FRAME_COLUMNS))
    frame["written_at"] = pd.to_datetime(frame["written_at"], utc=True, errors="coerce",
                                         format="ISO8601")
    for column in FRAME_COLUMNS:
        if column not in ("written_at", "alerts"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.dropna(subset=["written_at"]).reset_index(drop=True)
