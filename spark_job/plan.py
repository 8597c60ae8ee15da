"""Build the detection plan: decoded transactions in, one DataFrame of tagged rows out.

The plan is built apart from running it: ``build_detection_plan`` takes any DataFrame with the
decoded-transaction columns (a stream from the Kafka source, or a static frame in tests) and
returns a single DataFrame that carries, per micro-batch, every input row (``kind = 'tx'``,
valid or rejected) and every alert of the windowed rules (``kind = 'alert'``). One read of Kafka
per batch then feeds every sink (bronze, DLQ, alerts) through one ``foreachBatch``.

The windowed rules run in ``applyInPandasWithState`` grouped by user: Spark keeps each user's
state (``spark_job.rules.UserRuleState`` as JSON) in its state store, checkpointed with the
query, and drops rows older than the watermark before they reach it (counted by Spark as
``numRowsDroppedByWatermark``). ``high_value`` needs no state and is applied to the batch's
valid rows in the sink step, so it fires for late events too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from spark_job.rules import MICROS, RuleAlert, RuleConfig, Tx, UserRuleState, alert_record

KIND_TX = "tx"
KIND_ALERT = "alert"

#: Alert columns as the stateful operator emits them (SPEC fields + when the trigger reached Kafka).
ALERT_COLUMNS_DDL = (
    "alert_id string, rule string, user_id string, window_start timestamp, "
    "window_end timestamp, transaction_count long, total_amount double, "
    "locations array<string>, transaction_ids array<string>, reason string, "
    "detected_at timestamp, trigger_kafka_timestamp timestamp"
)
STATE_DDL = "rules_state string"
ALERT_COLUMNS = [column.split()[0] for column in ALERT_COLUMNS_DDL.split(", ")]
RULE_INPUT_COLUMNS = ("user_id", "transaction_id", "event_time", "amount", "location",
                      "payment_method", "kafka_timestamp")


def _micros(series: pd.Series) -> list[int]:
    values = pd.to_datetime(series, utc=True)
    return (values.astype("int64") // 1000).tolist()


def make_state_function(config: RuleConfig):  # type: ignore[no-untyped-def]
    """The per-user handler given to applyInPandasWithState (closes over the thresholds)."""
    retention_ms = config.max_window_us // 1000

    def handle(key: tuple[Any, ...], frames: Iterator[pd.DataFrame], state: GroupState
               ) -> Iterator[pd.DataFrame]:
        user_id = str(key[0])
        if state.hasTimedOut:
            state.remove()
            return
        rules_state = UserRuleState.from_json(state.get[0] if state.exists else None)
        alerts, _duplicates = rules_state.process(user_id, _arrivals(frames), config)
        watermark_ms = state.getCurrentWatermarkMs()
        if watermark_ms > 0:
            rules_state.prune(watermark_ms * 1000, config)
        latest = rules_state.latest_event_us
        if rules_state.empty or latest is None:
            state.remove()
        else:
            state.update((rules_state.to_json(),))
            # Once the watermark passes this, nothing can join the user's spans any more.
            state.setTimeoutTimestamp(max(latest // 1000 + retention_ms + 1, watermark_ms + 1))
        if alerts:
            yield _alerts_frame(alerts)

    return handle


def make_batch_function(config: RuleConfig):  # type: ignore[no-untyped-def]
    """The same handler for a static DataFrame (applyInPandas): one user's rows, no prior state."""

    def handle(key: tuple[Any, ...], frame: pd.DataFrame) -> pd.DataFrame:
        alerts, _duplicates = UserRuleState().process(str(key[0]), _arrivals([frame]), config)
        return _alerts_frame(alerts) if alerts else pd.DataFrame(columns=ALERT_COLUMNS)

    return handle


def _arrivals(frames: Iterable[pd.DataFrame]) -> list[Tx]:
    arrivals: list[Tx] = []
    for frame in frames:
        arrivals.extend(Tx(*row) for row in zip(
            _micros(frame["event_time"]), frame["transaction_id"].tolist(),
            frame["amount"].astype(float).tolist(), frame["location"].tolist(),
            frame["payment_method"].tolist(), _micros(frame["kafka_timestamp"]),
            strict=True,
        ))
    return arrivals


def _alerts_frame(alerts: list[RuleAlert]) -> pd.DataFrame:
    detected_at = datetime.now(UTC)
    records = []
    for alert in alerts:
        record = alert_record(alert, detected_at)
        record["trigger_kafka_timestamp"] = datetime.fromtimestamp(
            alert.trigger.kafka_us / MICROS, tz=UTC)
        records.append(record)
    return pd.DataFrame.from_records(records, columns=ALERT_COLUMNS)


def build_detection_plan(transactions: DataFrame, config: RuleConfig,
                         watermark_seconds: float) -> DataFrame:
    """Tagged rows (``kind``) for one foreachBatch: every decoded input row plus the windowed
    rules' alerts. ``transactions`` must have the decoder's columns (``error_reason`` null for
    valid rows, ``event_time`` null for rejected ones so bad input never moves the watermark)."""
    lateness = f"{int(watermark_seconds * 1000)} milliseconds"
    watermarked = transactions.withWatermark("event_time", lateness)
    valid = watermarked.where(F.col("error_reason").isNull())
    by_user = valid.select(*RULE_INPUT_COLUMNS).groupBy("user_id")
    if transactions.isStreaming:
        alerts = by_user.applyInPandasWithState(
            make_state_function(config),
            outputStructType=ALERT_COLUMNS_DDL,
            stateStructType=STATE_DDL,
            outputMode="append",
            timeoutConf=GroupStateTimeout.EventTimeTimeout,
        )
    else:
        # A static frame (tests, backfill checks) runs the same handler without a state store.
        alerts = by_user.applyInPandas(make_batch_function(config), schema=ALERT_COLUMNS_DDL)
    alerts = alerts.withColumn("kind", F.lit(KIND_ALERT))
    rows = watermarked.withColumn("kind", F.lit(KIND_TX))
    # Alert columns that clash with transaction columns keep the transaction meaning in tx rows.
    alerts = alerts.withColumnRenamed("user_id", "alert_user_id")
    return rows.unionByName(alerts, allowMissingColumns=True)
