"""Build the detection plan: the detection input in, one DataFrame of tagged rows out.

The plan is built apart from running it: ``build_detection_plan`` takes any DataFrame with the
columns of ``spark_job.detection_input`` (a stream from the Kafka source, or a static frame in
tests) and returns a single DataFrame that carries, per micro-batch, every alert
(``kind = 'alert'``), one counter row per state bucket (``kind = 'stats'``: late and duplicate
rows) and the archived chunks of decoded records (``kind = 'archive'``, for bronze and the DLQ).
One read of Kafka per batch then feeds every sink through one ``foreachBatch``.

Rule rows pass once through ``applyInPandasWithState``, grouped by a hash bucket of user_id
(``BucketState``): keying Spark's state by user would cost a pandas frame and a state round trip
per user and batch, which dominated the run time. Spark keeps each bucket's state as JSON in its
state store, checkpointed with the query. Archive rows form a group of their own
(``ARCHIVE_BUCKET``) that never touches state. The operator runs without an event-time timeout
so Spark does not drop late rows before the handler sees them: the handler itself keeps rows
older than the watermark out of the windowed rules and counts them; ``high_value`` fires for
them too, and bronze keeps them (they are in the archive).

Rules reach the state like Flink's broadcast state: the rules topic is a second stream of the
same source (``RULE_RECORD`` rows), each of its rows copied to every state bucket. Each bucket
keeps the rules in force in its state next to its users and applies a batch's rule records, in
offset order, before the batch's transactions: a definition read in batch N judges the
transactions of batch N onward, and a replay of batch N reads the same records. One bucket
(the first) reports what each record did (``kind = 'rule'`` rows) for the log and the
``rule_changes`` dataset.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from fraudstream.model import ModelSource
from fraudstream.rules import MICROS, BucketState, RuleAlert, RuleChange, RuleSet, Tx, alert_record
from spark_job.detection_input import ARCHIVE, RULE_RECORD, read_rule_record
from spark_job.memory import handled_rows
from spark_job.validation import EVENT_TIME

__all__ = [
    "ALERT_COLUMNS",
    "KIND_ALERT",
    "KIND_ARCHIVE",
    "KIND_RULE",
    "KIND_STATS",
    "OUTPUT_COLUMNS",
    "OUTPUT_DDL",
    "RULE_CHANGE",
    "BucketStep",
    "archive_frame",
    "balanced_bucket_keys",
    "build_detection_plan",
]

KIND_ALERT = "alert"
KIND_STATS = "stats"
KIND_ARCHIVE = "archive"
KIND_RULE = "rule"
RULE_CHANGE = "rule_change"

#: Alert columns as the stateful operator emits them (the contract's fields, ``user_id``
#: renamed to say whose alert it is, and when the trigger reached Kafka, for latency).
ALERT_COLUMNS_DDL = (
    "alert_id string, rule string, rule_version long, alert_user_id string, "
    "window_start timestamp, window_end timestamp, transaction_count long, total_amount double, "
    "locations array<string>, transaction_ids array<string>, reason string, "
    "detected_at timestamp, risk_score double, score_reasons array<string>, "
    "trigger_kafka_timestamp timestamp"
)
STATS_COLUMNS_DDL = "late_rows long, duplicate_rows long"
OUTPUT_DDL = (f"kind string, {ALERT_COLUMNS_DDL}, {STATS_COLUMNS_DDL}, {ARCHIVE} binary, "
              f"{RULE_CHANGE} string")
STATE_DDL = "rules_state string"
BUCKET = "state_bucket"
#: The group of the archive rows: never a hash bucket (those are >= 0), never given state.
ARCHIVE_BUCKET = -1

ALERT_COLUMNS = [column.split()[0] for column in ALERT_COLUMNS_DDL.split(", ")]
STATS_COLUMNS = [column.split()[0] for column in STATS_COLUMNS_DDL.split(", ")]
OUTPUT_COLUMNS = ["kind", *ALERT_COLUMNS, *STATS_COLUMNS, ARCHIVE, RULE_CHANGE]

# PySpark's worker concatenates our frames, whose alert or archive columns are all null by design;
# pandas warns about that. Imported wherever the handler runs.
warnings.filterwarnings(
    "ignore", message="The behavior of DataFrame concatenation with empty or all-NA entries",
    category=FutureWarning)


def _micros(series: pd.Series) -> np.ndarray:
    """Epoch microseconds of a timestamp column. Spark hands the handler naive UTC values (the
    session time zone is UTC), Arrow's ``to_pandas`` zone-aware ones; both in any unit."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert(UTC).dt.tz_localize(None)
    values = series.to_numpy()
    if values.dtype.kind != "M":
        values = pd.to_datetime(series, utc=True).dt.tz_localize(None).to_numpy()
    return values.astype("datetime64[us]").astype(np.int64)


class BucketStep:
    """One state bucket's work for one batch: apply the batch's rule records, read the
    transaction rows, run the rules, emit alerts.

    Shared by the streaming handler (state from Spark) and the static one (fresh state), so a
    batch run over a static frame exercises exactly the streaming code.
    """

    def __init__(self, watermark_delay_us: int, horizon_us: int,
                 models_dir: str | None = None) -> None:
        self.watermark_delay_us = watermark_delay_us
        self.horizon_us = horizon_us
        self.models_dir = models_dir

    def run(self, frames: Iterator[pd.DataFrame], state: BucketState, watermark_us: int,
            reports_rules: bool = True) -> Iterator[pd.DataFrame]:
        arrivals: dict[str, list[Tx]] = defaultdict(list)
        late: dict[str, list[Tx]] = defaultdict(list)
        records: list[tuple[str | None, str | None, int]] = []
        late_rows = 0
        newest_us: int | None = None
        rows = 0
        for frame in frames:
            if frame.empty:
                continue
            rows += len(frame)
            cells = frame.get(RULE_RECORD)
            if cells is not None and cells.notna().any():
                is_rule = cells.notna()
                records.extend(map(read_rule_record, cells[is_rule].tolist()))
                frame = frame[~is_rule]
                if frame.empty:
                    continue
            event_us = _micros(frame[EVENT_TIME])
            on_time = event_us >= watermark_us
            if on_time.any():
                newest_us = max(newest_us or 0, int(event_us[on_time].max()))
            txs = map(Tx, event_us.tolist(), frame["transaction_id"].tolist(),
                      frame["amount"].astype(float).tolist(), frame["location"].tolist(),
                      frame["payment_method"].tolist(), _micros(frame["kafka_timestamp"]).tolist(),
                      frame["merchant_id"].tolist(), frame["device_ip"].tolist())
            for user_id, tx, in_time in zip(frame["user_id"].tolist(), txs, on_time.tolist(),
                                            strict=True):
                if in_time:
                    arrivals[user_id].append(tx)
                else:
                    late_rows += 1
                    late[user_id].append(tx)
        changes: list[RuleChange] = []
        if records:
            records.sort(key=lambda record: record[2])
            changes = state.apply_rules(records, self.horizon_us)
        models = model_source(self.models_dir) if arrivals or late else None
        scorer = models.current() if models is not None else None
        alerts, duplicates = state.process(arrivals, late=late, scorer=scorer)
        # The next batch's watermark is at least this bucket's newest event minus the delay.
        floor = watermark_us if newest_us is None else max(
            watermark_us, newest_us - self.watermark_delay_us)
        state.prune(floor, self.horizon_us)
        handled_rows(rows)
        if alerts:
            yield _alerts_frame(alerts)
        if late_rows or duplicates:
            yield _stats_frame(late_rows, duplicates)
        if changes and reports_rules:
            yield _changes_frame(changes)


def archive_frame(cells: Sequence[bytes]) -> pd.DataFrame:
    """Output rows carrying archive cells (``kind = 'archive'``)."""
    return _with_columns(pd.DataFrame({ARCHIVE: list(cells)}), KIND_ARCHIVE)


def _archives(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """The archive group: its cells pass through as they are."""
    for frame in frames:
        if not frame.empty:
            yield archive_frame(frame[ARCHIVE].tolist())


def _alerts_frame(alerts: list[RuleAlert]) -> pd.DataFrame:
    detected_at = datetime.now(UTC)
    records = []
    for alert in alerts:
        record = alert_record(alert, detected_at)
        record["alert_user_id"] = record.pop("user_id")
        record["trigger_kafka_timestamp"] = datetime.fromtimestamp(
            alert.trigger.kafka_us / MICROS, tz=UTC)
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=ALERT_COLUMNS)
    return _with_columns(frame, KIND_ALERT)


def _changes_frame(changes: list[RuleChange]) -> pd.DataFrame:
    texts = [json.dumps(change.to_record()) for change in changes]
    return _with_columns(pd.DataFrame({RULE_CHANGE: texts}), KIND_RULE)


def _stats_frame(late_rows: int, duplicates: int) -> pd.DataFrame:
    frame = pd.DataFrame({"late_rows": [late_rows], "duplicate_rows": [duplicates]})
    return _with_columns(frame, KIND_STATS)


def _with_columns(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    frame = frame.assign(kind=kind)
    for column in OUTPUT_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    return frame[OUTPUT_COLUMNS]


#: One model source per Python worker process and models folder: Spark reuses its Python
#: workers across batches, so a loaded model stays loaded and is looked up again only every
#: few seconds (``ModelSource``).
_MODEL_SOURCES: dict[str, ModelSource] = {}


def model_source(models_dir: str | None) -> ModelSource | None:
    """This process's watcher of ``models_dir`` (None: scoring off)."""
    if not models_dir:
        return None
    source = _MODEL_SOURCES.get(models_dir)
    if source is None:
        source = _MODEL_SOURCES[models_dir] = ModelSource(models_dir)
    return source


def make_state_function(watermark_delay_us: int, horizon_us: int, initial_rules: RuleSet,
                        reporter_key: int, models_dir: str | None = None
                        ):  # type: ignore[no-untyped-def]
    """The per-bucket handler given to applyInPandasWithState. A bucket without state starts
    with ``initial_rules``; ``reporter_key`` is the bucket that reports rule changes; the
    newest usable model under ``models_dir`` scores each new transaction."""
    step = BucketStep(watermark_delay_us, horizon_us, models_dir)

    def handle(key: tuple[Any, ...], frames: Iterator[pd.DataFrame], state: GroupState
               ) -> Iterator[pd.DataFrame]:
        if key[0] == ARCHIVE_BUCKET:
            yield from _archives(frames)
            return
        bucket = (BucketState.from_json(state.get[0]) if state.exists
                  else BucketState(ruleset=initial_rules))
        watermark_us = max(0, state.getCurrentWatermarkMs()) * 1000
        yield from step.run(frames, bucket, watermark_us, reports_rules=key[0] == reporter_key)
        if bucket.empty:
            if state.exists:
                state.remove()
        else:
            state.update((bucket.to_json(horizon_us),))

    return handle


def make_batch_function(watermark_delay_us: int, horizon_us: int, initial_rules: RuleSet,
                        reporter_key: int, models_dir: str | None = None
                        ):  # type: ignore[no-untyped-def]
    """The same step for a static DataFrame (applyInPandas): one group's rows, no prior
    state."""
    step = BucketStep(watermark_delay_us, horizon_us, models_dir)

    def handle(key: tuple[Any, ...], frame: pd.DataFrame) -> pd.DataFrame:
        if key[0] == ARCHIVE_BUCKET:
            parts = list(_archives(iter([frame])))
        else:
            parts = list(step.run(iter([frame]), BucketState(ruleset=initial_rules), 0,
                                  reports_rules=key[0] == reporter_key))
        if not parts:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

    return handle


# --- spreading the buckets over Spark's shuffle partitions -------------------------------------
# Spark places a group on shuffle partition pmod(murmur3(key, seed 42), partitions). A handful of
# small integer keys lands unevenly (buckets 0..31 split 20/12 over two partitions), and one task
# then does most of each batch. So bucket b is keyed by a value chosen to land on partition
# b mod partitions: every partition gets the same number of buckets.


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def _mix_k1(k1: int) -> int:
    return (_rotl32((k1 * 0xCC9E2D51) & 0xFFFFFFFF, 15) * 0x1B873593) & 0xFFFFFFFF


def _mix_h1(h1: int, k1: int) -> int:
    return (_rotl32(h1 ^ k1, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF


def spark_hash_long(value: int, seed: int = 42) -> int:
    """Spark's ``hash()`` (Murmur3_x86_32.hashLong) of a long: what its hash partitioning uses."""
    value &= 0xFFFFFFFFFFFFFFFF
    h1 = _mix_h1(_mix_h1(seed, _mix_k1(value & 0xFFFFFFFF)), _mix_k1(value >> 32))
    h1 ^= 8
    h1 ^= h1 >> 16
    h1 = (h1 * 0x85EBCA6B) & 0xFFFFFFFF
    h1 ^= h1 >> 13
    h1 = (h1 * 0xC2B2AE35) & 0xFFFFFFFF
    h1 ^= h1 >> 16
    return h1 - (1 << 32) if h1 >= 1 << 31 else h1


def balanced_bucket_keys(state_buckets: int, shuffle_partitions: int) -> list[int]:
    """Group-key values for buckets 0..state_buckets-1: bucket b lands on shuffle partition
    b mod shuffle_partitions. Non-negative, so never ARCHIVE_BUCKET."""
    free: dict[int, list[int]] = defaultdict(list)
    keys: list[int] = []
    candidate = 0
    for bucket in range(state_buckets):
        wanted = bucket % shuffle_partitions
        while not free[wanted]:
            free[spark_hash_long(candidate) % shuffle_partitions].append(candidate)
            candidate += 1
        keys.append(free[wanted].pop(0))
    return keys


def build_detection_plan(detection_input: DataFrame, *, watermark_seconds: float,
                         horizon_seconds: float, rules_input: DataFrame | None = None,
                         initial_rules: RuleSet | None = None, state_buckets: int = 32,
                         shuffle_partitions: int = 2, models_dir: str | None = None
                         ) -> DataFrame:
    """Tagged rows (``kind``) for one foreachBatch: the alerts, per-bucket counters, rule
    changes and the archived chunks.

    ``detection_input`` has the columns of ``DETECTION_INPUT_SCHEMA`` (archive rows with a null
    ``event_time``, so they never move the watermark); ``rules_input``, with the same columns,
    carries rule records (the rules topic), copied to every bucket. ``initial_rules`` are in
    force in a bucket before any rule record (the detector starts from none: its rules come
    from the topic). ``shuffle_partitions`` must be the query's (``spark.sql.shuffle.partitions``,
    fixed by its checkpoint): the bucket keys are chosen to spread evenly over them.
    ``models_dir``: where the state step looks for the newest model version (None: no
    scoring; alerts then carry null ``risk_score`` and ``ml_score`` rules never fire)."""
    delay_ms = int(watermark_seconds * 1000)
    horizon_us = round(horizon_seconds * MICROS)
    initial = initial_rules or RuleSet()
    bucket_keys = balanced_bucket_keys(state_buckets, shuffle_partitions)
    keys = F.array(*[F.lit(key).cast("long") for key in bucket_keys])
    bucket_index = F.pmod(F.xxhash64(F.col("user_id")), F.lit(state_buckets)).cast("int")
    bucketed = detection_input.withColumn(BUCKET, F.when(
        F.col(ARCHIVE).isNotNull(), F.lit(ARCHIVE_BUCKET).cast("long")).otherwise(
        F.element_at(keys, bucket_index + 1)))
    if rules_input is not None:
        bucketed = bucketed.unionByName(rules_input.withColumn(BUCKET, F.explode(keys)))
    grouped = bucketed.withWatermark(EVENT_TIME, f"{delay_ms} milliseconds").groupBy(BUCKET)
    args = (delay_ms * 1000, horizon_us, initial, bucket_keys[0], models_dir)
    if detection_input.isStreaming:
        return grouped.applyInPandasWithState(
            make_state_function(*args),
            outputStructType=OUTPUT_DDL,
            stateStructType=STATE_DDL,
            outputMode="append",
            # No event-time timeout: with one, Spark would drop late rows before the handler.
            timeoutConf=GroupStateTimeout.NoTimeout,
        )
    return grouped.applyInPandas(make_batch_function(*args), schema=OUTPUT_DDL)
