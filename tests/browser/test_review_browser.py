"""The Review queue of the served dashboard (``python -m dashboard``) in headless Chromium, against
the real embedded broker and a SQLite verdict database of the test's own: an analyst types a
name in the sidebar, opens the queue (alerts written to Parquet by the test, the newest
unreviewed one first), records ``fraud`` with a note from the keyboard (pick the verdict, type
the note, press Enter) and the queue moves on to the next alert. The dashboard is then stopped
and started again (a new server process on the same database): the verdict and its note are
still on the page, and the verdicts topic holds it. Ends with a full-page screenshot whose path
is printed.

No detector runs: the alerts are Parquet files, as the detector leaves them. Chromium and
Playwright come from ``support.browser`` (the system's /usr/bin/chromium, never a downloaded
browser); without them the test skips, except under CI.

Set ``REVIEW_SCREENSHOT=docs/review.png`` to choose where the screenshot goes (default: pytest's
tmp dir).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.browser import (
    choose_option,
    new_page,
    served_dashboard,
    settled,
    table_rows,
    wait_on_page,
)

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.datasets import ALERTS_SCHEMA, TRANSACTIONS_SCHEMA
from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.schemas import (
    ALERTS_DATASET,
    HIGH_VALUE,
    TRANSACTIONS_DATASET,
    VELOCITY,
    alert_id,
)
from fraudstream.testing import read_messages
from fraudstream.topics import TopicSpec
from fraudstream.verdicts.store import VerdictStore

ANALYST = "Browser Analyst"
NOTE = "customer confirmed the card was stolen"
SCORE_REASON = "amount vs the user's median 40x (+0.52)"
NOW = datetime.now(UTC).replace(microsecond=0)


def _transaction(tid: str, user: str, seconds_ago: int, amount: float) -> dict[str, Any]:
    moment = NOW - timedelta(seconds=seconds_ago)
    return {"transaction_id": tid, "user_id": user, "amount": amount, "currency": "EUR",
            "event_time": moment, "location": "Lyon", "payment_method": "card",
            "merchant_id": "m001", "device_ip": "203.0.113.7", "is_fraud": False,
            "fraud_pattern": None, "key": user, "topic": "transactions", "partition": 0,
            "offset": 0, "kafka_timestamp": moment}


def _alert(rule: str, evidence: list[dict[str, Any]], detected_seconds_ago: int
           ) -> dict[str, Any]:
    user = evidence[0]["user_id"]
    ids = [t["transaction_id"] for t in evidence]
    return {"alert_id": alert_id(rule, user, ids), "rule": rule, "rule_version": 1,
            "user_id": user, "window_start": min(t["event_time"] for t in evidence),
            "window_end": max(t["event_time"] for t in evidence), "transaction_count": len(ids),
            "total_amount": sum(t["amount"] for t in evidence), "locations": ["Lyon"],
            "transaction_ids": ids, "reason": f"{rule} fired for {user}",
            "detected_at": NOW - timedelta(seconds=detected_seconds_ago)}


def write_alerts(root: Path) -> list[dict[str, Any]]:
    """Three alerts (and their evidence) as the detector writes them; newest first."""
    big = _transaction("rb-big", "u-review-big", 60, 4800.0)
    burst = [_transaction(f"rb-burst-{i}", "u-review-burst", 300 - 10 * i, 20.0 + i)
             for i in range(4)]
    older = _transaction("rb-older", "u-review-older", 900, 3900.0)
    # Scored as the model would (the oldest alert was raised before there was a model), so
    # the risk order once a verdict exists is also the newest-first order.
    alerts = [{**_alert(HIGH_VALUE, [big], 50), "risk_score": 0.91,
               "score_reasons": [SCORE_REASON, "new device (+0.18)"]},
              {**_alert(VELOCITY, burst, 250), "risk_score": 0.47,
               "score_reasons": ["transactions in 1 min 4 (+0.21)"]},
              _alert(HIGH_VALUE, [older], 890)]
    for dataset, rows, schema in ((TRANSACTIONS_DATASET, [big, *burst, older],
                                   TRANSACTIONS_SCHEMA),
                                  (ALERTS_DATASET, alerts, ALERTS_SCHEMA)):
        folder = root / dataset / "batch_id=0"
        folder.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")
    return alerts


def by_key(page: Any, key: str) -> Any:
    """The element of the widget or container with this Streamlit key."""
    return page.locator(f".st-key-{key.replace('.', '-')}")


def queue_rows(page: Any) -> dict[str, dict[str, str]]:
    """The queue table (the page's last table) as user -> row."""
    last = page.locator('[data-testid="stDataFrame"]').count() - 1
    return {row["user"]: row for row in table_rows(page, last) if "user" in row}


def test_record_a_verdict_from_the_queue_and_find_it_after_a_restart(
        browser: Any, broker: EmbeddedBroker, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    alerts = write_alerts(tmp_path / "parquet")
    newest, second = alerts[0], alerts[1]
    verdicts_url = f"sqlite:///{tmp_path / 'verdicts.db'}"
    stem = f"review-browser-{uuid.uuid4().hex[:6]}"
    verdicts_topic = f"verdicts-{stem}"
    ensure_topics(wait_for_broker(broker.client_config(), 10),
                  [TopicSpec(f"alerts-{stem}", 1), TopicSpec(verdicts_topic, 1)])
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "ALERTS_TOPIC": f"alerts-{stem}", "RULES_TOPIC": f"rules-{stem}",
           "TRANSACTIONS_TOPIC": f"tx-{stem}", "DLQ_TOPIC": f"dlq-{stem}",
           "VERDICTS_TOPIC": verdicts_topic, "VERDICTS_URL": verdicts_url,
           "PARQUET_DIR": str(tmp_path / "parquet"),
           "STREAMLIT_SERVER_PORT": str(free_port()), "STREAMLIT_SERVER_ADDRESS": "127.0.0.1"}
    env.pop("FRAUDSTREAM_ANALYST", None)  # the analyst types a name in the sidebar

    with served_dashboard(env, tmp_path / "dashboard-1.log") as url, \
            new_page(browser) as page:
        page.goto(f"{url}/review")
        page.get_by_role("heading", name="Review queue").wait_for()
        wait_on_page(lambda: {u: r["verdict"] for u, r in queue_rows(page).items()} ==
                   {a["user_id"]: "unreviewed" for a in alerts}, "three unreviewed alerts")
        # The risk score as 0.00, an empty cell where there is none; the reasons beside the
        # evidence of the alert under review.
        assert {u: r["risk"] for u, r in queue_rows(page).items()} == {
            "u-review-big": "0.91", "u-review-burst": "0.47", "u-review-older": ""}
        page.get_by_text("Risk score: 0.91").first.wait_for()
        page.get_by_text(SCORE_REASON).first.wait_for()
        assert page.get_by_text("Enter your name as Analyst").count() == 1

        name = page.get_by_role("textbox", name="Analyst")
        name.fill(ANALYST)
        name.press("Enter")
        page.get_by_text("Enter your name as Analyst").wait_for(state="detached")

        # The newest unreviewed alert is the one under review; decide it from the keyboard.
        choice = by_key(page, f"review.verdict.{newest['alert_id']}")
        # The rerun the name caused may still show the previous drawing of the choice beside
        # the new one: click once the page has settled on a single one.
        wait_on_page(lambda: settled(page)
                   and choice.get_by_text("fraud", exact=True).count() == 1,
                   "the verdict choice drawn once")
        choice.get_by_text("fraud", exact=True).click()
        note = by_key(page, f"review.note.{newest['alert_id']}").locator("input")
        note.fill(NOTE)
        note.press("Enter")
        page.get_by_text("published it to").first.wait_for()
        # On to the next unreviewed alert.
        by_key(page, f"review.verdict.{second['alert_id']}").wait_for()
        wait_on_page(lambda: queue_rows(page).get(newest["user_id"], {}).get("verdict") == "fraud",
                   "the verdict in the queue table")

    with VerdictStore(verdicts_url) as store:
        recorded = store.latest()
    assert set(recorded) == {newest["alert_id"]}
    verdict = recorded[newest["alert_id"]]
    assert (verdict.verdict, verdict.note, verdict.analyst) == ("fraud", NOTE, ANALYST)

    # A new server process on the same database: the verdict is still there.
    with served_dashboard(env, tmp_path / "dashboard-2.log") as url, \
            new_page(browser) as page:
        page.goto(f"{url}/review")
        page.get_by_role("heading", name="Review queue").wait_for()
        wait_on_page(lambda: queue_rows(page).get(newest["user_id"], {}).get("verdict") == "fraud",
                   "the verdict in the queue table after the restart")
        row = queue_rows(page)[newest["user_id"]]
        assert row["analyst"] == ANALYST
        assert {queue_rows(page)[a["user_id"]]["verdict"] for a in alerts[1:]} == {"unreviewed"}

        # Open the decided alert: its current verdict and audit trail, with the note.
        choose_option(page, by_key(page, "review.pick"), newest["alert_id"][:8])
        by_key(page, f"review.verdict.{newest['alert_id']}").wait_for()
        page.get_by_text(f"Current verdict: fraud by {ANALYST}").first.wait_for()
        page.get_by_text(f"Note: {NOTE}").first.wait_for()

        target = Path(os.environ.get("REVIEW_SCREENSHOT") or tmp_path / "review.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        wait_on_page(lambda: settled(page), "a settled page")
        page.screenshot(path=str(target), full_page=True)
        assert target.stat().st_size > 10_000

    messages = read_messages(broker.bootstrap_servers, verdicts_topic)
    assert [m.key().decode() for m in messages] == [newest["alert_id"]]
    published = json.loads(messages[0].value())
    assert {k: published[k] for k in ("alert_id", "verdict", "note", "analyst")} == \
        {"alert_id": newest["alert_id"], "verdict": "fraud", "note": NOTE, "analyst": ANALYST}
    assert published["decided_at"].endswith("Z")
    with capsys.disabled():
        print(f"\nReview queue screenshot: {target}")
