"""Epochs: one checkpoint's life, and the broker resets that end one.

Spark's checkpoint remembers, per topic partition, the offset the next batch starts from. Those
offsets mean something only on the topic they were read from. A memory-only broker that
restarts, a topic deleted and created again, or retention that deleted records before they were
read all leave a checkpoint pointing at records that are not there (or are different records):
resuming would wait for offsets that never come, or silently skip everything below them.

So every checkpoint carries an *epoch* (``<CHECKPOINT_DIR>/fraudstream-epoch.json``): an id that
sorts by start time, the Kafka topic ids it was read from, and why it began. The detector
writes its Parquet under ``<dataset>/epoch=<id>/`` (``fraudstream.datasets``), so batch ids that
restart at 0 in a new epoch never touch an earlier one's files.

Before the query starts, ``open_epoch`` compares the checkpoint with the broker::

    checkpoint: transactions {0: 2053, 1: 1990}   topic id AaI0...
    broker:     transactions {0: [0, 12), 1: [0, 9)}   topic id Qx7r...   -> reset

A reset is a topic id that changed, a partition that is gone, a checkpoint offset beyond the
partition's end (records lost; proven by reading, as the source does) or below its start
(deleted before they were read). Then, by
``ON_BROKER_RESET``:

- ``fail`` (default): refuse to start, naming the cause and the ways out.
- ``new-epoch`` (local mode): move the checkpoint to ``<CHECKPOINT_DIR>/archived/epoch=<old>/``,
  start a new epoch from the topic's earliest offsets, keep every Parquet file, say so loudly.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from confluent_kafka import Consumer, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient

__all__ = [
    "ARCHIVE_FOLDER",
    "EPOCH_FILE",
    "BrokerResetError",
    "Epoch",
    "TopicView",
    "checkpoint_offsets",
    "find_lost_records",
    "find_reset",
    "new_epoch_id",
    "open_epoch",
    "read_epoch",
    "read_topics",
]

log = logging.getLogger(__name__)

EPOCH_FILE: Final = "fraudstream-epoch.json"
ARCHIVE_FOLDER: Final = "archived"
QUERY_FOLDER: Final = "query"
FAIL: Final = "fail"
NEW_EPOCH: Final = "new-epoch"


class BrokerResetError(RuntimeError):
    """The broker no longer holds what the checkpoint read, and the policy is to stop."""


@dataclass(frozen=True)
class Epoch:
    """One checkpoint's life: the id in the Parquet paths and what it was read from."""

    epoch: str
    started_at: str
    topic_ids: dict[str, str | None] = field(default_factory=dict)
    previous: str | None = None
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class TopicView:
    """What the broker holds for one topic now: its id and each partition's [low, high)."""

    topic_id: str | None
    ranges: dict[int, tuple[int, int]]


def new_epoch_id(now: datetime | None = None) -> str:
    """``20261202T031500Z-3fa2c1``: sorts by start time; the suffix keeps two starts in the same
    second apart."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def read_epoch(checkpoint_dir: Path) -> Epoch | None:
    path = Path(checkpoint_dir) / EPOCH_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Epoch(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise BrokerResetError(f"{path} is not an epoch file ({exc}); move it away") from exc


def _write_epoch(checkpoint_dir: Path, epoch: Epoch) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    temporary = checkpoint_dir / f".{EPOCH_FILE}.tmp"
    temporary.write_text(epoch.to_json(), encoding="utf-8")
    os.replace(temporary, checkpoint_dir / EPOCH_FILE)


def checkpoint_offsets(checkpoint_dir: Path) -> list[dict[int, int]] | None:
    """Per source (in the query's order: transactions, then rules) the offsets the newest planned
    batch ends at, or None when the query never planned a batch.

    Spark's offset log file is a version line, a metadata line, then one JSON line per source.
    """
    folder = Path(checkpoint_dir) / QUERY_FOLDER / "offsets"
    if not folder.is_dir():
        return None
    batches = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    if not batches:
        return None
    lines = (folder / str(batches[-1])).read_text(encoding="utf-8").splitlines()
    sources = []
    for line in lines[2:]:
        data = json.loads(line) if line.strip() not in ("", "-") else {}
        sources.append({int(p): int(o) for p, o in (data or {}).items()})
    return sources


def read_topics(client_config: Mapping[str, str], topics: Sequence[str],
                timeout: float = 10.0) -> dict[str, TopicView | None]:
    """Each topic's id and partition ranges (None for a topic the broker does not have)."""
    admin = AdminClient(dict(client_config))
    views: dict[str, TopicView | None] = {}
    consumer = Consumer({**client_config, "group.id": "fraudstream-epoch-check",
                         "enable.auto.commit": False})
    try:
        for topic in topics:
            try:
                description = admin.describe_topics(TopicCollection([topic]))[topic].result(timeout)
            except KafkaException as exc:
                if "UNKNOWN_TOPIC" in str(exc).upper():
                    views[topic] = None
                    continue
                raise
            raw_id = getattr(description, "topic_id", None)
            topic_id = str(raw_id) if raw_id is not None else None
            if topic_id in ("", "AAAAAAAAAAAAAAAAAAAAAA"):  # the all-zero id: not supported
                topic_id = None
            ranges = {}
            for info in description.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, info.id),
                                                           timeout=timeout, cached=False)
                ranges[info.id] = (low, high)
            views[topic] = TopicView(topic_id, ranges)
    finally:
        consumer.close()
    return views


def find_reset(topic: str, offsets: Mapping[int, int], recorded_id: str | None,
               view: TopicView | None) -> str | None:
    """Why ``offsets`` (read from ``topic`` with id ``recorded_id``) no longer fit the broker's
    ``view`` of it, or None when they do."""
    if view is None:
        return f"topic {topic!r} no longer exists"
    if recorded_id and view.topic_id and recorded_id != view.topic_id:
        return (f"topic {topic!r} was created again (id {recorded_id} -> {view.topic_id}): a "
                "memory-only broker restarted or the topic was deleted and recreated")
    for partition, offset in sorted(offsets.items()):
        if partition not in view.ranges:
            return f"topic {topic!r} has no partition {partition} any more"
        low, _ = view.ranges[partition]
        if offset < low:
            return (f"topic {topic!r} partition {partition} starts at offset {low}, above offset "
                    f"{offset} not yet read: records {offset}..{low - 1} were deleted before "
                    "the detector read them (retention)")
    return None


def find_lost_records(client_config: Mapping[str, str], topic: str,
                      offsets: Mapping[int, int], view: TopicView) -> str | None:
    """Why records below ``offsets`` are gone, or None when each partition still reaches its
    offset. A reported end below the offset is checked by reading from the offset with the
    source's own prober (Tansu reports a lagging end; a fetch tells the truth)."""
    suspect = {p: o for p, o in offsets.items() if p in view.ranges and o > view.ranges[p][1]}
    if not suspect:
        return None
    from spark_job.kafka_source import KafkaSourceError, OffsetProber, SourceOptions

    prober = OffsetProber(SourceOptions(kafka=dict(client_config), topic=topic,
                                        probe_timeout=5.0))
    try:
        prober.latest(sorted(suspect), floors=suspect)
    except KafkaSourceError as exc:
        return str(exc).split("; set ")[0]
    finally:
        prober.close()
    return None


def _archive(checkpoint_dir: Path, old: Epoch | None) -> Path:
    """Move the checkpoint's contents (not the archive itself) to ``archived/epoch=<id>/``."""
    name = f"epoch={old.epoch}" if old else f"epoch=unknown-{new_epoch_id()}"
    target = checkpoint_dir / ARCHIVE_FOLDER / name
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(checkpoint_dir.iterdir()):
        if entry.name != ARCHIVE_FOLDER:
            shutil.move(str(entry), str(target / entry.name))
    return target


def open_epoch(checkpoint_dir: Path, client_config: Mapping[str, str], topics: Sequence[str],
               policy: str = FAIL, now: datetime | None = None) -> Epoch:
    """The epoch this start continues or begins (see the module docstring). ``topics`` lists the
    query's sources in their checkpoint order. Raises BrokerResetError under ``fail``."""
    checkpoint_dir = Path(checkpoint_dir)
    current = read_epoch(checkpoint_dir)
    offsets = checkpoint_offsets(checkpoint_dir)
    views = read_topics(client_config, topics)
    ids = {topic: (view.topic_id if view else None) for topic, view in views.items()}
    stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    if offsets is None:  # no batch planned yet, so nothing written under any epoch of it
        if current is not None:
            if current.topic_ids != ids:
                current = replace(current, topic_ids=ids)
                _write_epoch(checkpoint_dir, current)
            return current
        epoch = Epoch(new_epoch_id(now), stamp, ids, None, "new checkpoint")
        _write_epoch(checkpoint_dir, epoch)
        log.info("epoch %s begins (new checkpoint in %s)", epoch.epoch, checkpoint_dir)
        return epoch
    recorded = current.topic_ids if current else {}
    cause = None
    for topic, source in zip(topics, offsets, strict=False):
        view = views[topic]
        cause = find_reset(topic, source, recorded.get(topic), view)
        if cause is None and view is not None:
            cause = find_lost_records(client_config, topic, source, view)
        if cause:
            break
    if cause is None:
        if current is None:  # a checkpoint written before epochs: give it one, keep its state
            current = Epoch(new_epoch_id(now), stamp, ids, None,
                            "checkpoint from before epochs")
            _write_epoch(checkpoint_dir, current)
            log.info("epoch %s given to the existing checkpoint in %s", current.epoch,
                     checkpoint_dir)
        return current
    if policy != NEW_EPOCH:
        raise BrokerResetError(
            f"the broker no longer holds what checkpoint {checkpoint_dir} read: {cause}. "
            "Nothing was processed. Ways out: ON_BROKER_RESET=new-epoch (archives the "
            "checkpoint, reads the new topic from its start, keeps all Parquet; what "
            "./setup.sh uses), a new CHECKPOINT_DIR, or ./reset.sh (deletes everything)")
    archived = _archive(checkpoint_dir, current)
    epoch = Epoch(new_epoch_id(now), stamp, ids, current.epoch if current else None,
                  f"broker reset: {cause}")
    _write_epoch(checkpoint_dir, epoch)
    log.warning("BROKER RESET: %s. The old checkpoint is archived in %s; epoch %s begins from "
                "the earliest offsets of the topic; every earlier Parquet file is kept.",
                cause, archived, epoch.epoch)
    return epoch

