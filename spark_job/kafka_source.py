"""A Kafka source for Spark on the Python Data Source API and confluent-kafka.

Why not Spark's own Kafka connector: it is a JVM package fetched from Maven, which this project
cannot rely on. This source needs nothing but the Python packages already installed.

Format name ``fraudstream-kafka`` (registered by ``spark_job.session.build_spark_session``)::

    spark.readStream.format("fraudstream-kafka")
        .option("kafka.bootstrap.servers", "localhost:9092")   # every kafka.* goes to librdkafka
        .option("topic", "transactions")
        .option("startingOffsets", "earliest")                 # | latest | {"0": 42, "1": -2}
        .option("maxRowsPerBatch", "200000")
        .option("decoder", "spark_job.validation:transaction_decoder")
        .load()

Offsets are ``{"<partition>": <next offset to read>}`` JSON, stored by Spark in the checkpoint.
Each micro-batch has one Spark partition per Kafka partition with new data (more with the
``minPartitions`` option, which splits ranges deterministically); a task reads exactly
``[start, end)`` with ``assign()`` (never a consumer group, never a commit), so replaying a
batch yields the same rows, and a task that cannot reach ``end`` fails instead of returning
fewer rows than the offsets promise.

The end of a partition is found by reading, not only by asking. Some brokers (the embedded
Tansu) answer ListOffsets with the last record batch's base offset + 1, so after one batch of
1000 records the "high watermark" is 1. The driver therefore keeps one assigned consumer alive
and, on every ``latestOffset``, fetches from ``max(reported high, known end, start)``: the high
watermark in the fetch response is exact on Tansu too, so the first one above the start is the
end (or, at the end already, the broker signals end-of-partition). On a broker whose ListOffsets
answer is exact that fetch returns nothing and costs one round trip (~10-20 ms).
"""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pyspark.sql.datasource import (
    DataSource,
    DataSourceReader,
    DataSourceStreamReader,
    InputPartition,
)
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from spark_job.memory import handled_rows

__all__ = [
    "FORMAT_NAME",
    "KafkaDataSource",
    "KafkaPartition",
    "KafkaSourceError",
    "KafkaStreamReader",
    "OffsetProber",
    "RawBatch",
    "RawDecoder",
    "SourceOptions",
    "arrow_schema",
    "limit_offsets",
    "load_decoder",
    "parse_offset_spec",
    "plan_partitions",
    "read_partition_range",
    "source_options",
]

log = logging.getLogger(__name__)

FORMAT_NAME: Final = "fraudstream-kafka"

# --- option names -------------------------------------------------------------------------------

#: Every option starting with this prefix is passed to librdkafka without it (security etc.).
KAFKA_OPTION_PREFIX: Final = "kafka."
OPT_BOOTSTRAP_SERVERS: Final = "kafka.bootstrap.servers"
OPT_TOPIC: Final = "topic"
#: Where a query without a checkpoint starts: earliest | latest | JSON {"<partition>": offset}
#: (offset -2 = earliest, -1 = latest; partitions left out start at earliest).
OPT_STARTING_OFFSETS: Final = "startingOffsets"
#: Batch reads only: latest (default) | JSON like startingOffsets.
OPT_ENDING_OFFSETS: Final = "endingOffsets"
#: Upper bound on rows per micro-batch (spread over partitions by backlog); 0 or absent = none.
OPT_MAX_ROWS_PER_BATCH: Final = "maxRowsPerBatch"
#: Split the batch's ranges so that it has at least this many Spark partitions (default: one
#: per Kafka partition with new data). More tasks than cores balances the decoding work.
OPT_MIN_PARTITIONS: Final = "minPartitions"
#: ``module:factory`` building the Decoder; absent = raw records (RAW_SCHEMA).
OPT_DECODER: Final = "decoder"
#: Options starting with this prefix go to the decoder factory without it.
DECODER_OPTION_PREFIX: Final = "decoder."
#: A task without progress for this long checks whether the broker still holds its range.
LOSS_CHECK_SECONDS: Final = 5.0
#: A task waits this long without progress for promised offsets before failing.
OPT_READ_TIMEOUT: Final = "readTimeoutSeconds"
#: Whether latestOffset reads past the reported high watermark (needed for Tansu).
OPT_PROBE_END: Final = "probeEndOffsets"
#: How long one end-of-partition probe may take before the known end is used.
OPT_PROBE_TIMEOUT: Final = "probeTimeoutSeconds"
#: Timeout of metadata and watermark requests.
OPT_REQUEST_TIMEOUT: Final = "requestTimeoutSeconds"
#: true (default): fail when offsets went backwards (broker lost data). false: log it and read
#: the partition again from offset 0 (what a restarted memory-only broker needs).
OPT_FAIL_ON_DATA_LOSS: Final = "failOnDataLoss"

EARLIEST: Final = "earliest"
LATEST: Final = "latest"
EARLIEST_OFFSET: Final = -2
LATEST_OFFSET: Final = -1

#: The columns of an undecoded record (no ``decoder`` option).
RAW_SCHEMA: Final = StructType([
    StructField("key", StringType()),
    StructField("value", BinaryType()),
    StructField("topic", StringType()),
    StructField("partition", IntegerType()),
    StructField("offset", LongType()),
    StructField("timestamp", TimestampType()),
])

#: Rows handed to a decoder at once (and so the largest Arrow batch a task yields).
READ_CHUNK_ROWS: Final = 20_000

_PERMANENT_ERRORS: Final = frozenset({
    KafkaError.OFFSET_OUT_OF_RANGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
})


class KafkaSourceError(RuntimeError):
    """The source cannot deliver what its offsets promise, or an option is invalid."""


def arrow_schema(schema: StructType) -> pa.Schema:
    """The Arrow schema Spark requires of a Python data source's record batches (it compares
    with ``equals``, so types, time zone and nullability must all match)."""
    return to_arrow_schema(schema, timezone="UTC")


# --- what decoders receive and return ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawBatch:
    """Consecutive records of one partition, column-wise, as read from Kafka."""

    topic: str
    partition: int
    keys: list[bytes | None]
    values: list[bytes | None]
    offsets: list[int]
    #: Kafka record timestamps in epoch milliseconds; negative = not available.
    timestamps_ms: list[int]

    def __len__(self) -> int:
        return len(self.offsets)

    def key_array(self) -> pa.Array:
        """Keys as UTF-8 text; invalid bytes are replaced (a key is never a reason to drop)."""
        binary = pa.array(self.keys, pa.binary())
        try:
            return binary.cast(pa.string())
        except pa.ArrowInvalid:
            return pa.array(
                [k.decode("utf-8", "replace") if k is not None else None for k in self.keys],
                pa.string(),
            )

    def value_array(self) -> pa.Array:
        return pa.array(self.values, pa.binary())

    def topic_array(self) -> pa.Array:
        return pa.array([self.topic] * len(self), pa.string())

    def partition_array(self) -> pa.Array:
        return pa.array([self.partition] * len(self), pa.int32())

    def offset_array(self) -> pa.Array:
        return pa.array(self.offsets, pa.int64())

    def timestamp_array(self) -> pa.Array:
        millis = np.array(self.timestamps_ms, dtype=np.int64)
        missing = millis < 0
        return pa.array(millis * 1000, pa.timestamp("us", tz="UTC"),
                        mask=missing if missing.any() else None)


class Decoder(Protocol):
    """Turns raw records into rows of ``schema``. Must be picklable (Spark ships the reader,
    and the decoder with it, to the Python workers) and deterministic for the same input."""

    @property
    def schema(self) -> StructType: ...

    def decode(self, raw: RawBatch) -> pa.RecordBatch: ...


#: ``decoder`` names one of these: called with the ``decoder.*`` options (prefix removed).
DecoderFactory = Callable[[Mapping[str, str]], Decoder]


@dataclass(frozen=True)
class RawDecoder:
    """The default: one row per record, the value left as bytes."""

    schema: StructType = RAW_SCHEMA

    def decode(self, raw: RawBatch) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [raw.key_array(), raw.value_array(), raw.topic_array(), raw.partition_array(),
             raw.offset_array(), raw.timestamp_array()],
            schema=arrow_schema(RAW_SCHEMA),
        )


def raw_decoder(options: Mapping[str, str]) -> RawDecoder:
    return RawDecoder()


def load_decoder(path: str | None, options: Mapping[str, str]) -> Decoder:
    """Import ``module:attribute`` and call it with the decoder options."""
    if not path:
        return raw_decoder(options)
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise KafkaSourceError(f"option {OPT_DECODER}: expected 'module:function', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise KafkaSourceError(f"option {OPT_DECODER}: cannot load {path!r}: {exc}") from None
    decoder = target(options)
    if not isinstance(getattr(decoder, "schema", None), StructType) or not callable(
        getattr(decoder, "decode", None)
    ):
        raise KafkaSourceError(
            f"option {OPT_DECODER}: {path!r} must return an object with a StructType 'schema' "
            "and a 'decode(raw)' method"
        )
    return decoder


# --- options ------------------------------------------------------------------------------------


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise KafkaSourceError(f"option {name}: expected true or false, got {text!r}")


def _parse_number(name: str, text: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        value = kind(text.strip())
    except ValueError:
        raise KafkaSourceError(f"option {name}: expected a number, got {text!r}") from None
    if value < minimum:
        raise KafkaSourceError(f"option {name}: must be >= {minimum}, got {text!r}")
    return value


@dataclass(frozen=True)
class SourceOptions:
    """The parsed data source options (Spark hands them over lower-cased)."""

    kafka: dict[str, str]
    topic: str
    starting_offsets: str = EARLIEST
    ending_offsets: str = LATEST
    max_rows_per_batch: int | None = None
    min_partitions: int | None = None
    decoder: str | None = None
    decoder_options: dict[str, str] = field(default_factory=dict)
    read_timeout: float = 120.0
    probe_end_offsets: bool = True
    probe_timeout: float = 2.0
    request_timeout: float = 10.0
    fail_on_data_loss: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> SourceOptions:
        opts = {str(k).lower(): str(v) for k, v in options.items()}

        def get(name: str) -> str | None:
            return opts.get(name.lower())

        kafka = {k[len(KAFKA_OPTION_PREFIX):]: v for k, v in opts.items()
                 if k.startswith(KAFKA_OPTION_PREFIX)}
        if not kafka.get("bootstrap.servers"):
            raise KafkaSourceError(f"option {OPT_BOOTSTRAP_SERVERS} is required")
        topic = get(OPT_TOPIC)
        if not topic:
            raise KafkaSourceError(f"option {OPT_TOPIC} is required")
        result = cls(kafka=kafka, topic=topic)
        changes: dict[str, Any] = {
            "decoder_options": {k[len(DECODER_OPTION_PREFIX):]: v for k, v in opts.items()
                                if k.startswith(DECODER_OPTION_PREFIX)},
            "decoder": get(OPT_DECODER) or None,
        }
        if (text := get(OPT_STARTING_OFFSETS)) is not None:
            changes["starting_offsets"] = text.strip()
            parse_offset_spec(OPT_STARTING_OFFSETS, text, topic)
        if (text := get(OPT_ENDING_OFFSETS)) is not None:
            changes["ending_offsets"] = text.strip()
            parse_offset_spec(OPT_ENDING_OFFSETS, text, topic)
        if (text := get(OPT_MAX_ROWS_PER_BATCH)) is not None:
            rows = _parse_number(OPT_MAX_ROWS_PER_BATCH, text, int, 0)
            changes["max_rows_per_batch"] = rows or None
        if (text := get(OPT_MIN_PARTITIONS)) is not None:
            changes["min_partitions"] = _parse_number(OPT_MIN_PARTITIONS, text, int, 1)
        for name, attr, minimum in ((OPT_READ_TIMEOUT, "read_timeout", 0.1),
                                    (OPT_PROBE_TIMEOUT, "probe_timeout", 0.01),
                                    (OPT_REQUEST_TIMEOUT, "request_timeout", 0.1)):
            if (text := get(name)) is not None:
                changes[attr] = _parse_number(name, text, float, minimum)
        if (text := get(OPT_PROBE_END)) is not None:
            changes["probe_end_offsets"] = _parse_bool(OPT_PROBE_END, text)
        if (text := get(OPT_FAIL_ON_DATA_LOSS)) is not None:
            changes["fail_on_data_loss"] = _parse_bool(OPT_FAIL_ON_DATA_LOSS, text)
        return replace(result, **changes)

    def consumer_config(self, **tuning: str) -> dict[str, str]:
        """librdkafka settings: ``tuning`` defaults < user's kafka.* options < the settings the
        source's correctness depends on (no group commits, no silent offset reset)."""
        config = {"group.id": "fraudstream-kafka-source", **tuning, **self.kafka}
        config.update({
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "auto.offset.reset": "error",
            "enable.partition.eof": "true",
        })
        return config


def source_options(
    client_config: Mapping[str, str],
    topic: str,
    *,
    starting_offsets: str = EARLIEST,
    max_rows_per_batch: int | None = None,
    decoder: str | None = None,
    decoder_options: Mapping[str, object] | None = None,
    **extra: str,
) -> dict[str, str]:
    """Options for ``.options(**...)`` from a librdkafka client config (e.g.
    ``KafkaSettings.client_config()``), so callers never spell option names."""
    options = {KAFKA_OPTION_PREFIX + k: str(v) for k, v in client_config.items()}
    options[OPT_TOPIC] = topic
    options[OPT_STARTING_OFFSETS] = starting_offsets
    if max_rows_per_batch:
        options[OPT_MAX_ROWS_PER_BATCH] = str(max_rows_per_batch)
    if decoder:
        options[OPT_DECODER] = decoder
    for key, value in (decoder_options or {}).items():
        options[DECODER_OPTION_PREFIX + key] = str(value)
    options.update(extra)
    return options


def parse_offset_spec(name: str, text: str, topic: str) -> str | dict[int, int]:
    """``earliest`` / ``latest`` or a JSON object of partition -> offset (also accepted in
    Spark's ``{"<topic>": {...}}`` form)."""
    stripped = text.strip()
    if stripped.lower() in (EARLIEST, LATEST):
        return stripped.lower()
    try:
        data = json.loads(stripped)
    except ValueError:
        raise KafkaSourceError(
            f"option {name}: expected earliest, latest or JSON like {{\"0\": 42}}, got {text!r}"
        ) from None
    if isinstance(data, dict) and set(data) == {topic} and isinstance(data[topic], dict):
        data = data[topic]
    if not isinstance(data, dict):
        raise KafkaSourceError(f"option {name}: JSON must be an object, got {text!r}")
    spec: dict[int, int] = {}
    for key, value in data.items():
        try:
            partition = int(key)
        except ValueError:
            raise KafkaSourceError(f"option {name}: {key!r} is not a partition number") from None
        if type(value) is not int or value < EARLIEST_OFFSET:
            raise KafkaSourceError(
                f"option {name}: offset of partition {key} must be an integer >= -2, got {value!r}"
            )
        spec[partition] = value
    return spec


# --- offsets ------------------------------------------------------------------------------------


def offsets_to_json(offsets: Mapping[int, int]) -> dict[str, int]:
    """The checkpointed form. Spark decides "no new data" by comparing the JSON text of start
    and end, so the key order must be stable: sorted by partition number."""
    return {str(p): int(offsets[p]) for p in sorted(offsets)}


def offsets_from_json(offsets: Mapping[str, Any] | None) -> dict[int, int]:
    return {int(p): int(o) for p, o in (offsets or {}).items()}


def limit_offsets(
    start: Mapping[int, int], end: Mapping[int, int], max_rows: int
) -> dict[int, int]:
    """Cut ``end`` so that at most ``max_rows`` records lie between start and end, spread over
    partitions in proportion to their backlog (like Spark's Kafka maxOffsetsPerTrigger)."""
    lags = {p: max(0, end[p] - start.get(p, 0)) for p in end}
    total = sum(lags.values())
    if total <= max_rows:
        return dict(end)
    share = {p: lag * max_rows // total for p, lag in lags.items()}
    spare = max_rows - sum(share.values())
    # Fewer spare rows than partitions remain; hand them to the largest leftovers first.
    for p in sorted(lags, key=lambda q: (share[q] - lags[q], q)):
        if spare <= 0:
            break
        if share[p] < lags[p]:
            share[p] += 1
            spare -= 1
    return {p: (start.get(p, 0) + share[p]) if lags[p] else end[p] for p in end}


@dataclass
class KafkaPartition(InputPartition):
    """One Spark task: records ``[start, end)`` of one Kafka partition."""

    topic: str
    partition: int
    start: int
    end: int


def plan_partitions(
    topic: str, start: Mapping[int, int], end: Mapping[int, int], min_partitions: int | None = None
) -> list[KafkaPartition]:
    """One range per Kafka partition with new records, split further (deterministically, in
    proportion to size) when ``min_partitions`` asks for more. A partition missing from
    ``start`` is new and is read from offset 0. An end below the start means the broker lost
    the partition (only produced with failOnDataLoss=false): its records are all new, so it is
    read again from 0."""
    planned = []
    for p in sorted(end):
        first = start.get(p, 0)
        if end[p] < first:
            first = 0
        if end[p] > first:
            planned.append(KafkaPartition(topic, p, first, end[p]))
    total = sum(part.end - part.start for part in planned)
    if not min_partitions or len(planned) >= min_partitions or total == 0:
        return planned
    split = []
    for part in planned:
        size = part.end - part.start
        pieces = min(size, math.ceil(size * min_partitions / total))
        bounds = [part.start + size * i // pieces for i in range(pieces + 1)]
        split += [KafkaPartition(topic, part.partition, lo, hi)
                  for lo, hi in itertools.pairwise(bounds)]
    return split


# --- the driver-side offset finder --------------------------------------------------------------


class OffsetProber:
    """Finds partition ends on the driver. Keeps one consumer (and its connections) for the
    life of the query; it is assigned only while probing, so it fetches nothing in between."""

    def __init__(self, options: SourceOptions) -> None:
        self.options = options
        self._consumer: Consumer | None = None
        #: Highest end proven by reading (records exist below it).
        self.known_ends: dict[int, int] = {}

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer(self.options.consumer_config(**{
                "fetch.wait.max.ms": "10",
                "queued.max.messages.kbytes": "16384",
            }))
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            finally:
                self._consumer = None

    def partitions(self) -> list[int]:
        topic = self.options.topic
        metadata = self.consumer.list_topics(topic, timeout=self.options.request_timeout)
        info = metadata.topics.get(topic)
        if info is not None and info.error is not None:
            # Often transient (leader election); a running query retries on the next trigger.
            raise KafkaException(info.error)
        if info is None or not info.partitions:
            raise KafkaSourceError(f"topic {topic!r} does not exist")
        return sorted(info.partitions)

    def watermarks(self, partition: int) -> tuple[int, int]:
        tp = TopicPartition(self.options.topic, partition)
        low, high = self.consumer.get_watermark_offsets(
            tp, timeout=self.options.request_timeout, cached=False
        )
        return low, high

    def earliest(self, partitions: Sequence[int]) -> dict[int, int]:
        return {p: self.watermarks(p)[0] for p in partitions}

    def latest(
        self, partitions: Sequence[int], floors: Mapping[int, int] | None = None,
        caps: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """True end of each partition: never below a floor (offsets already proven, e.g. the
        batch start); probing stops early at a partition's cap (row limit)."""
        floors = floors or {}
        reported = {p: self.watermarks(p)[1] for p in partitions}
        ends = {p: max(reported[p], floors.get(p, 0), self.known_ends.get(p, 0))
                for p in partitions}
        if self.options.probe_end_offsets:
            todo = {p: end for p, end in ends.items()
                    if caps is None or p not in caps or end < caps[p]}
            if todo:
                ends.update(self._probe(todo, reported, caps or {}))
        self.known_ends.update(ends)
        return ends

    def _probe(self, begin: Mapping[int, int], reported: Mapping[int, int],
               caps: Mapping[int, int]) -> dict[int, int]:
        topic = self.options.topic
        consumer = self.consumer
        found = dict(begin)
        pending = set(begin)
        lost: dict[int, int] = {}
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in begin.items()])
        deadline = time.monotonic() + self.options.probe_timeout
        try:
            while pending and time.monotonic() < deadline:
                for message in consumer.consume(num_messages=10_000, timeout=0.01):
                    p = message.partition()
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            if message.offset() < begin[p]:
                                lost[p] = message.offset()
                            found[p] = max(found[p], message.offset())
                            pending.discard(p)
                        elif error.code() == KafkaError.OFFSET_OUT_OF_RANGE:
                            lost[p] = reported[p]
                            pending.discard(p)
                        elif error.fatal() or error.code() in _PERMANENT_ERRORS:
                            raise KafkaException(error)
                        else:
                            log.warning("probing %s: %s", topic, error.str())
                        continue
                    found[p] = max(found[p], message.offset() + 1)
                    if p in caps and found[p] >= caps[p]:
                        pending.discard(p)
                for p in list(pending):
                    # A fetch response's high watermark is exact, also on Tansu: records
                    # exist below it. One above the start ends the probe of that partition
                    # without reading the rest of the way (one fetch round trip per record
                    # batch on Tansu), and without chasing the tail of a busy partition,
                    # whose end-of-partition event may never come.
                    _, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                             cached=True)
                    if high > begin[p]:
                        found[p] = max(found[p], high)
                        pending.discard(p)
            for p in list(pending):
                # A fetch beyond the end of a partition is answered with no records and no
                # end-of-partition event by Tansu, but the response's high watermark is exact.
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                if 0 <= high < begin[p] and reported[p] < begin[p]:
                    lost[p] = high
                    pending.discard(p)
        finally:
            consumer.unassign()
        if pending:
            log.warning("probing %s partitions %s timed out after %.1f s; using the ends known "
                        "so far", topic, sorted(pending), self.options.probe_timeout)
        for p, high in lost.items():
            self.data_lost(p, begin[p], high)
            found[p] = high
        return found

    def data_lost(self, partition: int, already_read: int, high: int) -> None:
        """The partition now ends below offsets already read. Raise (failOnDataLoss=true), or
        log it and accept the new end; plan_partitions then re-reads the partition from 0."""
        message = (f"topic {self.options.topic!r} partition {partition}: the broker's end offset "
                   f"{high} is below offset {already_read} already read: records were lost "
                   "(broker restarted with memory storage, topic recreated, or truncated)")
        if self.options.fail_on_data_loss:
            raise KafkaSourceError(message + f"; set {OPT_FAIL_ON_DATA_LOSS}=false to re-read "
                                   "the partition from offset 0 instead")
        log.error("%s; re-reading it from offset 0 (%s=false)", message, OPT_FAIL_ON_DATA_LOSS)
        self.known_ends[partition] = high


# --- the worker-side range reader ---------------------------------------------------------------


def read_partition_range(
    options: SourceOptions, decoder: Decoder, part: KafkaPartition
) -> Iterator[pa.RecordBatch]:
    """Yield exactly the records ``[part.start, part.end)`` of one partition, decoded.

    Fails rather than return fewer: the offsets of this batch are already in Spark's offset log,
    so a short read would lose records for good. Offsets missing inside the range on a real
    Kafka (compaction, transaction markers) are skipped; the range ends at the first record at
    or beyond ``end``, or when the broker's end-of-partition reaches ``end``.
    """
    if part.end <= part.start:
        return
    consumer = Consumer(options.consumer_config(**{"fetch.wait.max.ms": "100"}))
    try:
        consumer.assign([TopicPartition(part.topic, part.partition, part.start)])
        yield from _read_assigned(consumer, options, decoder, part)
    finally:
        consumer.close()
    handled_rows(part.end - part.start)


def _read_assigned(
    consumer: Consumer, options: SourceOptions, decoder: Decoder, part: KafkaPartition
) -> Iterator[pa.RecordBatch]:
    end = part.end
    next_offset = part.start
    keys: list[bytes | None] = []
    values: list[bytes | None] = []
    offsets: list[int] = []
    stamps: list[int] = []
    last_progress = time.monotonic()
    last_error: str | None = None

    def chunk() -> RawBatch:
        return RawBatch(part.topic, part.partition, keys, values, offsets, stamps)

    while next_offset < end:
        want = min(end - next_offset, READ_CHUNK_ROWS - len(offsets))
        messages: list[Message] = consumer.consume(num_messages=want, timeout=0.5)
        before = next_offset
        fast = _contiguous_records(messages, next_offset, end)
        if fast is not None:
            # The common case, taken column-wise with C-level calls (no per-record frames).
            offsets += fast
            keys += map(Message.key, messages)
            values += map(Message.value, messages)
            stamps += (ts for _, ts in map(Message.timestamp, messages))
            next_offset = fast[-1] + 1
            messages = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if message.offset() >= end:
                        next_offset = end
                    continue
                if error.fatal() or error.code() in _PERMANENT_ERRORS:
                    raise KafkaSourceError(
                        f"topic {part.topic!r} partition {part.partition}: reading offsets "
                        f"[{part.start}, {end}) failed at {next_offset}: {error.str()}"
                    )
                last_error = error.str()
                continue
            offset = message.offset()
            if offset < next_offset:
                continue
            if offset >= end:
                next_offset = end
                break
            keys.append(message.key())
            values.append(message.value())
            offsets.append(offset)
            stamps.append(message.timestamp()[1])
            next_offset = offset + 1
        now = time.monotonic()
        if next_offset > before:
            last_progress = now
        elif now - last_progress > LOSS_CHECK_SECONDS:
            # Tansu answers a fetch beyond the end with no records and no error, but the
            # response carries the partition's exact end: an end below what this range still
            # has to read means the records are gone (a memory-only broker restarted, the topic
            # recreated), and waiting out read_timeout would only delay the same failure.
            _, high = consumer.get_watermark_offsets(
                TopicPartition(part.topic, part.partition), cached=True)
            if 0 <= high < next_offset:
                raise KafkaSourceError(
                    f"topic {part.topic!r} partition {part.partition}: the broker's end offset "
                    f"{high} is below offset {next_offset} planned to be read: records were "
                    "lost (broker restarted with memory storage, topic recreated, or truncated)")
        if next_offset == before and now - last_progress > options.read_timeout:
            raise KafkaSourceError(
                f"topic {part.topic!r} partition {part.partition}: offsets [{part.start}, {end}) "
                f"were planned but reading stopped at {next_offset} with no progress for "
                f"{options.read_timeout:.0f} s"
                + (f" (last error: {last_error})" if last_error else "")
                + "; refusing to return fewer records than the offsets say (the broker lost "
                "data or is unreachable)"
            )
        if len(offsets) >= READ_CHUNK_ROWS or (offsets and next_offset >= end):
            yield decoder.decode(chunk())
            keys, values, offsets, stamps = [], [], [], []


def _contiguous_records(messages: list[Message], next_offset: int, end: int) -> list[int] | None:
    """Offsets of ``messages`` if they are all records, consecutive from ``next_offset`` and
    below ``end``; None when the careful per-message path is needed."""
    if not messages or any(map(Message.error, messages)):
        return None
    offsets = list(map(Message.offset, messages))
    if offsets[0] != next_offset or offsets[-1] - offsets[0] != len(offsets) - 1:
        return None
    return offsets if offsets[-1] < end else None


# --- the Spark data source ----------------------------------------------------------------------


class KafkaDataSource(DataSource):
    """``spark.readStream.format("fraudstream-kafka")`` (and ``spark.read`` for backfills)."""

    @classmethod
    def name(cls) -> str:
        return FORMAT_NAME

    def _parsed(self) -> tuple[SourceOptions, Decoder]:
        options = SourceOptions.parse(self.options)
        return options, load_decoder(options.decoder, options.decoder_options)

    def schema(self) -> StructType:
        return self._parsed()[1].schema

    def streamReader(self, schema: StructType) -> KafkaStreamReader:
        options, decoder = self._parsed()
        _check_schema(schema, decoder)
        return KafkaStreamReader(options, decoder)

    def reader(self, schema: StructType) -> KafkaBatchReader:
        options, decoder = self._parsed()
        _check_schema(schema, decoder)
        return KafkaBatchReader(options, decoder)


def _check_schema(schema: StructType, decoder: Decoder) -> None:
    if schema != decoder.schema:
        raise KafkaSourceError(
            f"{FORMAT_NAME} produces the decoder's schema {decoder.schema.simpleString()}; "
            f"a user-specified schema {schema.simpleString()} is not supported"
        )


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Micro-batch reader. Lives in one driver-side Python process for the whole query (so the
    probing consumer is reused); a pickled copy without it runs ``read`` in the workers."""

    def __init__(self, options: SourceOptions, decoder: Decoder) -> None:
        self.options = options
        self.decoder = decoder
        self._prober: OffsetProber | None = None
        self._target: dict[int, int] | None = None
        self._last_end: dict[int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_prober"] = None
        return state

    @property
    def prober(self) -> OffsetProber:
        if self._prober is None:
            self._prober = OffsetProber(self.options)
        return self._prober

    def initialOffset(self) -> dict[str, int]:
        return offsets_to_json(
            resolve_offsets(self.prober, OPT_STARTING_OFFSETS, self.options.starting_offsets)
        )

    def getDefaultReadLimit(self) -> ReadLimit:
        if self.options.max_rows_per_batch:
            return ReadMaxRows(self.options.max_rows_per_batch)
        return ReadAllAvailable()

    def prepareForTriggerAvailableNow(self) -> None:
        """Fix the target to the true ends now; later records wait for the next run."""
        prober = self.prober
        self._target = prober.latest(prober.partitions())
        log.info("%s available-now target %s", self.options.topic, offsets_to_json(self._target))

    def latestOffset(self, start: dict[str, int], limit: ReadLimit) -> dict[str, int]:
        begin = offsets_from_json(start)
        max_rows = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        if self._target is not None:
            ends = self._towards_target(begin)
        else:
            ends = self._available(begin, max_rows)
        if max_rows is not None:
            ends = limit_offsets(begin, ends, max_rows)
        self._last_end = ends
        return offsets_to_json(ends)

    def _towards_target(self, begin: Mapping[int, int]) -> dict[int, int]:
        """Available-now: the fixed target, never anything produced after it was taken.
        Partitions created since then are left for the next run."""
        assert self._target is not None
        ends = dict(begin)
        for p, target in self._target.items():
            first = begin.get(p, 0)
            if target < first:
                self.prober.data_lost(p, first, target)
            ends[p] = target
        return ends

    def _available(self, begin: Mapping[int, int], max_rows: int | None) -> dict[int, int]:
        prober = self.prober
        try:
            partitions = sorted({*prober.partitions(), *begin})
            caps = None
            if max_rows is not None:
                known = {p: max(begin.get(p, 0), prober.known_ends.get(p, 0)) for p in partitions}
                backlog = sum(known[p] - begin.get(p, 0) for p in partitions)
                if backlog >= max_rows:
                    # Enough known records for this batch: no need to look further.
                    return known
                caps = {p: begin.get(p, 0) + max_rows for p in partitions}
            return prober.latest(partitions, floors=begin, caps=caps)
        except KafkaException as exc:
            # An unreachable broker is not a reason to stop the query: no new data this time.
            log.warning("%s: cannot read end offsets (%s); retrying next trigger",
                        self.options.topic, exc)
            return {p: max(o, prober.known_ends.get(p, 0)) for p, o in begin.items()}

    def reportLatestOffset(self) -> dict[str, int] | None:
        return offsets_to_json(self._last_end) if self._last_end is not None else None

    def partitions(self, start: dict[str, int], end: dict[str, int]) -> list[KafkaPartition]:
        return plan_partitions(self.options.topic, offsets_from_json(start),
                               offsets_from_json(end), self.options.min_partitions)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, KafkaPartition)
        return read_partition_range(self.options, self.decoder, partition)

    def commit(self, end: dict[str, int]) -> None:
        """Nothing to do: progress lives in Spark's checkpoint, never in a consumer group."""

    def stop(self) -> None:
        if self._prober is not None:
            self._prober.close()


def resolve_offsets(prober: OffsetProber, name: str, text: str) -> dict[int, int]:
    """Concrete offsets for ``earliest`` / ``latest`` / a JSON spec (missing partitions:
    earliest)."""
    partitions = prober.partitions()
    spec = parse_offset_spec(name, text, prober.options.topic)
    if spec == EARLIEST:
        return prober.earliest(partitions)
    if spec == LATEST:
        return prober.latest(partitions)
    assert isinstance(spec, dict)
    unknown = sorted(set(spec) - set(partitions))
    if unknown:
        raise KafkaSourceError(f"option {name}: topic {prober.options.topic!r} has no "
                               f"partitions {unknown} (it has {len(partitions)})")
    wanted = {p: spec.get(p, EARLIEST_OFFSET) for p in partitions}
    resolved = {p: o for p, o in wanted.items() if o >= 0}
    if any(o == EARLIEST_OFFSET for o in wanted.values()):
        earliest = prober.earliest([p for p, o in wanted.items() if o == EARLIEST_OFFSET])
        resolved.update(earliest)
    if any(o == LATEST_OFFSET for o in wanted.values()):
        resolved.update(prober.latest([p for p, o in wanted.items() if o == LATEST_OFFSET]))
    return resolved


class KafkaBatchReader(DataSourceReader):
    """``spark.read``: the records between startingOffsets (default earliest) and
    endingOffsets (default latest), resolved once when the query is planned."""

    def __init__(self, options: SourceOptions, decoder: Decoder) -> None:
        self.options = options
        self.decoder = decoder

    def partitions(self) -> list[InputPartition]:
        prober = OffsetProber(self.options)
        try:
            start = resolve_offsets(prober, OPT_STARTING_OFFSETS, self.options.starting_offsets)
            end = resolve_offsets(prober, OPT_ENDING_OFFSETS, self.options.ending_offsets)
        finally:
            prober.close()
        return list(plan_partitions(self.options.topic, start, end, self.options.min_partitions))

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        if not isinstance(partition, KafkaPartition):
            # Spark substitutes InputPartition(None) when there is nothing to read.
            return iter(())
        return read_partition_range(self.options, self.decoder, partition)
