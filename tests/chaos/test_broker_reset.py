"""Broker resets and new checkpoints never cost history (each on a broker of its own).

A memory-only broker that restarts comes back with empty topics, while the checkpoint still
holds the old offsets. The detector must not wait for offsets that never come nor skip records
below them: by default it refuses to start and names the cause; with ``ON_BROKER_RESET=new-epoch``
it archives the checkpoint, starts a new epoch from the new topic's first record, restores the
rules in force from the Parquet history, and every earlier Parquet file stays as it was. A new
``CHECKPOINT_DIR`` over the same ``PARQUET_DIR`` re-reads the topic into an epoch of its own:
the earlier files are untouched and readers see every alert once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from support.ground import chaos_seed, ground_truth
from support.pipeline import alert_rows, detector_env, duplicates, run_detector, transaction_records

from fraudstream import datasets, schemas, topics
from fraudstream.broker import EmbeddedBroker
from fraudstream.rules.store import RulesTopic
from fraudstream.testing import produce
from spark_job.epochs import ARCHIVE_FOLDER, EPOCH_FILE

TRANSACTIONS = 1_500
HORIZON_US = 600 * 1_000_000


def snapshot(parquet: Path) -> dict[str, tuple[int, int]]:
    """Every Parquet file under ``parquet`` with its (mtime, size)."""
    return {str(p.relative_to(parquet)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in parquet.rglob("*.parquet")}


def epoch_of(checkpoint: Path) -> dict[str, object]:
    return json.loads((checkpoint / EPOCH_FILE).read_text())


def rule_versions(bootstrap: str) -> dict[str, int]:
    ruleset, _ = RulesTopic({"bootstrap.servers": bootstrap}, topics.RULES).state(HORIZON_US)
    return {d.rule_id: d.version for d in ruleset.rules.values()}


def read_alert_ids(parquet: Path) -> list[str]:
    table = datasets.read_dataset(parquet, schemas.ALERTS_DATASET,
                                  pa.schema([("alert_id", pa.string())]))
    return table.column("alert_id").to_pylist()


@pytest.mark.timeout(1500)
def test_a_broker_reset_fails_fast_or_starts_a_new_epoch_and_history_survives(
        tmp_path: Path) -> None:
    seed = chaos_seed()
    before, after = ground_truth(seed, TRANSACTIONS), ground_truth(seed + 1, TRANSACTIONS)
    checkpoint, parquet = tmp_path / "checkpoint", tmp_path / "parquet"
    log = tmp_path / "detector.log"
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    bootstrap, port = broker.bootstrap_servers, broker.port
    env = detector_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path, CONSOLE_ALERTS="false")
    try:
        # Epoch 1, with a rule changed to version 2 (same parameters, so the oracle holds).
        produce(bootstrap, topics.TRANSACTIONS, transaction_records(before.transactions))
        code, text = run_detector(env, log, "--available-now")
        assert code == 0, text[-3000:]
        rules_topic = RulesTopic({"bootstrap.servers": bootstrap}, topics.RULES)
        ruleset, _ = rules_topic.state(HORIZON_US)
        high_value = ruleset.rules["high_value"]
        rules_topic.publish(high_value.changed(version=2, updated_by="reset-test"))
        code, text = run_detector(env, log, "--available-now")
        assert code == 0, text[-3000:]
        versions = rule_versions(bootstrap)
        assert versions["high_value"] == 2
        first = epoch_of(checkpoint)
        assert set(read_alert_ids(parquet)) == set(before.expected)
        history_before = snapshot(parquet)
        assert all(f"epoch={first['epoch']}" in path for path in history_before), history_before

        # The broker restarts empty on the same address; new traffic arrives.
        broker.stop()
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log").start()
        produce(bootstrap, topics.TRANSACTIONS, transaction_records(after.transactions))

        # Default policy: refuse, name the cause and the fix, touch nothing.
        code, text = run_detector(env, log, "--available-now", timeout=120)
        assert code == 1, text[-3000:]
        assert "no longer holds" in text and "ON_BROKER_RESET=new-epoch" in text, text[-3000:]
        assert epoch_of(checkpoint) == first
        assert snapshot(parquet) == history_before

        # Local mode: a new epoch from the new topic's start; the old checkpoint archived.
        code, text = run_detector({**env, "ON_BROKER_RESET": "new-epoch"}, log,
                                  "--available-now")
        assert code == 0, text[-3000:]
        assert "BROKER RESET" in text, text[-3000:]
        second = epoch_of(checkpoint)
        assert second["epoch"] != first["epoch"] and second["previous"] == first["epoch"]
        assert str(second["reason"]).startswith("broker reset")
        archived = checkpoint / ARCHIVE_FOLDER / f"epoch={first['epoch']}"
        assert (archived / "query" / "offsets").is_dir() and (archived / EPOCH_FILE).is_file()
        assert rule_versions(bootstrap) == versions, "rules in force were not restored"
        history = snapshot(parquet)
        assert {p: history[p] for p in history_before} == history_before, \
            "a file of the earlier epoch was changed"
        ids = read_alert_ids(parquet)
        assert not duplicates(ids)
        assert set(ids) == set(before.expected) | set(after.expected)

        # A new checkpoint over the same Parquet: an epoch of its own, nothing replaced.
        fresh = {**env, "CHECKPOINT_DIR": str(tmp_path / "checkpoint-2")}
        code, text = run_detector(fresh, log, "--available-now")
        assert code == 0, text[-3000:]
        third = epoch_of(tmp_path / "checkpoint-2")["epoch"]
        assert third not in (first["epoch"], second["epoch"])
        assert {p: snapshot(parquet)[p] for p in history} == history
        raw = [row["alert_id"] for row in alert_rows(parquet)]
        assert len(raw) == len(before.expected) + 2 * len(after.expected), \
            "the re-read epoch should hold its own copy of the re-read alerts"
        ids = read_alert_ids(parquet)
        assert not duplicates(ids), "readers must keep one row per alert across epochs"
        assert set(ids) == set(before.expected) | set(after.expected)
    finally:
        broker.stop()
