"""The per-bucket step and the sink step without Spark: lateness, duplicates, state round trip.

``BucketStep`` is what runs inside ``applyInPandasWithState`` for one hash bucket of users, and
``BatchProcessor.process_table`` what runs on the driver for the batch's Arrow rows (alerts,
counters and archived chunks); both are plain Python, so the watermark behaviour is checked
here on small frames.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraudstream import schemas
from fraudstream.rules import MICROS, BucketState, RuleSet, default_definitions
from fraudstream.rules.oracle import expected_alerts
from producer.generator import TransactionGenerator
from spark_job.batch import BatchProcessor, DetectorOutputs
from spark_job.detection_input import RULE_RECORD, archive_bytes, rule_record_text
from spark_job.plan import (
    KIND_ALERT,
    KIND_RULE,
    KIND_STATS,
    OUTPUT_COLUMNS,
    OUTPUT_DDL,
    BucketStep,
    archive_frame,
)
from spark_job.sinks import ListSink
from spark_job.validation import TRANSACTION_ROW_SCHEMA

# Frames of different kinds have all-null columns by design (see spark_job.plan).
pytestmark = pytest.mark.filterwarnings("ignore:The behavior of DataFrame concatenation")

BASE = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DEFAULTS = RuleSet.of(default_definitions())
DELAY_US = 60 * MICROS
HORIZON_US = 600 * MICROS


def fresh() -> BucketState:
    """A bucket with the default rules in force."""
    return BucketState(ruleset=DEFAULTS)


def row(user: str, seconds: float, *, amount: float = 20.0, tx_id: str | None = None,
        location: str = "Lyon") -> dict[str, Any]:
    moment = BASE + timedelta(seconds=seconds)
    return {
        "key": user, "topic": "transactions", "partition": 0, "offset": 0,
        "kafka_timestamp": moment, "transaction_id": tx_id or f"{user}-{seconds}",
        "user_id": user, "amount": amount, "currency": "EUR", "event_time": moment,
        "location": location, "payment_method": "card", "merchant_id": "m1",
        "device_ip": "203.0.113.1", "is_fraud": False, "fraud_pattern": None,
        "error_reason": None, "error_detail": None, "raw_value": None,
    }


def decoded(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRANSACTION_ROW_SCHEMA)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return decoded(rows).to_pandas()


def run(rows: list[dict[str, Any]], state: BucketState, watermark: datetime | None = None
        ) -> pd.DataFrame:
    watermark_us = round(watermark.timestamp() * MICROS) if watermark else 0
    parts = list(BucketStep(DELAY_US, HORIZON_US).run(iter([frame(rows)]), state, watermark_us))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=OUTPUT_COLUMNS)


def test_the_step_emits_alerts_only_with_the_declared_columns() -> None:
    out = run([row("u1", s) for s in (0, 10, 20, 30)], fresh())
    assert list(out.columns) == OUTPUT_COLUMNS
    assert len(OUTPUT_COLUMNS) == len(OUTPUT_DDL.split(", "))
    assert out["kind"].tolist() == [KIND_ALERT]
    alerts = out[out["kind"] == KIND_ALERT]
    assert alerts["rule"].tolist() == [schemas.VELOCITY]
    assert alerts["alert_user_id"].tolist() == ["u1"]


def test_rows_older_than_the_watermark_are_counted_late_and_kept_out_of_the_rules() -> None:
    state = fresh()
    run([row("u1", s) for s in (100, 110, 120)], state)
    # Three on-time rows in state; a fourth inside the span but behind the watermark.
    out = run([row("u1", 95)], state, watermark=BASE + timedelta(seconds=99))
    assert (out["kind"] == KIND_ALERT).sum() == 0
    stats = out[out["kind"] == KIND_STATS]
    assert stats["late_rows"].tolist() == [1]
    # The same row on time completes the burst.
    out = run([row("u1", 101)], state, watermark=BASE + timedelta(seconds=99))
    assert out[out["kind"] == KIND_ALERT]["rule"].tolist() == [schemas.VELOCITY]


def test_a_resent_transaction_counts_once() -> None:
    state = fresh()
    first = [row("u1", s) for s in (0, 10, 20)]
    out = run([*first, first[2]], state)
    assert (out["kind"] == KIND_ALERT).sum() == 0
    assert out[out["kind"] == KIND_STATS]["duplicate_rows"].tolist() == [1]


def test_state_round_trips_through_json_and_is_pruned_by_the_batch_watermark() -> None:
    state = fresh()
    run([row("u1", 0), row("u2", 1000)], state)
    # u1's transaction is older than u2's minus the delay minus the retention horizon: gone.
    assert set(state.users) == {"u2"}
    restored = BucketState.from_json(state.to_json(HORIZON_US))
    assert restored.users == {}, "users are parsed only when a batch touches them"
    assert restored.ruleset == state.ruleset
    user = restored.get("u2")
    assert user is not None and user.buffer == state.users["u2"].buffer
    assert restored.get("u1") is None
    assert BucketState.from_json(None).empty
    assert not fresh().empty, "a bucket holding rules keeps its state"


def test_untouched_users_stay_unparsed_and_are_dropped_once_past_retention() -> None:
    state = fresh()
    run([row("u1", 0, tx_id="a"), row("u2", 0, tx_id="b")], state)
    stored = BucketState.from_json(state.to_json(HORIZON_US))
    run([row("u2", 200, tx_id="c")], stored, watermark=BASE + timedelta(seconds=100))
    assert set(stored.users) == {"u2"} and set(stored.stored) == {"u1"}
    # u1's last transaction is kept until 0 s + the retention horizon (600 s).
    stored.prune(round((BASE + timedelta(seconds=600)).timestamp() * MICROS), HORIZON_US)
    assert "u1" in stored.stored
    stored.prune(round((BASE + timedelta(seconds=601)).timestamp() * MICROS), HORIZON_US)
    assert "u1" not in stored.stored
    # The parsed and the stored users survive another round trip together.
    again = BucketState.from_json(stored.to_json(HORIZON_US))
    assert set(again.stored) == {"u2"}


def test_high_value_fires_once_per_transaction_even_when_resent_in_a_later_batch() -> None:
    state = fresh()
    rich = row("u1", 0, amount=9000.0)
    first = run([rich, rich], state)
    assert first.loc[first["kind"] == KIND_ALERT, "rule"].tolist() == [schemas.HIGH_VALUE]
    again = run([rich], state)
    assert (again["kind"] == KIND_ALERT).sum() == 0
    assert again.loc[again["kind"] == KIND_STATS, "duplicate_rows"].tolist() == [1]
    # Behind the watermark it is kept out of the windowed rules, but still known: no alert.
    late = run([rich], state, watermark=BASE + timedelta(seconds=30))
    assert (late["kind"] == KIND_ALERT).sum() == 0
    assert late.loc[late["kind"] == KIND_STATS, "late_rows"].tolist() == [1]


def test_the_sink_step_fires_high_value_for_late_rows_and_writes_bronze(tmp_path: Path) -> None:
    state = fresh()
    run([row("u1", 1000)], state)
    late = row("u9", 0, amount=9000.0)
    out = run([late], state, watermark=BASE + timedelta(seconds=900))
    out = pd.concat([out, archive_frame([archive_bytes(decoded([late]))])], ignore_index=True)
    table = pa.Table.from_pandas(out[OUTPUT_COLUMNS], preserve_index=False)
    alerts, dlq = ListSink(), ListSink()
    outcome = BatchProcessor(DetectorOutputs(alerts=[alerts], dlq=[dlq],
                                             bronze_dir=tmp_path)).process_table(table, 7)
    assert outcome.late_rows == 1
    assert dict(outcome.alerts) == {schemas.HIGH_VALUE: 1}
    assert [a["rule"] for a in alerts.records] == [schemas.HIGH_VALUE]
    assert alerts.records[0]["user_id"] == "u9"
    bronze = pq.read_table(tmp_path / "batch_id=7")
    assert bronze.column("transaction_id").to_pylist() == [late["transaction_id"]]


@pytest.mark.parametrize("seed", [3, 11])
def test_streamed_in_chunks_with_pruning_the_step_matches_the_oracle(seed: int) -> None:
    """A generated stream (all four episode kinds, thousands of users) fed in micro-batches to
    one bucket's state, pruned after every batch as in the detector, yields the oracle's
    alerts: pruning never drops a transaction a later span needs."""
    records = TransactionGenerator(users=400, merchants=20, fraud_ratio=0.08, seed=seed).generate(
        6000, BASE, rate=20)
    state = fresh()
    step = BucketStep(DELAY_US, HORIZON_US)
    found: list[str] = []
    watermark_us = 0
    for start in range(0, len(records), 250):
        chunk = [_decoded(r) for r in records[start:start + 250]]
        for out in step.run(iter([frame(chunk)]), state, watermark_us):
            found += out.loc[out["kind"] == KIND_ALERT, "alert_id"].tolist()
            assert (out["kind"] == KIND_STATS).sum() == 0, f"seed {seed}: nothing late or resent"
        newest = max(r["event_time"] for r in chunk)
        watermark_us = round(newest.timestamp() * MICROS) - DELAY_US
    expected = [a["alert_id"] for a in expected_alerts(records)]
    assert len({a["rule"] for a in expected_alerts(records)}) == 4, "all rules exercised"
    assert sorted(found) == sorted(expected), f"seed {seed}"


def _decoded(record: dict[str, Any]) -> dict[str, Any]:
    moment = schemas.parse_timestamp(record["timestamp"])
    out = {k: v for k, v in record.items() if k != "timestamp"}
    out.update(key=record["user_id"], topic="transactions", partition=0, offset=0,
               kafka_timestamp=moment, event_time=moment, error_reason=None,
               error_detail=None, raw_value=None)
    return out


def test_pruning_keeps_micro_payments_for_the_whole_paypal_span() -> None:
    """Four PayPal micro-payments spanning 240 s, one per batch, with the watermark following
    each batch; a card payment just before the last moves the watermark past what the other
    rules need: the first micro-payment must still be there to complete the rule."""
    state = fresh()
    found = []
    watermark = None
    for seconds, method in ((0, "PayPal"), (80, "PayPal"), (160, "PayPal"), (239, "card"),
                            (240, "PayPal")):
        record = row("u1", seconds, amount=10.0)
        record["payment_method"] = method
        out = run([record], state, watermark)
        found += out.loc[out["kind"] == KIND_ALERT, "rule"].tolist()
        watermark = BASE + timedelta(seconds=seconds - 60)
    assert found == [schemas.PAYPAL_MICRO]


def rule_frame(*records: tuple[str, bytes | None, int]) -> pd.DataFrame:
    """Rule record rows (the rules topic's stream) for one bucket."""
    out = frame([])
    texts = [rule_record_text(key.encode(), value, offset) for key, value, offset in records]
    out = pd.DataFrame({column: [None] * len(texts) for column in out.columns})
    out[RULE_RECORD] = texts
    return out


def test_rule_records_apply_before_the_batch_and_a_change_opens_a_new_episode() -> None:
    """A batch's rule records are applied in offset order before its transactions, whatever
    order the frames come in; the reporting bucket emits one change row per record; the next
    qualifying transaction after a change opens an episode under the new version."""
    state = fresh()
    step = BucketStep(DELAY_US, HORIZON_US)
    first = pd.concat(list(step.run(iter([frame([row("u1", s) for s in (0, 10, 20, 30)])]),
                                    state, 0)))
    assert first.loc[first["kind"] == KIND_ALERT, "rule_version"].tolist() == [1]
    velocity = default_definitions()[1]
    stricter = velocity.changed(version=2, updated_by="t", params={"count": 4,
                                                                   "window_seconds": 60})
    looser = velocity.changed(version=3, updated_by="t", params={"count": 2,
                                                                 "window_seconds": 60})
    frames = [frame([row("u1", 40)]),
              rule_frame(("velocity", looser.to_json().encode(), 8)),
              rule_frame(("velocity", stricter.to_json().encode(), 7))]
    out = pd.concat(list(step.run(iter(frames), state, 0)), ignore_index=True)
    changes = out[out["kind"] == KIND_RULE]
    assert len(changes) == 2 and state.ruleset.rules["velocity"].version == 3
    alerts = out[out["kind"] == KIND_ALERT]
    # Still inside version 1's episode, but version 3 has none: a new alert, under v3.
    assert alerts[["rule", "rule_version"]].values.tolist() == [["velocity", 3]]
    silent = list(BucketStep(DELAY_US, HORIZON_US).run(
        iter([rule_frame(("velocity", None, 9))]), state, 0, reports_rules=False))
    assert silent == [] and "velocity" not in state.ruleset.rules
