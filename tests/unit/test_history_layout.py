"""The Parquet history's layout and readers, the epoch checks, and rules restored from history:
pure logic on real files (no broker, no Spark)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraudstream import datasets
from fraudstream.rules.definition import default_definitions
from fraudstream.rules.ruleset import APPLIED, DELETED, REFUSED, rules_in_force
from fraudstream.schemas import DLQ_DATASET, TRANSACTIONS_DATASET
from spark_job.epochs import TopicView, checkpoint_offsets, find_reset, new_epoch_id

SCHEMA = pa.schema([("transaction_id", pa.string()), ("amount", pa.float64())])


def write(folder: Path, rows: list[tuple[str, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"transaction_id": [r[0] for r in rows], "amount": [r[1] for r in rows]})
    pq.write_table(table, folder / datasets.PART_FILE)


def test_history_is_read_in_order_legacy_then_epochs_batches_by_number(tmp_path: Path) -> None:
    base = tmp_path / TRANSACTIONS_DATASET
    write(base / "batch_id=3", [("legacy", 1.0)])
    old, new = "epoch=20261201T000000Z-aaaaaa", "epoch=20261202T000000Z-bbbbbb"
    for batch in (10, 2, 1):
        write(base / old / f"batch_id={batch}", [(f"a{batch}", float(batch))])
    write(base / new / "batch_id=0", [("b0", 0.0)])
    write(base / new / ".batch_id=1", [("hidden", 0.0)])
    (base / new / "batch_id=1").mkdir()
    (base / new / "batch_id=1" / ".part-0.123.tmp").write_bytes(b"half")
    table = datasets.read_dataset(tmp_path, TRANSACTIONS_DATASET, SCHEMA)
    assert table.column("transaction_id").to_pylist() == ["legacy", "a1", "a2", "a10", "b0"]


def test_a_repeated_item_is_kept_once_first_epoch_wins_unless_asked_for_every_row(
        tmp_path: Path) -> None:
    base = tmp_path / TRANSACTIONS_DATASET
    write(base / "epoch=1" / "batch_id=0", [("t1", 1.0), ("t2", 2.0)])
    write(base / "epoch=2" / "batch_id=0", [("t2", 99.0), ("t3", 3.0)])
    table = datasets.read_dataset(tmp_path, TRANSACTIONS_DATASET, SCHEMA)
    assert table.to_pydict() == {"transaction_id": ["t1", "t2", "t3"], "amount": [1.0, 2.0, 3.0]}
    every = datasets.read_dataset(tmp_path, TRANSACTIONS_DATASET, SCHEMA, distinct=False)
    assert every.num_rows == 4
    only_amounts = datasets.read_dataset(tmp_path, TRANSACTIONS_DATASET,
                                         pa.schema([("amount", pa.float64())]))
    assert only_amounts.column_names == ["amount"] and only_amounts.num_rows == 3


def test_an_uncommitted_compacted_folder_hides_nothing(tmp_path: Path) -> None:
    epoch = tmp_path / TRANSACTIONS_DATASET / "epoch=1"
    write(epoch / "batch_id=0", [("t0", 0.0)])
    write(epoch / "batch_id=1", [("t1", 1.0)])
    (epoch / "compacted=0-1").mkdir()
    (epoch / "compacted=0-1" / ".part-0.abc.tmp").write_bytes(b"being written")
    names = [p.parent.name for p in datasets.dataset_files(tmp_path, TRANSACTIONS_DATASET)]
    assert names == ["batch_id=0", "batch_id=1"]
    write(epoch / "compacted=0-1", [("t0", 0.0), ("t1", 1.0)])
    names = [p.parent.name for p in datasets.dataset_files(tmp_path, TRANSACTIONS_DATASET)]
    assert names == ["compacted=0-1"]


def test_dlq_rows_are_the_same_item_only_with_the_same_kafka_coordinates() -> None:
    table = pa.table({"topic": ["t", "t", "t"], "partition": [0, 0, 0], "offset": [5, 5, 5],
                      "kafka_timestamp": [1, 1, 2], "raw_value": ["x", "x", "y"]})
    assert datasets.first_of_each(table, DLQ_DATASET).column("raw_value").to_pylist() == \
        ["x", "y"]


def test_epoch_ids_sort_by_start_time() -> None:
    from datetime import UTC, datetime
    earlier = new_epoch_id(datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC))
    later = new_epoch_id(datetime(2026, 12, 2, 0, 0, 0, tzinfo=UTC))
    assert earlier.startswith("20261201T235959Z-") and earlier < later


@pytest.mark.parametrize(("recorded", "view", "offsets", "expected"), [
    ("id-1", TopicView("id-1", {0: (0, 10)}), {0: 10}, None),
    ("id-1", TopicView("id-2", {0: (0, 10)}), {0: 10}, "was created again"),
    (None, TopicView("id-2", {0: (0, 10)}), {0: 4}, None),
    ("id-1", TopicView("id-1", {0: (0, 10)}), {0: 4, 1: 3}, "no partition 1"),
    ("id-1", TopicView("id-1", {0: (7, 10)}), {0: 4}, "deleted before the detector read"),
    ("id-1", None, {0: 4}, "no longer exists"),
])
def test_find_reset(recorded: str | None, view: TopicView | None, offsets: dict[int, int],
                    expected: str | None) -> None:
    reason = find_reset("transactions", offsets, recorded, view)
    assert (reason is None) if expected is None else (expected in (reason or "")), reason


def test_checkpoint_offsets_reads_the_newest_planned_batch(tmp_path: Path) -> None:
    assert checkpoint_offsets(tmp_path) is None
    folder = tmp_path / "query" / "offsets"
    folder.mkdir(parents=True)
    for batch, end in ((9, 5), (10, 7)):
        (folder / str(batch)).write_text(
            f'v1\n{{"batchWatermarkMs":0}}\n{{"0":{end},"1":2}}\n{{"0":4}}\n')
    assert checkpoint_offsets(tmp_path) == [{0: 7, 1: 2}, {0: 4}]


def record(definition_dict: dict[str, object], status: str) -> dict[str, object]:
    return {"rule_id": definition_dict["rule_id"], "status": status,
            "kind": definition_dict["kind"], "version": definition_dict["version"],
            "enabled": definition_dict["enabled"],
            "params": json.dumps(definition_dict["params"]),
            "updated_at": definition_dict["updated_at"],
            "updated_by": definition_dict["updated_by"]}


def test_rules_in_force_fold_the_history() -> None:
    defaults = [d.to_dict() for d in default_definitions()]
    high_value = next(d for d in defaults if d["rule_id"] == "high_value")
    velocity = next(d for d in defaults if d["rule_id"] == "velocity")
    changed = {**high_value, "version": 2, "params": {**high_value["params"], "amount": 5000.0}}
    refused = {**high_value, "version": 3, "params": {"amount": -1}}
    history = [record(d, APPLIED) for d in defaults]
    history += [record(changed, APPLIED), record(refused, REFUSED), record(velocity, DELETED)]
    restored = {d.rule_id: d for d in rules_in_force(history)}
    assert set(restored) == {d["rule_id"] for d in defaults} - {"velocity"}
    assert restored["high_value"].version == 2
    assert restored["high_value"].params["amount"] == 5000.0
