"""Session-scoped fixtures shared by every test tier: a real embedded broker, a real Spark
session, and markers applied by folder so `-m unit` / `-m integration` select tiers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudstream.broker import EmbeddedBroker

REPO_ROOT = Path(__file__).resolve().parent.parent
TIER_BY_FOLDER = {"unit": "unit", "integration": "integration", "e2e": "e2e", "chaos": "chaos",
                  "docker": "docker", "browser": "browser"}

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
# Programs started by tests must not score with a model someone trained in the working copy
# (MODELS_DIR defaults to ./models): an empty folder unless a test names its own.
os.environ["MODELS_DIR"] = tempfile.mkdtemp(prefix="fraudstream-test-models-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO_ROOT / "tests").parts
        tier = TIER_BY_FOLDER.get(parts[0]) if len(parts) > 1 else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real Tansu broker on a free port for the whole session, with the three topics."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for every browser test (``support.browser``: the system's
    Chromium driven by Playwright; skips without it, fails under CI)."""
    from support.browser import chromium

    with chromium() as launched:
        yield launched


@pytest.fixture(scope="session")
def spark():  # type: ignore[no-untyped-def]
    """One real local Spark session (local[2]) for the whole test session."""
    from spark_job.session import build_spark_session

    session = build_spark_session("local[2]", app_name="fraudstream-tests", shuffle_partitions=2)
    yield session
    session.stop()


def read_topic(bootstrap: str, topic: str, idle_seconds: float = 3.0,
               deadline_seconds: float = 60.0) -> list:  # type: ignore[type-arg]
    """Every message of a topic, read with assign() from offset 0 until it stays idle."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "fraudstream-tests",
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages = []
        deadline = time.monotonic() + deadline_seconds
        last = time.monotonic()
        while time.monotonic() - last < idle_seconds and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
                    last = time.monotonic()
        return messages
    finally:
        consumer.close()


@pytest.fixture
def unique_topics(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> dict[str, str]:
    """Fresh transactions/alerts/DLQ topics for one test, so tests sharing the session broker
    never see each other's records. Returns the env vars that point the services at them."""
    import re
    import uuid

    from fraudstream.kafka import ensure_topics, wait_for_broker
    from fraudstream.topics import default_topic_specs

    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:6]
    names = {"transactions": f"tx-{stem}", "alerts": f"alerts-{stem}", "dlq": f"dlq-{stem}",
             "rules": f"rules-{stem}"}
    admin = wait_for_broker(broker.client_config(), 10)
    ensure_topics(admin, default_topic_specs(3, transactions=names["transactions"],
                                             alerts=names["alerts"], dlq=names["dlq"]))
    return {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "TRANSACTIONS_TOPIC": names["transactions"],
        "ALERTS_TOPIC": names["alerts"],
        "DLQ_TOPIC": names["dlq"],
        "RULES_TOPIC": names["rules"],
    }
