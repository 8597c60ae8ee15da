"""``python -m spark_job.compact`` on a fabricated Parquet history: real files written with
pyarrow, old modification times set with os.utime, the command run as a real process (and killed
with SIGKILL mid-way through the test hook ``FRAUDSTREAM_COMPACT_PAUSE_AFTER``).

The reader rule is checked with a private copy (``visible_files``): a ``batch_id=<n>`` folder is
ignored when a committed ``compacted=<a>-<b>`` folder of the same epoch covers n; names starting
with ``_`` or ``.`` are never data. Where ``fraudstream.datasets.dataset_files`` implements the
rule, it must agree.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraudstream import datasets
from fraudstream.datasets import ALERTS_SCHEMA, DLQ_SCHEMA, RULE_CHANGES_SCHEMA, TRANSACTIONS_SCHEMA
from spark_job import compact as compaction

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("alerts", "transactions", "dlq", "rule_changes")
EPOCH_A = "20260101T000000Z-aaaaaa"
EPOCH_B = "20260102T000000Z-bbbbbb"
_BATCH = re.compile(r"^batch_id=(\d+)$")
_COMPACTED = re.compile(r"^compacted=(\d+)-(\d+)$")
#: Alerts written before ``rule_version`` existed: a different schema splits runs.
OLD_ALERTS_SCHEMA = ALERTS_SCHEMA.remove(ALERTS_SCHEMA.get_field_index("rule_version"))
ID_COLUMN = {ALERTS_SCHEMA: "alert_id", OLD_ALERTS_SCHEMA: "alert_id",
             TRANSACTIONS_SCHEMA: "transaction_id", DLQ_SCHEMA: "raw_value",
             RULE_CHANGES_SCHEMA: "raw"}


# --- the reader rule (private copy) and helpers -----------------------------------------------


def visible_files(root: Path, dataset: str) -> list[Path]:
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root / dataset):
        here = Path(folder)
        covered = [(int(m[1]), int(m[2])) for name in subfolders
                   if (m := _COMPACTED.match(name)) and (here / name / "part-0.parquet").is_file()]

        def hidden(name: str, covered: list[tuple[int, int]] = covered) -> bool:
            match = _BATCH.match(name)
            return bool(match) and any(a <= int(match[1]) <= b for a, b in covered)

        subfolders[:] = sorted(n for n in subfolders
                               if not n.startswith(("_", ".")) and not hidden(n))
        files += [here / n for n in sorted(names)
                  if n.endswith(".parquet") and not n.startswith(("_", "."))]
    return files


def visible_rows(root: Path) -> Counter[str]:
    """Every row a reader sees, in every dataset, as a multiset of JSON texts."""
    rows: Counter[str] = Counter()
    lead_reader = getattr(datasets, "dataset_files", None)
    for dataset in DATASETS:
        files = visible_files(root, dataset)
        if lead_reader is not None:
            assert sorted(lead_reader(root, dataset)) == sorted(files), dataset
        for path in files:
            for row in pq.ParquetFile(path).read().to_pylist():
                rows[json.dumps({"dataset": dataset, **row}, sort_keys=True, default=str)] += 1
    return rows


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime (ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def write_batch(folder: Path, schema: pa.Schema, ids: list[str], mtime: datetime,
                stale_temporary: bool = False) -> None:
    folder.mkdir(parents=True)
    column = ID_COLUMN[schema]
    rows = [{column: value, **({"amount": float(i)} if "amount" in schema.names else {})}
            for i, value in enumerate(ids)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")
    if stale_temporary:  # a detector attempt killed before its rename
        (folder / ".part-0.0123abcd.tmp").write_bytes(b"PAR1 cut")
    stamp = mtime.timestamp()
    for path in folder.iterdir():
        os.utime(path, (stamp, stamp))


def fabricate(root: Path, now: datetime) -> None:
    """A history with two epochs and the legacy layout. Hours are relative to ``now``'s hour H:
    H-3 and H-2 are closed, H is the current one."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    h3 = hour - timedelta(hours=3) + timedelta(minutes=10)
    h2 = hour - timedelta(hours=2) + timedelta(minutes=10)
    h_now = hour

    def batches(dataset: str, epoch: str | None, schema: pa.Schema,
                plan: dict[int, datetime], rows: int = 3, stale: tuple[int, ...] = ()) -> None:
        base = root / dataset / (f"epoch={epoch}" if epoch else "")
        for batch_id, mtime in plan.items():
            ids = [f"{dataset}/{epoch}/{batch_id}/{i}" for i in range(rows + batch_id % 2)]
            write_batch(base / f"batch_id={batch_id}", schema, ids, mtime, batch_id in stale)

    # transactions, legacy: 0-2 merge (3 is the newest of its layout).
    batches("transactions", None, TRANSACTIONS_SCHEMA,
            {i: h3 - timedelta(days=1) for i in range(4)})
    # transactions, epoch A: 0-2 (H-3) and 3-7 (H-2; no batch 5: it wrote no rows); 8 newest.
    batches("transactions", EPOCH_A, TRANSACTIONS_SCHEMA,
            {0: h3, 1: h3, 2: h3, 3: h2, 4: h2, 6: h2, 7: h2, 8: h2}, stale=(1,))
    # transactions, epoch B: 0-1 (H-2); 2-4 are in the current hour.
    batches("transactions", EPOCH_B, TRANSACTIONS_SCHEMA,
            {0: h2, 1: h2, 2: h_now, 3: h_now, 4: h_now})
    # alerts, legacy: a schema change between 1 and 2 splits the runs: 0-1, 2-3; 4 newest.
    batches("alerts", None, OLD_ALERTS_SCHEMA, {0: h3, 1: h3})
    batches("alerts", None, ALERTS_SCHEMA, {2: h3, 3: h3, 4: h3})
    # alerts, epoch A: sparse; 2-9 in H-3 (10 newest).
    batches("alerts", EPOCH_A, ALERTS_SCHEMA, {2: h3, 9: h3, 10: h3}, rows=2)
    # dlq, epoch B: a single old batch and the newest: nothing to merge.
    batches("dlq", EPOCH_B, DLQ_SCHEMA, {0: h2, 4: h_now}, rows=1)
    # rule_changes, epoch A: 0-1 merge; batch 2 has only a detector's temporary file (a batch
    # being written), which cuts runs; 3-4 merge; 5 newest.
    batches("rule_changes", EPOCH_A, RULE_CHANGES_SCHEMA, {0: h3, 1: h3, 3: h3, 4: h3, 5: h3},
            rows=1)
    in_flight = root / "rule_changes" / f"epoch={EPOCH_A}" / "batch_id=2"
    in_flight.mkdir()
    (in_flight / ".part-0.feedbeef.tmp").write_bytes(b"PAR1")


#: The compacted folders ``fabricate`` leads to, by group folder (relative to the root).
EXPECTED = {
    "transactions": ["compacted=0-2"],
    f"transactions/epoch={EPOCH_A}": ["compacted=0-2", "compacted=3-7"],
    f"transactions/epoch={EPOCH_B}": ["compacted=0-1"],
    "alerts": ["compacted=0-1", "compacted=2-3"],
    f"alerts/epoch={EPOCH_A}": ["compacted=2-9"],
    f"dlq/epoch={EPOCH_B}": [],
    f"rule_changes/epoch={EPOCH_A}": ["compacted=0-1", "compacted=3-4"],
}
#: Batch folders left in place.
LEFT = {
    "transactions": ["batch_id=3"],
    f"transactions/epoch={EPOCH_A}": ["batch_id=8"],
    f"transactions/epoch={EPOCH_B}": ["batch_id=2", "batch_id=3", "batch_id=4"],
    "alerts": ["batch_id=4"],
    f"alerts/epoch={EPOCH_A}": ["batch_id=10"],
    f"dlq/epoch={EPOCH_B}": ["batch_id=0", "batch_id=4"],
    f"rule_changes/epoch={EPOCH_A}": ["batch_id=2", "batch_id=5"],
}


def assert_completed(root: Path, all_closed: bool = False) -> None:
    """The folders ``fabricate`` leads to (``all_closed``: its current hour was closed and old
    when the compactor ran)."""
    expected, left = dict(EXPECTED), dict(LEFT)
    if all_closed:
        epoch_b = f"transactions/epoch={EPOCH_B}"
        expected[epoch_b], left[epoch_b] = ["compacted=0-1", "compacted=2-3"], ["batch_id=4"]
    for group, compacted in expected.items():
        names = [n for n in folders(root / group) if not n.startswith("epoch=")]
        assert names == sorted(compacted + left[group]), group
        for name in compacted:
            assert os.listdir(root / group / name) == ["part-0.parquet"], (group, name)


def run_cli(*args: str, env: dict[str, str] | None = None, parquet_dir: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "spark_job.compact", *args]
    if parquet_dir is not None:
        command += ["--parquet-dir", str(parquet_dir)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env or clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PARQUET_DIR", "FRAUDSTREAM_CONFIG", compaction.PAUSE_ENV)}
    return {**env, **extra}


# --- tests ----------------------------------------------------------------------------------


def test_compaction_keeps_every_row_once_and_leaves_open_work_alone(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(minute=30)
    fabricate(tmp_path, now)
    before = visible_rows(tmp_path)
    files_before = sum(len(visible_files(tmp_path, d)) for d in DATASETS)

    report = compaction.compact(tmp_path, now=now, progress=False)

    assert_completed(tmp_path)
    assert visible_rows(tmp_path) == before
    totals = report.totals()
    assert totals["files_before"] == files_before == 32
    assert totals["files_after"] == sum(len(visible_files(tmp_path, d)) for d in DATASETS) == 19
    assert totals["runs"] == 9 and totals["rows_compacted"] == 66
    # A compacted file holds its batches' rows in batch order, each batch's rows in order.
    merged = pq.read_table(tmp_path / "transactions" / f"epoch={EPOCH_A}" / "compacted=3-7"
                           / "part-0.parquet")
    assert merged.column("transaction_id").to_pylist() == [
        f"transactions/{EPOCH_A}/{b}/{i}" for b in (3, 4, 6, 7) for i in range(3 + b % 2)]
    assert merged.schema.equals(TRANSACTIONS_SCHEMA, check_metadata=False)
    old_alerts = pq.read_schema(tmp_path / "alerts" / "compacted=0-1" / "part-0.parquet")
    assert old_alerts.equals(OLD_ALERTS_SCHEMA, check_metadata=False)

    # Idempotent: a second run finds nothing to do and touches nothing.
    snapshot = tree(tmp_path)
    again = compaction.compact(tmp_path, now=now, progress=False)
    assert again.totals()["runs"] == 0 and tree(tmp_path) == snapshot


def test_files_younger_than_the_minimum_age_wait(tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(minute=10, second=0, microsecond=0)
    twenty_minutes_ago = now - timedelta(minutes=20)  # the previous hour, a closed one
    for batch_id in range(3):
        write_batch(tmp_path / "alerts" / f"epoch={EPOCH_A}" / f"batch_id={batch_id}",
                    ALERTS_SCHEMA, [f"a{batch_id}"], twenty_minutes_ago)
    assert compaction.compact(tmp_path, now=now, progress=False).totals()["runs"] == 0
    report = compaction.compact(tmp_path, now=now, min_age_minutes=15, progress=False)
    assert [(r["first"], r["last"]) for r in report.groups[0].runs] == [(0, 1)]


def test_runs_are_cut_at_the_row_limit(tmp_path: Path) -> None:
    old = datetime.now(UTC) - timedelta(hours=5)
    for batch_id in range(6):
        write_batch(tmp_path / "dlq" / f"epoch={EPOCH_A}" / f"batch_id={batch_id}", DLQ_SCHEMA,
                    [f"r{batch_id}-{i}" for i in range(2)], old.replace(minute=30))
    before = visible_rows(tmp_path)
    report = compaction.compact(tmp_path, max_rows=4, progress=False)
    assert [(r["first"], r["last"]) for r in report.groups[0].runs] == [(0, 1), (2, 3)]
    assert visible_rows(tmp_path) == before


def test_a_merged_file_with_the_wrong_row_count_replaces_nothing(tmp_path: Path) -> None:
    old = (datetime.now(UTC) - timedelta(hours=5)).replace(minute=30)
    for batch_id in range(3):
        write_batch(tmp_path / "alerts" / f"batch_id={batch_id}", ALERTS_SCHEMA,
                    [f"a{batch_id}"], old)
    snapshot = tree(tmp_path)
    [group] = compaction.scan(tmp_path)
    [run] = compaction.plan(group, datetime.now(UTC), timedelta(minutes=60))
    wrong = dataclasses.replace(run, members=(
        dataclasses.replace(run.members[0], rows=run.members[0].rows + 1), *run.members[1:]))
    with pytest.raises(compaction.CompactionError, match="holds 2 rows"):
        compaction.write_run(wrong)
    assert tree(tmp_path) == snapshot and folders(tmp_path / "alerts") == [
        "batch_id=0", "batch_id=1", "batch_id=2"]


def test_a_second_compaction_at_the_same_time_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("alerts").mkdir()
    with open(tmp_path / compaction.LOCK_FILE, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = run_cli(parquet_dir=tmp_path)
    assert result.returncode == 1 and "another compaction is running" in result.stderr


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    fabricate(tmp_path, datetime.now(UTC) - timedelta(hours=2))  # every hour closed and old
    snapshot = tree(tmp_path)
    result = run_cli("--dry-run", "--json", parquet_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path) == snapshot
    report = json.loads(result.stdout)
    assert report["dry_run"] is True and report["runs"] == 10  # epoch B's 2-3 as well
    assert (report["files_before"], report["files_after"]) == (32, 18)
    assert result.stderr.count("(dry run)") == len(EXPECTED)


def test_command_reads_parquet_dir_from_the_environment_and_reports(tmp_path: Path) -> None:
    fabricate(tmp_path, datetime.now(UTC) - timedelta(hours=2))
    before = visible_rows(tmp_path)
    result = run_cli(env=clean_env(PARQUET_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert visible_rows(tmp_path) == before
    assert_completed(tmp_path, all_closed=True)
    assert result.stdout == "compacted 10 runs: 32 files -> 18 files, 73 rows rewritten\n"
    lines = result.stderr.splitlines()
    assert len(lines) == len(EXPECTED)
    assert f"compact: transactions epoch={EPOCH_A}: 8 files -> 3, 2 runs, 24 rows" in lines
    assert "compact: alerts (legacy layout): 5 files -> 3, 2 runs, 14 rows" in lines
    # Nothing left to do.
    result = run_cli("--json", parquet_dir=tmp_path)
    assert json.loads(result.stdout)["runs"] == 0


@pytest.mark.parametrize("step", compaction.PAUSE_STEPS)
def test_kill_9_loses_and_duplicates_nothing_and_the_next_run_finishes(
        tmp_path: Path, step: str) -> None:
    now = datetime.now(UTC)
    fabricate(tmp_path, now - timedelta(hours=2))
    before = visible_rows(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "spark_job.compact", "--parquet-dir", str(tmp_path)],
        cwd=REPO_ROOT, env=clean_env(**{compaction.PAUSE_ENV: step}),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        paused = ""
        while time.monotonic() < deadline and not paused:
            line = process.stderr.readline()
            if not line:
                break
            if line.startswith(f"compact: paused after {step}: "):
                paused = line.strip().split(": ", 2)[2]
        assert paused, f"the compactor never paused after {step}"
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # Killed in the middle of the first run (alerts, legacy layout, batches 0-1).
    group = tmp_path / "alerts"
    if step == "write":
        assert Path(paused).name.startswith(".part-0.") and Path(paused).exists()
        assert not (group / "compacted=0-1" / "part-0.parquet").exists()
    else:
        assert (group / "compacted=0-1" / "part-0.parquet").is_file()
    if step == "delete":
        assert "batch_id=0" not in folders(group) and "batch_id=1" in folders(group)
    else:
        assert {"batch_id=0", "batch_id=1"} <= set(folders(group))
    assert "compacted=2-3" not in folders(group)
    assert visible_rows(tmp_path) == before, "every row exactly once under the reader rule"

    result = run_cli("--json", parquet_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert visible_rows(tmp_path) == before
    legacy = next(g for g in json.loads(result.stdout)["groups"]
                  if g["dataset"] == "alerts" and g["epoch"] is None)
    if step == "write":  # the incomplete folder was removed and the run done again
        assert legacy["removed_incomplete"] == 1 and len(legacy["runs"]) == 2
    else:  # the run was committed; only its deletions were left to finish
        assert legacy["removed_covered"] == (2 if step == "replace" else 1)
        assert [(r["first"], r["last"]) for r in legacy["runs"]] == [(2, 3)]
    assert_completed(tmp_path, all_closed=True)
    assert not [p for p in tmp_path.rglob("compacted=*/.*")]
