"""The fraudstream-kafka source against the real embedded broker and a real Spark session.

The broker under-reports its high watermark (the last record batch's base offset + 1), and the
records here are produced with ordinary batching, so every test below also checks that the
source finds the true end of each partition by reading."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from pyspark.sql import Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming.datasource import ReadAllAvailable, ReadMaxRows

from fraudstream import schemas
from fraudstream.broker import EmbeddedBroker
from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.topics import TopicSpec
from spark_job.kafka_source import (
    FORMAT_NAME,
    KafkaDataSource,
    KafkaPartition,
    KafkaSourceError,
    KafkaStreamReader,
    OffsetProber,
    RawDecoder,
    SourceOptions,
    limit_offsets,
    load_decoder,
    parse_offset_spec,
    plan_partitions,
    read_partition_range,
    source_options,
)
from spark_job.validation import TRANSACTION_DECODER

QUERY_TIMEOUT = 240.0


# --- helpers --------------------------------------------------------------------------------------


def new_topic(broker: EmbeddedBroker, partitions: int) -> str:
    name = f"src-test-{uuid.uuid4().hex[:10]}"
    admin = wait_for_broker(broker.client_config(), 30)
    ensure_topics(admin, [TopicSpec(name, partitions)])
    return name


def produce(broker: EmbeddedBroker, topic: str, count: int, *, first: int = 0,
            partitions: int = 1, value: Any = None) -> list[bytes]:
    """``count`` records spread round-robin over ``partitions``, produced with librdkafka's
    ordinary batching (so the broker's reported high watermark lags)."""
    producer = Producer(broker.client_config())
    values = []
    for i in range(first, first + count):
        payload = value(i) if value else f"v{i}".encode()
        producer.produce(topic, key=f"k{i}".encode(), value=payload, partition=i % partitions)
        values.append(payload)
    assert producer.flush(30) == 0
    return values


def reported_highs(broker: EmbeddedBroker, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({**broker.client_config(), "group.id": "reported-highs"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(partitions)}
    finally:
        consumer.close()


def options(broker: EmbeddedBroker, topic: str, **extra: Any) -> dict[str, str]:
    return source_options(broker.client_config(), topic, **extra)


def run_available_now(spark: SparkSession, opts: dict[str, str], checkpoint: Path,
                      columns: tuple[str, ...] = ("partition", "offset", "value")
                      ) -> list[list[Row]]:
    """Run the source with trigger(availableNow=True); return each micro-batch's rows."""
    batches: list[tuple[int, list[Row]]] = []

    def collect(frame: Any, batch_id: int) -> None:
        batches.append((batch_id, frame.select(*columns).collect()))

    query = (spark.readStream.format(FORMAT_NAME).options(**opts).load()
             .writeStream.foreachBatch(collect)
             .option("checkpointLocation", str(checkpoint))
             .trigger(availableNow=True).start())
    try:
        finished = query.awaitTermination(QUERY_TIMEOUT)
    finally:
        if query.isActive:
            query.stop()
    assert finished, f"availableNow query did not finish within {QUERY_TIMEOUT} s"
    assert query.exception() is None, query.exception()
    return [rows for _, rows in sorted(batches, key=lambda b: b[0])]


def positions(rows: list[Row]) -> list[tuple[int, int]]:
    return sorted((r["partition"], r["offset"]) for r in rows)


def contiguous(counts: dict[int, int], start: dict[int, int] | None = None
               ) -> list[tuple[int, int]]:
    start = start or {}
    return sorted((p, o) for p, n in counts.items() for o in range(start.get(p, 0), n))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return tmp_path / "checkpoint"


@pytest.fixture
def reader_factory(broker: EmbeddedBroker) -> Iterator[Any]:
    """In-process stream readers (the driver side, without Spark), closed after the test."""
    made: list[KafkaStreamReader] = []

    def make(topic: str, **extra: Any) -> KafkaStreamReader:
        source = KafkaDataSource(options(broker, topic, **extra))
        reader = source.streamReader(source.schema())
        made.append(reader)
        return reader

    yield make
    for reader in made:
        reader.stop()


# --- the true end of a partition ------------------------------------------------------------------


def test_prober_finds_the_true_end_beyond_the_reported_watermark(broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 1)
    produce(broker, topic, 1000)
    reported = reported_highs(broker, topic, 1)
    prober = OffsetProber(SourceOptions.parse(options(broker, topic)))
    try:
        assert prober.latest([0]) == {0: 1000}, f"broker reported {reported}"
        produce(broker, topic, 250, first=1000)
        assert prober.latest([0]) == {0: 1250}
        # Already at the end: the probe finds nothing more.
        assert prober.latest([0]) == {0: 1250}
    finally:
        prober.close()


def test_latest_offset_respects_the_row_limit_without_gaps(reader_factory: Any,
                                                           broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 3)
    produce(broker, topic, 900, partitions=3)
    reader = reader_factory(topic, max_rows_per_batch=200)
    assert reader.getDefaultReadLimit() == ReadMaxRows(200)
    start = reader.initialOffset()
    assert start == {"0": 0, "1": 0, "2": 0}
    seen: list[tuple[int, int]] = []
    for _ in range(20):
        end = reader.latestOffset(start, reader.getDefaultReadLimit())
        if end == start:
            break
        parts = reader.partitions(start, end)
        assert sum(p.end - p.start for p in parts) <= 200
        seen += [(p.partition, o) for p in parts for o in range(p.start, p.end)]
        start = end
    assert sorted(seen) == contiguous({0: 300, 1: 300, 2: 300})
    assert reader.latestOffset(start, ReadAllAvailable()) == start


def test_available_now_target_ignores_records_produced_later(reader_factory: Any,
                                                             broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 2)
    produce(broker, topic, 100, partitions=2)
    reader = reader_factory(topic)
    start = reader.initialOffset()
    reader.prepareForTriggerAvailableNow()
    produce(broker, topic, 50, first=100, partitions=2)
    end = reader.latestOffset(start, ReadAllAvailable())
    assert end == {"0": 50, "1": 50}
    assert reader.latestOffset(end, ReadAllAvailable()) == end


def test_a_partition_missing_from_the_start_offsets_is_read_from_zero(
        reader_factory: Any, broker: EmbeddedBroker) -> None:
    # The broker cannot add partitions to a topic; a start offset without partition 2 is what a
    # query holds when the partition was added after its last batch.
    topic = new_topic(broker, 3)
    produce(broker, topic, 30, partitions=3)
    reader = reader_factory(topic)
    end = reader.latestOffset({"0": 10, "1": 4}, ReadAllAvailable())
    assert end == {"0": 10, "1": 10, "2": 10}
    assert [(p.partition, p.start, p.end) for p in reader.partitions({"0": 10, "1": 4}, end)] == [
        (1, 4, 10), (2, 0, 10)]


def test_lost_records_fail_loudly_or_restart_the_partition(broker: EmbeddedBroker) -> None:
    # A memory-only broker that restarted: the checkpoint is past the partition's new end.
    topic = new_topic(broker, 1)
    produce(broker, topic, 10)
    strict = OffsetProber(SourceOptions.parse(options(broker, topic, probeTimeoutSeconds="0.5")))
    lenient = OffsetProber(SourceOptions.parse(options(broker, topic, probeTimeoutSeconds="0.5",
                                                       failOnDataLoss="false")))
    try:
        with pytest.raises(KafkaSourceError, match="records were lost"):
            strict.latest([0], floors={0: 50})
        assert lenient.latest([0], floors={0: 50}) == {0: 10}
        assert [(p.start, p.end) for p in plan_partitions(topic, {0: 50}, {0: 10})] == [(0, 10)]
    finally:
        strict.close()
        lenient.close()


# --- reading exactly [start, end) -----------------------------------------------------------------


def test_read_returns_exactly_the_range_and_replays_identically(broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 1)
    values = produce(broker, topic, 2000)
    opts = SourceOptions.parse(options(broker, topic))
    part = KafkaPartition(topic, 0, 500, 1700)
    first = [b.to_pylist() for b in read_partition_range(opts, RawDecoder(), part)]
    again = [b.to_pylist() for b in read_partition_range(opts, RawDecoder(), part)]
    rows = [row for batch in first for row in batch]
    assert [r["offset"] for r in rows] == list(range(500, 1700))
    assert [r["value"] for r in rows] == values[500:1700]
    assert rows[0]["key"] == "k500" and rows[0]["timestamp"].tzinfo is not None
    assert first == again


def test_read_fails_instead_of_returning_fewer_records(broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 1)
    produce(broker, topic, 20)
    opts = SourceOptions.parse(options(broker, topic, readTimeoutSeconds="1"))
    with pytest.raises(KafkaSourceError, match=r"\[0, 25\).*stopped at 20"):
        list(read_partition_range(opts, RawDecoder(), KafkaPartition(topic, 0, 0, 25)))


# --- through Spark --------------------------------------------------------------------------------


def test_session_is_utc_with_arrow_and_the_source_registered(spark: SparkSession) -> None:
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
    assert spark.conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert spark.conf.get("spark.sql.shuffle.partitions") == "2"
    # Workers run this interpreter, so they import the same packages.
    executable = spark.range(1).rdd.map(lambda _: __import__("sys").executable).first()
    assert executable == sys.executable
    with pytest.raises(Exception, match=r"kafka\.bootstrap\.servers"):
        spark.read.format(FORMAT_NAME).option("topic", "t").load()


def test_stream_delivers_every_record_exactly_once(spark: SparkSession, broker: EmbeddedBroker,
                                                   checkpoint: Path) -> None:
    topic = new_topic(broker, 3)
    values = produce(broker, topic, 3000, partitions=3)
    batches = run_available_now(spark, options(broker, topic), checkpoint)
    rows = [r for batch in batches for r in batch]
    assert len(rows) == 3000
    assert positions(rows) == contiguous({0: 1000, 1: 1000, 2: 1000})
    assert sorted(r["value"] for r in rows) == sorted(values)


def test_continuous_trigger_keeps_up_with_a_live_producer(
        spark: SparkSession, broker: EmbeddedBroker, checkpoint: Path) -> None:
    # Records arrive while the query runs, in many small producer batches: each trigger must
    # find the true end again, and no record may be skipped or read twice.
    topic = new_topic(broker, 3)
    seen: list[tuple[int, int]] = []

    def collect(frame: Any, batch_id: int) -> None:
        seen.extend((r["partition"], r["offset"])
                    for r in frame.select("partition", "offset").collect())

    query = (spark.readStream.format(FORMAT_NAME)
             .options(**options(broker, topic, max_rows_per_batch=500)).load()
             .writeStream.foreachBatch(collect).option("checkpointLocation", str(checkpoint))
             .trigger(processingTime="200 milliseconds").start())
    try:
        deadline = time.monotonic() + QUERY_TIMEOUT
        for chunk in range(6):
            # The next chunk is produced only once the query delivered the previous one.
            produce(broker, topic, 150, first=chunk * 150, partitions=3)
            while len(seen) < (chunk + 1) * 150 and query.isActive:
                assert time.monotonic() < deadline, f"only {len(seen)} records delivered"
                query.awaitTermination(0.1)
            assert query.exception() is None, query.exception()
    finally:
        query.stop()
    assert sorted(seen) == contiguous({0: 300, 1: 300, 2: 300})


def test_row_limit_splits_into_batches_without_gaps_or_overlaps(
        spark: SparkSession, broker: EmbeddedBroker, checkpoint: Path) -> None:
    topic = new_topic(broker, 3)
    produce(broker, topic, 2500, partitions=3)
    batches = run_available_now(spark, options(broker, topic, max_rows_per_batch=600), checkpoint)
    assert len(batches) >= 5
    assert all(0 < len(batch) <= 600 for batch in batches)
    rows = [r for batch in batches for r in batch]
    assert positions(rows) == contiguous({0: 834, 1: 833, 2: 833})


def test_restart_from_checkpoint_continues_without_duplicates(
        spark: SparkSession, broker: EmbeddedBroker, checkpoint: Path) -> None:
    topic = new_topic(broker, 2)
    produce(broker, topic, 1000, partitions=2)
    first = [r for b in run_available_now(spark, options(broker, topic), checkpoint) for r in b]
    produce(broker, topic, 600, first=1000, partitions=2)
    second = [r for b in run_available_now(spark, options(broker, topic), checkpoint) for r in b]
    assert positions(first) == contiguous({0: 500, 1: 500})
    assert positions(second) == contiguous({0: 800, 1: 800}, start={0: 500, 1: 500})
    third = run_available_now(spark, options(broker, topic), checkpoint)
    assert [r for batch in third for r in batch] == []


def test_starting_offsets_latest_skips_what_was_there(spark: SparkSession, broker: EmbeddedBroker,
                                                     checkpoint: Path) -> None:
    topic = new_topic(broker, 2)
    produce(broker, topic, 1000, partitions=2)
    opts = options(broker, topic, starting_offsets="latest")
    # Spark may run one empty first batch; it must hold no record.
    assert [r for batch in run_available_now(spark, opts, checkpoint) for r in batch] == []
    produce(broker, topic, 300, first=1000, partitions=2)
    rows = [r for batch in run_available_now(spark, opts, checkpoint) for r in batch]
    # "latest" is the true end (500 per partition), not the lagging reported watermark.
    assert positions(rows) == contiguous({0: 650, 1: 650}, start={0: 500, 1: 500})


def test_batch_read_between_json_offsets(spark: SparkSession, broker: EmbeddedBroker) -> None:
    topic = new_topic(broker, 2)
    produce(broker, topic, 400, partitions=2)
    frame = (spark.read.format(FORMAT_NAME)
             .options(**options(broker, topic, starting_offsets=json.dumps({"0": 150})),
                      endingOffsets=json.dumps({topic: {"0": -1, "1": 120}}))
             .load())
    rows = frame.select("partition", "offset", "value").collect()
    assert positions(rows) == contiguous({0: 200, 1: 120}, start={0: 150})
    stamps = frame.select(F.unix_millis("timestamp").alias("ms")).collect()
    assert all(abs(r["ms"] / 1000 - datetime.now(UTC).timestamp()) < 3600 for r in stamps)


def test_transaction_decoder_yields_typed_and_rejected_rows(
        spark: SparkSession, broker: EmbeddedBroker, checkpoint: Path) -> None:
    topic = new_topic(broker, 2)
    moment = datetime.now(UTC) - timedelta(minutes=1)
    good = {"transaction_id": "t", "user_id": "u1", "amount": 12, "currency": "EUR",
            "timestamp": schemas.format_timestamp(moment), "location": "Lyon",
            "payment_method": "card", "merchant_id": "m1", "device_ip": "203.0.113.7"}
    bad = {0: b"{not json", 1: json.dumps({**good, "timestamp": "9999-12-31T00:00:00Z"}).encode(),
           2: json.dumps({**good, "amount": -1}).encode()}

    def value(i: int) -> bytes:
        return bad.get(i) or json.dumps({**good, "transaction_id": f"t{i}"}).encode()

    produce(broker, topic, 40, partitions=2, value=value)
    opts = options(broker, topic, decoder=TRANSACTION_DECODER,
                   decoder_options={"max_value_bytes": 10_000, "future_tolerance_seconds": 300})
    frame = spark.readStream.format(FORMAT_NAME).options(**opts).load()
    types = dict(frame.dtypes)
    assert types["event_time"] == "timestamp" and types["amount"] == "double"
    assert types["is_fraud"] == "boolean" and types["error_reason"] == "string"

    columns = ("partition", "offset", "transaction_id", "amount", "event_time", "error_reason",
               "raw_value")
    rows = [r for b in run_available_now(spark, opts, checkpoint, columns) for r in b]
    assert len(rows) == 40
    rejected = {(r["partition"], r["offset"]): r for r in rows if r["error_reason"]}
    # Records 0, 1, 2 went to partitions 0, 1, 0 at offsets 0, 0, 1.
    assert {k: r["error_reason"] for k, r in rejected.items()} == {
        (0, 0): schemas.INVALID_JSON, (1, 0): schemas.FUTURE_TIMESTAMP,
        (0, 1): schemas.INVALID_AMOUNT}
    assert rejected[(0, 0)]["raw_value"] == "{not json"
    assert all(r["event_time"] is None and r["amount"] is None and r["transaction_id"] is None
               for r in rejected.values())
    valid = [r for r in rows if r["error_reason"] is None]
    assert sorted(r["transaction_id"] for r in valid) == sorted(f"t{i}" for i in range(3, 40))
    assert all(r["amount"] == 12.0 and r["raw_value"] is None for r in valid)


# --- options and planning (no broker needed) ------------------------------------------------------


def test_options_are_validated_with_their_names() -> None:
    with pytest.raises(KafkaSourceError, match=r"kafka\.bootstrap\.servers"):
        SourceOptions.parse({"topic": "t"})
    with pytest.raises(KafkaSourceError, match="topic"):
        SourceOptions.parse({"kafka.bootstrap.servers": "h:1"})
    with pytest.raises(KafkaSourceError, match="maxRowsPerBatch"):
        SourceOptions.parse({"kafka.bootstrap.servers": "h:1", "topic": "t",
                             "maxRowsPerBatch": "many"})
    with pytest.raises(KafkaSourceError, match="startingOffsets"):
        SourceOptions.parse({"kafka.bootstrap.servers": "h:1", "topic": "t",
                             "startingOffsets": "yesterday"})
    with pytest.raises(KafkaSourceError, match="decoder"):
        load_decoder("no_such_module:thing", {})
    parsed = SourceOptions.parse({"KAFKA.BOOTSTRAP.SERVERS": "h:1", "topic": "t",
                                  "kafka.security.protocol": "SASL_SSL", "maxRowsPerBatch": "0"})
    assert parsed.max_rows_per_batch is None
    config = parsed.consumer_config()
    assert config["security.protocol"] == "SASL_SSL" and config["auto.offset.reset"] == "error"


def test_offset_specs() -> None:
    assert parse_offset_spec("o", " Latest ", "t") == "latest"
    assert parse_offset_spec("o", '{"0": 5, "2": -2}', "t") == {0: 5, 2: -2}
    assert parse_offset_spec("o", '{"t": {"1": -1}}', "t") == {1: -1}
    with pytest.raises(KafkaSourceError):
        parse_offset_spec("o", '{"0": -3}', "t")


@pytest.mark.parametrize(("lags", "limit"), [((10, 0, 5), 4), ((1, 1, 1), 1), ((7, 3, 100), 50),
                                             ((5, 5), 100)])
def test_limit_offsets_spreads_the_budget_exactly(lags: tuple[int, ...], limit: int) -> None:
    start = {p: 100 * p for p in range(len(lags))}
    end = {p: start[p] + lag for p, lag in enumerate(lags)}
    cut = limit_offsets(start, end, limit)
    assert all(start[p] <= cut[p] <= end[p] for p in end)
    assert sum(cut[p] - start[p] for p in end) == min(limit, sum(lags))


def test_min_partitions_splits_ranges_contiguously() -> None:
    start, end = {0: 0, 1: 10}, {0: 1000, 1: 510, 2: 3}
    assert [(p.partition, p.start, p.end) for p in plan_partitions("t", start, end)] == [
        (0, 0, 1000), (1, 10, 510), (2, 0, 3)]
    split = plan_partitions("t", start, end, min_partitions=6)
    assert len(split) >= 6
    covered = sorted((p.partition, o) for p in split for o in range(p.start, p.end))
    assert covered == sorted([(0, o) for o in range(1000)] + [(1, o) for o in range(10, 510)]
                             + [(2, o) for o in range(3)])
    assert split == plan_partitions("t", start, end, min_partitions=6)
