"""End to end: generator -> real broker -> `python -m spark_job` -> alerts topic + Parquet,
compared with the oracle computed in plain Python from the produced events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.dataset as ds

from fraudstream import schemas
from fraudstream.rules.oracle import expected_alerts
from fraudstream.testing import REPO_ROOT, produce, read_json
from producer.generator import TransactionGenerator, encode_transaction

BAD_RECORDS = [
    (b"{not json", schemas.INVALID_JSON),
    (b"[1, 2, 3]", schemas.NOT_AN_OBJECT),
    (b'{"transaction_id": "x"}', schemas.MISSING_FIELD),
]


def run_detector(env: dict[str, str], work: Path) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ, **env,
        "PARQUET_DIR": str(work / "parquet"), "CHECKPOINT_DIR": str(work / "checkpoint"),
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    return subprocess.run([sys.executable, "-m", "spark_job", "--available-now"], cwd=REPO_ROOT,
                          env=full_env, capture_output=True, text=True, timeout=600)


def parquet_rows(root: Path) -> list[dict]:  # type: ignore[type-arg]
    if not root.exists():
        return []
    return ds.dataset(root, format="parquet", partitioning="hive").to_table().to_pylist()


def test_pipeline_alerts_equal_the_oracle_and_backfill_sees_every_record(
    unique_topics: dict[str, str], tmp_path: Path,
) -> None:
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    generator = TransactionGenerator(users=1500, fraud_ratio=0.03, seed=20261122)
    start = datetime.now(UTC) - timedelta(minutes=30)
    first = generator.generate(3000, start=start, rate=20)
    records = [(tx["user_id"].encode(), encode_transaction(tx)) for tx in first]
    records[100:100] = [(None, value) for value, _ in BAD_RECORDS]
    produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"], records)

    result = run_detector(unique_topics, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    expected = {a["alert_id"]: a for a in expected_alerts(first)}
    assert Counter(a["rule"] for a in expected.values()).keys() == set(schemas.RULES), \
        "the seeded stream should exercise all four rules"
    parquet_alerts = parquet_rows(tmp_path / "parquet" / schemas.ALERTS_DATASET)
    assert sorted(a["alert_id"] for a in parquet_alerts) == sorted(expected)
    topic_alerts = read_json(bootstrap, unique_topics["ALERTS_TOPIC"])
    assert {a["alert_id"] for a in topic_alerts} == set(expected)
    assert all(set(a) == set(schemas.ALERT_FIELDS) for a in topic_alerts)
    assert "ALERT " in result.stdout  # console sink

    dlq = parquet_rows(tmp_path / "parquet" / schemas.DLQ_DATASET)
    assert sorted(r["error_reason"] for r in dlq) == sorted(code for _, code in BAD_RECORDS)
    dlq_topic = read_json(bootstrap, unique_topics["DLQ_TOPIC"])
    assert sorted(r["reason"] for r in dlq_topic) == sorted(code for _, code in BAD_RECORDS)
    assert all(r["source_topic"] == unique_topics["TRANSACTIONS_TOPIC"] for r in dlq_topic)

    bronze = parquet_rows(tmp_path / "parquet" / schemas.TRANSACTIONS_DATASET)
    assert len(bronze) == len(first)
    metrics = (tmp_path / "parquet" / schemas.METRICS_FOLDER / schemas.METRICS_FILE_NAME)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sum(line["input_rows"] for line in lines) == len(records)
    assert sum(line["dlq_rows"] for line in lines) == len(BAD_RECORDS)

    # A second backfill from the same checkpoint sees exactly the new records.
    second = generator.generate(1500, start=start + timedelta(seconds=len(first) / 20), rate=20)
    produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"],
            [(tx["user_id"].encode(), encode_transaction(tx)) for tx in second])
    result = run_detector(unique_topics, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    bronze = parquet_rows(tmp_path / "parquet" / schemas.TRANSACTIONS_DATASET)
    assert len(bronze) == len(first) + len(second)
    assert len({(r["partition"], r["offset"]) for r in bronze}) == len(bronze)
    all_expected = {a["alert_id"] for a in expected_alerts(first + second)}
    parquet_alerts = parquet_rows(tmp_path / "parquet" / schemas.ALERTS_DATASET)
    assert sorted(a["alert_id"] for a in parquet_alerts) == sorted(all_expected)
