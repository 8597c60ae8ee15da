"""Negative control of the written-but-not-committed replay check.

tests/chaos/test_crash_recovery.py deletes the newest commit-log entry of a finished run,
restarts the detector and finds no duplicate alert row: its Parquet sink replaces a batch's
folder. Here the same procedure runs with a deliberately non-idempotent sink (a new file per
write, as a naive ``append`` would) plugged into the real detector in-process through
``Detector(outputs=...)``. It must leave duplicates, and the same check must see them: proof
that the replay really happens and that the check can tell a broken sink.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from support.ground import chaos_seed, ground_truth
from support.pipeline import (
    detector_env,
    drop_newest_commit,
    duplicates,
    parquet_rows,
    transaction_records,
)

from fraudstream import schemas
from fraudstream.datasets import ALERTS_SCHEMA
from fraudstream.settings import DetectorSettings, load_settings
from fraudstream.testing import produce
from spark_job.app import Detector
from spark_job.batch import DetectorOutputs

TRANSACTIONS = 2_000
ROWS_PER_BATCH = 1_000


class AppendingParquetSink:
    """NOT idempotent on purpose: every write adds a new file to the batch's folder, so a
    replayed batch leaves its alerts twice. Only for the negative control."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, batch_id: int, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        folder = self.root / f"batch_id={batch_id}"
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(
            [{k: r.get(k) for k in ALERTS_SCHEMA.names} for r in records],
            schema=ALERTS_SCHEMA)
        pq.write_table(table, folder / f"part-{uuid.uuid4().hex}.parquet")

    def close(self) -> None:
        pass


def alert_id_duplicates(alerts_root: Path) -> dict[str, int]:
    """The check of the replay test: alert_ids present in more than one Parquet row."""
    return duplicates([row["alert_id"] for row in parquet_rows(alerts_root)])


def run_in_process(spark: SparkSession, settings: DetectorSettings, alerts_root: Path) -> int:
    detector = Detector(settings, spark=spark, outputs=DetectorOutputs(
        alerts=[AppendingParquetSink(alerts_root)], dlq=[], bronze_dir=None))
    detector.start()
    return detector.wait()  # also unregisters its metrics listener from the shared session


def test_negative_control_a_non_idempotent_sink_fails_the_replay_check(
        unique_topics: dict[str, str], spark: SparkSession, tmp_path: Path) -> None:
    seed = chaos_seed()
    ground = ground_truth(seed, TRANSACTIONS)
    produce(unique_topics["KAFKA_BOOTSTRAP_SERVERS"], unique_topics["TRANSACTIONS_TOPIC"],
            transaction_records(ground.transactions))
    environ = detector_env(unique_topics, tmp_path, MAX_ROWS_PER_BATCH=str(ROWS_PER_BATCH),
                           CONSOLE_ALERTS="false", AVAILABLE_NOW="true")
    settings, _ = load_settings(DetectorSettings, [], environ)
    alerts_root = tmp_path / "parquet" / schemas.ALERTS_DATASET

    assert run_in_process(spark, settings, alerts_root) == 0
    assert alert_id_duplicates(alerts_root) == {}, "no replay yet, no duplicates yet"
    assert {r["alert_id"] for r in parquet_rows(alerts_root)} == set(ground.expected)

    replayed = drop_newest_commit(settings.checkpoint_dir)
    assert (alerts_root / f"batch_id={replayed}").is_dir(), \
        f"seed {seed}: the replayed batch must hold alerts, or the control proves nothing"
    assert run_in_process(spark, settings, alerts_root) == 0

    found = alert_id_duplicates(alerts_root)
    assert found, (f"seed {seed}: the non-idempotent sink replayed batch {replayed} "
                   "without leaving duplicates: the check cannot tell a broken sink")
    replayed_ids = {row["alert_id"] for row in parquet_rows(alerts_root)
                    if row["batch_id"] == replayed}
    assert set(found) == replayed_ids, "exactly the replayed batch's alerts are doubled"
