"""The served dashboard (``python -m dashboard``) in headless Chromium, against the real embedded
broker holding alerts the real pipeline produced: a seeded generated stream goes to a fresh
transactions topic, ``python -m spark_job --available-now`` turns it into alerts (topic and
Parquet), and the dashboard is served on the same topics and Parquet folder. The tests check
that the users of the alerts on the alerts topic are in the live table, the charts render, the
rule and user filters narrow the table, the Topics page lists the pipeline's three topics, and
measure how long a new alert takes from the topic to the page.

Chromium and Playwright come from ``support.browser`` (the system's Chromium, never a
downloaded browser); without them the tests skip, except under CI (``CI`` set), where they fail.

Set ``DASHBOARD_SCREENSHOT=docs/dashboard.png`` to save a screenshot of the live page, and
``DASHBOARD_LATENCY_JSON`` to choose where the latency samples go (default: pytest's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from support.browser import (
    GRID_SNAPSHOT,
    REPO,
    choose_option,
    new_page,
    served_dashboard,
    settled,
    table_rows,
    wait_on_page,
)

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.schemas import (
    HIGH_VALUE,
    RULES,
    VELOCITY,
    alert_id,
    format_timestamp,
    parse_timestamp,
)
from fraudstream.settings import DashboardSettings, load_settings
from fraudstream.testing import read_messages
from fraudstream.topics import default_topic_specs
from producer.generator import TransactionGenerator, encode_transaction

DETECTOR_TIMEOUT = 600.0

# The seeded stream: 3000 transactions at a simulated 10 tx/s (5 minutes of event time ending
# now), and this seed starts three fraud episodes of each of the four rules.
SEED = 2
USERS = 500
FRAUD_RATIO = 0.006
COUNT = 3000
RATE = 10.0
BAD_RECORDS = [b"{not json", b'{"transaction_id": "t-missing-fields"}']
NEW_ALERT_SAMPLES = 5


# --- the pipeline: generator -> transactions topic -> detector -> alerts topic + Parquet -------


@dataclass(frozen=True)
class Pipeline:
    env: dict[str, str]  # what the services read: broker, topic names, Parquet folder
    topics: dict[str, str]  # role (transactions/alerts/dlq) -> this module's topic name
    alerts: list[dict[str, Any]]  # the alerts the detector put on the alerts topic

    def users(self) -> set[str]:
        return {a["user_id"] for a in self.alerts}


def create_topics(broker: EmbeddedBroker) -> dict[str, str]:
    """Fresh topics for this module (like the ``unique_topics`` fixture, for a whole module), so
    the session broker's other tests never share records with it."""
    stem = f"browser-{uuid.uuid4().hex[:6]}"
    names = {"transactions": f"tx-{stem}", "alerts": f"alerts-{stem}", "dlq": f"dlq-{stem}"}
    admin = wait_for_broker(broker.client_config(), 10)
    ensure_topics(admin, default_topic_specs(3, transactions=names["transactions"],
                                             alerts=names["alerts"], dlq=names["dlq"]))
    return names


def produce_stream(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The seeded stream, event times ending now, plus a few records for the DLQ."""
    generator = TransactionGenerator(users=USERS, fraud_ratio=FRAUD_RATIO, seed=SEED)
    start = datetime.now(UTC) - timedelta(seconds=COUNT / RATE)
    transactions = generator.generate(COUNT, start=start, rate=RATE)
    patterns = Counter(tx["fraud_pattern"] for tx in transactions if tx["is_fraud"])
    assert set(patterns) == set(RULES), f"the seed should start episodes of every rule: {patterns}"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    for tx in transactions:
        producer.produce(topic, key=tx["user_id"].encode(), value=encode_transaction(tx))
    for value in BAD_RECORDS:
        producer.produce(topic, value=value)
    assert producer.flush(30) == 0
    return transactions


def service_env(broker: EmbeddedBroker, topics: dict[str, str], work: Path) -> dict[str, str]:
    """What the detector and the dashboard read: the broker, this module's topics, Parquet."""
    return {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "TRANSACTIONS_TOPIC": topics["transactions"], "ALERTS_TOPIC": topics["alerts"],
            "DLQ_TOPIC": topics["dlq"], "PARQUET_DIR": str(work / "parquet")}


def run_pipeline(broker: EmbeddedBroker, topics: dict[str, str], work: Path) -> Pipeline:
    """Produce the stream, run the detector to the end of it, and read the alerts it sent."""
    env = service_env(broker, topics, work)
    produce_stream(broker.bootstrap_servers, topics["transactions"])
    log_path = work / "detector.log"
    with log_path.open("wb") as log:
        detector = subprocess.run(
            [sys.executable, "-m", "spark_job", "--available-now"], cwd=REPO,
            env={**os.environ, **env, "CHECKPOINT_DIR": str(work / "checkpoint"),
                 "SPARK_LOCAL_IP": "127.0.0.1"},
            stdout=log, stderr=subprocess.STDOUT, timeout=DETECTOR_TIMEOUT, check=False)
    assert detector.returncode == 0, log_path.read_text(errors="replace")[-4000:]
    alerts = [json.loads(m.value()) for m in read_messages(broker.bootstrap_servers,
                                                         topics["alerts"])]
    rules = Counter(a["rule"] for a in alerts)
    assert set(rules) == set(RULES), f"the detector should alert on every rule: {rules}"
    return Pipeline(env, topics, alerts)


def fresh_alert(template: dict[str, Any], user: str) -> dict[str, Any]:
    """A pipeline alert moved to ``user`` and to now, with new evidence ids, so it is a new
    alert (new alert_id) of the contract's shape."""
    now = datetime.now(UTC)
    span = parse_timestamp(template["window_end"]) - parse_timestamp(template["window_start"])
    ids = [uuid.uuid4().hex for _ in template["transaction_ids"]]
    return {**template, "alert_id": alert_id(template["rule"], user, ids), "user_id": user,
            "transaction_ids": ids, "window_start": format_timestamp(now - span),
            "window_end": format_timestamp(now), "detected_at": format_timestamp(now)}


# --- the served app -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    url: str
    pipeline: Pipeline
    bootstrap: str
    refresh_seconds: float  # the live page's refresh interval, as the dashboard reads it


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """The pipeline's output, served by ``python -m dashboard`` on the same topics and Parquet
    folder. The server starts first (it reads nothing until a page is opened), so its start-up
    overlaps the detector's."""
    work = tmp_path_factory.mktemp("dashboard")
    topics = create_topics(broker)
    env = {**os.environ, **service_env(broker, topics, work),
           "STREAMLIT_SERVER_PORT": str(free_port()), "STREAMLIT_SERVER_ADDRESS": "127.0.0.1"}
    pipelines: list[Pipeline] = []
    with served_dashboard(env, work / "dashboard.log",
                          before_ready=lambda: pipelines.append(
                              run_pipeline(broker, topics, work))) as url:
        settings, _ = load_settings(DashboardSettings, [], environ=env)
        yield Served(url, pipelines[0], broker.bootstrap_servers, settings.refresh_seconds)


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    with new_page(browser) as opened:
        yield opened


# --- reading the page -----------------------------------------------------------------------------


def top_rows(page: Any) -> list[dict[str, str]]:
    """The rows at the top of the live table (newest first): one read, no scrolling through."""
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.locator(".dvn-scroller").evaluate("scroller => { scroller.scrollTop = 0; }")
    snapshot = grid.evaluate(GRID_SNAPSHOT)
    return list(snapshot["rows"].values())


def column(page: Any, header: str) -> set[str]:
    """The distinct texts of one column of the live table (every row, not only visible ones)."""
    return {row[header] for row in table_rows(page) if header in row}


def matching_alerts(page: Any) -> int | None:
    """The live page's count of alerts passing the filters, from its caption."""
    found = re.search(r"([\d,]+) matching alerts", page.locator("body").inner_text())
    return int(found.group(1).replace(",", "")) if found else None


def open_live_page(page: Any, served: Served) -> None:
    """The live page, once the pipeline's alerts are in its table."""
    page.goto(served.url)
    expected = served.pipeline.users()
    wait_on_page(lambda: expected <= column(page, "user"), "the pipeline's users in the table")


# --- tests ----------------------------------------------------------------------------------------


def test_live_table_lists_the_users_of_the_pipeline_alerts_and_draws_the_chart(
        page: Any, served: Served) -> None:
    alerts = served.pipeline.alerts
    assert len({a["alert_id"] for a in alerts}) == len(alerts) >= len(RULES)
    open_live_page(page, served)
    rows = table_rows(page)
    by_user = Counter(row["user"] for row in rows)
    assert {user: by_user[user] for user in served.pipeline.users()} == \
        Counter(a["user_id"] for a in alerts), "each pipeline alert is one row"
    assert {row["rule"] for row in rows} >= set(RULES)
    # The "alerts over time" chart: plotly's SVG, with one bar trace per rule.
    page.locator(".js-plotly-plot .main-svg").first.wait_for()
    page.locator(".js-plotly-plot .barlayer .point path").first.wait_for(state="attached")
    wait_on_page(lambda: page.locator(".js-plotly-plot .barlayer .trace.bars").count()
               == len(RULES), "a bar trace per rule")
    assert page.get_by_text("Kafka broker unreachable").count() == 0


def test_rule_and_user_filters_narrow_the_table(page: Any, served: Served) -> None:
    open_live_page(page, served)
    before = matching_alerts(page)
    page.get_by_role("combobox", name="Rule", exact=True).click()
    page.get_by_role("option", name=HIGH_VALUE, exact=True).click()
    page.keyboard.press("Escape")
    high_value = [a for a in served.pipeline.alerts if a["rule"] == HIGH_VALUE]
    wait_on_page(lambda: column(page, "rule") == {HIGH_VALUE}
               and matching_alerts(page) == len(high_value), "only high_value alerts")
    assert before is not None and len(high_value) < before
    assert column(page, "user") == {a["user_id"] for a in high_value}

    user = sorted(a["user_id"] for a in high_value)[0]
    box = page.get_by_role("textbox", name="User", exact=True)
    box.fill(user)
    box.press("Enter")
    wanted = sum(a["user_id"] == user for a in high_value)
    wait_on_page(lambda: column(page, "user") == {user} and matching_alerts(page) == wanted,
               f"only {user} in the table")
    assert len(table_rows(page)) == wanted < len(high_value)


def test_screenshot_of_the_live_page(page: Any, served: Served, tmp_path: Path) -> None:
    """The detail view of one pipeline alert (its JSON, and its evidence found in the detector's
    Parquet history), then a full-page screenshot with the newest alerts at the top."""
    open_live_page(page, served)
    alert = next(a for a in served.pipeline.alerts if a["rule"] == VELOCITY)
    choose_option(page, page.get_by_role("combobox", name="Alert", exact=True),
                  str(alert["alert_id"])[:8])
    n = len(alert["transaction_ids"])
    page.get_by_text(f"Evidence: {n} of {n} transactions found").wait_for()
    page.locator('[data-testid="stJson"]').get_by_text(alert["alert_id"]).wait_for()
    top_rows(page)  # scrolls the table back to the newest alerts
    target = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_on_page(lambda: settled(page), "a settled page")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000


def test_new_alert_reaches_the_page(page: Any, served: Served, capsys: pytest.CaptureFixture[str],
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Produce alerts one at a time (a pipeline alert moved to a new user and to now) and time
    each from the produce call's acknowledgement until its user id is in the table."""
    open_live_page(page, served)
    template = next(a for a in served.pipeline.alerts if a["rule"] == VELOCITY)
    producer = Producer({"bootstrap.servers": served.bootstrap})
    seconds = []
    for sample in range(NEW_ALERT_SAMPLES):
        alert = fresh_alert(template, f"u-new-{sample}-{uuid.uuid4().hex[:6]}")
        producer.produce(served.pipeline.topics["alerts"], key=alert["user_id"],
                         value=json.dumps(alert))
        assert producer.flush(15) == 0
        started = time.monotonic()
        wait_on_page(lambda user=alert["user_id"]: any(row.get("user") == user
                                                      for row in top_rows(page)),
                   f"{alert['user_id']} at the top of the alert table")
        seconds.append(time.monotonic() - started)
    target = Path(os.environ.get("DASHBOARD_LATENCY_JSON")
                  or tmp_path_factory.mktemp("browser") / "new_alert_latency.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    summary = {"samples_s": [round(s, 3) for s in seconds], "min_s": round(min(seconds), 3),
               "median_s": round(statistics.median(seconds), 3),
               "max_s": round(max(seconds), 3), "refresh_s": served.refresh_seconds,
               "measured_at": format_timestamp(datetime.now(UTC))}
    target.write_text(json.dumps(summary, indent=2) + "\n")
    with capsys.disabled():
        print(f"\nnew alert on the topic -> shown on the live page: "
              f"{', '.join(f'{s:.2f}' for s in seconds)} s (min {summary['min_s']:.2f}, "
              f"median {summary['median_s']:.2f}, max {summary['max_s']:.2f}; page refresh "
              f"every {served.refresh_seconds:g} s) -> {target}")
    assert len(json.loads(target.read_text())["samples_s"]) == NEW_ALERT_SAMPLES


def test_overview_draws_every_chart(page: Any, served: Served) -> None:
    page.goto(f"{served.url}/overview")
    wait_on_page(lambda: page.locator(".js-plotly-plot .main-svg").count() >= 6, "six charts")
    assert page.locator(".js-plotly-plot .scattergeo").count() >= 1, "the map has points"
    dlq = page.locator('[data-testid="stMetric"]', has_text="DLQ rows") \
        .locator('[data-testid="stMetricValue"]')
    wait_on_page(lambda: dlq.inner_text() == str(len(BAD_RECORDS)), "the DLQ count of the run")


def test_topics_page_lists_the_three_topics(page: Any, served: Served) -> None:
    page.goto(served.url)
    page.get_by_role("link", name="Topics").click()
    topics = set(served.pipeline.topics.values())
    wait_on_page(lambda: topics <= {row.get("topic") for row in table_rows(page)},
               f"topics {topics} in the summary table")
