"""The Parquet history in S3, against a real S3-compatible server (moto's server mode, its own
process): the detector writes there, every reader reads there, replays stay exactly-once, and
what cannot work there says so (the checkpoint, compaction)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from support.ground import ground_truth
from support.pipeline import REPO_ROOT, detector_env, run_detector, transaction_records
from support.s3 import s3_server

from fraudstream import datasets, schemas
from fraudstream.storage import _remote_filesystem, filesystem, storage_path
from fraudstream.testing import produce
from spark_job.sinks import ParquetBatchSink

BUCKET = "fraudstream"
ID_SCHEMA = pa.schema([("alert_id", pa.string())])


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with s3_server(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET) as env:
        yield env


@pytest.fixture
def s3(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process pointed at the server (pyarrow's S3 client is built once per process)."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    _remote_filesystem.cache_clear()
    return s3_env


def test_a_batch_file_in_s3_is_replaced_by_its_replay_and_removed_by_an_empty_one(
        s3: dict[str, str]) -> None:
    root = storage_path(f"s3://{BUCKET}/sink-test") / "alerts" / "epoch=1"
    sink = ParquetBatchSink(root, ID_SCHEMA)
    table = pa.table({"alert_id": ["a", "b"]})
    sink.write_table(0, table)
    sink.write_table(1, table.slice(0, 1))
    sink.write_table(0, pa.table({"alert_id": ["c"]}))  # the replay of batch 0
    read = datasets.read_dataset(f"s3://{BUCKET}/sink-test", schemas.ALERTS_DATASET, ID_SCHEMA,
                                 distinct=False)
    assert read.column("alert_id").to_pylist() == ["c", "a"]
    sink.write_table(1, table.slice(0, 0))  # a replay that found nothing
    fs, path = filesystem(root / "batch_id=1")
    assert fs.get_file_info(path).type.name == "NotFound"


@pytest.mark.timeout(900)
def test_the_detector_writes_its_history_to_s3_and_every_reader_reads_it(
        s3: dict[str, str], unique_topics: dict[str, str], tmp_path: Path) -> None:
    ground = ground_truth(20261202, 1_500)
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"],
            transaction_records(ground.transactions))
    url = f"s3://{BUCKET}/history"
    metrics = tmp_path / "metrics" / "detector.jsonl"  # an S3 object cannot be appended to
    env = detector_env(unique_topics, tmp_path, PARQUET_DIR=url, CONSOLE_ALERTS="false",
                       METRICS_FILE=str(metrics), **s3)
    code, text = run_detector(env, tmp_path / "detector.log", "--available-now")
    assert code == 0, text[-3000:]

    alerts = datasets.read_dataset(url, schemas.ALERTS_DATASET, ID_SCHEMA, distinct=False)
    ids = alerts.column("alert_id").to_pylist()
    assert sorted(ids) == sorted(ground.expected), "alerts in S3 differ from the oracle"
    bronze = datasets.read_dataset(url, schemas.TRANSACTIONS_DATASET,
                                   pa.schema([("transaction_id", pa.string())]), distinct=False)
    assert bronze.num_rows == len(ground.transactions)
    _, files = datasets.list_dataset(url, schemas.ALERTS_DATASET)
    assert files and all("/epoch=" in f.path and f.path.startswith(f"{BUCKET}/history/")
                         for f in files)
    assert metrics.read_text().count("\n") >= 1

    # Readers outside the detector: the dashboard's cache and the quality command.
    from dashboard.data.parquet import DatasetCache

    cache = DatasetCache(url, schemas.ALERTS_DATASET, datasets.ALERTS_SCHEMA)
    assert sorted(cache.refresh()[0].column("alert_id").to_pylist()) == sorted(ground.expected)
    quality = subprocess.run([sys.executable, "-m", "spark_job.quality", "--parquet-dir", url,
                              "--json"], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert quality.returncode == 0, quality.stderr
    assert '"rule": "velocity"' in quality.stdout

    # What cannot work on S3 says so and changes nothing.
    compaction = subprocess.run([sys.executable, "-m", "spark_job.compact", "--parquet-dir", url],
                                cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=120, check=False)
    assert compaction.returncode == 2 and "object storage" in compaction.stderr
    refused = subprocess.run([sys.executable, "-m", "spark_job", "--available-now"],
                             cwd=REPO_ROOT, env={**env, "CHECKPOINT_DIR": f"s3://{BUCKET}/cp"},
                             capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "hadoop-aws" in refused.stderr, refused.stderr
    assert datasets.list_dataset(url, schemas.ALERTS_DATASET)[1] == files
