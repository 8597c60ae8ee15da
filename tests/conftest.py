"""Session-scoped fixtures shared by every test tier: a real embedded broker, a real Spark
session, and markers applied by folder so `-m unit` / `-m integration` select tiers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudstream.broker import EmbeddedBroker

REPO_ROOT = Path(__file__).resolve().parent.parent
TIER_BY_FOLDER = {"unit": "unit", "integration": "integration", "e2e": "e2e", "chaos": "chaos",
                  "docker": "docker", "browser": "browser"}

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")


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
def spark():  # type: ignore[no-untyped-def]
    """One real local Spark session (local[2]) for the whole test session."""
    from spark_job.session import build_spark_session

    session = build_spark_session("local[2]", app_name="fraudstream-tests", shuffle_partitions=2)
    yield session
    session.stop()
