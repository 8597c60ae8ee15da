"""The served dashboard (``python -m dashboard``) in headless Chromium, against the real embedded
broker: alerts produced to ``fraud-alerts`` show up in the live table, charts render, the user
filter narrows the table, and the Topics page lists the pipeline's topics.

Needs /usr/bin/chromium and the playwright package; both are installed here if missing and
possible (apt-get as root, pip) and never is a browser downloaded. Without them the tests skip,
except under CI (``CI`` set), where they fail.

Set ``DASHBOARD_SCREENSHOT=docs/dashboard.png`` to save a screenshot of the live page.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from dashboard.data.parquet import TRANSACTIONS_SCHEMA
from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.schemas import (
    HIGH_VALUE,
    METRICS_FILE_NAME,
    METRICS_FOLDER,
    MULTI_LOCATION,
    PAYPAL,
    PAYPAL_MICRO,
    TRANSACTIONS_DATASET,
    VELOCITY,
    alert_id,
    format_timestamp,
)
from fraudstream.topics import ALERTS, DLQ, TRANSACTIONS

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run",
                 "--disable-sync"]
TIMEOUT = 60.0


# --- tools ----------------------------------------------------------------------------------------


def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} is not available and could not be installed")


def _ensure_chromium() -> bool:
    if os.access(CHROMIUM, os.X_OK):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "chromium"], env=env, check=False)
    return os.access(CHROMIUM, os.X_OK)


def _ensure_playwright() -> bool:
    try:
        importlib.import_module("playwright.sync_api")
        return True
    except ImportError:
        # The package only: the browser is the system's Chromium, never a download.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"],
                       check=False)
        importlib.invalidate_caches()
        try:
            importlib.import_module("playwright.sync_api")
            return True
        except ImportError:
            return False


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not _ensure_chromium():
        _unavailable(CHROMIUM)
    if not _ensure_playwright():
        _unavailable("the playwright package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# --- what the pipeline would have produced ------------------------------------------------------
# A stand-in for producer -> detector: labelled transactions in Parquet, the detector's metrics
# lines, and contract-shaped alerts on the alerts topic.

NOW = datetime.now(UTC)
CITIES = ["Lyon", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Amsterdam", "Lisbon"]


def _tx(rng: random.Random, user: str, at: datetime, amount: float, city: str,
        method: str = "card", pattern: str | None = None) -> dict[str, Any]:
    return {"transaction_id": f"t{rng.getrandbits(48):012x}", "user_id": user, "amount": amount,
            "currency": "EUR", "event_time": at, "location": city, "payment_method": method,
            "merchant_id": f"m{rng.randrange(200):03d}", "device_ip": "203.0.113.7",
            "is_fraud": pattern is not None, "fraud_pattern": pattern, "key": user,
            "topic": TRANSACTIONS, "partition": 0, "offset": 0, "kafka_timestamp": at}


def _episode(rng: random.Random, rule: str, user: str, start: datetime) -> list[dict[str, Any]]:
    if rule == HIGH_VALUE:
        return [_tx(rng, user, start, round(rng.uniform(3600, 9000), 2), rng.choice(CITIES),
                    pattern=rule)]
    if rule == VELOCITY:
        city = rng.choice(CITIES)
        return [_tx(rng, user, start + timedelta(seconds=8 * i),
                    round(rng.uniform(20, 400), 2), city, pattern=rule) for i in range(4)]
    if rule == MULTI_LOCATION:
        first, second = rng.sample(CITIES, 2)
        return [_tx(rng, user, start, 80.0, first, pattern=rule),
                _tx(rng, user, start + timedelta(seconds=50), 95.0, second, pattern=rule)]
    city = rng.choice(CITIES)
    return [_tx(rng, user, start + timedelta(seconds=30 * i), round(rng.uniform(2, 49), 2),
                city, PAYPAL, pattern=rule) for i in range(4)]


def _alert(rule: str, evidence: list[dict[str, Any]]) -> dict[str, Any]:
    user = evidence[0]["user_id"]
    ids = [t["transaction_id"] for t in evidence]
    end = max(t["event_time"] for t in evidence)
    return {"alert_id": alert_id(rule, user, ids), "rule": rule, "user_id": user,
            "window_start": format_timestamp(min(t["event_time"] for t in evidence)),
            "window_end": format_timestamp(end), "transaction_count": len(ids),
            "total_amount": round(sum(t["amount"] for t in evidence), 2),
            "locations": sorted({t["location"] for t in evidence}), "transaction_ids": ids,
            "reason": f"{rule}: {len(ids)} transactions",
            "detected_at": format_timestamp(end + timedelta(milliseconds=900))}


def feed_pipeline_output(broker: EmbeddedBroker, parquet_dir: Path
                         ) -> tuple[list[dict[str, Any]], Callable[..., dict[str, Any]]]:
    """Write the history and produce the alerts; returns them and a function producing one
    more alert (rule, user) the way the detector would."""
    rng = random.Random(7)
    txs: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    rules = [VELOCITY, HIGH_VALUE, MULTI_LOCATION, PAYPAL_MICRO]
    for i, user in enumerate(["u-alpha", "u-beta", "u-gamma", "u-delta", "u-alpha", "u-beta"]):
        episode = _episode(rng, rules[i % 4], user, NOW - timedelta(minutes=12 - 2 * i))
        txs += episode
        alerts.append(_alert(rules[i % 4], episode))
    for n in range(600):
        txs.append(_tx(rng, f"u{rng.randrange(300):04d}", NOW - timedelta(seconds=900 - 1.5 * n),
                       round(rng.lognormvariate(3.6, 1.0), 2), rng.choice(CITIES),
                       rng.choice(["card", "card", PAYPAL, "apple_pay"])))
    folder = parquet_dir / TRANSACTIONS_DATASET / "batch_id=0"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(txs, schema=TRANSACTIONS_SCHEMA),
                   folder / "part-0.parquet")
    metrics = parquet_dir / METRICS_FOLDER / METRICS_FILE_NAME
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({
        "batch_id": b, "written_at": format_timestamp(NOW - timedelta(seconds=600 - 10 * b)),
        "input_rows": 40, "valid_rows": 40, "dlq_rows": 0, "late_rows": 0, "alerts": {},
        "batch_seconds": 0.3, "rows_per_second": 130.0, "watermark": None,
        "latency_ms_p50": 700 + 40 * rng.random(), "latency_ms_p95": 1100 + 200 * rng.random(),
        "latency_ms_max": 1500.0}) + "\n" for b in range(60)))

    producer = Producer(broker.client_config())

    def produce(alert: dict[str, Any]) -> dict[str, Any]:
        producer.produce(ALERTS, key=alert["user_id"], value=json.dumps(alert))
        assert producer.flush(15) == 0
        return alert

    for alert in alerts:
        produce(alert)

    def produce_new(rule: str, user: str) -> dict[str, Any]:
        return produce(_alert(rule, _episode(rng, rule, user, datetime.now(UTC))))

    return alerts, produce_new


# --- the served app -------------------------------------------------------------------------------


class Served:
    def __init__(self, url: str, alerts: list[dict[str, Any]],
                 produce_new: Callable[[str, str], dict[str, Any]]) -> None:
        self.url = url
        self.alerts = alerts
        self.produce_new = produce_new


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("dashboard")
    parquet_dir = work / "parquet"
    alerts, produce_new = feed_pipeline_output(broker, parquet_dir)
    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
           "PARQUET_DIR": str(parquet_dir), "STREAMLIT_SERVER_PORT": str(port),
           "STREAMLIT_SERVER_ADDRESS": "127.0.0.1"}
    log_path = work / "dashboard.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dashboard"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dashboard did not become healthy"
            time.sleep(0.2)
        yield Served(url, alerts, produce_new)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def page(chromium: Any, served: Served) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1500, "height": 2200})
    context.set_default_timeout(TIMEOUT * 1000)
    page = context.new_page()
    yield page
    context.close()


def grid_text(page: Any) -> list[str]:
    """Cell texts of the dataframes: the grid draws on a canvas, and mirrors the visible cells
    as DOM text in an accessible table, which is what a screen reader (and this test) reads."""
    return page.locator('[data-testid="stDataFrame"] [role="gridcell"]').all_text_contents()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def settled(page: Any) -> bool:
    """No element left over from the previous run (Streamlit dims those during a rerun)."""
    return page.locator('[data-testid="stElementContainer"][data-stale="true"]').count() == 0


def users_shown(page: Any) -> set[str]:
    return {text for text in grid_text(page) if text.startswith("u-")}


# --- tests ----------------------------------------------------------------------------------------


def test_live_page_lists_the_alerts_and_draws_the_chart(page: Any, served: Served) -> None:
    page.goto(served.url)
    expected = {a["user_id"] for a in served.alerts}
    wait_until(lambda: expected <= users_shown(page), f"users {expected} in the alert table")
    page.locator(".js-plotly-plot .main-svg").first.wait_for()
    assert page.locator(".js-plotly-plot .main-svg").count() >= 1
    assert page.get_by_text("Kafka broker unreachable").count() == 0


def test_user_filter_narrows_the_table(page: Any, served: Served) -> None:
    page.goto(served.url)
    wait_until(lambda: {"u-alpha", "u-beta"} <= users_shown(page), "the alert table")
    box = page.get_by_role("textbox", name="User", exact=True)
    box.fill("u-beta")
    box.press("Enter")
    wait_until(lambda: users_shown(page) == {"u-beta"}, "only u-beta in the table")


def test_new_alert_reaches_the_page(page: Any, served: Served,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Produce alerts one at a time and time each until its user id is in the table."""
    page.goto(served.url)
    wait_until(lambda: "u-alpha" in users_shown(page), "the alert table")
    seconds = []
    for sample in range(5):
        user = f"u-new-{sample}-{time.time_ns()}"
        started = time.monotonic()
        served.produce_new(VELOCITY, user)
        wait_until(lambda user=user: user in users_shown(page), f"{user} in the alert table")
        seconds.append(time.monotonic() - started)
    with capsys.disabled():
        print(f"\nnew alert produced -> shown on the live page (refresh every 3 s): "
              f"{', '.join(f'{s:.2f}' for s in seconds)} s; max {max(seconds):.2f} s")


def test_overview_draws_every_chart(page: Any, served: Served) -> None:
    page.goto(f"{served.url}/overview")
    wait_until(lambda: page.locator(".js-plotly-plot .main-svg").count() >= 6, "six charts")
    assert page.locator(".js-plotly-plot .scattergeo").count() >= 1, "the map has points"
    assert page.get_by_text("DLQ rows").count() == 1


def test_topics_page_lists_the_topics(page: Any, served: Served) -> None:
    page.goto(served.url)
    page.get_by_role("link", name="Topics").click()
    topics = {TRANSACTIONS, ALERTS, DLQ}
    wait_until(lambda: topics <= set(grid_text(page)), f"topics {topics}")


def test_screenshot_of_the_live_page(page: Any, served: Served, tmp_path: Path) -> None:
    page.goto(served.url)
    wait_until(lambda: "u-alpha" in users_shown(page), "the alert table")
    page.get_by_role("combobox", name="Alert", exact=True).click()
    page.get_by_role("option", name="u-alpha").first.click()
    page.get_by_text("Evidence:").wait_for()
    target = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_until(lambda: settled(page), "a settled page")
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
