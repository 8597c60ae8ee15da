"""Compaction of the Parquet history: many small per-batch files become one file per closed hour.

The detector writes one file per micro-batch and dataset (``<dataset>/epoch=<id>/batch_id=<n>/
part-0.parquet``; before epochs existed, ``<dataset>/batch_id=<n>/part-0.parquet``: the legacy
layout, treated here as an epoch of its own). ``python -m spark_job.compact`` merges, in every
dataset and epoch, runs of batch folders written in the same closed UTC hour into
``compacted=<first>-<last>/part-0.parquet`` beside them. Readers skip a ``batch_id=<n>`` folder
when a committed ``compacted=<a>-<b>`` folder with ``a <= n <= b`` exists in the same epoch folder
(``fraudstream.datasets.dataset_files``), so each row is read exactly once at every moment.

Which batch folders are merged
------------------------------
- Their data files were all last modified in a UTC hour strictly before the current one, and at
  least ``--min-age-minutes`` ago.
- Never the highest batch id of a dataset's epoch: the detector may still be replaying it.
- A run is a sequence of such folders, adjacent in batch-id order (ids without a folder are
  batches that wrote no rows), from the same hour and with the same Parquet schema, with no other
  batch folder or compacted folder between them; only runs of two folders or more are merged.
  A compacted file holds the rows of its batches in batch-id order, each batch's rows in order.

Crash safety (kill -9 at any point loses or duplicates no row)
--------------------------------------------------------------
1. The merged rows are written to ``compacted=<a>-<b>/.part-0.<uuid>.tmp`` (invisible to readers)
   and fsynced; its row count must equal the sum of the inputs' or the run is abandoned.
2. ``os.replace`` renames it to ``part-0.parquet``: from that instant readers use it and ignore
   the covered batch folders.
3. The covered batch folders are deleted.

Every run first finishes interrupted work: a ``compacted`` folder without its ``part-0.parquet``
(step 1 interrupted) is removed, so are temporary files in committed ones, and batch folders
covered by a committed compacted folder (step 3 interrupted) are deleted. Two compactions never
run at once on the same root (``_compact.lock``).

Test hook: ``FRAUDSTREAM_COMPACT_PAUSE_AFTER=write|replace|delete`` makes the command print
``compact: paused after <step>: <path>`` on stderr and sleep after step 1, step 2, or the first
folder deleted in step 3 of its first run, so that a test can kill it there.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from fraudstream.logs import setup_logging
from fraudstream.schemas import (
    ALERTS_DATASET,
    DLQ_DATASET,
    RULE_CHANGES_DATASET,
    TRANSACTIONS_DATASET,
)
from fraudstream.settings import DetectorSettings, load_settings, run_entry_point

__all__ = [
    "LOCK_FILE",
    "PAUSE_ENV",
    "PAUSE_STEPS",
    "CompactionBusy",
    "CompactionError",
    "compact",
    "main",
    "plan",
    "scan",
    "write_run",
]

PROG: Final = "python -m spark_job.compact"
DATASETS: Final = (ALERTS_DATASET, TRANSACTIONS_DATASET, DLQ_DATASET, RULE_CHANGES_DATASET)
DEFAULT_MIN_AGE_MINUTES: Final = 60.0
#: A run is cut before it would exceed this many rows (one file stays a reasonable size).
MAX_ROWS_PER_FILE: Final = 10_000_000
#: Rows buffered before they are written as one row group of the compacted file.
ROW_GROUP_ROWS: Final = 128 * 1024
PART_FILE: Final = "part-0.parquet"
LOCK_FILE: Final = "_compact.lock"
#: Test hook (see the module docstring).
PAUSE_ENV: Final = "FRAUDSTREAM_COMPACT_PAUSE_AFTER"
PAUSE_STEPS: Final = ("write", "replace", "delete")

_EPOCH = re.compile(r"^epoch=(.+)$")
_BATCH = re.compile(r"^batch_id=(\d+)$")
_COMPACTED = re.compile(r"^compacted=(\d+)-(\d+)$")


class CompactionError(RuntimeError):
    """A merged file did not hold exactly its inputs' rows; nothing was replaced."""


class CompactionBusy(RuntimeError):
    """Another compaction holds the lock on this Parquet root."""


# --- what is on disk ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchFolder:
    batch_id: int
    path: Path
    #: Finished data files (``*.parquet`` not starting with ``_`` or ``.``), in name order.
    files: tuple[Path, ...]
    #: The newest data file's mtime (None without data files).
    mtime: float | None


@dataclass(frozen=True)
class CompactedFolder:
    first: int
    last: int
    path: Path

    @property
    def committed(self) -> bool:
        return (self.path / PART_FILE).is_file()


@dataclass(frozen=True)
class Group:
    """One epoch folder of a dataset (or the dataset folder itself: the legacy layout)."""

    dataset: str
    epoch: str | None
    path: Path
    batches: tuple[BatchFolder, ...]
    compacted: tuple[CompactedFolder, ...]

    def committed_ranges(self) -> list[tuple[int, int]]:
        return [(c.first, c.last) for c in self.compacted if c.committed]

    def covered(self, batch_id: int) -> bool:
        return any(a <= batch_id <= b for a, b in self.committed_ranges())


def _is_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def _scan_group(dataset: str, epoch: str | None, path: Path) -> Group:
    batches: list[BatchFolder] = []
    compacted: list[CompactedFolder] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if match := _BATCH.match(entry.name):
                folder = Path(entry.path)
                try:
                    names = sorted(n for n in os.listdir(folder) if _is_data_file(n))
                    mtimes = [(folder / n).stat().st_mtime for n in names]
                except FileNotFoundError:
                    continue  # deleted meanwhile
                batches.append(BatchFolder(int(match[1]), folder, tuple(folder / n for n in names),
                                           max(mtimes) if mtimes else None))
            elif match := _COMPACTED.match(entry.name):
                compacted.append(CompactedFolder(int(match[1]), int(match[2]), Path(entry.path)))
    batches.sort(key=lambda b: b.batch_id)
    compacted.sort(key=lambda c: (c.first, c.last))
    return Group(dataset, epoch, path, tuple(batches), tuple(compacted))


def scan(parquet_dir: Path, datasets: Sequence[str] = DATASETS) -> list[Group]:
    """Every dataset's groups: the legacy layout first (if any), then the epochs by id."""
    groups: list[Group] = []
    for dataset in datasets:
        base = Path(parquet_dir) / dataset
        if not base.is_dir():
            continue
        legacy = _scan_group(dataset, None, base)
        if legacy.batches or legacy.compacted:
            groups.append(legacy)
        epochs = sorted(
            (match[1], base / name) for name in os.listdir(base)
            if not name.startswith(("_", ".")) and (match := _EPOCH.match(name))
            and (base / name).is_dir()
        )
        groups.extend(_scan_group(dataset, epoch, path) for epoch, path in epochs)
    return groups


# --- planning ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    folder: BatchFolder
    hour: datetime
    rows: int
    schema: pa.Schema


@dataclass(frozen=True)
class Run:
    """Batch folders of one group to merge into ``compacted=<first>-<last>``."""

    group: Group
    members: tuple[Candidate, ...]

    @property
    def first(self) -> int:
        return self.members[0].folder.batch_id

    @property
    def last(self) -> int:
        return self.members[-1].folder.batch_id

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.members)

    @property
    def files(self) -> int:
        return sum(len(m.folder.files) for m in self.members)

    @property
    def target(self) -> Path:
        return self.group.path / f"compacted={self.first}-{self.last}"


def hour_of(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(minute=0, second=0, microsecond=0)


def _candidate(folder: BatchFolder, newest: int, now: datetime, min_age: timedelta
               ) -> Candidate | None:
    """``folder`` if it may be merged (closed hour, old enough, not the newest, readable)."""
    if folder.batch_id == newest or folder.mtime is None:
        return None
    current_hour = now.replace(minute=0, second=0, microsecond=0)
    if hour_of(folder.mtime) >= current_hour:
        return None
    if now.timestamp() - folder.mtime < min_age.total_seconds():
        return None
    try:
        schema = None
        rows = 0
        for path in folder.files:
            metadata = pq.read_metadata(path)
            file_schema = metadata.schema.to_arrow_schema()
            if schema is not None and not file_schema.equals(schema, check_metadata=False):
                return None  # files of one batch that disagree: leave the batch alone
            schema = schema or file_schema
            rows += metadata.num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        print(f"compact: leaving {folder.path} alone: unreadable: {exc}", file=sys.stderr)
        return None
    assert schema is not None
    return Candidate(folder, hour_of(folder.mtime), rows, schema)


def plan(group: Group, now: datetime, min_age: timedelta,
         max_rows: int = MAX_ROWS_PER_FILE) -> list[Run]:
    """The runs of ``group`` to merge, as if its interrupted work were finished (batch folders
    covered by a committed compacted folder are gone)."""
    ranges = group.committed_ranges()
    live = [b for b in group.batches if not any(a <= b.batch_id <= z for a, z in ranges)]
    if not live:
        return []
    newest = max(b.batch_id for b in live)
    # Batch folders and committed compacted folders in id order; a run never spans either kind
    # of folder it does not merge.
    items: list[tuple[int, BatchFolder | None]] = [(b.batch_id, b) for b in live]
    items += [(a, None) for a, _ in ranges]
    items.sort(key=lambda item: item[0])

    runs: list[Run] = []
    current: list[Candidate] = []

    def close() -> None:
        if len(current) >= 2:
            runs.append(Run(group, tuple(current)))
        current.clear()

    for _, folder in items:
        candidate = _candidate(folder, newest, now, min_age) if folder is not None else None
        if candidate is None:
            close()
            continue
        if current and (candidate.hour != current[0].hour
                        or not candidate.schema.equals(current[0].schema, check_metadata=False)
                        or sum(c.rows for c in current) + candidate.rows > max_rows):
            close()
        current.append(candidate)
    close()
    return runs


# --- doing it ----------------------------------------------------------------------------------


@dataclass
class GroupReport:
    dataset: str
    epoch: str | None
    files_before: int = 0
    files_after: int = 0
    rows_compacted: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    removed_incomplete: int = 0
    removed_covered: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "epoch": self.epoch, "files_before": self.files_before,
                "files_after": self.files_after, "rows_compacted": self.rows_compacted,
                "runs": self.runs, "removed_incomplete": self.removed_incomplete,
                "removed_covered": self.removed_covered}


@dataclass
class Report:
    parquet_dir: str
    dry_run: bool
    groups: list[GroupReport] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        return {
            "files_before": sum(g.files_before for g in self.groups),
            "files_after": sum(g.files_after for g in self.groups),
            "rows_compacted": sum(g.rows_compacted for g in self.groups),
            "runs": sum(len(g.runs) for g in self.groups),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"parquet_dir": self.parquet_dir, "dry_run": self.dry_run, **self.totals(),
                "groups": [g.as_dict() for g in self.groups]}

    def summary(self) -> str:
        t = self.totals()
        verb = "would compact" if self.dry_run else "compacted"
        return (f"{verb} {t['runs']} runs: {t['files_before']} files -> {t['files_after']} "
                f"files, {t['rows_compacted']:,} rows rewritten")


def _data_files(group: Group) -> int:
    return (sum(len(b.files) for b in group.batches)
            + sum(1 for c in group.compacted if c.committed))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause(step: str, path: Path, paused: set[str]) -> None:
    """The test hook: stop here (once) so that a test can kill the process at this step."""
    if os.environ.get(PAUSE_ENV) == step and step not in paused:
        paused.add(step)
        print(f"compact: paused after {step}: {path}", file=sys.stderr, flush=True)
        time.sleep(3600)


def finish_interrupted(group: Group, dry_run: bool = False) -> tuple[int, int]:
    """Remove what an interrupted compaction left: compacted folders without their file,
    temporary files, batch folders covered by a committed compacted folder. Returns the numbers
    of (incomplete compacted folders, covered batch folders) removed."""
    incomplete = 0
    for compacted in group.compacted:
        if not compacted.committed:
            incomplete += 1
            if not dry_run:
                shutil.rmtree(compacted.path, ignore_errors=True)
        elif not dry_run:
            for leftover in compacted.path.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
    covered = [b for b in group.batches if group.covered(b.batch_id)]
    if not dry_run:
        for batch in covered:
            shutil.rmtree(batch.path, ignore_errors=True)
        if covered or incomplete:
            _fsync_dir(group.path)
    return incomplete, len(covered)


def write_run(run: Run, paused: set[str] | None = None) -> None:
    """Merge ``run`` (steps 1 to 3 of the module docstring); raises CompactionError, leaving the
    batch folders untouched, if the merged file does not hold exactly their rows."""
    paused = set() if paused is None else paused
    target = run.target
    target.mkdir(exist_ok=True)
    temporary = target / f".part-0.{uuid.uuid4().hex}.tmp"
    schema = run.members[0].schema
    expected = run.rows
    written = 0
    try:
        with pq.ParquetWriter(temporary, schema) as writer:
            buffered: list[pa.Table] = []
            buffered_rows = 0
            for member in run.members:
                for path in member.folder.files:
                    with pq.ParquetFile(path) as parquet_file:
                        table = parquet_file.read()
                    if not table.schema.equals(schema, check_metadata=False):
                        raise CompactionError(f"{path}: schema changed since it was planned")
                    buffered.append(table)
                    buffered_rows += table.num_rows
                    written += table.num_rows
                    if buffered_rows >= ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(buffered))
                        buffered, buffered_rows = [], 0
            if buffered:
                writer.write_table(pa.concat_tables(buffered))
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        _pause("write", temporary, paused)
        in_file = pq.read_metadata(temporary).num_rows
        if not written == in_file == expected:
            raise CompactionError(
                f"{target}: merged file holds {in_file} rows, read {written}, the batches' "
                f"footers say {expected}: batch folders left as they were")
    except BaseException:
        temporary.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            target.rmdir()
        raise
    os.replace(temporary, target / PART_FILE)
    _fsync_dir(target)
    _fsync_dir(run.group.path)
    _pause("replace", target / PART_FILE, paused)
    for member in run.members:
        shutil.rmtree(member.folder.path, ignore_errors=True)
        _pause("delete", member.folder.path, paused)
    _fsync_dir(run.group.path)


def compact(parquet_dir: Path, *, now: datetime | None = None,
            min_age_minutes: float = DEFAULT_MIN_AGE_MINUTES, dry_run: bool = False,
            progress: bool = True, max_rows: int = MAX_ROWS_PER_FILE) -> Report:
    """Compact every dataset under ``parquet_dir`` (see the module docstring); ``now`` is the
    current time (default: the clock). With ``progress``, one line per group on stderr."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    min_age = timedelta(minutes=min_age_minutes)
    report = Report(str(parquet_dir), dry_run)
    paused: set[str] = set()
    with contextlib.ExitStack() as stack:
        if not dry_run and Path(parquet_dir).is_dir():
            stack.enter_context(_lock(Path(parquet_dir)))
        for group in scan(Path(parquet_dir)):
            result = GroupReport(group.dataset, group.epoch, files_before=_data_files(group))
            result.removed_incomplete, result.removed_covered = finish_interrupted(group, dry_run)
            runs = plan(group, now, min_age, max_rows)
            for run in runs:
                if not dry_run:
                    write_run(run, paused)
                result.runs.append({"first": run.first, "last": run.last,
                                    "batches": len(run.members), "files": run.files,
                                    "rows": run.rows, "path": str(run.target / PART_FILE)})
                result.rows_compacted += run.rows
            if dry_run:
                removed = (sum(len(b.files) for b in group.batches if group.covered(b.batch_id))
                           + sum(run.files for run in runs))
                result.files_after = result.files_before - removed + len(runs)
            else:
                result.files_after = _data_files(_scan_group(group.dataset, group.epoch,
                                                             group.path))
            report.groups.append(result)
            if progress:
                print(_progress_line(result, dry_run), file=sys.stderr, flush=True)
    return report


def _progress_line(result: GroupReport, dry_run: bool) -> str:
    epoch = f"epoch={result.epoch}" if result.epoch else "(legacy layout)"
    line = (f"compact: {result.dataset} {epoch}: {result.files_before} files -> "
            f"{result.files_after}, {len(result.runs)} runs, {result.rows_compacted:,} rows"
            f"{' (dry run)' if dry_run else ''}")
    if result.removed_incomplete or result.removed_covered:
        line += (f"; finished an interrupted compaction: {result.removed_incomplete} incomplete "
                 f"compacted folders, {result.removed_covered} covered batch folders")
    return line


@contextlib.contextmanager
def _lock(parquet_dir: Path) -> Iterator[None]:
    with open(parquet_dir / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CompactionBusy(f"another compaction is running on {parquet_dir} "
                                     f"(it holds {parquet_dir / LOCK_FILE})") from None
            raise
        yield  # the lock goes with the file handle


# --- command line -------------------------------------------------------------------------------


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.prog = PROG
    parser.description = (
        "Merge the per-batch Parquet files of closed UTC hours into one file per run of batches "
        "(compacted=<first>-<last>/part-0.parquet), in every dataset and epoch under "
        "PARQUET_DIR. Safe to interrupt at any point; the next run finishes the work."
    )
    parser.add_argument("--min-age-minutes", type=float, default=DEFAULT_MIN_AGE_MINUTES,
                        help="leave files younger than this alone (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="print what would be done, change nothing")
    parser.add_argument("--json", action="store_true", default=False,
                        help="print the summary as JSON on stdout")


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, namespace = load_settings(DetectorSettings, argv, extra_args=_add_flags)
        setup_logging("compact")
        if namespace.min_age_minutes < 0:
            print(f"{PROG}: --min-age-minutes must not be negative", file=sys.stderr)
            return 2
        if not isinstance(settings.parquet_dir, Path):
            print(f"{PROG}: {settings.parquet_dir} is in object storage; compaction works on "
                  "local (or mounted) Parquet folders only", file=sys.stderr)
            return 2
        try:
            report = compact(settings.parquet_dir, min_age_minutes=namespace.min_age_minutes,
                             dry_run=namespace.dry_run)
        except CompactionBusy as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        except CompactionError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        if namespace.json:
            print(json.dumps(report.as_dict(), indent=2))
        else:
            print(report.summary())
        return 0

    run_entry_point(PROG, run)


if __name__ == "__main__":
    main()
