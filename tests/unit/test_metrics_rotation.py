"""The detector's metrics file is bounded by rotation (``spark_job.metrics``), and the dashboard's
reader (``dashboard.data.metrics.MetricsTail``) keeps the recent history across rotations."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from dashboard.data.metrics import MetricsTail
from fraudstream.schemas import format_timestamp
from spark_job.metrics import (
    METRICS_BACKUPS,
    METRICS_MAX_BYTES,
    MetricsListener,
    append_line,
    rotate,
    rotated_path,
)

NOW = format_timestamp(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))


def line(batch_id: int) -> str:
    return json.dumps({"batch_id": batch_id, "written_at": NOW, "input_rows": 10,
                       "late_rows": batch_id % 2}) + "\n"


def on_disk(path: Path) -> list[int]:
    """Batch ids in the rotated files (oldest first) and the current file."""
    files = [rotated_path(path, n) for n in range(9, 0, -1)] + [path]
    return [json.loads(text)["batch_id"] for file in files if file.exists()
            for text in file.read_text().splitlines()]


def batch_ids(tail: MetricsTail) -> list[int]:
    return [int(b) for b in tail.refresh().batches["batch_id"]]


def test_append_rotates_before_a_line_would_pass_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    size = len(line(0).encode())  # one more byte for two-digit batch ids
    for batch_id in range(20):
        append_line(path, line(batch_id), max_bytes=3 * size + 3)
    files = [path, *(rotated_path(path, n) for n in (1, 2, 3))]
    assert [len(f.read_text().splitlines()) for f in files] == [2, 3, 3, 3]
    assert all(f.stat().st_size <= 3 * size + 3 for f in files)
    assert not rotated_path(path, 4).exists(), "three rotated files are kept"
    assert on_disk(path) == list(range(9, 20)), "the oldest lines dropped, none repeated"


def test_a_line_larger_than_the_limit_still_gets_written(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    for batch_id in range(3):
        append_line(path, line(batch_id), max_bytes=10, backups=1)
    assert on_disk(path) == [1, 2] and len(path.read_text().splitlines()) == 1


def test_listener_rotates_its_file(tmp_path: Path) -> None:
    assert (METRICS_MAX_BYTES, METRICS_BACKUPS) == (10 * 1024 * 1024, 3)
    path = tmp_path / "_metrics" / "detector.jsonl"
    listener = MetricsListener(SimpleNamespace(outcomes={}), path, max_bytes=2_000)
    assert MetricsListener(SimpleNamespace(outcomes={}), path).max_bytes == METRICS_MAX_BYTES
    for batch_id in range(12):
        progress = {"batchId": batch_id, "numInputRows": 5, "durationMs": {"triggerExecution": 9}}
        listener.onQueryProgress(SimpleNamespace(progress=SimpleNamespace(
            json=json.dumps(progress))))
    assert rotated_path(path, 1).exists() and path.stat().st_size <= 2_000
    ids = on_disk(path)
    assert ids == list(range(12 - len(ids), 12)) and listener.batches == 12
    with pytest.raises(ValueError):
        MetricsListener(SimpleNamespace(outcomes={}), path, max_bytes=0)


def test_tail_follows_the_file_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    limit = 4 * len(line(0).encode()) + 4  # four lines per file
    tail = MetricsTail(path)
    written = 0

    def write(count: int) -> None:
        nonlocal written
        for _ in range(count):
            append_line(path, line(written), max_bytes=limit)
            written += 1

    write(3)
    assert batch_ids(tail) == [0, 1, 2]
    write(2)  # one rotation: batch 3 is in .1 now, 4 in the new file
    assert batch_ids(tail) == [0, 1, 2, 3, 4]
    write(9)  # two more rotations between two refreshes: what was followed is .2 now
    snapshot = tail.refresh()
    assert list(snapshot.batches["batch_id"]) == list(range(14))
    assert snapshot.totals["input_rows"] == 140 and snapshot.totals["late_rows"] == 7
    assert tail.refresh() is snapshot, "nothing new, nothing rebuilt"

    # Rotated just now, before the next line: the current file does not exist for a moment.
    rotate(path)
    assert batch_ids(tail) == list(range(14))
    write(1)
    assert batch_ids(tail) == list(range(15))

    # More rotations than files kept: the followed file is gone; start over from what is left.
    write(30)
    assert batch_ids(tail) == on_disk(path) == list(range(45 - len(on_disk(path)), 45))


def test_a_new_reader_starts_with_the_rotated_history(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    limit = 4 * len(line(0).encode()) + 4
    for batch_id in range(10):  # .2: 0-3, .1: 4-7, current: 8-9
        append_line(path, line(batch_id), max_bytes=limit)
    tail = MetricsTail(path)
    assert batch_ids(tail) == list(range(10))
    assert tail.refresh().totals["input_rows"] == 100
    assert batch_ids(MetricsTail(path, keep=3)) == [7, 8, 9], "the newest lines, across files"

    # A crash cut the last line of a rotated file: it counts as invalid, nothing else is lost.
    with rotated_path(path, 1).open("a") as handle:
        handle.write('{"batch_id": 99, "writ')
    snapshot = MetricsTail(path).refresh()
    assert list(snapshot.batches["batch_id"]) == list(range(10)) and snapshot.invalid_lines == 1


def test_a_replaced_history_starts_the_reader_over(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    limit = 4 * len(line(0).encode()) + 4
    for batch_id in range(6):
        append_line(path, line(batch_id), max_bytes=limit)
    tail = MetricsTail(path)
    assert batch_ids(tail) == list(range(6))
    for file in tmp_path.iterdir():  # reset.sh: the metrics are deleted
        file.unlink()
    assert tail.refresh().batches.empty
    append_line(path, line(0), max_bytes=limit)
    assert batch_ids(tail) == [0]
