"""``python -m spark_job.status`` for real: the session's embedded broker with fresh topics,
records produced to chosen partitions, and a checkpoint folder, epoch file and metrics file
written by the test the way the detector and Spark write them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from fraudstream.broker import free_port
from fraudstream.schemas import format_timestamp
from fraudstream.settings import DetectorSettings, load_settings
from spark_job import status

REPO = Path(__file__).resolve().parents[2]
EPOCH = "20261202T031500Z-3fa2c1"
#: Records produced per partition of the transactions topic (its high watermarks).
PRODUCED = {0: 10, 1: 20, 2: 7}

pytestmark = pytest.mark.timeout(120)


def produce(bootstrap: str, topic: str) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition, count in PRODUCED.items():
        for i in range(count):
            producer.produce(topic, key=f"u{i}", value=b"{}", partition=partition)
    assert producer.flush(30) == 0


def write_batch(checkpoint: Path, batch: int, offsets: dict, committed: bool,
                committed_ago: float = 0.0) -> None:
    """Spark's offset log entry (version, batch metadata, one line per source: transactions
    then rules) and, when committed, its commit log entry."""
    query = checkpoint / "query"
    (query / "offsets").mkdir(parents=True, exist_ok=True)
    (query / "commits").mkdir(parents=True, exist_ok=True)
    metadata = {"batchWatermarkMs": 0, "batchTimestampMs": 1764644100000, "conf": {}}
    (query / "offsets" / str(batch)).write_text(
        "v1\n" + json.dumps(metadata) + "\n" + json.dumps(offsets) + "\n" + json.dumps({"0": 3})
        + "\n")
    (query / "offsets" / f".{batch}.crc").write_bytes(b"crc")  # Hadoop's checksum files
    if committed:
        commit = query / "commits" / str(batch)
        commit.write_text('v1\n{"nextBatchWatermarkMs":0}\n')
        moment = time.time() - committed_ago
        os.utime(commit, (moment, moment))


def write_metrics(path: Path) -> None:
    """30 lines: the 10 oldest claim an absurd rate (only the newest 20 may be read), the 20
    newest are one second apart with 5 rows each: 19 batches * 5 rows / 19 s = 5 rows/s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = datetime.now(UTC) - timedelta(seconds=60)
    lines = []
    for i in range(30):
        rows = 1_000_000 if i < 10 else 5
        lines.append(json.dumps({"batch_id": i, "written_at": format_timestamp(
            start + timedelta(seconds=i)), "input_rows": rows, "valid_rows": rows}))
    path.write_text("\n".join(lines) + "\n")
    # A rotated file next to it (its numbers would change the rate): never read.
    path.with_name(path.name + ".1").write_text(json.dumps(
        {"batch_id": 99, "written_at": format_timestamp(datetime.now(UTC)),
         "input_rows": 1_000_000}) + "\n")


@pytest.fixture
def setup(unique_topics: dict[str, str], tmp_path: Path) -> dict[str, str]:
    produce(unique_topics["KAFKA_BOOTSTRAP_SERVERS"], unique_topics["TRANSACTIONS_TOPIC"])
    env = {**unique_topics, "CHECKPOINT_DIR": str(tmp_path / "checkpoint"),
           "PARQUET_DIR": str(tmp_path / "parquet")}
    write_metrics(tmp_path / "parquet" / "_metrics" / "detector.jsonl")
    return env


def run_status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    drop = ("KAFKA_", "CHECKPOINT_DIR", "PARQUET_DIR", "METRICS_FILE", "TRANSACTIONS_TOPIC")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return subprocess.run([sys.executable, "-m", "spark_job.status", *args], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=30,
                          check=False)


def settings_from(env: dict[str, str]) -> DetectorSettings:
    return load_settings(DetectorSettings, [], environ=env)[0]


def test_epoch_batch_and_lag_of_the_last_committed_batch(setup: dict[str, str]) -> None:
    checkpoint = Path(setup["CHECKPOINT_DIR"])
    (checkpoint).mkdir(parents=True)
    (checkpoint / status.EPOCH_FILE).write_text(json.dumps({
        "epoch": EPOCH, "started_at": "2026-12-02T03:15:00Z",
        "topic_ids": {setup["TRANSACTIONS_TOPIC"]: None}, "previous": None,
        "reason": "new checkpoint"}))
    write_batch(checkpoint, 0, {"0": 2}, committed=True, committed_ago=30)
    # Partition 2 is not in the checkpoint yet: it counts from its low watermark (0).
    write_batch(checkpoint, 1, {"0": 4, "1": 20}, committed=True, committed_ago=5)
    write_batch(checkpoint, 2, {"0": 10, "1": 20, "2": 7}, committed=False)  # planned only
    behind = (10 - 4) + (20 - 20) + (7 - 0)

    result = run_status(setup)
    assert result.returncode == 0, result.stdout + result.stderr
    # The age counts from the file's mtime, so a slow interpreter start adds seconds.
    line = re.fullmatch(
        rf"detector: epoch {EPOCH}, batch 1 committed (\d+) s ago, "
        rf"behind: {behind} records \({re.escape(setup['TRANSACTIONS_TOPIC'])}\), ~2\.6 s",
        result.stdout.strip())
    assert line is not None, result.stdout
    assert 4 <= int(line.group(1)) < 15

    result = run_status(setup, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["epoch"] == EPOCH and report["epoch_file"]["reason"] == "new checkpoint"
    assert report["batch"] == 1
    assert 4 <= report["committed_seconds_ago"] < 15
    assert report["topic"] == setup["TRANSACTIONS_TOPIC"]
    assert report["partitions"] == [
        {"partition": 0, "checkpoint": 4, "low": 0, "high": 10, "behind": 6},
        {"partition": 1, "checkpoint": 20, "low": 0, "high": 20, "behind": 0},
        {"partition": 2, "checkpoint": 0, "low": 0, "high": 7, "behind": 7},
    ]
    assert report["behind_records"] == behind
    assert report["input_rows_per_second"] == pytest.approx(5.0)
    assert report["behind_seconds"] == pytest.approx(behind / 5.0)
    assert report["checkpoint_ahead"] == [] and report["error"] is None


def test_an_old_checkpoint_without_epoch_and_no_commit_yet(setup: dict[str, str]) -> None:
    result = run_status(setup)
    assert result.returncode == 0, result.stdout + result.stderr
    total = sum(PRODUCED.values())
    assert result.stdout.strip() == (
        f"detector: epoch unknown, no batch committed yet (checkpoint "
        f"{setup['CHECKPOINT_DIR']}), behind: {total} records ({setup['TRANSACTIONS_TOPIC']}), "
        f"~{total / 5:.1f} s")


def test_spark_kafka_offsets_caught_up_and_a_checkpoint_ahead_of_the_broker(
        setup: dict[str, str]) -> None:
    checkpoint = Path(setup["CHECKPOINT_DIR"])
    topic = setup["TRANSACTIONS_TOPIC"]
    # Spark's own Kafka source names the topic; the checkpoint is caught up.
    write_batch(checkpoint, 0, {topic: {str(p): n for p, n in PRODUCED.items()}}, committed=True)
    report = status.collect(settings_from(setup))
    assert report["behind_records"] == 0 and report["behind_seconds"] == 0.0
    assert report["checkpoint_ahead"] == []
    # A memory-only broker restarted under the checkpoint: its offsets are past the new topic's.
    write_batch(checkpoint, 1, {topic: {"0": 500, "1": 20, "2": 7}}, committed=True)
    report = status.collect(settings_from(setup))
    assert report["checkpoint_ahead"] == [0] and report["behind_records"] == 0
    assert "ahead of the broker on partition 0" in status.format_line(report)


def test_no_recent_rate_leaves_the_seconds_unknown(setup: dict[str, str], tmp_path: Path) -> None:
    env = {**setup, "METRICS_FILE": str(tmp_path / "missing.jsonl")}
    report = status.collect(settings_from(env))
    assert report["behind_records"] == sum(PRODUCED.values())
    assert report["input_rows_per_second"] is None and report["behind_seconds"] is None
    assert "time unknown" in status.format_line(report)


def test_an_unreachable_broker_is_reported_with_exit_1_within_the_timeout(
        setup: dict[str, str]) -> None:
    env = {**setup, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    begun = time.monotonic()
    result = run_status(env)
    assert time.monotonic() - begun < 10
    assert result.returncode == 1, result.stdout + result.stderr
    assert "behind: unknown (broker 127.0.0.1:" in result.stdout
    assert "unreachable within 3 s" in result.stdout
    result = run_status(env, "--json", "--timeout", "1")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["behind_records"] is None and "unreachable within 1 s" in report["error"]


def test_a_missing_topic_is_reported_with_exit_1(setup: dict[str, str]) -> None:
    result = run_status({**setup, "TRANSACTIONS_TOPIC": "no-such-topic-status-test"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "topic 'no-such-topic-status-test' does not exist" in result.stdout


def test_status_does_not_import_pyspark() -> None:
    code = "import sys, spark_job.status; sys.exit('pyspark' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=30).returncode == 0
