"""Every dashboard page through Streamlit's AppTest, over a Parquet history + metrics file
written like the detector writes them, with the real embedded broker (and once with an
unreachable address: the pages must say so and keep showing the history). The Rules page runs
against a rules topic of its own per test, read back with the rule core's ``RulesTopic``.
Verdicts go to a SQLite file of each test's own (read back with ``VerdictStore``) and a verdicts
topic of this module's own."""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer
from streamlit.testing.v1 import AppTest

from dashboard.cli import main as cli_main
from dashboard.cli import streamlit_command
from dashboard.data import backtest as bt
from dashboard.data.kafka import decode_alert
from dashboard.data.metrics import MetricsTail, model_status
from dashboard.data.parquet import DatasetCache
from dashboard.data.resources import ANALYST_KEY
from dashboard.data.views import NO_SCORES, alerts_over_time, amount_distribution, count_by_rule
from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.datasets import (
    ALERTS_SCHEMA,
    DLQ_SCHEMA,
    RULE_CHANGES_SCHEMA,
    TRANSACTIONS_SCHEMA,
    dataset_files,
)
from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.quality import format_ratio, load_report
from fraudstream.rules import MICROS, RuleDefinition, default_definitions
from fraudstream.rules.definition import DEFAULTS_AUTHOR
from fraudstream.rules.store import RulesTopic
from fraudstream.schemas import (
    ALERTS_DATASET,
    DLQ_DATASET,
    HIGH_VALUE,
    METRICS_FILE_NAME,
    METRICS_FOLDER,
    MULTI_LOCATION,
    PAYPAL_MICRO,
    RULE_CHANGES_DATASET,
    TRANSACTIONS_DATASET,
    VELOCITY,
    alert_id,
    format_timestamp,
    to_json_ready,
)
from fraudstream.topics import ALERTS, VERDICTS, TopicSpec
from fraudstream.verdicts.model import make_verdict
from fraudstream.verdicts.store import RecordedVerdict, VerdictStore

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
NOW = datetime.now(UTC).replace(microsecond=0)


def transaction(tid: str, user: str, seconds_ago: float, amount: float, location: str,
                pattern: str | None = None) -> dict[str, Any]:
    moment = NOW - timedelta(seconds=seconds_ago)
    return {"transaction_id": tid, "user_id": user, "amount": amount, "currency": "EUR",
            "event_time": moment, "location": location, "payment_method": "card",
            "merchant_id": "m001", "device_ip": "203.0.113.7", "is_fraud": pattern is not None,
            "fraud_pattern": pattern, "key": user, "topic": "transactions", "partition": 0,
            "offset": 0, "kafka_timestamp": moment}


def make_alert(rule: str, evidence: list[dict[str, Any]], detected_seconds_ago: float,
               version: int = 1) -> dict[str, Any]:
    user = evidence[0]["user_id"]
    ids = [t["transaction_id"] for t in evidence]
    return {"alert_id": alert_id(rule, user, ids), "rule": rule, "rule_version": version,
            "user_id": user,
            "window_start": min(t["event_time"] for t in evidence),
            "window_end": max(t["event_time"] for t in evidence),
            "transaction_count": len(ids), "total_amount": sum(t["amount"] for t in evidence),
            "locations": sorted({t["location"] for t in evidence}), "transaction_ids": ids,
            "reason": f"{rule} fired", "detected_at": NOW - timedelta(seconds=detected_seconds_ago)}


def write_batch(root: Path, dataset: str, batch_id: int, rows: list[dict[str, Any]],
                schema: pa.Schema) -> None:
    folder = root / dataset / f"batch_id={batch_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")


# One velocity burst (detected), one high-value purchase (detected), one multi-location pair
# (missed), an alert on normal traffic (false positive), and the Kafka-only alert.
VELOCITY_TXS = [transaction(f"v{i}", "u-velocity", 300 - i * 10, 20.0 + i, "Lyon", VELOCITY)
                for i in range(4)]
HIGH_TX = transaction("h1", "u-high", 200, 4200.0, "Paris", HIGH_VALUE)
MULTI_TXS = [transaction("m1", "u-multi", 450, 30.0, "Berlin", MULTI_LOCATION),
             transaction("m2", "u-multi", 400, 35.0, "Madrid", MULTI_LOCATION)]
NORMAL_TXS = [transaction(f"n{i}", "u-normal", 400 - i * 30, 50.0 + i, "Rome") for i in range(4)]
PARQUET_ALERTS = [make_alert(VELOCITY, VELOCITY_TXS, 250), make_alert(HIGH_VALUE, [HIGH_TX], 190),
                  make_alert(VELOCITY, NORMAL_TXS, 280)]
KAFKA_ONLY = make_alert(HIGH_VALUE, [transaction("k1", "u-kafka-only", 30, 5000.0, "Vienna")], 20,
                        version=3)
#: How alerts were written before rules had versions: the last Parquet alert is in such a file.
UNVERSIONED_SCHEMA = pa.schema([f for f in ALERTS_SCHEMA if f.name != "rule_version"])


def write_history(root: Path) -> None:
    txs = [*VELOCITY_TXS, HIGH_TX, *MULTI_TXS, *NORMAL_TXS]
    write_batch(root, TRANSACTIONS_DATASET, 0, txs[:5], TRANSACTIONS_SCHEMA)
    write_batch(root, TRANSACTIONS_DATASET, 1, txs[5:], TRANSACTIONS_SCHEMA)
    write_batch(root, ALERTS_DATASET, 1, PARQUET_ALERTS[:2], ALERTS_SCHEMA)
    write_batch(root, ALERTS_DATASET, 3, PARQUET_ALERTS[2:], UNVERSIONED_SCHEMA)
    dlq = {"key": "u1", "topic": "transactions", "partition": 0, "offset": 7,
           "kafka_timestamp": NOW, "error_reason": "invalid_json", "error_detail": "x",
           "raw_value": "{not json"}
    write_batch(root, DLQ_DATASET, 1, [dlq, {**dlq, "offset": 8}], DLQ_SCHEMA)
    (root / ALERTS_DATASET / "batch_id=2").mkdir()
    (root / ALERTS_DATASET / "batch_id=2" / ".part-0.tmp").write_bytes(b"PAR1")
    metrics = root / METRICS_FOLDER / METRICS_FILE_NAME
    metrics.parent.mkdir(parents=True)
    lines = [{"batch_id": i, "written_at": format_timestamp(NOW - timedelta(seconds=40 - 10 * i)),
              "input_rows": 100, "valid_rows": 99, "dlq_rows": 1, "late_rows": 2,
              "alerts": {VELOCITY: 1}, "batch_seconds": 0.4, "rows_per_second": 250.0,
              "watermark": None, "latency_ms_p50": 800.0 + i, "latency_ms_p95": 1500.0 + i,
              "latency_ms_max": 2000.0} for i in range(4)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"batch_id": 9')


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    write_history(root)
    return root


#: This module's own alerts topic: other tests share the session broker's `fraud-alerts`.
ALERTS_TOPIC = f"{ALERTS}-dashboard-pages-{uuid.uuid4().hex[:6]}"
#: Likewise for verdicts (the publisher creates it on the first verdict).
VERDICTS_TOPIC = f"{VERDICTS}-dashboard-pages-{uuid.uuid4().hex[:6]}"


@pytest.fixture(autouse=True)
def verdicts_url(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
                 ) -> str:
    """Each test's own verdict database: the default (run/verdicts.db) is the working copy's."""
    url = f"sqlite:///{tmp_path_factory.mktemp('verdicts') / 'verdicts.db'}"
    monkeypatch.setenv("VERDICTS_URL", url)
    monkeypatch.setenv("VERDICTS_TOPIC", VERDICTS_TOPIC)
    return url


@pytest.fixture(scope="module")
def produced(broker: EmbeddedBroker) -> dict[str, Any]:
    """The Kafka-only alert and a replayed copy of a Parquet alert, on the alerts topic."""
    ensure_topics(wait_for_broker(broker.client_config(), 10), [TopicSpec(ALERTS_TOPIC, 3)])
    producer = Producer(broker.client_config())
    for alert in (KAFKA_ONLY, PARQUET_ALERTS[0]):
        producer.produce(ALERTS_TOPIC, key=alert["user_id"],
                         value=json.dumps(to_json_ready(alert)))
    assert producer.flush(15) == 0
    return KAFKA_ONLY


@pytest.fixture
def app_env(monkeypatch: pytest.MonkeyPatch, history: Path) -> Callable[[str], AppTest]:
    def make(bootstrap: str) -> AppTest:
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        monkeypatch.setenv("PARQUET_DIR", str(history))
        monkeypatch.setenv("ALERTS_TOPIC", ALERTS_TOPIC)
        monkeypatch.delenv("FRAUDSTREAM_DASHBOARD_ARGS", raising=False)
        return AppTest.from_file(str(APP), default_timeout=60)
    return make


def run_until(app: AppTest, condition: Callable[[AppTest], bool], timeout: float = 30.0
              ) -> AppTest:
    """Rerun the app until ``condition`` holds (the Kafka tail fills over refreshes)."""
    deadline = time.monotonic() + timeout
    while True:
        app.run()
        assert not app.exception, [e.value for e in app.exception]
        if condition(app) or time.monotonic() > deadline:
            return app


def table_users(app: AppTest) -> set[str]:
    return set(app.dataframe[0].value["user_id"])


def metric_values(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


@pytest.fixture
def reachable(app_env: Callable[[str], AppTest], broker: EmbeddedBroker,
              produced: dict[str, Any]) -> Iterator[AppTest]:
    yield app_env(broker.bootstrap_servers)


def test_live_page_merges_kafka_and_history_and_filters(reachable: AppTest) -> None:
    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    assert app.title[0].value == "Live alerts"
    assert not app.warning, "no banner while the broker answers"
    table = app.dataframe[0].value
    assert set(table["user_id"]) == {"u-velocity", "u-high", "u-normal", "u-kafka-only"}
    assert table["alert_id"].is_unique, "a replayed alert is shown once"
    assert list(table["detected_at"]) == sorted(table["detected_at"], reverse=True)
    metrics = metric_values(app)
    assert metrics["Latency p95"] == "1.50 s"
    assert metrics["Transactions/s in"] != "n/a"

    versions = dict(zip(table["user_id"], table["rule_version"], strict=True))
    assert (versions["u-velocity"], versions["u-kafka-only"]) == (1, 3)
    assert versions["u-normal"] is pd.NA, "an alert from before rule versions has none"

    app.text_input(key="live.user").set_value("u-high").run()
    assert table_users(app) == {"u-high"}
    app.text_input(key="live.user").set_value("").run()
    app.multiselect(key="live.rules").set_value([VELOCITY]).run()
    assert table_users(app) == {"u-velocity", "u-normal"}


def test_live_page_shows_the_evidence_of_a_selected_alert(reachable: AppTest) -> None:
    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    picker = app.selectbox(key="live.alert")
    assert picker.value is None
    picker.set_value(PARQUET_ALERTS[0]["alert_id"]).run()
    assert not app.exception
    shown = json.loads(app.json[0].value)
    assert (shown["user_id"], shown["rule"], shown["rule_version"]) == ("u-velocity", VELOCITY, 1)
    evidence = app.dataframe[1].value
    assert list(evidence["transaction_id"]) == ["v0", "v1", "v2", "v3"]
    assert any("4 of 4 transactions" in t.value for t in app.text)


def test_overview_page_shows_kpis_and_every_chart(reachable: AppTest) -> None:
    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    app.switch_page("screens/overview.py")
    app = run_until(app, lambda a: "Alerts: ` high_value `" in metric_values(a))
    assert app.title[0].value == "Overview"
    metrics = metric_values(app)
    assert metrics["DLQ rows"] == "2"
    assert metrics["Late rows"] == "8"
    assert metrics["Alerts: ` velocity `"] == "2"
    assert metrics["Alerts: ` high_value `"] == "2"  # one in Parquet, one only in Kafka
    plotly = app.get("plotly_chart")
    charts = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in plotly]
    assert charts == ["Alerts over time, by rule", "Top flagged users", "Alert locations",
                      "Alerts by rule (all history)",
                      "Amount distribution: flagged vs all transactions",
                      "Event -> alert latency per batch"]
    # The map's world outline comes from the app's static folder, not a CDN.
    assert json.loads(plotly[2].proto.config)["topojsonURL"] == "app/static/"


def test_quality_page_matches_the_cli_numbers(reachable: AppTest, history: Path) -> None:
    reachable.run()
    reachable.switch_page("screens/quality.py").run()
    assert not reachable.exception
    shown = reachable.dataframe[0].value.set_index("rule")
    expected = load_report(history, {VELOCITY: 60.0, MULTI_LOCATION: 120.0, "paypal_micro": 240.0})
    for rule in expected.index:
        assert shown.loc[rule, "precision"] == format_ratio(expected.loc[rule, "precision"])
        assert shown.loc[rule, "recall"] == format_ratio(expected.loc[rule, "recall"])
    assert shown.loc[VELOCITY, "precision"] == "50.0%"  # one of two velocity alerts is real
    assert shown.loc[MULTI_LOCATION, "recall"] == "0.0%"  # over before the newest event - 120 s
    assert shown.loc[MULTI_LOCATION, "pending_episodes"] == 0
    assert shown.loc["paypal_micro", "precision"] == "n/a"


def test_topics_page_lists_topics_and_messages(reachable: AppTest) -> None:
    reachable.run()
    reachable.switch_page("screens/topics.py").run()
    assert not reachable.exception
    topics = set(reachable.dataframe[0].value["topic"])
    assert {"transactions", "fraud-alerts", "transactions-dlq"} <= topics
    assert reachable.selectbox(key="topics.topic").value == ALERTS_TOPIC
    bodies = [json.loads(j.value) for j in reachable.json]
    assert {"u-kafka-only", "u-velocity"} <= {b["user_id"] for b in bodies}


def test_unreachable_broker_shows_a_banner_and_the_history(
        app_env: Callable[[str], AppTest]) -> None:
    address = f"127.0.0.1:{free_port()}"
    app = app_env(address)
    app.run()
    assert not app.exception
    banners = [w.value for w in app.warning]
    assert any("Kafka broker unreachable at" in b and address in b for b in banners), banners
    assert table_users(app) == {"u-velocity", "u-high", "u-normal"}
    app.switch_page("screens/topics.py").run()
    assert not app.exception
    assert any("Kafka broker unreachable at" in e.value for e in app.error)
    app.switch_page("screens/rules.py").run()
    assert not app.exception
    assert any("Cannot read the rules topic" in e.value and address in e.value
               for e in app.error)
    assert all(b.disabled for b in app.button if b.label.startswith("Publish"))


def test_every_page_renders_with_no_data_at_all(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("PARQUET_DIR", str(tmp_path / "missing"))
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not app.exception
    assert app.dataframe[0].value.empty
    assert metric_values(app)["Last batch"] == "n/a"
    for page in ("screens/review.py", "screens/overview.py", "screens/quality.py"):
        app.switch_page(page).run()
        assert not app.exception, page
    assert list(app.dataframe[0].value["precision"]) == ["n/a"] * 4
    assert list(app.dataframe[0].value["analyst_precision"]) == ["n/a"] * 4


def plotted(values: Any) -> list[Any]:
    """A trace's values from a plotly spec (plotly encodes numeric arrays as base64)."""
    if isinstance(values, dict) and "bdata" in values:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def test_quality_page_shows_precision_and_recall_per_hour(
        app_env: Callable[[str], AppTest], broker: EmbeddedBroker, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three hours of event time: a caught burst; a missed burst and a false alarm; a caught
    burst and a false alarm. Each hour is judged on its own."""
    hour = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

    def at(tid: str, user: str, moment: datetime, pattern: str | None = None
           ) -> dict[str, Any]:
        return transaction(tid, user, (NOW - moment).total_seconds(), 20.0, "Lyon", pattern)

    def burst(stem: str, user: str, first: datetime, pattern: str | None = VELOCITY
              ) -> list[dict[str, Any]]:
        return [at(f"{stem}{i}", user, first + timedelta(seconds=10 * i), pattern)
                for i in range(4)]

    caught = burst("a", "u-a", hour + timedelta(minutes=5))
    missed = burst("b", "u-b", hour + timedelta(hours=1, minutes=10))
    normal = burst("c", "u-c", hour + timedelta(hours=1, minutes=20), None)
    late_caught = burst("d", "u-d", hour + timedelta(hours=2, minutes=5))
    late_normal = burst("e", "u-e", hour + timedelta(hours=2, minutes=15), None)
    newest = at("z", "u-z", hour + timedelta(hours=2, minutes=50))
    txs = [*caught, *missed, *normal, *late_caught, *late_normal, newest]
    alerts = [make_alert(VELOCITY, evidence, 0)
              for evidence in (caught, normal, late_caught, late_normal)]
    write_batch(tmp_path, TRANSACTIONS_DATASET, 0, txs, TRANSACTIONS_SCHEMA)
    write_batch(tmp_path, ALERTS_DATASET, 0, alerts, ALERTS_SCHEMA)

    app = app_env(broker.bootstrap_servers)
    monkeypatch.setenv("PARQUET_DIR", str(tmp_path))
    app.run()
    app.switch_page("screens/quality.py").run()
    assert not app.exception, [e.value for e in app.exception]
    over_time = frame_with(app, "bucket", "rule", "recall")
    velocity = over_time[over_time["rule"] == VELOCITY].set_index("bucket")
    assert list(velocity.index) == [hour, hour + timedelta(hours=1), hour + timedelta(hours=2)]
    assert velocity["alerts"].tolist() == [1, 1, 2]
    assert velocity["precision"].tolist() == ["100.0%", "0.0%", "50.0%"]
    assert velocity["recall"].tolist() == ["100.0%", "0.0%", "100.0%"]
    high = over_time[over_time["rule"] == HIGH_VALUE]
    assert len(high) == 3 and set(high["precision"]) == {"n/a"}
    # The whole-history table beside it is unchanged: 2 of 4 alerts real, 2 of 3 bursts caught.
    overall = frame_with(app, "rule", "analyst_precision").set_index("rule")
    assert overall.loc[VELOCITY, ["precision", "recall"]].tolist() == ["50.0%", "66.7%"]

    # The chart: one panel per rule with a defined ratio, a precision and a recall line.
    figures = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    figure = next(f for f in figures
                  if f["layout"]["title"]["text"].startswith("Precision and recall over time"))
    lines = {trace["name"]: trace for trace in figure["data"]}
    assert set(lines) == {"precision", "recall"}
    assert plotted(lines["precision"]["y"]) == [1.0, 0.0, 0.5]
    assert plotted(lines["recall"]["y"]) == [1.0, 0.0, 1.0]
    panels = [a["text"] for a in figure["layout"]["annotations"]]
    assert panels == [VELOCITY]


# --- verdicts: review queue, live table and detail, quality -----------------------------------

ANALYST_ENV = "FRAUDSTREAM_ANALYST"


def give(url: str, alert: dict[str, Any], verdict: str, analyst: str = "Grace",
         note: str = "") -> None:
    """A verdict recorded straight into the database, as another dashboard or the console
    would."""
    with VerdictStore(url) as store:
        store.record(make_verdict(alert["alert_id"], verdict, analyst, note))


def stored(url: str) -> dict[str, RecordedVerdict]:
    with VerdictStore(url) as store:
        return store.latest()


def frame_with(app: AppTest, *columns: str) -> pd.DataFrame:
    """The page's table with these columns (st.dataframe keys are not visible to AppTest)."""
    return next(f.value for f in app.dataframe if set(columns) <= set(f.value.columns))


def open_review(app: AppTest) -> AppTest:
    """The review queue once the Kafka-only alert has reached the tail."""
    run_until(app, lambda a: "u-kafka-only" in table_users(a))
    app.switch_page("screens/review.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.title[0].value == "Review queue"
    return app


def queue(app: AppTest) -> pd.DataFrame:
    return frame_with(app, "verdict", "alert_id", "reason")


def under_review(app: AppTest) -> str:
    """The alert id of the verdict form on the page (one alert is reviewed at a time)."""
    keys = [r.key for r in app.radio if r.key and r.key.startswith("review.verdict.")]
    assert len(keys) == 1, keys
    return keys[0].removeprefix("review.verdict.")


def test_review_queue_lists_unreviewed_alerts_first(reachable: AppTest, verdicts_url: str
                                                    ) -> None:
    give(verdicts_url, PARQUET_ALERTS[1], "legit", note="known big spender")
    app = open_review(reachable)
    table = queue(app)
    assert list(table["verdict"]) == ["unreviewed"] * 3 + ["legit"]
    assert list(table["user_id"]) == ["u-kafka-only", "u-velocity", "u-normal", "u-high"], \
        "unreviewed first, newest first"
    assert table.loc[3, "analyst"] == "Grace"
    assert under_review(app) == KAFKA_ONLY["alert_id"]
    assert any(t.value.startswith("Rule") and "Evidence" in t.value and "k1" in t.value
               and "5,000.00" in t.value for t in app.text), [t.value for t in app.text]

    app.multiselect(key="review.rules").set_value([VELOCITY]).run()
    assert list(queue(app)["user_id"]) == ["u-velocity", "u-normal"]
    app.multiselect(key="review.rules").set_value([]).run()
    app.multiselect(key="review.verdicts").set_value(["legit"]).run()
    assert list(queue(app)["user_id"]) == ["u-high"]
    app.multiselect(key="review.verdicts").set_value([]).run()
    app.multiselect(key="review.analysts").set_value(["Grace"]).run()
    assert list(queue(app)["user_id"]) == ["u-high"]


def test_recording_a_verdict_from_the_queue_moves_on_to_the_next(
        reachable: AppTest, verdicts_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ANALYST_ENV, "Ada")
    app = open_review(reachable)
    app.multiselect(key="review.verdicts").set_value(["unreviewed"]).run()
    first = KAFKA_ONLY["alert_id"]
    assert under_review(app) == first
    assert not app.button(key=f"review.submit.{first}").disabled

    # Submitting without a verdict records nothing and keeps the note.
    app.text_input(key=f"review.note.{first}").set_value("card reported stolen")
    app.button(key=f"review.submit.{first}").click().run()
    assert any("Choose a verdict" in e.value for e in app.error)
    assert stored(verdicts_url) == {}
    assert under_review(app) == first

    app.radio(key=f"review.verdict.{first}").set_value("fraud")
    app.button(key=f"review.submit.{first}").click().run()
    assert not app.exception
    assert any("Recorded ` fraud `" in s.value for s in app.success), \
        [m.value for m in (*app.success, *app.warning, *app.error)]
    verdict = stored(verdicts_url)[first]
    assert (verdict.verdict, verdict.analyst, verdict.note) == ("fraud", "Ada",
                                                                "card reported stolen")
    assert first not in set(queue(app)["alert_id"]), "it left the unreviewed filter"
    # The next unreviewed alert, newest first: the high-value one (detected 190 s ago).
    assert under_review(app) == PARQUET_ALERTS[1]["alert_id"]

    app.multiselect(key="review.verdicts").set_value(["fraud"]).run()
    assert list(queue(app)["alert_id"]) == [first]


def test_live_table_shows_verdicts_and_the_detail_records_one(
        reachable: AppTest, verdicts_url: str) -> None:
    give(verdicts_url, PARQUET_ALERTS[0], "fraud", note="customer confirmed")
    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    table = app.dataframe[0].value
    verdicts = dict(zip(table["user_id"], table["verdict"], strict=True))
    assert verdicts == {"u-velocity": "fraud", "u-high": "unreviewed",
                        "u-normal": "unreviewed", "u-kafka-only": "unreviewed"}

    alert = PARQUET_ALERTS[0]["alert_id"]
    app.selectbox(key="live.alert").set_value(alert).run()
    texts = [t.value for t in app.text]
    assert any(t.startswith("Current verdict: fraud by Grace") and "customer confirmed" in t
               for t in texts), texts
    assert list(frame_with(app, "analyst", "note")["verdict"]) == ["fraud"]
    assert all(app.button(key=f"live.decide.{alert}.{v}").disabled
               for v in ("fraud", "legit", "unsure")), "no analyst name yet"
    assert any("Enter your name as Analyst" in i.value for i in app.info)

    app.sidebar.text_input(key=ANALYST_KEY).set_value("Ada").run()
    app.text_input(key=f"live.note.{alert}").set_value("refund was a test")
    app.button(key=f"live.decide.{alert}.legit").click().run()
    assert not app.exception
    assert any("Recorded ` legit `" in s.value for s in app.success)
    assert stored(verdicts_url)[alert].analyst == "Ada"
    trail = frame_with(app, "analyst", "note")
    assert list(trail["verdict"]) == ["fraud", "legit"]
    assert list(trail["analyst"]) == ["Grace", "Ada"]
    table = app.dataframe[0].value.set_index("user_id")
    assert table.loc["u-velocity", "verdict"] == "legit", "the newest verdict counts"


def test_unreachable_verdict_database_is_read_only_and_pages_still_work(
        reachable: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERDICTS_URL", "postgresql+psycopg://u@127.0.0.1:1/x")
    monkeypatch.setenv(ANALYST_ENV, "Ada")

    def read_only(app: AppTest) -> bool:
        return any(w.value.startswith("Verdicts are read-only:") and "127.0.0.1:1" in w.value
                   for w in app.warning)

    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    assert read_only(app), [w.value for w in app.warning]
    table = app.dataframe[0].value
    assert len(table) == 4 and table["verdict"].isna().all(), "unknown, not unreviewed"
    alert = PARQUET_ALERTS[0]["alert_id"]
    app.selectbox(key="live.alert").set_value(alert).run()
    assert not app.exception
    assert app.button(key=f"live.decide.{alert}.fraud").disabled

    app.switch_page("screens/review.py").run()
    assert not app.exception
    assert read_only(app)
    assert len(queue(app)) == 4
    assert app.button(key=f"review.submit.{under_review(app)}").disabled

    app.switch_page("screens/quality.py").run()
    assert not app.exception
    assert read_only(app)
    shown = app.dataframe[0].value.set_index("rule")
    assert shown.loc[VELOCITY, "precision"] == "50.0%", "the label-based figures stay"
    assert shown.loc[VELOCITY, "analyst_precision"] == "n/a"


def test_quality_page_shows_analyst_precision_per_rule(reachable: AppTest, verdicts_url: str
                                                       ) -> None:
    give(verdicts_url, PARQUET_ALERTS[0], "fraud")
    give(verdicts_url, PARQUET_ALERTS[2], "legit")
    give(verdicts_url, PARQUET_ALERTS[1], "unsure")
    give(verdicts_url, KAFKA_ONLY, "fraud")  # not in the Parquet history: not counted yet
    reachable.run()
    reachable.switch_page("screens/quality.py").run()
    assert not reachable.exception
    assert not reachable.warning
    shown = reachable.dataframe[0].value.set_index("rule")
    columns = ["reviewed", "confirmed_fraud", "analyst_precision"]
    assert shown.loc[VELOCITY, columns].tolist() == [2, 1, "50.0%"]
    assert shown.loc[HIGH_VALUE, columns].tolist() == [1, 0, "0.0%"]
    assert shown.loc[MULTI_LOCATION, columns].tolist() == [0, 0, "n/a"]
    assert shown.loc[VELOCITY, "precision"] == "50.0%", "the label-based figure beside it"
    assert any("Not counted yet: 1 verdict(s)" in c.value for c in reachable.caption)


# --- rules page --------------------------------------------------------------------------------

ANALYST = "Ada Analyst"
HORIZON_US = 600 * MICROS  # RETENTION_SECONDS' default, which the page and the topic fold use


@dataclass
class RulesPage:
    app: AppTest
    topic: RulesTopic

    def run(self) -> RulesPage:
        self.app.run()
        assert not self.app.exception, [e.value for e in self.app.exception]
        return self

    def frame(self, column: str) -> pd.DataFrame:
        """The page's table with this column (st.dataframe keys are not visible to AppTest)."""
        return next(f.value for f in self.app.dataframe if column in f.value.columns)

    def table(self) -> pd.DataFrame:
        """The rules in force."""
        return self.frame("summary").set_index("rule_id")

    def history(self, rule_id: str) -> pd.DataFrame:
        """The history table in the rule's own section."""
        section = next(e for e in self.app.expander if e.label.split(" · ")[0] == rule_id)
        return section.dataframe[0].value

    def state(self) -> dict[str, RuleDefinition]:
        return dict(self.topic.state(HORIZON_US)[0].rules)


@pytest.fixture
def rules_topic(unique_topics: dict[str, str]) -> RulesTopic:
    """This test's rules topic, holding the four default rules as version 1."""
    topic = RulesTopic({"bootstrap.servers": unique_topics["KAFKA_BOOTSTRAP_SERVERS"]},
                       unique_topics["RULES_TOPIC"])
    for definition in default_definitions():
        topic.publish(definition)
    return topic


@pytest.fixture
def rules_page(monkeypatch: pytest.MonkeyPatch, unique_topics: dict[str, str],
               rules_topic: RulesTopic, tmp_path: Path) -> Callable[..., RulesPage]:
    """Opens the Rules page on this test's topics, with a Parquet folder of its own for the
    detector's log of rule changes (``rule_changes/``), or ``parquet_dir``."""
    def open_page(analyst: str | None = ANALYST, parquet_dir: Path | None = None) -> RulesPage:
        for name, value in unique_topics.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PARQUET_DIR", str(parquet_dir or tmp_path))
        monkeypatch.delenv("RETENTION_SECONDS", raising=False)
        monkeypatch.delenv("FRAUDSTREAM_DASHBOARD_ARGS", raising=False)
        if analyst is None:
            monkeypatch.delenv("FRAUDSTREAM_ANALYST", raising=False)
        else:
            monkeypatch.setenv("FRAUDSTREAM_ANALYST", analyst)
        app = AppTest.from_file(str(APP), default_timeout=60)
        app.run()
        return RulesPage(app.switch_page("screens/rules.py"), rules_topic).run()
    return open_page


def test_rules_page_lists_the_four_defaults(rules_page: Callable[..., RulesPage]) -> None:
    page = rules_page()
    assert page.app.title[0].value == "Rules"
    table = page.table()
    assert sorted(table.index) == sorted(d.rule_id for d in default_definitions())
    assert set(table["version"]) == {1} and table["enabled"].all()
    assert set(table["updated_by"]) == {DEFAULTS_AUTHOR}
    assert table.loc[VELOCITY, "summary"] == "more than 3 transactions within 60 s"
    # An edit form per rule, its inputs holding the version in force.
    assert page.app.number_input(key="rules.edit.velocity.1.count").value == 3
    assert page.app.number_input(key="rules.edit.velocity.1.window_seconds").value == 60.0
    assert page.app.number_input(key="rules.edit.high_value.1.amount").value == 3500.0
    assert page.app.session_state[ANALYST_KEY] == ANALYST
    assert any(t.value.startswith("None: every record") for t in page.app.text), \
        "no refused definitions"
    assert not page.app.error


def test_editing_velocity_count_publishes_version_2(rules_page: Callable[..., RulesPage]
                                                    ) -> None:
    page = rules_page()
    page.app.number_input(key="rules.edit.velocity.1.count").set_value(5)
    page.app.button(key="rules.publish.velocity").click()
    page.run()
    assert any("Published velocity version 2" in s.value for s in page.app.success), \
        [s.value for s in page.app.success]
    assert not page.app.error
    assert page.table().loc[VELOCITY, "version"] == 2
    assert page.app.number_input(key="rules.edit.velocity.2.count").value == 5

    published = page.state()[VELOCITY]
    assert (published.version, published.updated_by) == (2, ANALYST)
    assert dict(published.params) == {"count": 5, "window_seconds": 60.0}
    assert published.enabled
    assert all(page.state()[rule].version == 1 for rule in (HIGH_VALUE, MULTI_LOCATION))

    history = page.history(VELOCITY)
    newest = history.iloc[0]
    assert (newest["status"], newest["version"], newest["updated_by"]) == \
        ("applied", "v1 → v2", ANALYST)
    assert (newest["old_params"], newest["new_params"]) == \
        ("count=3, window_seconds=60", "count=5, window_seconds=60")


def test_a_window_beyond_the_horizon_is_refused_and_nothing_is_published(
        rules_page: Callable[..., RulesPage]) -> None:
    page = rules_page()
    before = len(page.topic.read())
    page.app.number_input(key="rules.edit.velocity.1.window_seconds").set_value(900.0)
    page.app.button(key="rules.publish.velocity").click()
    page.run()
    errors = [e.value for e in page.app.error]
    assert any("Refused, nothing published" in e and "exceeds the retention horizon of 600 s"
               in e for e in errors), errors
    assert not page.app.success
    assert len(page.topic.read()) == before, "nothing was published"
    assert page.state()[VELOCITY].version == 1
    assert page.table().loc[VELOCITY, "version"] == 1


def test_refused_records_are_listed_with_their_reason(
        rules_page: Callable[..., RulesPage], rules_topic: RulesTopic, tmp_path: Path) -> None:
    """From the topic (folded here) and from the detector's log, which keeps a refusal the
    compacted topic may have lost."""
    too_long = {**default_definitions()[1].to_dict(), "rule_id": "velocity_long",
                "params": {"count": 3, "window_seconds": 900}}
    rules_topic.publish_raw(VELOCITY, b"{not json")
    rules_topic.publish_raw("velocity_long", json.dumps(too_long).encode())
    logged = {"rule_id": "velocity_old", "status": "refused", "reason": "stale version 1",
              "version": 1, "kind": VELOCITY, "enabled": True,
              "params": json.dumps({"count": 3, "window_seconds": 60}), "previous_version": None,
              "previous_params": None, "updated_at": format_timestamp(NOW),
              "updated_by": "someone", "raw": None, "offset": 99, "applied_at": NOW}
    # The detector logged the bad JSON too (offset 4, after the four defaults): shown once.
    bad_json = {name: None for name in RULE_CHANGES_SCHEMA.names} | {
        "rule_id": VELOCITY, "status": "refused", "reason": "not valid JSON", "raw": "{not json",
        "offset": 4, "applied_at": NOW}
    write_batch(tmp_path, RULE_CHANGES_DATASET, 0, [logged, bad_json], RULE_CHANGES_SCHEMA)
    page = rules_page()
    refused = page.frame("raw")
    by_rule = refused.set_index("rule_id")
    assert by_rule.loc[VELOCITY, "reason"].startswith("not valid JSON")
    assert by_rule.loc[VELOCITY, "raw"] == "{not json"
    assert "exceeds the retention horizon of 600 s" in by_rule.loc["velocity_long", "reason"]
    assert by_rule.loc["velocity_old", "reason"] == "stale version 1"
    assert by_rule.loc["velocity_old", "seen_in"] == "detector log"
    assert by_rule.loc[VELOCITY, "seen_in"] == "topic + detector log"
    assert by_rule.loc["velocity_long", "seen_in"] == "topic"
    assert len(refused) == 3
    # Refusals change nothing: the defaults stay in force, and nothing else is.
    table = page.table()
    assert sorted(table.index) == sorted(d.rule_id for d in default_definitions())
    assert set(table["version"]) == {1}


def test_add_disable_and_delete_a_rule(rules_page: Callable[..., RulesPage]) -> None:
    page = rules_page()
    app = page.app
    app.selectbox(key="rules.add.kind").set_value(VELOCITY)
    page.run()
    app.text_input(key="rules.add.rule_id").set_value("velocity_10m")
    app.number_input(key="rules.add.velocity.count").set_value(10)
    app.number_input(key="rules.add.velocity.window_seconds").set_value(600.0)
    app.button(key="rules.add.submit").click()
    page.run()
    assert any("Published velocity_10m version 1" in s.value for s in app.success)
    added = page.state()["velocity_10m"]
    assert (added.kind, added.version, dict(added.params)) == \
        (VELOCITY, 1, {"count": 10, "window_seconds": 600.0})

    app.button(key="rules.toggle.velocity_10m").click()
    page.run()
    assert page.table().loc["velocity_10m", ["version", "enabled"]].tolist() == [2, False]
    assert not page.state()["velocity_10m"].enabled

    app.button(key="rules.delete.velocity_10m").click()
    page.run()
    assert "velocity_10m" in page.state(), "asking is not deleting"
    assert any("Delete rule" in w.value for w in app.warning)
    app.button(key="rules.delete.confirm.velocity_10m").click()
    page.run()
    assert "velocity_10m" not in page.state()
    assert "velocity_10m" not in page.table().index
    assert any("Deleted velocity_10m" in s.value for s in app.success)


def test_publishing_needs_an_analyst_name(rules_page: Callable[..., RulesPage]) -> None:
    page = rules_page(analyst=None)
    assert page.app.button(key="rules.publish.velocity").disabled
    assert any("Enter your name" in i.value for i in page.app.info)

    # The name typed in the sidebar is kept across page switches and goes on the change.
    app = AppTest.from_file(str(APP), default_timeout=60).run()
    app.sidebar.text_input(key=ANALYST_KEY).set_value("Grace").run()
    page = RulesPage(app.switch_page("screens/rules.py"), page.topic).run()
    assert not app.button(key="rules.publish.velocity").disabled
    app.button(key="rules.toggle.paypal_micro").click()
    page.run()
    assert any("Published paypal_micro version 2 (disabled)" in s.value for s in app.success)
    assert page.state()[PAYPAL_MICRO].updated_by == "Grace"


# --- backtesting from the rules page --------------------------------------------------------------

BACKTEST_EPOCH = "20261122T100000Z-aaaaaa"
#: The candidate: velocity counts more than 5 transactions in 60 s instead of more than 3.
VELOCITY_5 = {"count": 5, "window_seconds": 60.0}


def write_epoch(root: Path, dataset: str, rows: list[dict[str, Any]], schema: pa.Schema
                ) -> None:
    """One batch of an epoch, as the detector lays out bronze and alerts."""
    folder = root / dataset / f"epoch={BACKTEST_EPOCH}" / "batch_id=0"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")


def oracle_alerts(txs: list[dict[str, Any]], definitions: list[RuleDefinition]
                  ) -> list[dict[str, Any]]:
    """The alerts the rules must raise (the plain-Python oracle), as alert rows."""
    from fraudstream.rules.oracle import expected_alerts

    by_id = {t["transaction_id"]: t for t in txs}
    rows = []
    for alert in expected_alerts([{**t, "timestamp": t["event_time"]} for t in txs],
                                 definitions):
        evidence = [by_id[i] for i in alert["transaction_ids"]]
        rows.append({**make_alert(alert["rule"], evidence, 0, alert["rule_version"]),
                     "detected_at": evidence[-1]["event_time"] + timedelta(seconds=1)})
        assert rows[-1]["alert_id"] == alert["alert_id"]
    return rows


@pytest.fixture(scope="module")
def backtest_history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bronze transactions of the last hours and the alerts the live detector raised on them
    under the default rules; and what the oracle says velocity with count 5 raises instead."""
    root = tmp_path_factory.mktemp("backtest-parquet")
    start = 7200.0  # two hours before NOW
    txs = [
        # Four transactions in 30 s: velocity (more than 3 in 60 s) fires; count 5 does not.
        *[transaction(f"ba{i}", "u-four", start - i * 10, 15.0 + i, "Lyon", VELOCITY)
          for i in range(4)],
        # Seven in 45 s: both fire, on different evidence (removed and added).
        *[transaction(f"bb{i}", "u-seven", start - 1800 - i * 7.5, 12.0 + i, "Nice", VELOCITY)
          for i in range(7)],
        # A big purchase: high_value fires under both rule sets (unchanged).
        transaction("bh1", "u-big", start - 3600, 4200.0, "Paris", HIGH_VALUE),
        # Normal traffic, the newest transaction of the history.
        *[transaction(f"bn{i}", "u-calm", start - 4200 - i * 400, 40.0, "Rome")
          for i in range(3)],
    ]
    defaults = default_definitions()
    live = oracle_alerts(txs, defaults)
    candidate = [d.changed(version=2, updated_by="test", params=VELOCITY_5)
                 if d.rule_id == VELOCITY else d for d in defaults]
    backtested = oracle_alerts(txs, candidate)
    write_epoch(root, TRANSACTIONS_DATASET, txs, TRANSACTIONS_SCHEMA)
    write_epoch(root, ALERTS_DATASET, live, ALERTS_SCHEMA)

    def ids(alerts: list[dict[str, Any]], rule: str) -> set[str]:
        return {a["alert_id"] for a in alerts if a["rule"] == rule}

    added = ids(backtested, VELOCITY) - ids(live, VELOCITY)
    removed = ids(live, VELOCITY) - ids(backtested, VELOCITY)
    assert added and removed, "the history should show both kinds of change"
    return {"root": root, "transactions": txs, "live": live, "backtested": backtested,
            "ids": ids, "added": added, "removed": removed}


def backtest_running(app: AppTest) -> bool:
    return any("Backtesting" in i.value for i in app.info)


def wait_for_backtest(page: RulesPage, timeout: float = 420.0) -> None:
    """Rerun the page until the backtest subprocess ended (it starts a Spark session)."""
    run_until(page.app, lambda a: not backtest_running(a), timeout=timeout)
    assert not backtest_running(page.app), "the backtest did not finish in time"


def test_backtest_a_velocity_change_then_publish_it(
        rules_page: Callable[..., RulesPage], backtest_history: dict[str, Any]) -> None:
    history = backtest_history
    page = rules_page(parquet_dir=history["root"])
    app = page.app
    assert app.number_input(key="rules.backtest.hours.velocity").value == 24
    app.number_input(key="rules.edit.velocity.1.count").set_value(5)
    app.button(key="rules.backtest.start.velocity").click()
    page.run()
    assert backtest_running(app), [m.value for m in (*app.info, *app.error)]
    assert any("version 2" in i.value for i in app.info)
    assert page.state()[VELOCITY].version == 1, "a backtest publishes nothing"
    wait_for_backtest(page)
    assert not app.error, [(e.value, [t.value for t in app.text]) for e in app.error]
    assert any("Backtest of" in s.value and "velocity v2" in s.value for s in app.success), \
        [s.value for s in app.success]

    # Per rule: the backtest's alerts and the difference with the live alerts (the oracle's).
    ids, live, backtested = history["ids"], history["live"], history["backtested"]
    table = page.frame("live_alerts").set_index("rule")
    for rule in (VELOCITY, HIGH_VALUE, MULTI_LOCATION, PAYPAL_MICRO):
        assert table.loc[rule, ["alerts", "live_alerts", "added", "removed"]].tolist() == [
            len(ids(backtested, rule)), len(ids(live, rule)),
            len(ids(backtested, rule) - ids(live, rule)),
            len(ids(live, rule) - ids(backtested, rule))], rule
    assert table.loc[VELOCITY, "version"] == "v2" and table.loc[HIGH_VALUE, "version"] == "v1"
    assert table.loc[VELOCITY, "precision"] == "100.0%"  # every burst is labelled
    assert table.loc[HIGH_VALUE, ["added", "removed"]].tolist() == [0, 0]
    metrics = metric_values(app)
    assert (metrics["Added"], metrics["Removed"]) == \
        (f"+{len(history['added'])}", f"-{len(history['removed'])}")

    # The added and removed alerts themselves, and the evidence of one.
    changes = page.frame("change")
    assert set(changes.loc[changes["change"] == "added", "alert_id"]) == history["added"]
    assert set(changes.loc[changes["change"] == "removed", "alert_id"]) == history["removed"]
    picker = next(s for s in app.selectbox if s.label == "Evidence of")
    picker.set_value(0).run()
    assert not app.exception
    shown = json.loads(app.json[0].value)
    expected = next(a for a in [*backtested, *live] if a["alert_id"] == shown["alert_id"])
    assert (shown["rule"], shown["user_id"]) == (VELOCITY, expected["user_id"])
    found = frame_with(app, "transaction_id", "payment_method")
    assert list(found["transaction_id"]) == expected["transaction_ids"]
    assert any(t.value.startswith(f"Evidence: {len(expected['transaction_ids'])} of") for t in
               app.text)

    # Publish the backtested definition: the same path as the form, version 2 on the topic.
    app.button(key="rules.backtest.publish").click()
    page.run()
    assert any("Published velocity version 2" in s.value for s in app.success), \
        [m.value for m in (*app.success, *app.error)]
    published = page.state()[VELOCITY]
    assert (published.version, published.updated_by) == (2, ANALYST)
    assert dict(published.params) == VELOCITY_5
    assert page.table().loc[VELOCITY, "version"] == 2
    assert not any(b.key == "rules.backtest.publish" for b in app.button), "results are gone"


def test_a_backtest_that_fails_shows_its_message(rules_page: Callable[..., RulesPage],
                                                 tmp_path: Path) -> None:
    page = rules_page(parquet_dir=tmp_path / "empty")
    page.app.selectbox(key="rules.add.kind").set_value(VELOCITY)
    page.run()
    page.app.text_input(key="rules.add.rule_id").set_value("velocity_10m")
    page.app.number_input(key="rules.add.velocity.window_seconds").set_value(600.0)
    page.app.button(key="rules.backtest.start.add").click()
    page.run()
    wait_for_backtest(page, timeout=120.0)
    assert any(e.value.startswith("Backtest failed") for e in page.app.error)
    texts = [t.value for t in page.app.text]
    assert any("no transaction history under" in t and "exit status 2" in t for t in texts), texts
    assert not any("Traceback" in t for t in texts)
    assert "velocity_10m" not in page.state(), "nothing published"
    page.app.button(key="rules.backtest.dismiss").click()
    page.run()
    assert not any(e.value.startswith("Backtest failed") for e in page.app.error)


def test_a_running_backtest_can_be_cancelled(rules_page: Callable[..., RulesPage],
                                             backtest_history: dict[str, Any]) -> None:
    page = rules_page(parquet_dir=backtest_history["root"])
    page.app.button(key="rules.backtest.start.high_value").click()
    page.run()
    assert backtest_running(page.app)
    run = page.app.session_state["rules.backtest"]
    page.app.button(key="rules.backtest.cancel").click()
    page.run()
    assert run.process.poll() is not None, "the subprocess was stopped"
    assert any("Backtest cancelled" in i.value for i in page.app.info)
    assert page.state()[HIGH_VALUE].version == 1
    page.app.button(key="rules.backtest.dismiss").click()
    page.run()
    assert not run.folder.exists(), "its files are removed"


# --- the model: risk scores, the queue's order, the model's status and figures ------------------

MODEL_LINE = "model 20261202T061500Z (gbt, hold-out AUC 0.951)"
ML_SCORE = "ml_score"
#: How alerts were written before the model: the unscored alert is in such a file.
PRE_MODEL_SCHEMA = pa.schema([f for f in ALERTS_SCHEMA
                              if f.name not in ("risk_score", "score_reasons")])


def scored(alert: dict[str, Any], score: float, *reasons: str) -> dict[str, Any]:
    return {**alert, "risk_score": score, "score_reasons": list(reasons)}


# Five alerts; newest first: C, A, E, B, D. By risk score: D, B, A, E, then C (none).
SCORED_A_TX = transaction("sa1", "u-score-a", 120, 4100.0, "Paris", HIGH_VALUE)
SCORED_B_TXS = [transaction(f"sb{i}", "u-score-b", 260 - i * 10, 15.0, "Lyon", VELOCITY)
                for i in range(4)]
SCORED_C_TX = transaction("sc1", "u-score-c", 70, 3900.0, "Nice")
SCORED_D_TX = transaction("sd1", "u-score-d", 320, 80.0, "Oslo")
SCORED_E_TXS = [transaction(f"se{i}", "u-score-e", 200 - i * 10, 30.0, "Rome") for i in range(4)]
SCORED_A = scored(make_alert(HIGH_VALUE, [SCORED_A_TX], 100), 0.42, "amount 4100.00 (+0.20)")
SCORED_B = scored(make_alert(VELOCITY, SCORED_B_TXS, 200), 0.93,
                  "transactions in 1 min 4 (+0.41)", "new location (+0.12)")
UNSCORED_C = make_alert(HIGH_VALUE, [SCORED_C_TX], 50)
SCORED_D = scored(make_alert(ML_SCORE, [SCORED_D_TX], 300), 0.97,
                  "amount vs the user's median 9.5x (+0.55)")
SCORED_E = scored(make_alert(VELOCITY, SCORED_E_TXS, 150), 0.07,
                  "transactions in 1 min 4 (+0.02)")
NEWEST_FIRST = ["u-score-c", "u-score-a", "u-score-e", "u-score-b", "u-score-d"]
BY_RISK = ["u-score-d", "u-score-b", "u-score-a", "u-score-e", "u-score-c"]

#: The newest model version's metrics.json, as the trainer writes it.
HOLDOUT_METRICS: dict[str, Any] = {
    "version": "20261202T061500Z", "algorithm": "gbt",
    "trained_at": "2026-12-02T06:15:00.000Z", "training_seconds": 84.2,
    "data": {"from": "2026-11-30T00:00:00.000Z", "to": "2026-12-02T06:00:00.000Z",
             "transactions": 250_000, "labelled": 250_000, "train_rows": 200_000,
             "holdout_rows": 50_000, "holdout_from": "2026-12-01T20:00:00.000Z",
             "fraud_share_train": 0.021, "fraud_share_holdout": 0.019,
             "labels_from_verdicts": 12},
    "auc": 0.951, "precision_at_recall_0_9": 0.812, "threshold_at_recall_0_9": 0.42,
    "candidates": {"gbt": {"auc": 0.951, "precision_at_recall_0_9": 0.812},
                   "logistic_regression": {"auc": 0.903, "precision_at_recall_0_9": 0.55}},
    "rules": {"precision": 0.70, "recall": 0.835,
              "per_rule": {VELOCITY: {"precision": 0.68, "recall": 0.84, "flagged": 1200},
                           HIGH_VALUE: {"precision": 0.75, "recall": 0.81, "flagged": 300}}},
    "comparison": {
        "recall": 0.835,
        "rules_alone": {"precision": 0.70, "recall": 0.835},
        "model_alone": {"precision": 0.874, "recall": 0.836, "threshold": 0.53},
        "rules_plus_model": {"precision": 0.912, "recall": 0.838, "veto_threshold": 0.05,
                             "add_threshold": 0.93},
    },
    "score_histogram": {"edges": [round(i / 20, 2) for i in range(21)],
                        "fraud": [0] * 15 + [5, 10, 15, 20, 50],
                        "legit": [600, 200, 100, 50, 25, 10, 5, 4, 3, 2, 1] + [0] * 9},
}


def write_version(models: Path, name: str, metrics: dict[str, Any] | None,
                  complete: bool = True) -> None:
    """One model version folder: metrics.json, and model.json last unless still being written
    (its content does not matter to the dashboard)."""
    folder = models / name
    folder.mkdir(parents=True)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if complete:
        (folder / "model.json").write_text("{}")


@pytest.fixture(scope="module")
def scored_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scored-parquet")
    txs = [SCORED_A_TX, *SCORED_B_TXS, SCORED_C_TX, SCORED_D_TX, *SCORED_E_TXS]
    write_batch(root, TRANSACTIONS_DATASET, 0, txs, TRANSACTIONS_SCHEMA)
    write_batch(root, ALERTS_DATASET, 0, [UNSCORED_C], PRE_MODEL_SCHEMA)
    write_batch(root, ALERTS_DATASET, 1, [SCORED_A, SCORED_B, SCORED_D, SCORED_E], ALERTS_SCHEMA)
    metrics = root / METRICS_FOLDER / METRICS_FILE_NAME
    metrics.parent.mkdir(parents=True)
    lines = [{"batch_id": i, "written_at": format_timestamp(NOW - timedelta(seconds=30 - 10 * i)),
              "input_rows": 10, "valid_rows": 10, "dlq_rows": 0, "late_rows": 0, "alerts": {},
              "model": None if i == 0 else MODEL_LINE} for i in range(3)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An older version, the newest complete one, one still being written, a hidden one."""
    models = tmp_path_factory.mktemp("models")
    write_version(models, "20261201T000000Z", {"version": "20261201T000000Z",
                                               "algorithm": "logistic_regression", "auc": 0.88})
    write_version(models, "20261202T061500Z", HOLDOUT_METRICS)
    write_version(models, "20261203T000000Z", {"version": "20261203T000000Z"}, complete=False)
    write_version(models, ".20261204T000000Z", {"version": "hidden"})
    return models


@pytest.fixture
def scored_app(monkeypatch: pytest.MonkeyPatch, unique_topics: dict[str, str],
               scored_history: Path, models_dir: Path) -> Callable[..., AppTest]:
    """The app over the scored history, an empty alerts topic of the test's own, and
    ``models`` (default: the model versions above) as MODELS_DIR."""
    def make(models: Path | None = None) -> AppTest:
        for name, value in unique_topics.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PARQUET_DIR", str(scored_history))
        monkeypatch.setenv("MODELS_DIR", str(models or models_dir))
        monkeypatch.delenv("FRAUDSTREAM_DASHBOARD_ARGS", raising=False)
        app = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not app.exception, [e.value for e in app.exception]
        return app
    return make


def figure_titled(app: AppTest, prefix: str) -> dict[str, Any] | None:
    figures = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    return next((f for f in figures if f["layout"]["title"]["text"].startswith(prefix)), None)


def bars(figure: dict[str, Any], y: str = "y") -> dict[str, list[tuple[str, Any]]]:
    """Each trace of a bar chart as name -> [(x, y)]."""
    return {trace["name"]: list(zip(trace["x"], plotted(trace[y]), strict=True))
            for trace in figure["data"]}


def test_live_page_shows_risk_scores_their_reasons_and_distribution(
        scored_app: Callable[..., AppTest]) -> None:
    app = scored_app()
    table = app.dataframe[0].value
    assert list(table["user_id"]) == NEWEST_FIRST
    assert str(table["risk_score"].dtype) == "Float64", "numbers: the column sorts"
    risks = dict(zip(table["user_id"], table["risk_score"], strict=True))
    assert risks["u-score-b"] == pytest.approx(0.93) and risks["u-score-e"] == pytest.approx(0.07)
    assert risks["u-score-c"] is pd.NA, "no score: an empty cell, not 0"
    assert json.loads(app.dataframe[0].proto.columns)["risk_score"]["type_config"] == \
        {"type": "number", "format": "%.2f"}
    assert app.dataframe[0].proto.placeholder == ""

    figure = figure_titled(app, "Risk score of the alerts in view, by rule")
    assert figure is not None
    assert bars(figure) == {HIGH_VALUE: [("0.40-0.45", 1)],
                            VELOCITY: [("0.05-0.10", 1), ("0.90-0.95", 1)],
                            ML_SCORE: [("0.95-1.00", 1)]}
    assert any(c.value.startswith("4 of 5 alerts in view carry a risk score; 1 was raised")
               for c in app.caption)
    assert not any(i.value == NO_SCORES for i in app.info)

    # The filters reach the chart: high_value alone is one scored alert and one without.
    app.multiselect(key="live.rules").set_value([HIGH_VALUE]).run()
    assert bars(figure_titled(app, "Risk score") or {}) == {HIGH_VALUE: [("0.40-0.45", 1)]}
    app.multiselect(key="live.rules").set_value([]).run()

    # The detail: the score and the features that raised it most, above the evidence.
    app.selectbox(key="live.alert").set_value(SCORED_B["alert_id"]).run()
    assert not app.exception
    texts = [t.value for t in app.text]
    assert "Risk score: 0.93 (the model's fraud probability of the transaction that fired the " \
           "rule)\nTop reasons:\n  transactions in 1 min 4 (+0.41)\n  new location (+0.12)" \
        in texts, texts
    shown = json.loads(app.json[0].value)
    assert (shown["risk_score"], shown["score_reasons"]) == (0.93, SCORED_B["score_reasons"])
    app.selectbox(key="live.alert").set_value(UNSCORED_C["alert_id"]).run()
    assert "Risk score: none (no model was loaded when this alert was raised)" in \
        [t.value for t in app.text]
    shown = json.loads(app.json[0].value)
    assert (shown["risk_score"], shown["score_reasons"]) == (None, None)


def test_live_page_without_scores_says_no_model_is_loaded(reachable: AppTest) -> None:
    app = run_until(reachable, lambda a: "u-kafka-only" in table_users(a))
    assert [i.value for i in app.info if i.value.startswith("No risk scores")] == [NO_SCORES]
    assert NO_SCORES == ("No risk scores yet: no model is loaded (train one with "
                         "python -m spark_job.train)")
    assert figure_titled(app, "Risk score") is None
    assert app.dataframe[0].value["risk_score"].isna().all()


def test_score_distribution_splits_by_verdict_once_alerts_have_one(
        scored_app: Callable[..., AppTest], verdicts_url: str) -> None:
    give(verdicts_url, SCORED_E, "legit")
    give(verdicts_url, SCORED_B, "fraud")
    app = scored_app()
    figure = figure_titled(app, "Risk score of the alerts in view, by verdict")
    assert figure is not None
    assert bars(figure) == {"legit": [("0.05-0.10", 1)], "fraud": [("0.90-0.95", 1)],
                            "unreviewed": [("0.40-0.45", 1), ("0.95-1.00", 1)]}


def test_review_queue_is_newest_first_until_a_verdict_exists(
        scored_app: Callable[..., AppTest], verdicts_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ANALYST_ENV, "Ada")
    app = scored_app()
    app.switch_page("screens/review.py").run()
    assert not app.exception, [e.value for e in app.exception]
    table = queue(app)
    assert list(table["user_id"]) == NEWEST_FIRST
    assert table.set_index("user_id")["risk_score"].isna().to_dict() == {
        user: user == "u-score-c" for user in NEWEST_FIRST}
    texts = [t.value for t in app.text]
    assert any(t.startswith("Order: unreviewed first, then newest first") for t in texts), texts
    newest = UNSCORED_C["alert_id"]
    assert under_review(app) == newest
    assert "Risk score: none (no model was loaded when this alert was raised)" in texts

    # The first verdict: from now on the queue is ordered by risk, and the alert that comes
    # up is the highest-scored unreviewed one (not the next newest).
    app.radio(key=f"review.verdict.{newest}").set_value("legit")
    app.button(key=f"review.submit.{newest}").click().run()
    assert not app.exception
    assert set(stored(verdicts_url)) == {newest}
    table = queue(app)
    assert list(table["user_id"]) == [*BY_RISK[:4], "u-score-c"]
    assert list(table["verdict"]) == ["unreviewed"] * 4 + ["legit"]
    assert any(t.value.startswith("Order: unreviewed first, then highest risk score first")
               for t in app.text)
    assert under_review(app) == SCORED_D["alert_id"]
    assert any(t.value.startswith("Risk score: 0.97") and "(+0.55)" in t.value
               for t in app.text)

    app.radio(key=f"review.verdict.{SCORED_D['alert_id']}").set_value("fraud")
    app.button(key=f"review.submit.{SCORED_D['alert_id']}").click().run()
    assert under_review(app) == SCORED_B["alert_id"], "the next highest score"


def test_review_queue_orders_by_risk_when_verdicts_exist(
        scored_app: Callable[..., AppTest], verdicts_url: str) -> None:
    give(verdicts_url, SCORED_E, "legit")
    app = scored_app()
    app.switch_page("screens/review.py").run()
    assert not app.exception, [e.value for e in app.exception]
    table = queue(app)
    assert list(table["user_id"]) == ["u-score-d", "u-score-b", "u-score-a", "u-score-c",
                                      "u-score-e"], "unreviewed by risk (none last), reviewed"
    assert [round(float(r), 2) if pd.notna(r) else None for r in table["risk_score"]] == \
        [0.97, 0.93, 0.42, None, 0.07]
    assert under_review(app) == SCORED_D["alert_id"]
    app.multiselect(key="review.rules").set_value([VELOCITY, HIGH_VALUE]).run()
    assert list(queue(app)["user_id"]) == ["u-score-b", "u-score-a", "u-score-c", "u-score-e"]


def test_overview_shows_the_model_the_detector_scores_with(
        scored_app: Callable[..., AppTest]) -> None:
    app = scored_app()
    app.switch_page("screens/overview.py").run()
    assert not app.exception
    assert f"Model: scoring with {MODEL_LINE}" in [t.value for t in app.text]


def test_overview_says_when_the_detector_runs_on_rules_alone(reachable: AppTest) -> None:
    # This history's detector predates the model: no model key in its metrics.
    reachable.run()
    reachable.switch_page("screens/overview.py").run()
    assert not reachable.exception
    assert "Model: rules alone: no usable model" in [t.value for t in reachable.text]


def test_model_status_comes_from_the_newest_batch(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    tail = MetricsTail(path)
    assert model_status(tail.refresh().batches) is None
    line = {"batch_id": 0, "written_at": format_timestamp(NOW), "input_rows": 5,
            "model": MODEL_LINE}
    path.write_text(json.dumps(line) + "\n")
    assert model_status(tail.refresh().batches) == f"scoring with {MODEL_LINE}"
    with path.open("a") as handle:  # the model folder was removed: rules alone again
        handle.write(json.dumps({**line, "batch_id": 1, "model": None}) + "\n")
    assert model_status(tail.refresh().batches) == "rules alone: no usable model"


def test_quality_page_compares_rules_alone_with_rules_plus_model(
        scored_app: Callable[..., AppTest]) -> None:
    app = scored_app()
    app.switch_page("screens/quality.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert "Rules alone vs rules + model" in [h.value for h in app.subheader]
    comparison = frame_with(app, "approach", "threshold").set_index("approach")
    assert comparison.to_dict("index") == {
        "rules alone": {"precision": "70.0%", "recall": "83.5%",
                        "threshold": "the rules in force"},
        "model alone": {"precision": "87.4%", "recall": "83.6%",
                        "threshold": "score at or above 0.53"},
        "rules + model": {"precision": "91.2%", "recall": "83.8%",
                          "threshold": "drop rule alerts scored below 0.05; add transactions "
                                       "scored at or above 0.93"},
    }
    metrics = metric_values(app)
    assert (metrics["Model AUC (hold-out)"], metrics["Precision at recall 90%"],
            metrics["Threshold at recall 90%"], metrics["Rules' recall (hold-out)"]) == \
        ("0.95", "81.2%", "0.42", "83.5%")
    texts = [t.value for t in app.text]
    assert ("Model 20261202T061500Z (gbt), trained at 2026-12-02T06:15:00.000Z in 84 s on "
            "200,000 rows (12 labels from analysts' verdicts).") in texts, texts
    assert ("Hold-out: 50,000 transactions from 2026-12-01T20:00:00.000Z to "
            "2026-12-02T06:00:00.000Z, 1.90% fraud (the newest part of the history, kept out "
            "of training).") in texts
    assert "Not used: version 20261203T000000Z: being written (no model.json yet)" in texts

    figure = figure_titled(app, "Hold-out risk scores: fraud vs legit")
    assert figure is not None
    shares = {name: dict(points) for name, points in bars(figure).items()}
    assert shares["fraud"]["0.95-1.00"] == pytest.approx(0.5)
    assert shares["fraud"]["0.00-0.05"] == 0
    assert shares["legit"]["0.00-0.05"] == pytest.approx(0.6)
    assert len(shares["legit"]) == 20

    candidates = frame_with(app, "algorithm", "kept").set_index("algorithm")
    assert candidates.loc["gbt", ["auc", "kept"]].tolist() == ["0.95", "yes"]
    assert candidates.loc["logistic_regression", "auc"] == "0.90"
    per_rule = frame_with(app, "rule", "flagged").set_index("rule")
    assert per_rule.loc[VELOCITY, ["precision", "recall", "flagged"]].tolist() == \
        ["68.0%", "84.0%", 1200]
    versions = frame_with(app, "version", "state")
    assert list(versions["version"]) == ["20261203T000000Z", "20261202T061500Z",
                                         "20261201T000000Z"], "newest first, hidden left out"
    assert list(versions["state"]) == ["being written (no model.json yet)",
                                       "newest complete version", "complete"]


def test_quality_page_without_a_model_says_how_to_train_one(
        scored_app: Callable[..., AppTest], tmp_path: Path) -> None:
    app = scored_app(models=tmp_path / "no-models")
    app.switch_page("screens/quality.py").run()
    assert not app.exception
    lines = [i.value for i in app.info if "trained model" in i.value]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("No trained model under")
    assert "train one with ` python -m spark_job.train `" in lines[0]
    assert not any("approach" in f.value.columns for f in app.dataframe)
    assert figure_titled(app, "Hold-out risk scores") is None


def test_quality_page_reads_a_sparse_metrics_file(scored_app: Callable[..., AppTest],
                                                  tmp_path: Path) -> None:
    """A trainer that wrote fewer keys (or other types): every missing figure reads n/a."""
    write_version(tmp_path, "20261205T000000Z", {"version": "20261205T000000Z",
                                                 "algorithm": "gbt", "auc": "high",
                                                 "comparison": {"model_alone": None},
                                                 "score_histogram": {"edges": [0, 1]}})
    app = scored_app(models=tmp_path)
    app.switch_page("screens/quality.py").run()
    assert not app.exception, [e.value for e in app.exception]
    comparison = frame_with(app, "approach", "threshold")
    assert set(comparison["precision"]) == {"n/a"} and set(comparison["threshold"]) == \
        {"the rules in force", "n/a"}
    assert metric_values(app)["Model AUC (hold-out)"] == "n/a"
    assert "Model 20261205T000000Z (gbt)." in [t.value for t in app.text]
    figure = figure_titled(app, "Hold-out risk scores")
    assert figure is not None and figure["layout"]["annotations"][0]["text"] == \
        "no score histogram in the model's metrics.json"


def test_backtest_changes_carry_the_risk_score() -> None:
    live = pa.Table.from_pylist([SCORED_E], schema=ALERTS_SCHEMA)
    result = bt.BacktestResult({"rules": []},
                               pa.Table.from_pylist([SCORED_B], schema=ALERTS_SCHEMA))
    changes = bt.changed_alerts(result, live, VELOCITY, None, None).set_index("change")
    assert changes.loc["added", "risk_score"] == pytest.approx(0.93)
    assert list(changes.loc["added", "score_reasons"]) == SCORED_B["score_reasons"]
    assert changes.loc["removed", "risk_score"] == pytest.approx(0.07)


def test_tail_alerts_keep_a_risk_score_only_when_it_is_one() -> None:
    alert = to_json_ready(SCORED_B)
    row = decode_alert(json.dumps(alert))
    assert row is not None
    assert (row["risk_score"], row["score_reasons"]) == (0.93, SCORED_B["score_reasons"])
    for bad in ("high", True, 1.5, None):
        row = decode_alert(json.dumps({**alert, "risk_score": bad, "score_reasons": "x"}))
        assert row is not None and (row["risk_score"], row["score_reasons"]) == (None, None)
    old = {k: v for k, v in alert.items() if k not in ("risk_score", "score_reasons")}
    assert decode_alert(json.dumps(old)) is not None, "alerts from before the model"


# --- views, readers and launcher ------------------------------------------------------------


def alerts_frame(alerts: list[dict[str, Any]]) -> pd.DataFrame:
    return pa.Table.from_pylist(alerts, schema=ALERTS_SCHEMA).to_pandas()


def test_alerts_over_time_picks_a_bucket_width_from_the_span() -> None:
    # A 10-minute span: 5 s buckets would be 120 bars, 10 s buckets are 60.
    frame = alerts_frame([make_alert(VELOCITY, VELOCITY_TXS, 600),
                          make_alert(VELOCITY, NORMAL_TXS, 3),
                          make_alert(HIGH_VALUE, [HIGH_TX], 0)])
    data = alerts_over_time(frame)
    assert data["alerts"].sum() == 3
    assert data["bucket"].dt.second.isin(range(0, 60, 10)).all()
    assert (data["bucket"].diff().dropna() % pd.Timedelta("10s") == pd.Timedelta(0)).all()
    assert set(data["rule"]) == {VELOCITY, HIGH_VALUE}


def test_count_by_rule_adds_tail_alerts_missing_from_the_history() -> None:
    history = pa.Table.from_pylist(PARQUET_ALERTS, schema=ALERTS_SCHEMA)
    live = alerts_frame([KAFKA_ONLY, PARQUET_ALERTS[0]])  # one new, one replayed
    assert count_by_rule(history, live).to_dict() == {HIGH_VALUE: 2, VELOCITY: 2}


def test_amount_distribution_compares_flagged_with_all() -> None:
    txs = pa.Table.from_pylist([*VELOCITY_TXS, HIGH_TX, *NORMAL_TXS], schema=TRANSACTIONS_SCHEMA)
    data = amount_distribution(txs, {HIGH_TX["transaction_id"]})
    shares = data.groupby("group")["share"].sum()
    assert shares.to_list() == pytest.approx([1.0, 1.0])
    flagged = data[(data["group"] != "all transactions") & (data["count"] > 0)]
    assert flagged["amount"].iloc[0] == pytest.approx(4200.0, rel=0.2)


# --- readers and launcher -------------------------------------------------------------------


def test_dataset_cache_reads_only_changed_files_and_forgets_deleted_ones(tmp_path: Path) -> None:
    cache = DatasetCache(tmp_path, ALERTS_DATASET, ALERTS_SCHEMA)
    assert cache.refresh()[0].num_rows == 0  # missing folder
    write_batch(tmp_path, ALERTS_DATASET, 0, PARQUET_ALERTS[:1], ALERTS_SCHEMA)
    table, version = cache.refresh()
    assert table.num_rows == 1
    assert cache.refresh()[1] == version, "nothing changed, nothing re-read"
    write_batch(tmp_path, ALERTS_DATASET, 0, PARQUET_ALERTS, ALERTS_SCHEMA)  # replayed batch
    assert cache.refresh()[0].num_rows == 3
    for path in (tmp_path / ALERTS_DATASET / "batch_id=0").iterdir():
        path.unlink()
    assert cache.refresh()[0].num_rows == 0


def test_dataset_cache_reads_every_epoch_once_and_follows_compaction(tmp_path: Path) -> None:
    """A legacy batch, two epochs holding the same alert (a re-read topic), then compaction
    replacing an epoch's batches: every alert shown exactly once at each step."""
    cache = DatasetCache(tmp_path, ALERTS_DATASET, ALERTS_SCHEMA)
    first, second, third = PARQUET_ALERTS[:1], PARQUET_ALERTS[1:2], PARQUET_ALERTS[2:3]
    write_batch(tmp_path, ALERTS_DATASET, 0, first, ALERTS_SCHEMA)  # before epochs
    write_batch(tmp_path / ALERTS_DATASET, "epoch=20261201T000000Z-aaaaaa", 0, first + second,
                ALERTS_SCHEMA)
    write_batch(tmp_path / ALERTS_DATASET, "epoch=20261202T000000Z-bbbbbb", 0, second,
                ALERTS_SCHEMA)
    write_batch(tmp_path / ALERTS_DATASET, "epoch=20261202T000000Z-bbbbbb", 1, third,
                ALERTS_SCHEMA)
    ids = cache.refresh()[0].column("alert_id").to_pylist()
    assert sorted(ids) == sorted(a["alert_id"] for a in PARQUET_ALERTS[:3])
    epoch = tmp_path / ALERTS_DATASET / "epoch=20261202T000000Z-bbbbbb"
    (epoch / "compacted=0-1").mkdir()
    pq.write_table(pa.Table.from_pylist(second + third, schema=ALERTS_SCHEMA),
                   epoch / "compacted=0-1" / "part-0.parquet")
    ids = cache.refresh()[0].column("alert_id").to_pylist()
    assert sorted(ids) == sorted(a["alert_id"] for a in PARQUET_ALERTS[:3]), \
        "batches covered by a compacted file must not be read next to it"
    listed = [str(path.relative_to(tmp_path / ALERTS_DATASET).parent)
              for path in dataset_files(tmp_path, ALERTS_DATASET)]
    assert listed == ["batch_id=0", "epoch=20261201T000000Z-aaaaaa/batch_id=0",
                      "epoch=20261202T000000Z-bbbbbb/compacted=0-1"]


def test_metrics_tail_reads_appended_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "detector.jsonl"
    tail = MetricsTail(path)
    assert tail.refresh().batches.empty  # no file yet
    line = {"batch_id": 0, "written_at": format_timestamp(NOW), "input_rows": 5, "late_rows": 1}
    path.write_text(json.dumps(line) + "\n" + '{"batch_id": 1, "writ')
    snapshot = tail.refresh()
    assert list(snapshot.batches["batch_id"]) == [0]
    with path.open("a") as handle:
        handle.write('ten_at": "' + format_timestamp(NOW) + '", "input_rows": 7}\nnot json\n')
    snapshot = tail.refresh()
    assert list(snapshot.batches["batch_id"]) == [0, 1]
    assert snapshot.totals["input_rows"] == 12 and snapshot.invalid_lines == 1
    path.unlink()
    path.write_text(json.dumps(line) + "\n")  # replaced: start over
    assert tail.refresh().totals["input_rows"] == 5


def test_launcher_serves_the_app_with_its_config() -> None:
    command = streamlit_command()
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP
    # Streamlit reads the config beside the app; STREAMLIT_* variables override it.
    config = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text())
    assert (config["server"]["address"], config["server"]["port"]) == ("127.0.0.1", 8501)
    assert config["server"]["enableStaticServing"] is True
    assert (APP.parent / "static" / "world_110m.json").stat().st_size > 100_000


def test_launcher_rejects_a_bad_setting_before_starting(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--refresh-seconds", "0.1"])
    assert exit_info.value.code == 2
    assert "DASHBOARD_REFRESH_SECONDS" in capsys.readouterr().err
