"""The detector's per-batch metrics (``BatchMetrics`` JSON lines), followed like ``tail -f``.

Only bytes appended since the last refresh are read; a trailing line without its newline is
left for the next refresh (the detector may be writing it). Recent lines are kept in a bounded
buffer, totals over every line read.

The detector rotates the file (``spark_job.metrics``: ``detector.jsonl`` becomes
``detector.jsonl.1``, ``.1`` becomes ``.2`` and so on, each by an atomic rename). The reader
starts with the rotated files still on disk, oldest first, then the current file, so the recent
history survives a rotation and the totals cover the retained history. When the file it follows
is rotated away, it reads the rest of that file (found by its inode among the rotated ones), then
the new current file from its start: no line is lost or read twice. The file being replaced
(not by a rotation) or truncated starts the reading over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

__all__ = [
    "MetricsSnapshot",
    "MetricsTail",
    "model_status",
]

log = logging.getLogger(__name__)

#: Numeric fields summed over every batch of the file.
TOTAL_FIELDS = ("input_rows", "valid_rows", "dlq_rows", "late_rows")
#: How much of the start of a file identifies it, with its inode.
HEAD_BYTES = 256
FRAME_COLUMNS = (
    "batch_id", "written_at", "input_rows", "valid_rows", "dlq_rows", "late_rows", "alerts",
    "batch_seconds", "rows_per_second", "latency_ms_p50", "latency_ms_p95", "latency_ms_max",
    "model",
)
#: Columns that are not numbers.
_OTHER_COLUMNS = ("written_at", "alerts", "model")


@dataclass(frozen=True)
class MetricsSnapshot:
    """Recent batches (oldest first, ``written_at`` as UTC datetimes) and totals over every
    batch read (the rotated files still on disk when the reader started, and everything since)."""

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
        #: The file being followed (its inode) and how far it was read; None when no file is.
        self._offset = 0
        self._inode: int | None = None
        #: The first bytes of the followed file: with the inode, what identifies it (a deleted
        #: file's inode is soon given to a new one).
        self._head = b""
        #: Whether the rotated files were read since the last start over.
        self._primed = False
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
        """Complete lines written since the last call, oldest first, or None if nothing changed."""
        handle = _open(self.path)
        try:
            current = os.fstat(handle.fileno()) if handle else None
            inode = current.st_ino if current else None
            changed = False
            lines: list[bytes] = []
            if self._inode is not None and inode != self._inode:
                rest = self._rest_of_rotated(inode)
                changed = True
                if rest is None:
                    self._reset()  # replaced, or rotated out of reach: start over
                else:
                    lines += rest
                    self._inode, self._offset = None, 0
            elif (self._inode is not None and handle and current
                  and not self._same_file(handle, current)):
                self._reset()  # truncated, or replaced by a file that got the same inode
                changed = True
            if not self._primed:
                self._primed = True
                for _, older in reversed(self._rotated(skip=inode)):
                    lines += _lines(older)
            if handle is None or current is None:
                return lines if lines or changed else None
            if self._inode is None:
                self._inode, self._offset, self._head = inode, 0, b""
                changed = True
            if current.st_size > self._offset:
                handle.seek(self._offset)
                chunk = handle.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                if not self._offset:
                    self._head = complete[:HEAD_BYTES]
                self._offset += len(complete)
                lines += complete.splitlines()
            return lines if lines or changed else None
        finally:
            if handle:
                handle.close()

    def _rotated(self, skip: int | None) -> list[tuple[int, BinaryIO]]:
        """The rotated files (``<name>.<n>``), newest first, opened (so that renames meanwhile
        do not matter), without the one whose inode is ``skip``."""
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d+)")
        try:
            numbers = sorted(int(m[1]) for name in os.listdir(self.path.parent)
                             if (m := pattern.fullmatch(name)))
        except FileNotFoundError:
            return []
        opened = []
        for number in numbers:
            handle = _open(self.path.with_name(f"{self.path.name}.{number}"))
            if handle is None:
                continue
            if os.fstat(handle.fileno()).st_ino == skip:
                handle.close()
                continue
            opened.append((os.fstat(handle.fileno()).st_ino, handle))
        return opened

    def _rest_of_rotated(self, current: int | None) -> list[bytes] | None:
        """After a rotation: the rest of the file followed so far, then the whole of every file
        rotated after it; None if that file is not among the rotated ones."""
        newer: list[BinaryIO] = []
        opened = self._rotated(skip=current)
        try:
            for _, handle in opened:
                if not self._same_file(handle, os.fstat(handle.fileno())):
                    newer.append(handle)
                    continue
                handle.seek(self._offset)
                lines = handle.read().splitlines()
                for later in reversed(newer):
                    lines += later.read().splitlines()
                return lines
            return None
        finally:
            for _, handle in opened:
                handle.close()

    def _same_file(self, handle: BinaryIO, stat: os.stat_result) -> bool:
        """Whether ``handle`` is the file followed so far: same inode, same first bytes, and
        at least as long as what was read of it."""
        return (stat.st_ino == self._inode and stat.st_size >= self._offset
                and os.pread(handle.fileno(), len(self._head), 0) == self._head)

    def _reset(self) -> None:
        self._recent.clear()
        self._totals = dict.fromkeys(TOTAL_FIELDS, 0)
        self._invalid = 0
        self._offset = 0
        self._inode = None
        self._head = b""
        self._primed = False
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


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _lines(handle: BinaryIO) -> list[bytes]:
    """Every line of a rotated file (the detector no longer writes it: a last line without its
    newline was cut by a crash and counts as invalid)."""
    try:
        return handle.read().splitlines()
    finally:
        handle.close()


def _frame(records: deque[dict[str, Any]] | list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(records), columns=list(FRAME_COLUMNS))
    frame["written_at"] = pd.to_datetime(frame["written_at"], utc=True, errors="coerce",
                                         format="ISO8601")
    for column in FRAME_COLUMNS:
        if column not in _OTHER_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    # The model the batch was scored with ("model 2026... (gbt, hold-out AUC 0.951)"); None
    # on rules alone, and for lines of a detector from before the model.
    frame["model"] = frame["model"].map(lambda v: v if isinstance(v, str) and v.strip()
                                        else None).astype(object)
    return frame.dropna(subset=["written_at"]).reset_index(drop=True)


def model_status(batches: pd.DataFrame) -> str | None:
    """What the detector scored its newest batch with, from that batch's ``model`` key:
    ``scoring with <model>`` or ``rules alone: no usable model``; None with no batch read."""
    if batches.empty:
        return None
    model = batches["model"].iloc[-1] if "model" in batches.columns else None
    if isinstance(model, str) and model:
        return f"scoring with {model}"
    return "rules alone: no usable model"
