"""Precision/recall per rule against the producer's labels (fraudstream.quality), and its CLI over
a Parquet history written the way the detector writes it."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraudstream.datasets import dataset_files, read_dataset
from fraudstream.quality import (
    EVIDENCE_SCHEMA,
    LABEL_SCHEMA,
    REPORT_COLUMNS,
    format_ratio,
    load_report,
    main,
    quality_report,
    report_records,
    rule_spans,
)
from fraudstream.schemas import (
    ALERTS_DATASET,
    HIGH_VALUE,
    MULTI_LOCATION,
    PAYPAL_MICRO,
    RULES,
    TRANSACTIONS_DATASET,
    VELOCITY,
    alert_id,
)
from fraudstream.settings import DetectorSettings, load_settings

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
SPANS = {VELOCITY: 60.0, MULTI_LOCATION: 120.0, PAYPAL_MICRO: 240.0}


def tx(tid: str, user: str, seconds: float, pattern: str | None = None) -> dict[str, object]:
    return {"transaction_id": tid, "user_id": user, "event_time": T0 + timedelta(seconds=seconds),
            "fraud_pattern": pattern}


def alert(rule: str, user: str, ids: list[str]) -> dict[str, object]:
    return {"alert_id": alert_id(rule, user, ids), "rule": rule, "user_id": user,
            "transaction_ids": ids}


def frames(txs: list[dict[str, object]], alerts: list[dict[str, object]]
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (pd.DataFrame(txs, columns=LABEL_SCHEMA.names),
            pd.DataFrame(alerts, columns=EVIDENCE_SCHEMA.names))


def test_alert_is_true_positive_only_if_evidence_is_labelled_with_its_rule() -> None:
    txs = [tx("v1", "u1", 0, VELOCITY), tx("v2", "u1", 5, VELOCITY), tx("n1", "u2", 0),
           tx("m1", "u3", 0, MULTI_LOCATION)]
    alerts = [
        alert(VELOCITY, "u1", ["v1", "v2"]),       # TP
        alert(VELOCITY, "u2", ["n1"]),             # normal traffic: FP
        alert(VELOCITY, "u3", ["m1"]),             # labelled, but another rule: FP
        alert(HIGH_VALUE, "u9", ["unknown-id"]),   # evidence not in the dataset: FP
    ]
    report = quality_report(*frames(txs, alerts), SPANS)
    assert list(report.columns) == list(REPORT_COLUMNS)
    assert report.loc[VELOCITY, "alerts"] == 3
    assert report.loc[VELOCITY, "true_positive_alerts"] == 1
    assert report.loc[VELOCITY, "precision"] == pytest.approx(1 / 3)
    assert report.loc[HIGH_VALUE, "precision"] == 0.0


def test_a_legitimate_look_alike_is_a_false_positive_and_never_a_row() -> None:
    traveller = [{**tx("t1", "u1", 0, "legit_traveller"), "is_fraud": False},
                 {**tx("t2", "u1", 30, "legit_traveller"), "is_fraud": False}]
    fraud = [{**tx("m1", "u2", 0, MULTI_LOCATION), "is_fraud": True},
             {**tx("m2", "u2", 20, MULTI_LOCATION), "is_fraud": True}]
    alerts = [alert(MULTI_LOCATION, "u1", ["t1", "t2"]), alert(MULTI_LOCATION, "u2", ["m1", "m2"])]
    report = quality_report(*frames(traveller + fraud, alerts), SPANS,
                            as_of=T0 + timedelta(hours=1))
    assert "legit_traveller" not in report.index
    assert report.loc[MULTI_LOCATION, "precision"] == 0.5
    assert report.loc[MULTI_LOCATION, "episodes"] == 1
    assert report.loc[MULTI_LOCATION, "recall"] == 1.0


def test_duplicate_alerts_count_once() -> None:
    txs = [tx("v1", "u1", 0, VELOCITY)]
    same = alert(VELOCITY, "u1", ["v1"])
    report = quality_report(*frames(txs, [same, dict(same)]), SPANS)
    assert report.loc[VELOCITY, "alerts"] == 1


def test_episodes_split_where_the_gap_exceeds_the_rule_span() -> None:
    # velocity span 60 s: gaps of exactly 60 s stay together, 61 s splits.
    txs = [tx("a", "u1", 0, VELOCITY), tx("b", "u1", 60, VELOCITY), tx("c", "u1", 120, VELOCITY),
           tx("d", "u1", 181, VELOCITY),
           tx("e", "u2", 0, VELOCITY)]  # another user: its own episode
    alerts = [alert(VELOCITY, "u1", ["c"])]  # overlaps the first episode only
    report = quality_report(*frames(txs, alerts), SPANS, as_of=T0 + timedelta(hours=1))
    assert report.loc[VELOCITY, "episodes"] == 3
    assert report.loc[VELOCITY, "detected_episodes"] == 1
    assert report.loc[VELOCITY, "recall"] == pytest.approx(1 / 3)


def test_undetected_episodes_that_may_still_grow_are_pending_not_missed() -> None:
    # paypal_micro span 240 s. The newest event (unlabelled) is at t=1000.
    txs = [tx("old1", "u1", 0, PAYPAL_MICRO), tx("old2", "u1", 30, PAYPAL_MICRO),  # 970 s ago
           tx("new1", "u2", 700, PAYPAL_MICRO), tx("new2", "u2", 760, PAYPAL_MICRO),  # 240 s ago
           tx("done", "u3", 990, PAYPAL_MICRO),  # detected
           tx("h", "u4", 1000, HIGH_VALUE), tx("n", "u5", 1000)]
    alerts = [alert(PAYPAL_MICRO, "u3", ["done"])]
    report = quality_report(*frames(txs, alerts), SPANS)
    row = report.loc[PAYPAL_MICRO]
    assert row[["episodes", "detected_episodes", "pending_episodes"]].tolist() == [3, 1, 1]
    assert row["recall"] == pytest.approx(1 / 2), "the old one is missed, the new one pending"
    # high_value has no window: an undetected one is missed at once.
    assert report.loc[HIGH_VALUE, ["pending_episodes", "recall"]].tolist() == [0, 0.0]
    # A later as_of closes the window: the episode counts as missed.
    later = quality_report(*frames(txs, alerts), SPANS, as_of=T0 + timedelta(seconds=1001))
    assert later.loc[PAYPAL_MICRO, ["pending_episodes", "recall"]].tolist() == [0, 1 / 3]


def test_every_high_value_transaction_is_its_own_episode() -> None:
    txs = [tx("h1", "u1", 0, HIGH_VALUE), tx("h2", "u1", 1, HIGH_VALUE)]
    alerts = [alert(HIGH_VALUE, "u1", ["h1"])]
    report = quality_report(*frames(txs, alerts), SPANS)
    assert report.loc[HIGH_VALUE, ["episodes", "detected_episodes"]].tolist() == [2, 1]


def test_an_alert_for_another_user_does_not_detect_an_episode() -> None:
    txs = [tx("p1", "u1", 0, PAYPAL_MICRO)]
    alerts = [alert(PAYPAL_MICRO, "u2", ["p1"])]
    report = quality_report(*frames(txs, alerts), SPANS)
    assert report.loc[PAYPAL_MICRO, "episodes"] == 1
    assert report.loc[PAYPAL_MICRO, "detected_episodes"] == 0
    # The evidence is labelled with the rule, so precision still counts it.
    assert report.loc[PAYPAL_MICRO, "true_positive_alerts"] == 1


def test_undefined_ratios_are_nan_and_shown_as_na() -> None:
    report = quality_report(*frames([tx("n", "u1", 0)], []), SPANS)
    assert list(report.index) == list(RULES)
    assert report[["alerts", "episodes"]].to_numpy().sum() == 0
    assert report["precision"].isna().all() and report["recall"].isna().all()
    assert format_ratio(report.loc[VELOCITY, "recall"]) == "n/a"
    assert format_ratio(0.875) == "87.5%"
    assert all(row["precision"] is None for row in report_records(report))


def test_a_rule_outside_the_contract_is_reported_after_the_four() -> None:
    txs = [tx("x1", "u1", 0, "new_rule")]
    report = quality_report(*frames(txs, [alert("new_rule", "u1", ["x1"])]), SPANS)
    assert list(report.index) == [*RULES, "new_rule"]
    assert report.loc["new_rule", ["precision", "recall"]].tolist() == [1.0, 1.0]


def test_spans_are_the_windows_of_the_configured_default_rules() -> None:
    settings, _ = load_settings(DetectorSettings, [], {})
    assert rule_spans(settings) == SPANS  # high_value has no window, so no span
    wider, _ = load_settings(DetectorSettings, ["--velocity-window-seconds", "90.5"], {})
    assert rule_spans(wider)[VELOCITY] == 90.5


def test_a_windowed_rule_of_any_id_splits_and_waits_by_its_own_span() -> None:
    spans = {**SPANS, "velocity_10m": 600.0}
    txs = [tx("a", "u1", 0, "velocity_10m"), tx("b", "u1", 500, "velocity_10m"),  # one episode
           tx("c", "u1", 1200, "velocity_10m")]  # 700 s later: a new one, still pending
    report = quality_report(*frames(txs, [alert("velocity_10m", "u1", ["a", "b"])]), spans)
    row = report.loc["velocity_10m"]
    assert row[["episodes", "detected_episodes", "pending_episodes"]].tolist() == [2, 1, 1]
    # Without a span every labelled transaction is its own episode and none is pending.
    bare = quality_report(*frames(txs, []), SPANS).loc["velocity_10m"]
    assert bare[["episodes", "pending_episodes"]].tolist() == [3, 0]


# --- Parquet history and CLI -----------------------------------------------------------------


def write_batch(root: Path, dataset: str, batch_id: int, table: pa.Table) -> None:
    folder = root / dataset / f"batch_id={batch_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")


@pytest.fixture
def history(tmp_path: Path) -> Path:
    txs = [tx("v1", "u1", 0, VELOCITY), tx("v2", "u1", 10, VELOCITY), tx("v3", "u1", 20, VELOCITY),
           tx("v4", "u1", 30, VELOCITY), tx("h1", "u2", 5, HIGH_VALUE), tx("n1", "u3", 7)]
    alerts = [alert(VELOCITY, "u1", ["v1", "v2", "v3", "v4"]), alert(HIGH_VALUE, "u3", ["n1"])]
    write_batch(tmp_path, TRANSACTIONS_DATASET, 0,
                pa.Table.from_pylist(txs[:3], schema=LABEL_SCHEMA))
    write_batch(tmp_path, TRANSACTIONS_DATASET, 1,
                pa.Table.from_pylist(txs[3:], schema=LABEL_SCHEMA))
    write_batch(tmp_path, ALERTS_DATASET, 1, pa.Table.from_pylist(alerts, schema=EVIDENCE_SCHEMA))
    # What a concurrent writer leaves around: a half-written file, a temporary, a marker.
    partial = tmp_path / ALERTS_DATASET / "batch_id=2"
    partial.mkdir()
    (partial / "part-0.parquet").write_bytes(b"PAR1 not finished")
    (partial / ".part-0.1234.tmp").write_bytes(b"PAR1")
    (tmp_path / ALERTS_DATASET / "_SUCCESS").write_text("")
    return tmp_path


def test_reading_skips_hidden_files_and_unreadable_files(
    history: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = dataset_files(history, ALERTS_DATASET)
    assert [f.parent.name for f in files] == ["batch_id=1", "batch_id=2"]
    table = read_dataset(history, ALERTS_DATASET, EVIDENCE_SCHEMA)
    assert table.num_rows == 2
    assert "skipping unreadable Parquet file" in caplog.text
    assert read_dataset(history / "missing", ALERTS_DATASET, EVIDENCE_SCHEMA).num_rows == 0


def test_report_from_parquet_history(history: Path) -> None:
    report = load_report(history, SPANS)
    assert report.loc[VELOCITY, ["alerts", "true_positive_alerts", "episodes",
                                 "detected_episodes"]].tolist() == [1, 1, 1, 1]
    # The newest event time comes from every transaction, labelled or not (n1 at 7 s).
    assert report.loc[VELOCITY, "pending_episodes"] == 0
    assert report.loc[HIGH_VALUE, ["alerts", "true_positive_alerts", "episodes",
                                   "detected_episodes"]].tolist() == [1, 0, 1, 0]
    assert math.isnan(report.loc[MULTI_LOCATION, "precision"])


def test_cli_prints_json_and_a_table(history: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--parquet-dir", str(history), "--json"])
    assert exit_info.value.code == 0
    rows = {row["rule"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[VELOCITY]["precision"] == 1.0 and rows[VELOCITY]["recall"] == 1.0
    assert rows[HIGH_VALUE]["precision"] == 0.0
    assert rows[PAYPAL_MICRO]["recall"] is None

    with pytest.raises(SystemExit):
        main(["--parquet-dir", str(history)])
    table = capsys.readouterr().out
    assert "100.0%" in table and "n/a" in table and "paypal_micro" in table


def test_cli_rejects_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--velocity-window-seconds", "soon"])
    assert exit_info.value.code == 2
    assert "velocity" in capsys.readouterr().err


def test_an_ml_score_rule_is_judged_against_fraud_of_any_scenario() -> None:
    from fraudstream.quality import ANY_FRAUD, definition_labels
    from fraudstream.rules import definition_from_dict

    model_rule = definition_from_dict({
        "rule_id": "model_90", "kind": "ml_score", "version": 1, "enabled": True,
        "params": {"threshold": 0.9}, "updated_at": "2026-12-01T10:00:00Z", "updated_by": "t"})
    velocity = definition_from_dict({
        "rule_id": VELOCITY, "kind": VELOCITY, "version": 1, "enabled": True,
        "params": {"count": 3, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",
        "updated_by": "t"})
    labels = definition_labels([model_rule, velocity])
    assert labels == {"model_90": ANY_FRAUD}
    txs, alerts = frames(
        [tx("a", "u1", 0, VELOCITY), tx("b", "u2", 10, HIGH_VALUE), tx("c", "u3", 20),
         tx("d", "u4", 30, PAYPAL_MICRO)],
        [alert("model_90", "u1", ["a"]), alert("model_90", "u2", ["b"]),
         alert("model_90", "u3", ["c"])])
    report = quality_report(txs, alerts, SPANS, rules=["model_90"], labels=labels)
    row = report.loc["model_90"]
    # a and b are fraud (of other scenarios): true positives; c is not; d was missed.
    assert (row["alerts"], row["true_positive_alerts"]) == (3, 2)
    assert (row["episodes"], row["detected_episodes"]) == (3, 2)
    without = quality_report(txs, alerts, SPANS, rules=["model_90"])
    assert without.loc["model_90", "true_positive_alerts"] == 0
