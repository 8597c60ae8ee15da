"""The verdict store against real databases (an SQLite file, a real PostgreSQL server), and the
verdicts topic on the session broker.

Every store test runs on both backends; each PostgreSQL test gets its own empty database on one
server started for this module.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.postgres import create_database, postgres_server

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.datasets import ALERTS_SCHEMA
from fraudstream.schemas import ALERTS_DATASET, alert_id
from fraudstream.testing import read_messages
from fraudstream.verdicts import (
    MAX_NOTE,
    SCHEMA_VERSION,
    RecordedVerdict,
    UnknownAlert,
    Verdict,
    VerdictError,
    VerdictPublisher,
    VerdictPublishError,
    VerdictStore,
    VerdictStoreError,
    decide,
    make_verdict,
    parquet_alert_ids,
)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def an_alert(n: int) -> str:
    return alert_id("velocity", f"u{n:04d}", [f"t{n}-{i}" for i in range(4)])


def verdict(alert: str, word: str = "fraud", analyst: str = "alice", note: str = "",
            minutes: float = 0) -> Verdict:
    return make_verdict(alert, word, analyst, note, T0 + timedelta(minutes=minutes))


def contract(recorded: Verdict) -> dict[str, object]:
    return recorded.to_dict()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/verdicts.db"
    return create_database(request.getfixturevalue("postgres"))


@pytest.fixture
def store(url: str) -> Iterator[VerdictStore]:
    with VerdictStore(url) as opened:
        yield opened


@pytest.fixture
def verdicts_topic(broker: EmbeddedBroker, request: pytest.FixtureRequest) -> str:
    """A fresh topic name (the publisher creates it)."""
    return f"verdicts-{request.node.name[:30]}-{uuid.uuid4().hex[:6]}".replace("[", "-") \
        .replace("]", "")


def write_alerts(parquet_dir: Path, ids: list[str], batch: int = 0) -> None:
    """One batch of the detector's alerts dataset holding these ids."""
    folder = parquet_dir / ALERTS_DATASET / f"batch_id={batch}"
    folder.mkdir(parents=True)
    rows = [{"alert_id": i, "rule": "velocity", "rule_version": 1, "user_id": "u0001",
             "window_start": T0, "window_end": T0, "transaction_count": 4,
             "total_amount": 10.0, "locations": ["Lyon"], "transaction_ids": ["a"],
             "reason": "test", "detected_at": T0} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=ALERTS_SCHEMA), folder / "part-0.parquet")


# --- schema -------------------------------------------------------------------------------------


def test_migrations_create_the_schema_on_an_empty_database_once(url: str) -> None:
    with VerdictStore(url) as first:
        assert first.migrate() == SCHEMA_VERSION
        assert first.migrate() == SCHEMA_VERSION  # idempotent
        first.record(verdict(an_alert(1)))
    with VerdictStore(url) as again:
        assert again.migrate() == SCHEMA_VERSION
        assert again.count() == 1  # migrating again kept the rows


def test_first_use_migrates_without_an_explicit_call(url: str) -> None:
    with VerdictStore(url) as fresh:
        assert fresh.count() == 0
        assert fresh.latest() == {}
        assert fresh.history() == []


def test_concurrent_first_uses_migrate_once(url: str) -> None:
    stores = [VerdictStore(url) for _ in range(3)]
    barrier = threading.Barrier(len(stores))
    versions: list[int] = []
    errors: list[BaseException] = []

    def first_use(store: VerdictStore) -> None:
        try:
            barrier.wait(10)
            versions.append(store.migrate())
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.close()
    assert errors == []
    assert versions == [SCHEMA_VERSION] * len(stores)


# --- recording and reading ----------------------------------------------------------------------


def test_record_latest_and_history(store: VerdictStore) -> None:
    a, b = an_alert(1), an_alert(2)
    before = datetime.now(UTC)
    first = store.record(verdict(a, "unsure", "alice", "calling the customer"))
    assert isinstance(first, RecordedVerdict)
    assert first.id > 0 and before <= first.recorded_at <= datetime.now(UTC)
    assert contract(first) == contract(verdict(a, "unsure", "alice", "calling the customer"))
    second = store.record(verdict(b, "legit", "bob", minutes=1))
    third = store.record(verdict(a, "fraud", "alice", "card stolen", minutes=2))
    assert third.id > second.id > first.id

    assert store.count() == 3
    assert store.latest() == {a: third, b: second}
    assert store.latest([a]) == {a: third}
    assert store.latest([b, an_alert(9)]) == {b: second}  # no verdict: absent
    assert store.latest([]) == {}
    assert store.history(a) == [first, third]
    assert store.history() == [first, second, third]
    assert store.history(an_alert(9)) == []


def test_the_newest_decision_wins_not_the_last_recorded(store: VerdictStore) -> None:
    a = an_alert(1)
    newer = store.record(verdict(a, "fraud", "alice", minutes=10))
    older = store.record(verdict(a, "legit", "bob", minutes=5))  # recorded later, decided before
    assert store.latest([a]) == {a: newer}
    assert store.history(a) == [older, newer]  # oldest decision first: the last one is in force
    tie = store.record(verdict(a, "unsure", "carol", minutes=10))  # same time: the later row
    assert store.latest([a]) == {a: tie}
    assert store.count() == 3  # every change is kept


def test_latest_reads_many_alerts_at_once(store: VerdictStore) -> None:
    ids = [an_alert(n) for n in range(1200)]  # more than one IN list
    for n, alert in enumerate(ids[::100]):
        store.record(verdict(alert, "fraud", f"analyst{n}"))
    found = store.latest(ids)
    assert sorted(found) == sorted(ids[::100])
    assert {v.analyst for v in found.values()} == {f"analyst{n}" for n in range(12)}


def test_two_analysts_at_once_both_kept_later_decision_wins(url: str) -> None:
    """Two programs (two stores, two connection pools) record on the same alert at the same
    moment."""
    a = an_alert(1)
    with VerdictStore(url) as setup:
        setup.migrate()
    stores = [VerdictStore(url), VerdictStore(url)]
    choices = [verdict(a, "legit", "alice", "known customer", minutes=1),
               verdict(a, "fraud", "bob", "card reported stolen", minutes=2)]
    barrier = threading.Barrier(2)
    recorded: list[RecordedVerdict] = []
    errors: list[BaseException] = []

    def analyst(store: VerdictStore, choice: Verdict) -> None:
        try:
            barrier.wait(10)
            recorded.append(store.record(choice))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=analyst, args=pair) for pair in zip(stores, choices,
                                                                           strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    with VerdictStore(url) as reader:
        trail = reader.history(a)
        assert [(v.analyst, v.verdict) for v in trail] == [("alice", "legit"), ("bob", "fraud")]
        assert sorted(v.id for v in trail) == sorted(v.id for v in recorded)
        assert reader.latest([a])[a].analyst == "bob"
    for store in stores:
        store.close()


def test_an_unknown_alert_is_refused_and_nothing_stored(store: VerdictStore,
                                                        tmp_path: Path) -> None:
    known_alert, unknown_alert = an_alert(1), an_alert(2)
    write_alerts(tmp_path / "parquet", [known_alert])
    known = parquet_alert_ids(tmp_path / "parquet")
    with pytest.raises(UnknownAlert, match=f"no alert {unknown_alert} is known"):
        decide(store, verdict(unknown_alert), known=known.__contains__, publisher=None)
    assert store.count() == 0
    recorded = decide(store, verdict(known_alert), known=known.__contains__, publisher=None)
    assert store.latest() == {known_alert: recorded}


def test_an_over_long_note_is_refused_and_nothing_stored(store: VerdictStore) -> None:
    with pytest.raises(VerdictError, match="note"):
        make_verdict(an_alert(1), "fraud", "alice", "n" * (MAX_NOTE + 1))
    # A Verdict built without make_verdict is checked again before it reaches the database.
    forged = dataclasses.replace(verdict(an_alert(1)), note="n" * (MAX_NOTE + 1))
    with pytest.raises(VerdictError, match="note"):
        store.record(forged)
    unknown_word = dataclasses.replace(verdict(an_alert(1)), verdict="maybe")
    with pytest.raises(VerdictError, match="verdict"):
        store.record(unknown_word)
    assert store.count() == 0


def test_parquet_alert_ids_reads_every_batch_once(tmp_path: Path) -> None:
    assert parquet_alert_ids(tmp_path / "missing") == set()
    write_alerts(tmp_path, [an_alert(1), an_alert(2)], batch=0)
    write_alerts(tmp_path, [an_alert(2), an_alert(3)], batch=1)  # a replayed alert
    (tmp_path / ALERTS_DATASET / "batch_id=2").mkdir()
    (tmp_path / ALERTS_DATASET / "batch_id=2" / ".part-0.tmp").write_bytes(b"half written")
    assert parquet_alert_ids(tmp_path) == {an_alert(1), an_alert(2), an_alert(3)}


# --- databases that cannot be used --------------------------------------------------------------


def test_an_unreachable_postgresql_server_is_a_clear_error() -> None:
    url = f"postgresql+psycopg://fraud:hunter2@127.0.0.1:{free_port()}/fraud"
    started = time.monotonic()
    with VerdictStore(url, timeout=2) as store, pytest.raises(VerdictStoreError) as info:
        store.record(verdict(an_alert(1)))
    message = str(info.value)
    assert "postgresql+psycopg://fraud:***@127.0.0.1" in message
    assert "hunter2" not in message
    assert "unreachable" in message and "VERDICTS_URL" in message
    assert time.monotonic() - started < 30


def test_a_sqlite_file_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    url = f"sqlite:///{blocker}/verdicts.db"
    with pytest.raises(VerdictStoreError) as info:
        VerdictStore(url).record(verdict(an_alert(1)))
    assert f"sqlite:///{blocker}/verdicts.db" in str(info.value)
    assert "VERDICTS_URL" in str(info.value)
    # A place even root cannot write to.
    with pytest.raises(VerdictStoreError, match="cannot create the folder"):
        VerdictStore("sqlite:////proc/fraudstream-verdicts/verdicts.db").count()


def test_a_read_only_sqlite_database_is_read_but_not_written(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.db"
    with VerdictStore(f"sqlite:///{path}") as writable:
        kept = writable.record(verdict(an_alert(1)))
    read_only = f"sqlite:///file:{path}?mode=ro&uri=true"
    with VerdictStore(read_only) as store:
        assert store.latest() == {kept.alert_id: kept}
        with pytest.raises(VerdictStoreError) as info:
            store.record(verdict(an_alert(2)))
    assert "not writable" in str(info.value) and "Nothing was changed" in str(info.value)
    with VerdictStore(f"sqlite:///{path}") as again:
        assert again.history() == [kept]


def test_a_locked_sqlite_database_fails_after_the_timeout_and_loses_nothing(
        tmp_path: Path) -> None:
    path = tmp_path / "verdicts.db"
    with VerdictStore(f"sqlite:///{path}") as first:
        kept = first.record(verdict(an_alert(1)))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another program holds the write lock
        with VerdictStore(f"sqlite:///{path}", timeout=0.5) as store:
            started = time.monotonic()
            with pytest.raises(VerdictStoreError) as info:
                store.record(verdict(an_alert(2)))
            waited = time.monotonic() - started
            assert 0.4 <= waited < 10
            assert "locked by another writer for more than 0.5 s" in str(info.value)
            assert f"sqlite:///{path}" in str(info.value)
            assert store.history() == [kept]  # reading still works, the earlier row is there
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with VerdictStore(f"sqlite:///{path}") as after:
        assert after.history() == [kept]
        after.record(verdict(an_alert(2)))
        assert after.count() == 2


# --- the verdicts topic -------------------------------------------------------------------------


def read_verdicts(broker: EmbeddedBroker, topic: str) -> list[tuple[str, dict[str, object]]]:
    return [(m.key().decode(), json.loads(m.value()))
            for m in read_messages(broker.bootstrap_servers, topic, idle_seconds=2)]


def test_decide_records_then_publishes(store: VerdictStore, broker: EmbeddedBroker,
                                       verdicts_topic: str) -> None:
    a = an_alert(1)
    with VerdictPublisher(broker.client_config(), verdicts_topic) as publisher:
        first = decide(store, verdict(a, "unsure", "alice", "checking"), known=lambda _: True,
                       publisher=publisher)
        second = decide(store, verdict(a, "fraud", "bob", minutes=1), known=lambda _: True,
                        publisher=publisher)
    assert read_verdicts(broker, verdicts_topic) == [(a, contract(first)), (a, contract(second))]
    assert store.history(a) == [first, second]


def test_publishing_to_an_unreachable_broker_keeps_the_verdict_recorded(
        store: VerdictStore) -> None:
    publisher = VerdictPublisher({"bootstrap.servers": f"127.0.0.1:{free_port()}"},
                                 "fraud-verdicts", timeout=2)
    with pytest.raises(VerdictPublishError) as info:
        publisher.publish(verdict(an_alert(1)))
    assert "'fraud-verdicts'" in str(info.value)
    with pytest.raises(VerdictPublishError) as info:
        decide(store, verdict(an_alert(1)), known=lambda _: True, publisher=publisher)
    message = str(info.value)
    assert "is recorded in" in message and "--republish-verdicts" in message
    assert info.value.recorded is not None
    assert store.latest() == {an_alert(1): info.value.recorded}


def test_republish_leaves_the_stores_verdict_newest_per_key(
        store: VerdictStore, broker: EmbeddedBroker, verdicts_topic: str) -> None:
    a, b = an_alert(1), an_alert(2)
    store.record(verdict(a, "fraud", "alice", minutes=10))
    store.record(verdict(b, "legit", "bob", minutes=3))
    store.record(verdict(a, "legit", "carol", minutes=5))  # recorded last, decided before
    with VerdictPublisher(broker.client_config(), verdicts_topic) as publisher:
        assert publisher.republish(store) == 3
    published = read_verdicts(broker, verdicts_topic)
    assert published == [(v.alert_id, contract(v)) for v in store.history()]
    newest_on_topic = dict(published)  # the last record per key
    assert newest_on_topic == {k: contract(v) for k, v in store.latest().items()}


def test_verdicts_published_one_by_one_arrive_in_order(broker: EmbeddedBroker,
                                                       verdicts_topic: str) -> None:
    items = [verdict(an_alert(n), minutes=n) for n in range(5)]
    with VerdictPublisher(broker.client_config(), verdicts_topic) as publisher:
        for item in items:
            publisher.publish(item)
    assert read_verdicts(broker, verdicts_topic) == [(v.alert_id, contract(v)) for v in items]
