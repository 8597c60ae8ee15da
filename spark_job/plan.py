"""Build the detection plan: decoded transactions in, one DataFrame of tagged rows out.

The plan is built apart from running it: ``build_detection_plan`` takes any DataFrame with the
decoded-transaction columns (a stream from the Kafka source, or a static frame in tests) and
returns a single DataFrame that carries, per micro-batch, every input row (``kind = 'tx'``,
valid or rejected), every alert of the windowed rules (``kind = 'alert'``) and one counter row
per state bucket (``kind = 'stats'``: late and duplicate rows). One read of Kafka per batch then
feeds every sink (bronze, DLQ, alerts) through one ``foreachBatch``.

Every row passes once through ``applyInPandasWithState``, grouped by a hash bucket of user_id
(``BucketState``): keying Spark's state by user would cost a pandas frame and a state round trip
per user and batch, which dominated the run time. Spark keeps each bucket's state as JSON in its
state store, checkpointed with the query. The operator runs without an event-time timeout so
Spark does not drop late rows before the handler sees them: the handler itself keeps rows older
than the watermark out of the windowed rules, counts them, and still passes them on, so bronze
keeps them and ``high_value`` (applied in the sink step) fires for them too.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from spark_job.rules import MICROS, BucketState, RuleAlert, RuleConfig, Tx, alert_record
from spark_job.validation import ERROR_REASON, EVENT_TIME, TRANSACTION_DDL, TRANSACTION_SPARK_SCHEMA

KIND_TX = "tx"
KIND_ALERT = "alert"
KIND_STATS = "stats"

#: Alert columns as the stateful operator emits them (SPEC fields, ``user_id`` renamed so it does
#: not clash with the transaction column, and when the trigger reached Kafka, for latency).
ALERT_COLUMNS_DDL = (
    "alert_id string, rule string, alert_user_id string, window_start timestamp, "
    "window_end timestamp, transaction_count long, total_amount double, "
    "locations array<string>, transaction_ids array<string>, reason string, "
    "detected_at timestamp, trigger_kafka_timestamp timestamp"
)
STATS_COLUMNS_DDL = "late_rows long, duplicate_rows long"
OUTPUT_DDL = f"{TRANSACTION_DDL}, kind string, {ALERT_COLUMNS_DDL}, {STATS_COLUMNS_DDL}"
STATE_DDL = "rules_state string"
BUCKET = "state_bucket"

TX_COLUMNS = TRANSACTION_SPARK_SCHEMA.fieldNames()
ALERT_COLUMNS = [column.split()[0] for column in ALERT_COLUMNS_DDL.split(", ")]
STATS_COLUMNS = [column.split()[0] for column in STATS_COLUMNS_DDL.split(", ")]
OUTPUT_COLUMNS = [*TX_COLUMNS, "kind", *ALERT_COLUMNS, *STATS_COLUMNS]
_NOT_TX_COLUMNS = [*ALERT_COLUMNS, *STATS_COLUMNS]

# PySpark's worker concatenates our frames, whose alert or transaction columns are all null by
# design; pandas warns about that on every batch. Imported wherever the handler runs.
warnings.filterwarnings(
    "ignore", message="The behavior of DataFrame concatenation with empty or all-NA entries",
    category=FutureWarning)


def _micros(series: pd.Series) -> pd.Series:
    """Epoch microseconds, whatever unit the frame's timestamps carry (Spark hands pandas
    nanoseconds, Arrow microseconds)."""
    return pd.to_datetime(series, utc=True).dt.as_unit("us").astype("int64")


class BucketStep:
    """One state bucket's work for one batch: split rows, run the rules, emit tagged frames.

    Shared by the streaming handler (state from Spark) and the static one (empty state), so a
    batch run over a static frame exercises exactly the streaming code.
    """

    def __init__(self, config: RuleConfig, watermark_delay_us: int) -> None:
        self.config = config
        self.watermark_delay_us = watermark_delay_us

    def run(self, frames: Iterator[pd.DataFrame], state: BucketState, watermark_us: int
            ) -> Iterator[pd.DataFrame]:
        arrivals: dict[str, list[Tx]] = defaultdict(list)
        late_rows = 0
        newest_us: int | None = None
        for frame in frames:
            if frame.empty:
                continue
            valid = frame[frame[ERROR_REASON].isna()]
            if not valid.empty:
                event_us = _micros(valid[EVENT_TIME])
                on_time = event_us >= watermark_us
                late_rows += int((~on_time).sum())
                rows = valid[on_time.to_numpy()]
                event_us = event_us[on_time]
                if not rows.empty:
                    newest_us = max(newest_us or 0, int(event_us.max()))
                    for user_id, tx in zip(rows["user_id"].tolist(), map(Tx, *(
                        event_us.tolist(), rows["transaction_id"].tolist(),
                        rows["amount"].astype(float).tolist(), rows["location"].tolist(),
                        rows["payment_method"].tolist(),
                        _micros(rows["kafka_timestamp"]).tolist(),
                    )), strict=True):
                        arrivals[user_id].append(tx)
            yield _tagged_tx(frame)
        alerts, duplicates = state.process(arrivals, self.config)
        # The next batch's watermark is at least this bucket's newest event minus the delay.
        floor = watermark_us if newest_us is None else max(
            watermark_us, newest_us - self.watermark_delay_us)
        state.prune(floor, self.config)
        if alerts:
            yield _alerts_frame(alerts)
        if late_rows or duplicates:
            yield _stats_frame(late_rows, duplicates)


def _tagged_tx(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.assign(kind=KIND_TX)
    for column in _NOT_TX_COLUMNS:
        out[column] = None
    return out[OUTPUT_COLUMNS]


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


def _stats_frame(late_rows: int, duplicates: int) -> pd.DataFrame:
    frame = pd.DataFrame({"late_rows": [late_rows], "duplicate_rows": [duplicates]})
    return _with_columns(frame, KIND_STATS)


def _with_columns(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    frame = frame.assign(kind=kind)
    for column in OUTPUT_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    return frame[OUTPUT_COLUMNS]


def make_state_function(config: RuleConfig, watermark_delay_us: int):  # type: ignore[no-untyped-def]
    """The per-bucket handler given to applyInPandasWithState."""
    step = BucketStep(config, watermark_delay_us)

    def handle(key: tuple[Any, ...], frames: Iterator[pd.DataFrame], state: GroupState
               ) -> Iterator[pd.DataFrame]:
        bucket = BucketState.from_json(state.get[0] if state.exists else None)
        watermark_us = max(0, state.getCurrentWatermarkMs()) * 1000
        yield from step.run(frames, bucket, watermark_us)
        if bucket.empty:
            if state.exists:
                state.remove()
        else:
            state.update((bucket.to_json(),))

    return handle


def make_batch_function(config: RuleConfig, watermark_delay_us: int):  # type: ignore[no-untyped-def]
    """The same step for a static DataFrame (applyInPandas): one bucket's rows, no prior state."""
    step = BucketStep(config, watermark_delay_us)

    def handle(key: tuple[Any, ...], frame: pd.DataFrame) -> pd.DataFrame:
        parts = list(step.run(iter([frame]), BucketState(), 0))
        if not parts:
            return pd.DataFrame(columns=OUTPUT_COLUMNS)
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

    return handle


def build_detection_plan(transactions: DataFrame, config: RuleConfig,
                         watermark_seconds: float, state_buckets: int = 32) -> DataFrame:
    """Tagged rows (``kind``) for one foreachBatch: every decoded input row, the windowed rules'
    alerts and per-bucket counters. ``transactions`` must have the decoder's columns
    (``error_reason`` null for valid rows, ``event_time`` null for rejected ones so bad input
    never moves the watermark)."""
    delay_ms = int(watermark_seconds * 1000)
    watermarked = transactions.withWatermark(EVENT_TIME, f"{delay_ms} milliseconds")
    bucketed = watermarked.withColumn(
        BUCKET, F.pmod(F.xxhash64(F.col("user_id")), F.lit(state_buckets)))
    grouped = bucketed.groupBy(BUCKET)
    if transactions.isStreaming:
        return grouped.applyInPandasWithState(
            make_state_function(config, delay_ms * 1000),
            outputStructType=OUTPUT_DDL,
            stateStructType=STATE_DDL,
            outputMode="append",
            # No event-time timeout: with one, Spark would drop late rows before the handler.
            timeoutConf=GroupStateTimeout.NoTimeout,
        )
    return grouped.applyInPandas(make_batch_function(config, delay_ms * 1000), schema=OUTPUT_DDL)
