"""Helpers for tests that drive the real pipeline from outside: produce to a topic, run
``python -m spark_job`` as a subprocess in its own process group (so kill -9 reaches Spark's JVM
and its Python workers too), and read what it wrote (Parquet datasets, the alerts and DLQ
topics, the metrics file, the checkpoint's offset and commit logs).

Everything here goes through the public surface (CLI, topics, Parquet folders, metrics file),
never through the detector's internals, so the tests survive a rework of the plan.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow.dataset as ds
from confluent_kafka import Consumer, TopicPartition

from fraudstream import datasets, schemas
from fraudstream.testing import REPO_ROOT, Record, group_alive
from producer.generator import encode_transaction
from spark_job.epochs import EPOCH_FILE

# --- records -------------------------------------------------------------------------------------




def transaction_records(transactions: Iterable[Mapping[str, Any]]) -> list[Record]:
    """(user_id key, JSON value) pairs exactly as the producer sends them."""
    return [(tx["user_id"].encode(), encode_transaction(tx)) for tx in transactions]  # type: ignore[arg-type]


def write_jsonl(path: Path, transactions: Iterable[Mapping[str, Any]]) -> Path:
    """A JSON-lines file that ``python -m producer --from-file`` replays byte for byte."""
    with path.open("wb") as fh:
        for tx in transactions:
            fh.write(encode_transaction(tx) + b"\n")  # type: ignore[arg-type]
    return path


# --- the detector as a subprocess ----------------------------------------------------------------


def detector_env(topics_env: Mapping[str, str], work: Path, **extra: str) -> dict[str, str]:
    """Environment for ``python -m spark_job``: the test's topics, its own Parquet and checkpoint
    folders under ``work``, Spark on the loopback interface, no console colour."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "FRAUDSTREAM_", "PYSPARK_SUBMIT"))}
    env.update(topics_env)
    env.update({
        "PARQUET_DIR": str(work / "parquet"),
        "CHECKPOINT_DIR": str(work / "checkpoint"),
        "MODELS_DIR": str(work / "models"),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@dataclass
class DetectorRun:
    """One ``python -m spark_job`` process, leader of its own process group."""

    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the group: the Python driver, Spark's JVM, its workers."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            self._log.flush()
        return code

    def stop(self, timeout: float = 90) -> int:
        """A clean stop: SIGTERM to the driver only (it stops the query and Spark itself);
        the whole group is killed if it has not exited within ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_and_reap()
            raise

    def kill_and_reap(self) -> None:
        """kill -9 the whole group and wait until no member is left (a restart must not meet a
        half-dead JVM still holding the checkpoint)."""
        self.kill_group(signal.SIGKILL)
        self.process.wait(60)
        deadline = time.monotonic() + 60
        while group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]






def start_detector(env: Mapping[str, str], log_path: Path, *args: str) -> DetectorRun:
    """Start the detector CLI in a new session (its own process group), output to ``log_path``."""
    log = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "spark_job", *args], cwd=REPO_ROOT, env=dict(env),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return DetectorRun(process, log_path, log)


def run_detector(env: Mapping[str, str], log_path: Path, *args: str,
                 timeout: float = 600) -> tuple[int, str]:
    """Run the detector to completion (e.g. with ``--available-now``); returns (exit code,
    output of this run). The group is killed if it outlives ``timeout``."""
    before = log_path.stat().st_size if log_path.exists() else 0
    run = start_detector(env, log_path, *args)
    try:
        code = run.wait(timeout)
    except subprocess.TimeoutExpired:
        run.kill_and_reap()
        raise
    finally:
        if run.alive():
            run.kill_and_reap()
    with log_path.open("rb") as fh:
        fh.seek(before)
        text = fh.read().decode(errors="replace")
    return code, text


# --- what the detector wrote ---------------------------------------------------------------------


def parquet_rows(root: Path) -> list[dict[str, Any]]:
    """Rows of a hive-partitioned dataset (``batch_id=N`` folders); [] if it does not exist."""
    if not root.exists() or not any(root.rglob("*.parquet")):
        return []
    dataset = ds.dataset(root, format="parquet", partitioning="hive",
                         exclude_invalid_files=True)
    return dataset.to_table().to_pylist()


def batch_folder(parquet_dir: Path, checkpoint_dir: Path, dataset: str, batch_id: int) -> Path:
    """Where the detector writes one batch of a dataset in the checkpoint's current epoch."""
    epoch = json.loads((checkpoint_dir / EPOCH_FILE).read_text())["epoch"]
    folder = datasets.batch_folder(datasets.epoch_folder(parquet_dir, dataset, epoch), batch_id)
    assert isinstance(folder, Path)
    return folder


def alert_rows(parquet_dir: Path) -> list[dict[str, Any]]:
    return parquet_rows(parquet_dir / schemas.ALERTS_DATASET)


def dlq_rows(parquet_dir: Path) -> list[dict[str, Any]]:
    return parquet_rows(parquet_dir / schemas.DLQ_DATASET)


def metrics_lines(parquet_dir: Path) -> list[dict[str, Any]]:
    path = parquet_dir / schemas.METRICS_FOLDER / schemas.METRICS_FILE_NAME
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a line cut by kill -9
    return lines


def batch_logs(checkpoint_dir: Path) -> tuple[list[int], list[int]]:
    """Batch ids in the query checkpoint's offset log (planned) and commit log (done)."""

    def ids(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())

    query = checkpoint_dir / "query"
    return ids(query / "offsets"), ids(query / "commits")


def log_heads(checkpoint_dir: Path) -> tuple[int, int]:
    """(newest planned batch, newest committed batch); -1 when a log is empty."""
    offsets, commits = batch_logs(checkpoint_dir)
    return (offsets[-1] if offsets else -1), (commits[-1] if commits else -1)


def offsets_total(checkpoint_dir: Path, batch_id: int) -> int:
    """Transactions up to a planned batch's end offsets, summed over partitions (the offset log
    holds a version line, Spark's metadata, then one JSON line per source: the transactions
    topic first, then the rules topic)."""
    lines = (checkpoint_dir / "query" / "offsets" / str(batch_id)).read_text().splitlines()
    return sum(int(v) for v in json.loads(lines[2]).values())


def caught_up(checkpoint_dir: Path, produced: int) -> bool:
    """Every one of ``produced`` records is in a committed batch and nothing is in flight
    (counts from offset 0 of a fresh topic)."""
    planned, committed = log_heads(checkpoint_dir)
    try:
        return planned == committed >= 0 and offsets_total(checkpoint_dir, planned) == produced
    except (FileNotFoundError, ValueError, IndexError):
        return False  # a log file being written


def in_flight(checkpoint_dir: Path) -> bool:
    """A batch is planned (offset log) but not committed yet."""
    planned, committed = log_heads(checkpoint_dir)
    return planned > committed


def drop_newest_commit(checkpoint_dir: Path) -> int:
    """Delete the newest entry of the query's commit log (and its checksum file); returns its
    batch id. This is the state a crash leaves between "outputs written" and "Spark recorded
    the commit": on restart Spark replays that batch with the same offsets."""
    _, commits = batch_logs(checkpoint_dir)
    assert commits, "nothing was committed"
    newest = commits[-1]
    folder = checkpoint_dir / "query" / "commits"
    (folder / str(newest)).unlink()
    (folder / f".{newest}.crc").unlink(missing_ok=True)
    return newest






def dedup_by_alert_id(alerts: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Mapping[str, Any]],
                                                                     int]:
    """Alerts keyed by alert_id (what a downstream consumer keeps) and the number of extra
    copies dropped."""
    counts = Counter(a["alert_id"] for a in alerts)
    kept: dict[str, Mapping[str, Any]] = {}
    for alert in alerts:
        kept.setdefault(alert["alert_id"], alert)
    return kept, sum(n - 1 for n in counts.values())


def duplicates(values: Sequence[Any]) -> dict[Any, int]:
    """Values that occur more than once, with their counts."""
    return {v: n for v, n in Counter(values).items() if n > 1}


class TopicTail:
    """Reads a JSON topic from offset 0 in a background thread while a test runs (assign(), no
    group join), remembering every value of ``field`` seen so far."""

    def __init__(self, bootstrap: str, topic: str, field: str) -> None:
        import threading

        self.field = field
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fraudstream-tail",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in sorted(partitions)])
        self._thread = threading.Thread(target=self._run, name=f"tail-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(500, timeout=0.05):
                if message.error() is None:
                    value = json.loads(message.value()).get(self.field)
                    with self._lock:
                        self.seen[value] += 1

    def has_all(self, values: Iterable[str]) -> bool:
        with self._lock:
            return all(v in self.seen for v in values)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()
