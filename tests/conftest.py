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


@pytest.fixture
def unique_topics(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> dict[str, str]:
    """Fresh transactions/alerts/DLQ topics for one test, so tests sharing the session broker
    never see each other's records. Returns the env vars that point the services at them."""
    import re

    from fraudstream.testing import fresh_topics

    label = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40]
    return fresh_topics(broker.bootstrap_servers, label, 3, rules=True).env()
