"""The Rules page of the served dashboard (``python -m dashboard``) in headless Chromium, against
the real embedded broker: a fresh rules topic holding the four default rules, an analyst who
types a name in the sidebar, refuses a window beyond the retention horizon (nothing published),
then changes the velocity count to 5 and publishes version 2, which the table and the topic
then hold. Ends with a full-page screenshot whose path is printed. A second test backtests a
lower high_value threshold on a small stored history (a real ``python -m spark_job.backtest``
subprocess, which starts Spark: a minute or more), reads the results, and publishes it from the
results.

No detector runs: the page reads and writes the rules topic itself, so the workflow needs only
the broker (and, for the backtest, Parquet files written here as the detector writes them).
Chromium and Playwright come from ``support.browser`` (the system's
/usr/bin/chromium, never a downloaded browser); without them the test skips, except under CI.

Set ``RULES_SCREENSHOT=docs/rules.png`` to choose where the screenshot goes (default: pytest's
tmp dir), and ``BACKTEST_SCREENSHOT=docs/backtest-page.png`` for the backtest results.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.browser import (
    new_page,
    served_dashboard,
    settled,
    table_rows,
    wait_on_page,
)

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.datasets import ALERTS_SCHEMA, TRANSACTIONS_SCHEMA
from fraudstream.rules import MICROS, RuleDefinition, default_definitions
from fraudstream.rules.oracle import expected_alerts
from fraudstream.rules.store import RulesTopic
from fraudstream.schemas import ALERTS_DATASET, HIGH_VALUE, TRANSACTIONS_DATASET, VELOCITY

ANALYST = "Browser Analyst"
RETENTION_SECONDS = 600
#: A backtest starts Spark in a subprocess: allow it minutes on a small, busy machine.
BACKTEST_TIMEOUT_MS = 420_000
EPOCH = "20261122T100000Z-aaaaaa"
#: Purchases of the stored history: the default high_value rule (amount > 3500) flags one; with
#: amount 1000 three are flagged, so the backtest adds two alerts and removes none.
AMOUNTS = {"p1": 4200.0, "p2": 1500.0, "p3": 2500.0, "p4": 80.0, "p5": 900.0}


def write_history(root: Path) -> None:
    """Bronze transactions and the live detector's alerts under the default rules, laid out as
    the detector writes them (``<dataset>/epoch=<id>/batch_id=0/part-0.parquet``)."""
    first = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    txs = []
    for number, (tid, amount) in enumerate(AMOUNTS.items()):
        moment = first + timedelta(minutes=7 * number)
        txs.append({"transaction_id": tid, "user_id": f"u-{tid}", "amount": amount,
                    "currency": "EUR", "event_time": moment, "timestamp": moment,
                    "location": "Paris", "payment_method": "card", "merchant_id": "m001",
                    "device_ip": "203.0.113.7", "is_fraud": amount > 3500,
                    "fraud_pattern": HIGH_VALUE if amount > 3500 else None, "key": f"u-{tid}",
                    "topic": "transactions", "partition": 0, "offset": number,
                    "kafka_timestamp": moment})
    by_id = {tx["transaction_id"]: tx for tx in txs}
    alerts = []
    for alert in expected_alerts(txs, default_definitions()):
        evidence = [by_id[i] for i in alert["transaction_ids"]]
        alerts.append({
            "alert_id": alert["alert_id"], "rule": alert["rule"],
            "rule_version": alert["rule_version"], "user_id": alert["user_id"],
            "window_start": evidence[0]["event_time"], "window_end": evidence[-1]["event_time"],
            "transaction_count": len(evidence),
            "total_amount": sum(tx["amount"] for tx in evidence),
            "locations": sorted({tx["location"] for tx in evidence}),
            "transaction_ids": alert["transaction_ids"], "reason": "live",
            "detected_at": evidence[-1]["event_time"] + timedelta(seconds=1)})
    assert [a["rule"] for a in alerts] == [HIGH_VALUE]
    for dataset, rows, schema in ((TRANSACTIONS_DATASET, txs, TRANSACTIONS_SCHEMA),
                                  (ALERTS_DATASET, alerts, ALERTS_SCHEMA)):
        folder = root / dataset / f"epoch={EPOCH}" / "batch_id=0"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")


@dataclass(frozen=True)
class Served:
    url: str
    topic: RulesTopic

    def in_force(self) -> dict[str, RuleDefinition]:
        return dict(self.topic.state(RETENTION_SECONDS * MICROS)[0].rules)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """The dashboard on a rules topic of this module's own that holds the four defaults, over a
    small stored history (for the backtest) and a verdict database of its own."""
    work = tmp_path_factory.mktemp("rules-dashboard")
    write_history(work / "parquet")
    stem = f"rules-browser-{uuid.uuid4().hex[:6]}"
    topic = RulesTopic(broker.client_config(), f"rules-{stem}")
    for definition in default_definitions():
        topic.publish(definition)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "RULES_TOPIC": topic.topic, "ALERTS_TOPIC": f"alerts-{stem}",
           "TRANSACTIONS_TOPIC": f"tx-{stem}", "DLQ_TOPIC": f"dlq-{stem}",
           "PARQUET_DIR": str(work / "parquet"), "RETENTION_SECONDS": str(RETENTION_SECONDS),
           "VERDICTS_URL": f"sqlite:///{work / 'verdicts.db'}",
           "STREAMLIT_SERVER_PORT": str(free_port()), "STREAMLIT_SERVER_ADDRESS": "127.0.0.1"}
    env.pop("FRAUDSTREAM_ANALYST", None)  # the analyst types a name in the sidebar
    with served_dashboard(env, work / "dashboard.log") as url:
        yield Served(url, topic)


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    with new_page(browser) as opened:
        yield opened


def versions(page: Any) -> dict[str, str]:
    """rule_id -> version as the "Rules in force" table (the page's first table) shows it."""
    return {row["rule_id"]: row["version"] for row in table_rows(page, 0) if "rule_id" in row}


def by_key(page: Any, key: str) -> Any:
    """The element of the widget or container with this Streamlit key."""
    return page.locator(f".st-key-{key.replace('.', '-')}")


def table_with(page: Any, header: str) -> int:
    """Position among the page's dataframes of the first with a column named ``header``
    (a dataframe's key does not reach the browser). Waits for it: a grid draws its header
    cells a moment after the element itself appears."""
    def index() -> int:
        return int(page.evaluate(
            """header => [...document.querySelectorAll('[data-testid="stDataFrame"]')]
                   .findIndex(grid => [...grid.querySelectorAll('[role="columnheader"]')]
                       .some(cell => cell.textContent === header))""", header))
    wait_on_page(lambda: index() >= 0, f"a table with a column {header!r} on the page")
    return index()


def sign_in(page: Any) -> None:
    name = page.get_by_role("textbox", name="Analyst")
    name.fill(ANALYST)
    name.press("Enter")
    page.get_by_text("Enter your name as Analyst").wait_for(state="detached")


def publish_velocity(page: Any, version: int, count: str, window: str) -> None:
    """Fill the velocity rule's edit form (based on ``version``) and submit it."""
    by_key(page, f"rules.edit.velocity.{version}.count").locator("input").fill(count)
    by_key(page, f"rules.edit.velocity.{version}.window_seconds").locator("input").fill(window)
    by_key(page, "rules.publish.velocity").get_by_role("button").click()


def test_change_velocity_count_and_publish_version_2(
        page: Any, served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The page's own address as the first request a fresh server gets (a bookmark): the app's
    # navigation must serve it, not a page run without app.py.
    page.goto(f"{served.url}/rules")
    page.get_by_role("textbox", name="Analyst").wait_for()
    page.get_by_role("heading", name="Rules in force").wait_for()
    wait_on_page(lambda: versions(page) == {d.rule_id: "1" for d in default_definitions()},
               "the four defaults at version 1 in the table")
    assert page.get_by_text("Enter your name as Analyst").count() == 1

    name = page.get_by_role("textbox", name="Analyst")
    name.fill(ANALYST)
    name.press("Enter")
    page.get_by_text("Enter your name as Analyst").wait_for(state="detached")

    by_key(page, f"rules.rule.{VELOCITY}").locator("summary").click()
    # A window beyond the retention horizon: refused with the reason, nothing published.
    publish_velocity(page, 1, "3", "900")
    page.get_by_text("exceeds the retention horizon of 600 s").wait_for()
    assert page.get_by_text("Refused, nothing published").count() == 1
    assert served.in_force()[VELOCITY].version == 1

    publish_velocity(page, 1, "5", "60")
    page.get_by_text(f"Published {VELOCITY} version 2").wait_for()
    wait_on_page(lambda: versions(page).get(VELOCITY) == "2", "velocity at version 2 in the table")
    assert {rule: v for rule, v in versions(page).items() if rule != VELOCITY} == \
        {d.rule_id: "1" for d in default_definitions() if d.rule_id != VELOCITY}

    published = served.in_force()[VELOCITY]
    assert (published.version, published.updated_by) == (2, ANALYST)
    assert dict(published.params) == {"count": 5, "window_seconds": 60.0}
    # The new version's form holds the published value.
    assert by_key(page, "rules.edit.velocity.2.count").locator("input").input_value() == "5"

    target = Path(os.environ.get("RULES_SCREENSHOT") or tmp_path / "rules.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_on_page(lambda: settled(page), "a settled page")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nRules page screenshot: {target}")


def test_backtest_a_lower_high_value_threshold_then_publish_it(
        page: Any, served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    version = served.in_force()[HIGH_VALUE].version
    page.goto(f"{served.url}/rules")
    page.get_by_role("heading", name="Rules in force").wait_for()
    sign_in(page)
    by_key(page, f"rules.rule.{HIGH_VALUE}").locator("summary").click()
    by_key(page, f"rules.edit.{HIGH_VALUE}.{version}.amount").locator("input").fill("1000")
    assert by_key(page, f"rules.backtest.hours.{HIGH_VALUE}").locator("input").input_value() \
        == "24"
    by_key(page, f"rules.backtest.start.{HIGH_VALUE}").get_by_role("button").click()

    # Progress while the subprocess runs, with a Cancel button; then the results.
    page.get_by_text("Backtesting").first.wait_for()
    assert by_key(page, "rules.backtest.cancel").count() == 1
    page.get_by_text("Backtest of").wait_for(timeout=BACKTEST_TIMEOUT_MS)
    assert served.in_force()[HIGH_VALUE].version == version, "a backtest publishes nothing"
    wait_on_page(lambda: settled(page), "a settled page")
    rows = {row["rule"]: row for row in table_rows(page, table_with(page, "live alerts"))}
    assert set(rows) == {d.rule_id for d in default_definitions()}
    high = rows[HIGH_VALUE]
    assert (high["version"], high["alerts"], high["live alerts"], high["added"],
            high["removed"]) == (f"v{version + 1}", "3", "1", "2", "0")
    assert all(rows[rule]["added"] == rows[rule]["removed"] == "0"
               for rule in rows if rule != HIGH_VALUE)
    changes = table_rows(page, table_with(page, "change"))
    assert sorted((row["change"], row["user_id"]) for row in changes) == \
        [("added", "u-p2"), ("added", "u-p3")]

    # The evidence of an added alert, looked up in the stored transactions.
    page.get_by_role("combobox", name="Evidence of").click()
    page.get_by_role("option").first.click()
    page.get_by_text("Evidence: 1 of 1 transactions found").wait_for()
    page.locator('[data-testid="stJson"]').get_by_text("transaction_ids").wait_for()

    target = Path(os.environ.get("BACKTEST_SCREENSHOT") or tmp_path / "backtest.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_on_page(lambda: settled(page), "a settled page")
    by_key(page, f"rules.rule.{HIGH_VALUE}").screenshot(path=str(target))
    assert target.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nBacktest screenshot: {target}")

    by_key(page, "rules.backtest.publish").get_by_role("button").click()
    page.get_by_text(f"Published {HIGH_VALUE} version {version + 1}").wait_for()
    wait_on_page(lambda: versions(page).get(HIGH_VALUE) == str(version + 1),
               f"high_value at version {version + 1} in the table")
    published = served.in_force()[HIGH_VALUE]
    assert (published.version, published.updated_by) == (version + 1, ANALYST)
    assert dict(published.params) == {"amount": 1000.0}
    assert by_key(page, "rules.backtest.publish").count() == 0, "the results are gone"
