"""Where the running detector is: its epoch, its last committed micro-batch and how far behind
the transactions topic it is (``python -m spark_job.status``; ``./setup.sh status`` prints it).

Light on purpose (no pyspark import), so it answers in well under a second. What it reads:

- ``<CHECKPOINT_DIR>/fraudstream-epoch.json``, written by the detector when an epoch starts
  (``{"epoch": ..., "started_at": ..., "topic_ids": ..., "previous": ..., "reason": ...}``); an
  older checkpoint has none: the epoch is then "unknown".
- Spark's checkpoint of the query, ``<CHECKPOINT_DIR>/query/``: the newest batch of
  ``commits/`` is the last committed batch (committed when that file was written), and
  ``offsets/<batch>`` holds a version line, the batch metadata, then one JSON line per source in
  the query's order: the transactions source first (``{"0": 123, ...}``: partition -> next offset;
  Spark's own Kafka source writes ``{"<topic>": {"0": 123, ...}}``), then the rules source.
- The broker's end offsets of the transactions topic (high watermarks, checked by reading from
  them to the end of each partition: the embedded Tansu under-reports them). Behind = the sum
  over partitions of end offset - next offset of the last committed batch (a partition the
  checkpoint does not name counts from its low watermark).
- The last lines of the metrics file (``METRICS_FILE``, by default
  ``<PARQUET_DIR>/_metrics/detector.jsonl``; a rotated ``.1`` file is not read): the input rate
  is the rows of those batches over the wall-clock time they span, and seconds behind = records
  behind / that rate.

Exit codes: 0 the numbers were printed; 1 the broker did not answer within ``--timeout`` seconds
(default 3) or has no transactions topic; 2 an invalid setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from fraudstream.schemas import parse_timestamp
from fraudstream.settings import DetectorSettings, load_settings, run_entry_point

__all__ = [
    "EPOCH_FILE",
    "collect",
    "format_line",
    "main",
]

PROG = "python -m spark_job.status"
EPOCH_FILE = "fraudstream-epoch.json"
#: Metrics lines the input rate is computed from (the newest ones).
METRICS_TAIL = 20
DEFAULT_TIMEOUT = 3.0


class BrokerUnreachable(Exception):
    """The broker did not answer in time, or has no such topic."""


def _kafka_reason(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else exc
    return error.str() if hasattr(error, "str") else str(error)


# --- the checkpoint ---------------------------------------------------------------------------


def read_epoch(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The epoch file's content, or None when there is none (or it is unreadable)."""
    try:
        content = json.loads((checkpoint_dir / EPOCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _batch_ids(folder: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    except OSError:
        return []


def last_commit(checkpoint_dir: Path) -> tuple[int, float] | None:
    """(newest committed batch id, when its commit file was written as a Unix time)."""
    commits = checkpoint_dir / "query" / "commits"
    for batch in reversed(_batch_ids(commits)):
        try:
            return batch, (commits / str(batch)).stat().st_mtime
        except OSError:
            continue  # removed meanwhile: the one before
    return None


def source_offsets(checkpoint_dir: Path, batch: int, topic: str) -> dict[int, int] | None:
    """Next offset per partition of the transactions source after ``batch`` (the first source
    line of ``offsets/<batch>``); None when the file is missing or not understood."""
    try:
        lines = (checkpoint_dir / "query" / "offsets" / str(batch)).read_text().splitlines()
        offsets = json.loads(lines[2])
    except (OSError, ValueError, IndexError):
        return None
    if not isinstance(offsets, dict):
        return None
    if offsets and all(isinstance(v, dict) for v in offsets.values()):
        offsets = offsets.get(topic) or {}  # Spark's Kafka source: {"<topic>": {"0": 1}}
    try:
        return {int(p): int(v) for p, v in offsets.items()}
    except (TypeError, ValueError):
        return None


# --- the metrics file ---------------------------------------------------------------------------


def tail_lines(path: Path, count: int, block: int = 8192) -> list[str]:
    """The last ``count`` lines of a file, read from its end (the file may be large)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            position = handle.tell()
            data = b""
            while position > 0 and data.count(b"\n") <= count:
                step = min(block, position)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if position > 0 and lines:
        lines = lines[1:]  # the first one is cut
    return [line for line in lines if line.strip()][-count:]


def input_rate(metrics_file: Path, count: int = METRICS_TAIL) -> float | None:
    """Rows per second over the newest ``count`` batches: the rows of all but the oldest of them
    over the wall-clock time between the oldest and the newest; None with fewer than two."""
    points: list[tuple[datetime, int]] = []
    for line in tail_lines(metrics_file, count):
        try:
            record = json.loads(line)
            points.append((parse_timestamp(record["written_at"]), int(record["input_rows"])))
        except (ValueError, KeyError, TypeError):
            continue
    if len(points) < 2:
        return None
    points.sort(key=lambda point: point[0])
    span = (points[-1][0] - points[0][0]).total_seconds()
    if span <= 0:
        return None
    return sum(rows for _, rows in points[1:]) / span


# --- the broker ---------------------------------------------------------------------------------


def watermarks(config: Mapping[str, Any], topic: str, timeout: float) -> dict[int, tuple[int, int]]:
    """(low, high) watermark per partition of ``topic``; raises BrokerUnreachable when the
    broker does not answer within ``timeout`` seconds in all, or has no such topic.

    Some brokers (the embedded Tansu) report the last record batch's base offset + 1 as the high
    watermark, so the true end is found as the detector's source finds it: by fetching from the
    reported end until the broker signals end-of-partition (on an exact broker that fetch
    returns nothing at once)."""
    deadline = time.monotonic() + timeout
    servers = config.get("bootstrap.servers")
    consumer = Consumer({
        **config, "group.id": "fraudstream-status", "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "error", "log_level": 0,
        "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000)),
    })
    try:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout)
        except KafkaException as exc:
            raise BrokerUnreachable(f"broker {servers} unreachable within {timeout:g} s: "
                                    f"{_kafka_reason(exc)}") from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BrokerUnreachable(f"topic '{topic}' does not exist on broker {servers}")
        marks = {}
        for partition in sorted(found.partitions):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise KafkaException("timed out")
                marks[partition] = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=left, cached=False)
            except KafkaException as exc:
                raise BrokerUnreachable(f"broker {servers} did not give the offsets of "
                                        f"'{topic}' within {timeout:g} s: "
                                        f"{_kafka_reason(exc)}") from None
        ends = _probe_ends(consumer, topic, {p: high for p, (_, high) in marks.items()}, deadline)
        return {p: (int(low), ends[p]) for p, (low, _) in marks.items()}
    finally:
        consumer.close()


def _probe_ends(consumer: Consumer, topic: str, reported: Mapping[int, int],
                deadline: float) -> dict[int, int]:
    """True end of each partition: fetch from the reported end to the end-of-partition event."""
    ends = {p: max(0, high) for p, high in reported.items()}
    pending = set(ends)
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in ends.items()])
    while pending and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=10_000, timeout=0.05):
            partition, error = message.partition(), message.error()
            if error is None:
                ends[partition] = max(ends[partition], message.offset() + 1)
            elif error.code() == KafkaError._PARTITION_EOF:
                ends[partition] = max(ends[partition], message.offset())
                pending.discard(partition)
    for partition in pending:  # out of time: the high watermark of the last fetch response
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        ends[partition] = max(ends[partition], high)
    return ends


# --- the report ---------------------------------------------------------------------------------


def collect(settings: DetectorSettings, timeout: float = DEFAULT_TIMEOUT,
            now: float | None = None) -> dict[str, Any]:
    """Everything the status line says, as a JSON-ready dict (``error`` set when the broker
    could not be asked; the numbers that need it are then None)."""
    now = time.time() if now is None else now
    checkpoint_dir = Path(settings.checkpoint_dir)
    topic = settings.transactions_topic
    epoch = read_epoch(checkpoint_dir)
    commit = last_commit(checkpoint_dir)
    committed = source_offsets(checkpoint_dir, commit[0], topic) if commit else None
    report: dict[str, Any] = {
        "epoch": epoch.get("epoch") if epoch else None,
        "epoch_file": epoch,
        "checkpoint_dir": str(checkpoint_dir),
        "batch": commit[0] if commit else None,
        "committed_at": (datetime.fromtimestamp(commit[1], UTC).isoformat().replace("+00:00", "Z")
                         if commit else None),
        "committed_seconds_ago": round(max(0.0, now - commit[1]), 3) if commit else None,
        "topic": topic,
        "bootstrap_servers": settings.bootstrap_servers,
        "partitions": None,
        "behind_records": None,
        "checkpoint_ahead": [],
        "input_rows_per_second": None,
        "behind_seconds": None,
        "error": None,
    }
    rate = input_rate(Path(settings.resolved_metrics_file))
    report["input_rows_per_second"] = round(rate, 3) if rate is not None else None
    try:
        marks = watermarks(settings.client_config(), topic, timeout)
    except BrokerUnreachable as exc:
        report["error"] = str(exc)
        return report
    partitions = []
    for partition, (low, high) in sorted(marks.items()):
        position = (committed or {}).get(partition, low)
        if position > high:
            report["checkpoint_ahead"].append(partition)
        partitions.append({"partition": partition, "checkpoint": position, "low": low,
                           "high": high, "behind": max(0, high - position)})
    behind = sum(p["behind"] for p in partitions)
    report["partitions"] = partitions
    report["behind_records"] = behind
    if behind == 0:
        report["behind_seconds"] = 0.0
    elif rate:
        report["behind_seconds"] = round(behind / rate, 3)
    return report


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _seconds(value: float) -> str:
    return f"~{value:.1f} s" if value < 10 else f"~{math.floor(value + 0.5)} s"


def format_line(report: Mapping[str, Any]) -> str:
    """``detector: epoch E, batch B committed N s ago, behind: R records (topic), ~S s``."""
    parts = [f"epoch {report['epoch']}" if report["epoch"] else "epoch unknown"]
    if report["batch"] is None:
        parts.append(f"no batch committed yet (checkpoint {report['checkpoint_dir']})")
    else:
        parts.append(f"batch {report['batch']} committed {_ago(report['committed_seconds_ago'])}")
    if report["error"]:
        parts.append(f"behind: unknown ({report['error']})")
        return "detector: " + ", ".join(parts)
    lag = f"behind: {report['behind_records']} records ({report['topic']}), "
    if report["behind_seconds"] is not None:
        lag += _seconds(report["behind_seconds"])
    else:
        lag += "time unknown (no recent input rate)"
    parts.append(lag)
    line = "detector: " + ", ".join(parts)
    if report["checkpoint_ahead"]:
        names = ", ".join(str(p) for p in report["checkpoint_ahead"])
        line += (f"; the checkpoint is ahead of the broker on partition {names} (broker reset? "
                 "a restarted detector starts a new epoch when ON_BROKER_RESET=new-epoch)")
    return line


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", default=False,
                        help="print one JSON object instead of the status line")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds to wait for the broker (default: {DEFAULT_TIMEOUT:g})")


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, namespace = load_settings(DetectorSettings, argv, extra_args=_add_flags)
        report = collect(settings, timeout=max(0.1, namespace.timeout))
        if namespace.json:
            print(json.dumps(report, indent=2))
        else:
            print(format_line(report))
        return 1 if report["error"] else 0

    run_entry_point(PROG, run)


if __name__ == "__main__":
    main()
