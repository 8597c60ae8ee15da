"""The Rules page of the served dashboard (``python -m dashboard``) in headless Chromium, against
the real embedded broker: a fresh rules topic holding the four default rules, an analyst who
types a name in the sidebar, refuses a window beyond the retention horizon (nothing published),
then changes the velocity count to 5 and publishes version 2, which the table and the topic
then hold. Ends with a full-page screenshot whose path is printed.

No detector runs: the page reads and writes the rules topic itself, so the workflow needs only
the broker. Chromium and Playwright come from ``support.browser`` (the system's
/usr/bin/chromium, never a downloaded browser); without them the test skips, except under CI.

Set ``RULES_SCREENSHOT=docs/rules.png`` to choose where the screenshot goes (default: pytest's
tmp dir).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.browser import (
    new_page,
    served_dashboard,
    settled,
    table_rows,
    wait_until,
)

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.rules import MICROS, RuleDefinition, default_definitions
from fraudstream.rules.store import RulesTopic
from fraudstream.schemas import VELOCITY

ANALYST = "Browser Analyst"
RETENTION_SECONDS = 600


@dataclass(frozen=True)
class Served:
    url: str
    topic: RulesTopic

    def in_force(self) -> dict[str, RuleDefinition]:
        return dict(self.topic.state(RETENTION_SECONDS * MICROS)[0].rules)


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """The dashboard on a rules topic of this module's own that holds the four defaults."""
    work = tmp_path_factory.mktemp("rules-dashboard")
    stem = f"rules-browser-{uuid.uuid4().hex[:6]}"
    topic = RulesTopic(broker.client_config(), f"rules-{stem}")
    for definition in default_definitions():
        topic.publish(definition)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "RULES_TOPIC": topic.topic, "ALERTS_TOPIC": f"alerts-{stem}",
           "TRANSACTIONS_TOPIC": f"tx-{stem}", "DLQ_TOPIC": f"dlq-{stem}",
           "PARQUET_DIR": str(work / "parquet"), "RETENTION_SECONDS": str(RETENTION_SECONDS),
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
    wait_until(lambda: versions(page) == {d.rule_id: "1" for d in default_definitions()},
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
    wait_until(lambda: versions(page).get(VELOCITY) == "2", "velocity at version 2 in the table")
    assert {rule: v for rule, v in versions(page).items() if rule != VELOCITY} == \
        {d.rule_id: "1" for d in default_definitions() if d.rule_id != VELOCITY}

    published = served.in_force()[VELOCITY]
    assert (published.version, published.updated_by) == (2, ANALYST)
    assert dict(published.params) == {"count": 5, "window_seconds": 60.0}
    # The new version's form holds the published value.
    assert by_key(page, "rules.edit.velocity.2.count").locator("input").input_value() == "5"

    target = Path(os.environ.get("RULES_SCREENSHOT") or tmp_path / "rules.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_until(lambda: settled(page), "a settled page")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nRules page screenshot: {target}")
