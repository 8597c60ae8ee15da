"""Run the detector: attach the Kafka source, the sinks and the checkpoint to the plan.

Error policy: bad input never stops the job (it goes to the DLQ with a reason code);
infrastructure errors (broker unreachable past the clients' timeouts, a sink that cannot write)
fail the batch, the query stops with a clear message and a non-zero exit, and the next start
resumes from the checkpoint, replaying the unfinished batch.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from fraudstream import datasets, schemas
from fraudstream.kafka import BrokerUnavailable, wait_for_broker
from fraudstream.model import ModelSource
from fraudstream.rules.ruleset import rules_in_force
from fraudstream.rules.store import RulesTopic, RulesTopicError
from fraudstream.settings import DetectorSettings, SettingsError
from fraudstream.storage import StoragePath
from spark_job.batch import BatchProcessor, DetectorOutputs
from spark_job.compact import CompactionBusy, CompactionError, compact
from spark_job.detection_input import DETECTION_INPUT_DECODER, RULE_RECORD_DECODER
from spark_job.epochs import BrokerResetError, Epoch, open_epoch
from spark_job.kafka_source import KafkaSourceError
from spark_job.metrics import MetricsListener
from spark_job.plan import build_detection_plan
from spark_job.session import build_spark_session
from spark_job.sinks import (
    ALERT_ARROW_SCHEMA,
    DLQ_ARROW_SCHEMA,
    ConsoleAlertSink,
    KafkaJsonSink,
    ParquetBatchSink,
    RecordSink,
)

__all__ = [
    "Detector",
    "check_checkpoint",
    "explain_failure",
    "publish_default_rules",
    "run",
    "source_options",
]

log = logging.getLogger(__name__)

QUERY_NAME = "fraud-detector"
CHECKPOINT_CONTRACT_FILE = "fraudstream-checkpoint.json"
#: Bump when the state layout of the windowed rules changes incompatibly.
STATE_VERSION = 4


def source_options(settings: DetectorSettings) -> dict[str, str]:
    """Options of the ``fraudstream-kafka`` source: client config, topic, limits, decoder."""
    options = {f"kafka.{k}": v for k, v in settings.client_config().items()}
    options.update({
        "topic": settings.transactions_topic,
        "startingOffsets": settings.starting_offsets,
        "decoder": DETECTION_INPUT_DECODER,
        "decoder.max_value_bytes": str(settings.max_value_bytes),
        "decoder.future_tolerance_seconds": str(settings.future_tolerance_seconds),
    })
    if settings.max_rows_per_batch:
        options["maxRowsPerBatch"] = str(settings.max_rows_per_batch)
    return options


def rules_source_options(settings: DetectorSettings) -> dict[str, str]:
    """Options of the source on the rules topic: always from its first record (the rules in
    force are the fold of the whole topic), never limited per batch."""
    options = {f"kafka.{k}": v for k, v in settings.client_config().items()}
    options.update({"topic": settings.rules_topic, "startingOffsets": "earliest",
                    "decoder": RULE_RECORD_DECODER})
    return options


def open_transactions_stream(spark: SparkSession, settings: DetectorSettings) -> DataFrame:
    """The detection input stream (``spark_job.detection_input``; one read of Kafka per
    micro-batch)."""
    return spark.readStream.format("fraudstream-kafka").options(**source_options(settings)).load()


def open_rules_stream(spark: SparkSession, settings: DetectorSettings) -> DataFrame:
    """The rules topic as rule record rows, read in the same micro-batches as transactions."""
    return (spark.readStream.format("fraudstream-kafka")
            .options(**rules_source_options(settings)).load())


def publish_default_rules(settings: DetectorSettings) -> int:
    """Fill an empty rules topic and say what is in force; returns how many were published.

    An empty topic whose rules the Parquet history remembers (a memory-only broker restarted,
    the topic recreated) gets back the definitions in force at the end of that history, with
    their versions; a topic that never held a rule gets the four defaults (version 1, parameters
    from settings)."""
    topic = RulesTopic(settings.client_config(), settings.rules_topic)
    ruleset, _ = topic.state(settings.retention_us)
    if len(ruleset) or ruleset.retired:
        if ruleset.active:
            log.info("rules in force on %s: %s", settings.rules_topic,
                     "; ".join(f"{d.rule_id} v{d.version}: {d.summary()}"
                               for d in ruleset.active))
        else:
            log.warning("no rule is enabled on %s: no alerts until one is (python -m "
                        "fraudstream.rules list)", settings.rules_topic)
        return 0
    history = datasets.read_dataset(settings.parquet_dir, schemas.RULE_CHANGES_DATASET,
                                    datasets.RULE_CHANGES_SCHEMA).to_pylist()
    if history:
        restored = rules_in_force(history)
        for definition in restored:
            topic.publish(definition)
        log.warning("rules topic %s is empty but the Parquet history under %s holds rules: "
                    "published the %d in force at its end again (%s)", settings.rules_topic,
                    settings.parquet_dir, len(restored),
                    "; ".join(f"{d.rule_id} v{d.version}" for d in restored) or "none")
        return len(restored)
    defaults = settings.default_rules()
    for definition in defaults:
        topic.publish(definition)
    log.info("rules topic %s held no rule: published the default rules as version 1 (%s)",
             settings.rules_topic, "; ".join(f"{d.rule_id}: {d.summary()}" for d in defaults))
    return len(defaults)


def build_outputs(settings: DetectorSettings, epoch: str) -> DetectorOutputs:
    """The sinks of one epoch: its Parquet folders, the two topics and the console."""
    client = settings.client_config()

    def folder(dataset: str) -> StoragePath:
        return datasets.epoch_folder(settings.parquet_dir, dataset, epoch)

    alerts: list[RecordSink] = [
        ParquetBatchSink(folder(schemas.ALERTS_DATASET), ALERT_ARROW_SCHEMA),
        KafkaJsonSink(client, settings.alerts_topic, key_field="user_id",
                      fields=schemas.ALERT_FIELDS),
    ]
    if settings.console_alerts:
        alerts.append(ConsoleAlertSink())
    dlq: list[RecordSink] = [
        ParquetBatchSink(folder(schemas.DLQ_DATASET), DLQ_ARROW_SCHEMA),
        KafkaJsonSink(client, settings.dlq_topic, key_field="key", fields=schemas.DLQ_FIELDS),
    ]
    changes: list[RecordSink] = [ParquetBatchSink(
        folder(schemas.RULE_CHANGES_DATASET), datasets.RULE_CHANGES_SCHEMA)]
    return DetectorOutputs(alerts=alerts, dlq=dlq, rule_changes=changes,
                           bronze_dir=folder(schemas.TRANSACTIONS_DATASET))


def checkpoint_contract(settings: DetectorSettings) -> dict[str, Any]:
    """What the state in a checkpoint was built with and cannot change under it: its layout,
    the buckets and partitions it is spread over, how far back it holds transactions, and the
    topics whose offsets it records. Rules are data in the state itself, and change freely."""
    return {
        "state_version": STATE_VERSION,
        "retention_seconds": settings.retention_seconds,
        "shuffle_partitions": settings.shuffle_partitions,
        "state_buckets": settings.state_buckets,
        "transactions_topic": settings.transactions_topic,
        "rules_topic": settings.rules_topic,
    }


def check_checkpoint(settings: DetectorSettings) -> None:
    """Refuse to start on a checkpoint written with settings its state cannot follow."""
    path = settings.checkpoint_dir / CHECKPOINT_CONTRACT_FILE
    wanted = checkpoint_contract(settings)
    if path.exists():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found != wanted:
            changed = sorted(_diff(found, wanted))
            raise SettingsError(
                "CHECKPOINT_DIR",
                f"{settings.checkpoint_dir} holds state built with different settings "
                f"({', '.join(changed)}); start with a new CHECKPOINT_DIR (or ./reset.sh) to "
                "rebuild state from the topic",
            )
        return
    settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2, sort_keys=True), encoding="utf-8")


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def explain_failure(text: str) -> tuple[str, str]:
    """The cause of a query failure and what to do about it. Spark wraps an error raised in the
    source's Python worker in its own (``PYTHON_STREAMING_DATA_SOURCE_RUNTIME_ERROR``); the
    source's own message, deeper in the text, is the one that says what happened."""
    for line in text.splitlines():
        _, found, cause = line.partition(f"{KafkaSourceError.__name__}: ")
        if found:
            if "records were lost" in cause:
                # failOnDataLoss is an option of the source, not a detector setting.
                return cause.split("; set ")[0], (
                    "the checkpoint's offsets are gone from the broker: start again with "
                    "ON_BROKER_RESET=new-epoch (archives the checkpoint, keeps all Parquet; "
                    "./setup.sh does this), or a new CHECKPOINT_DIR, or ./reset.sh (deletes "
                    "everything)")
            return cause, "fix the cause; a restart resumes from the checkpoint"
    # A failure inside foreachBatch arrives as py4j's "exception raised by the Python Proxy"
    # with the Python traceback after it: its last "SomeError: message" line is the cause.
    raised = [line.strip() for line in text.splitlines()
              if _RAISED.match(line.strip()) and "Py4J" not in line]
    first = raised[-1] if raised else (text.splitlines()[0] if text else "unknown error")
    return first, "a restart resumes from the checkpoint"


_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")


class BackgroundCompaction:
    """Runs ``spark_job.compact`` over the Parquet history every ``interval`` seconds in a
    daemon thread, so a long-running detector does not leave a file per batch forever. Safe
    beside the query: it never touches the newest batch of an epoch nor the current hour, and
    each merge is committed by one atomic rename."""

    def __init__(self, parquet_dir: StoragePath, interval_seconds: float) -> None:
        self.parquet_dir = parquet_dir
        self.interval = interval_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="compaction", daemon=True)

    def start(self) -> None:
        if self.interval <= 0:
            return
        if not isinstance(self.parquet_dir, Path):
            log.info("no background compaction: it works on local Parquet folders only, and "
                     "%s is in object storage", self.parquet_dir)
            return
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                report = compact(self.parquet_dir, progress=False)
                merged = sum(len(group.runs) for group in report.groups)
                if merged:
                    log.info("compaction: %s", report.summary())
            except CompactionBusy:
                log.info("compaction skipped: another compaction holds the lock")
            except (OSError, ValueError, CompactionError) as exc:
                log.warning("compaction failed (history untouched, retried in %.0f min): %s",
                            self.interval / 60, exc)


class Detector:
    """The running streaming query and its clean stop."""

    def __init__(self, settings: DetectorSettings, spark: SparkSession | None = None,
                 outputs: DetectorOutputs | None = None) -> None:
        """``outputs`` replaces the sinks built from settings (tests attach list sinks or a
        deliberately non-idempotent sink here)."""
        self.settings = settings
        self.spark = spark
        self.query: StreamingQuery | None = None
        self.stop_requested = False
        self.listener: MetricsListener | None = None
        self.outputs: DetectorOutputs | None = outputs
        self.epoch: Epoch | None = None
        self.compaction = BackgroundCompaction(settings.parquet_dir,
                                               settings.compact_every_minutes * 60)

    def start(self) -> StreamingQuery:
        settings = self.settings
        self.epoch = open_epoch(settings.checkpoint_dir, settings.client_config(),
                                [settings.transactions_topic, settings.rules_topic],
                                policy=settings.on_broker_reset)
        check_checkpoint(settings)
        publish_default_rules(settings)
        if self.spark is None:
            self.spark = build_spark_session(
                settings.spark_master, app_name="fraudstream-detector",
                shuffle_partitions=settings.shuffle_partitions,
                driver_memory=settings.driver_memory.strip(),
                state_store_provider=settings.state_store,
                state_store_memory_mb=settings.state_store_memory_mb,
            )
        plan = build_detection_plan(
            open_transactions_stream(self.spark, settings),
            rules_input=open_rules_stream(self.spark, settings),
            watermark_seconds=settings.watermark_seconds,
            horizon_seconds=settings.retention_seconds,
            state_buckets=settings.state_buckets, shuffle_partitions=settings.shuffle_partitions,
            models_dir=str(settings.models_dir.resolve()))
        # The driver's own view of the model, for the log and the metrics; the state step's
        # Python workers each load the same newest version themselves.
        models = ModelSource(settings.models_dir)
        log.info("risk model: %s", models.status)
        if self.outputs is None:
            self.outputs = build_outputs(settings, self.epoch.epoch)
        processor = BatchProcessor(self.outputs)
        self.listener = MetricsListener(processor, settings.resolved_metrics_file,
                                        models=models)
        self.spark.streams.addListener(self.listener)
        writer = (plan.writeStream.queryName(QUERY_NAME).foreachBatch(processor)
                  .option("checkpointLocation", str(settings.checkpoint_dir / "query")))
        if settings.available_now:
            writer = writer.trigger(availableNow=True)
        else:
            interval_ms = int(settings.trigger_seconds * 1000)
            writer = writer.trigger(processingTime=f"{interval_ms} milliseconds")
        self.query = writer.start()
        if not settings.available_now:
            self.compaction.start()
        ui = self.spark.sparkContext.uiWebUrl
        if ui:
            log.info("Spark UI of the detector: %s (application %s on %s)", ui,
                     self.spark.sparkContext.applicationId, settings.spark_master)
        log.info("detector started: %s (rules from %s) -> %s, %s, console; parquet under %s "
                 "(epoch %s); checkpoint %s", settings.transactions_topic, settings.rules_topic,
                 settings.alerts_topic, settings.dlq_topic, settings.parquet_dir,
                 self.epoch.epoch, settings.checkpoint_dir)
        return self.query

    def request_stop(self, *_args: Any) -> None:
        self.stop_requested = True

    def wait(self) -> int:
        """Block until the query ends (available-now done, stop requested, or failure)."""
        assert self.query is not None
        query = self.query
        while query.isActive and not self.stop_requested:
            try:
                query.awaitTermination(0.5)
            except StreamingQueryException:
                break  # reported below from query.exception()
        if self.stop_requested:
            log.info("stop requested: stopping the query")
            try:
                query.stop()
                exception = query.exception()
            except Exception as exc:
                # A signal sent to the whole process group also reaches Spark's JVM, which then
                # shuts down on its own; an unfinished batch is replayed from the checkpoint.
                log.warning("Spark had already shut down (%s); the next start resumes from the "
                            "checkpoint", str(exc).splitlines()[0][:200])
                exception = None
        else:
            exception = query.exception()
        self._flush_metrics()
        self.close()
        if exception is not None:
            cause, advice = explain_failure(str(exception))
            log.error("detector stopped on an error: %s; %s", cause, advice)
            return 1
        if self.listener:
            log.info("detector stopped cleanly: %s", self.listener.summary())
        return 0

    def _flush_metrics(self) -> None:
        # The listener's last progress event is delivered asynchronously after the query ends.
        if self.listener is None:
            return
        deadline = time.monotonic() + 5
        while self.listener.processor.outcomes and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.compaction.stop()
        if self.listener is not None and self.spark is not None:
            # Unregistered before Python exits, or Spark's listener bus logs a stack trace
            # for a callback into a gone interpreter.
            self.listener.terminated.wait(timeout=3)
            try:
                self.spark.streams.removeListener(self.listener)
            except Exception as exc:
                log.debug("listener not removed: %s", exc)
        if self.outputs:
            for sink in (*self.outputs.alerts, *self.outputs.dlq, *self.outputs.rule_changes):
                sink.close()


def run(settings: DetectorSettings) -> int:
    try:
        wait_for_broker(settings.client_config(), timeout=30)
    except BrokerUnavailable as exc:
        log.error("%s; start the broker (./setup.sh) or set KAFKA_BOOTSTRAP_SERVERS", exc)
        return 1
    detector = Detector(settings)
    signal.signal(signal.SIGTERM, detector.request_stop)
    signal.signal(signal.SIGINT, detector.request_stop)
    try:
        detector.start()
    except RulesTopicError as exc:
        log.error("%s; check the broker and RULES_TOPIC", exc)
        return 1
    except BrokerResetError as exc:
        log.error("%s", exc)
        return 1
    except KafkaException as exc:  # the epoch check could not read the topics' ids and ends
        log.error("cannot compare the checkpoint with the broker at %s: %s; check the broker "
                  "and the topic settings", settings.bootstrap_servers, exc)
        return 1
    return detector.wait()

