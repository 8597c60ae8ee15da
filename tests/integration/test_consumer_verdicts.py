"""The console's verdict commands as real ``python -m consumer`` subprocesses against the
session broker, an SQLite file of the test's own and a Parquet alerts dataset written here.

Each test gets its own topics (``unique_topics`` plus a fresh verdicts topic), database and
Parquet folder, and checks what was stored (with ``VerdictStore``) and published (by reading
the verdicts topic back).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.datasets import ALERTS_SCHEMA
from fraudstream.schemas import ALERTS_DATASET, alert_id, format_timestamp
from fraudstream.settings import CONFIG_ENV
from fraudstream.testing import read_messages
from fraudstream.verdicts import MAX_NOTE, VerdictStore

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
#: Settings of the console that must not leak in from the environment running the tests.
OWN_ENV = ("KAFKA_", "CONSUMER_", "FRAUDSTREAM_", "VERDICTS_", "PARQUET_DIR", "LOG_LEVEL",
           CONFIG_ENV)
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

Cli = Callable[..., subprocess.CompletedProcess[str]]


def make_alert(user: str, n: int) -> dict[str, Any]:
    """One alert as the contract has it on the topic (times as text)."""
    tx_ids = [f"{user}-tx{n}-{i}" for i in range(4)]
    when = T0 + timedelta(minutes=n)
    return {"alert_id": alert_id("velocity", user, tx_ids), "rule": "velocity",
            "rule_version": 1, "user_id": user, "window_start": format_timestamp(when),
            "window_end": format_timestamp(when), "transaction_count": 4,
            "total_amount": 311.2, "locations": ["Lyon"], "transaction_ids": tx_ids,
            "reason": "4 transactions within 60 s (limit 3)",
            "detected_at": format_timestamp(when)}


@pytest.fixture
def env(unique_topics: dict[str, str], tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(OWN_ENV)}
    return {**base, **unique_topics,
            "VERDICTS_TOPIC": f"verdicts-{uuid.uuid4().hex[:10]}",
            "VERDICTS_URL": f"sqlite:///{tmp_path}/run/verdicts.db",
            "PARQUET_DIR": str(tmp_path / "parquet"),
            "CONSUMER_CONNECT_TIMEOUT": "15",
            "FRAUDSTREAM_ANALYST": "alice",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cli(env: dict[str, str]) -> Cli:
    def run(*args: str, drop: tuple[str, ...] = (), **extra_env: str
            ) -> subprocess.CompletedProcess[str]:
        command_env = {k: v for k, v in {**env, **extra_env}.items() if k not in drop}
        return subprocess.run([sys.executable, "-m", "consumer", *args], cwd=REPO_ROOT,
                              env=command_env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)

    return run


@pytest.fixture
def parquet_alerts(env: dict[str, str]) -> list[dict[str, Any]]:
    """Three alerts in the Parquet history (as the detector writes it), not on the topic."""
    alerts = [make_alert(f"pq-{uuid.uuid4().hex[:6]}", n) for n in range(3)]
    folder = Path(env["PARQUET_DIR"]) / ALERTS_DATASET / "batch_id=0"
    folder.mkdir(parents=True)
    times = ("window_start", "window_end", "detected_at")
    rows = [{**a, **{t: datetime.fromisoformat(a[t]) for t in times}} for a in alerts]
    pq.write_table(pa.Table.from_pylist(rows, schema=ALERTS_SCHEMA), folder / "part-0.parquet")
    return alerts


def produce_alerts(env: dict[str, str], alerts: list[dict[str, Any]]) -> None:
    producer = Producer({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]})
    for alert in alerts:
        producer.produce(env["ALERTS_TOPIC"], key=alert["user_id"].encode(),
                         value=json.dumps(alert).encode())
    assert producer.flush(30) == 0


def store_of(env: dict[str, str]) -> VerdictStore:
    return VerdictStore(env["VERDICTS_URL"])


def published(broker: EmbeddedBroker, env: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    return [(m.key().decode(), json.loads(m.value()))
            for m in read_messages(broker.bootstrap_servers, env["VERDICTS_TOPIC"],
                                idle_seconds=2)]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single line a refused or failed command prints on standard error."""
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m consumer: ")
    return lines[0]


# --- giving a verdict ---------------------------------------------------------------------------


def test_a_verdict_on_a_parquet_alert_is_recorded_and_published(
        cli: Cli, env: dict[str, str], broker: EmbeddedBroker,
        parquet_alerts: list[dict[str, Any]]) -> None:
    target = parquet_alerts[1]["alert_id"]
    result = ok(cli("--verdict", target, "FRAUD", "--note", "customer confirmed card stolen",
                    "--analyst", "bob"))
    assert f"recorded verdict #1 on alert {target}: fraud by bob" in result.stdout
    assert env["VERDICTS_URL"] in result.stdout
    assert f"published to {env['VERDICTS_TOPIC']}" in result.stdout
    with store_of(env) as store:
        current = store.latest()
    assert list(current) == [target]
    assert (current[target].verdict, current[target].analyst, current[target].note) == (
        "fraud", "bob", "customer confirmed card stolen")
    assert published(broker, env) == [(target, current[target].to_dict())]


def test_the_analyst_is_the_flag_else_the_environment_else_the_login_name(
        cli: Cli, env: dict[str, str], parquet_alerts: list[dict[str, Any]]) -> None:
    target = parquet_alerts[0]["alert_id"]
    ok(cli("--verdict", target, "unsure", "--analyst", "bob", FRAUDSTREAM_ANALYST="carol"))
    ok(cli("--verdict", target, "legit", FRAUDSTREAM_ANALYST="carol"))
    ok(cli("--verdict", target, "fraud", drop=("FRAUDSTREAM_ANALYST",)))
    with store_of(env) as store:
        trail = store.history(target)
    assert [(v.verdict, v.analyst) for v in trail] == [
        ("unsure", "bob"), ("legit", "carol"), ("fraud", getpass.getuser())]


def test_an_alert_only_on_the_alerts_topic_is_known(
        cli: Cli, env: dict[str, str], broker: EmbeddedBroker,
        parquet_alerts: list[dict[str, Any]]) -> None:
    live = [make_alert(f"live-{uuid.uuid4().hex[:6]}", n) for n in range(5)]
    produce_alerts(env, live)
    target = live[3]["alert_id"]
    result = ok(cli("--verdict", target, "legit", "--analyst", "dave"))
    assert f"on alert {target}: legit by dave" in result.stdout
    assert [key for key, _ in published(broker, env)] == [target]


@pytest.mark.parametrize(("args", "reasons"), [
    (("--verdict", alert_id("velocity", "nobody", ["x"]), "fraud"),
     ("no alert", "nothing was recorded")),
    (("--verdict", "PARQUET_ALERT", "maybe"), ("verdict: expected one of fraud, legit, unsure",)),
    (("--verdict", "PARQUET_ALERT", "fraud", "--note", "n" * (MAX_NOTE + 1)),
     (f"note: {MAX_NOTE + 1} characters",)),
    (("--verdict", "123", "fraud"), ("alert_id: expected the 32 hex characters",)),
    (("--note", "why"), ("--note and --analyst go with --verdict",)),
    (("--verdict-history", "not-an-id"), ("alert_id:",)),
])
def test_refusals_exit_2_with_one_line_and_store_nothing(
        cli: Cli, env: dict[str, str], broker: EmbeddedBroker,
        parquet_alerts: list[dict[str, Any]], args: tuple[str, ...], reasons: tuple[str, ...]
) -> None:
    args = tuple(parquet_alerts[0]["alert_id"] if a == "PARQUET_ALERT" else a for a in args)
    line = one_line(cli(*args), 2)
    for reason in reasons:
        assert reason in line
    with store_of(env) as store:
        assert store.count() == 0
    assert published(broker, env) == []


def test_an_invalid_database_url_stops_start_up_naming_the_key(cli: Cli) -> None:
    line = one_line(cli("--verdict-history", alert_id("velocity", "u", ["x"]),
                        VERDICTS_URL="mysql://user@localhost/fraud"), 2)
    assert "invalid setting VERDICTS_URL" in line and "unsupported database 'mysql'" in line


# --- failures -----------------------------------------------------------------------------------


def test_an_unreachable_database_exits_1_with_one_line(
        cli: Cli, parquet_alerts: list[dict[str, Any]]) -> None:
    url = f"postgresql+psycopg://fraud:hunter2@127.0.0.1:{free_port()}/fraud"
    line = one_line(cli("--verdict", parquet_alerts[0]["alert_id"], "fraud", "--analyst", "bob",
                        VERDICTS_URL=url), 1)
    assert "postgresql+psycopg://fraud:***@127.0.0.1" in line and "hunter2" not in line
    assert "unreachable" in line and "VERDICTS_URL" in line
    line = one_line(cli("--verdict-history", parquet_alerts[0]["alert_id"], VERDICTS_URL=url), 1)
    assert "unreachable" in line


def test_an_unreachable_broker_keeps_the_verdict_recorded_and_republish_repairs_the_topic(
        cli: Cli, env: dict[str, str], broker: EmbeddedBroker,
        parquet_alerts: list[dict[str, Any]]) -> None:
    target = parquet_alerts[2]["alert_id"]
    down = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
            "CONSUMER_CONNECT_TIMEOUT": "2"}
    result = cli("--verdict", target, "fraud", "--analyst", "bob", **down)
    line = one_line(result, 1)
    assert f"verdict #1 on alert {target} is recorded in {env['VERDICTS_URL']}" in line
    assert f"'{env['VERDICTS_TOPIC']}'" in line
    assert "python -m consumer --republish-verdicts" in line
    assert f"recorded verdict #1 on alert {target}" in result.stdout
    # An alert the Parquet history does not hold cannot be checked without the broker.
    unknown = alert_id("velocity", "nobody", ["y"])
    line = one_line(cli("--verdict", unknown, "fraud", "--analyst", "bob", **down), 1)
    assert f"cannot look alert {unknown} up on topic" in line
    with store_of(env) as store:
        assert [v.alert_id for v in store.history()] == [target]
        recorded = store.history()
    assert published(broker, env) == []

    result = ok(cli("--republish-verdicts"))
    assert f"re-published 1 verdict from {env['VERDICTS_URL']} to {env['VERDICTS_TOPIC']}" in (
        result.stdout)
    assert published(broker, env) == [(target, recorded[0].to_dict())]


def test_republish_with_the_broker_down_exits_1(cli: Cli, env: dict[str, str]) -> None:
    line = one_line(cli("--republish-verdicts", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
                        CONSUMER_CONNECT_TIMEOUT="2"), 1)
    assert f"'{env['VERDICTS_TOPIC']}'" in line


# --- reading ------------------------------------------------------------------------------------


def test_verdict_history_prints_the_audit_trail_oldest_first(
        cli: Cli, env: dict[str, str], parquet_alerts: list[dict[str, Any]]) -> None:
    target = parquet_alerts[0]["alert_id"]
    assert ok(cli("--verdict-history", target)).stdout.strip() == (
        f"no verdict recorded for alert {target}")
    ok(cli("--verdict", target, "unsure", "--note", "calling the customer", "--analyst", "bob"))
    ok(cli("--verdict", target, "legit", "--note", "customer confirmed", "--analyst", "carol"))
    ok(cli("--verdict", parquet_alerts[1]["alert_id"], "fraud", "--analyst", "dave"))
    lines = ok(cli("--verdict-history", target)).stdout.splitlines()
    assert lines[0] == f"alert {target}: 2 verdicts; in force: legit by carol"
    assert "unsure" in lines[1] and "by bob" in lines[1] and "calling the customer" in lines[1]
    assert "legit" in lines[2] and "by carol" in lines[2] and "#2" in lines[2]
    assert len(lines) == 3  # dave's verdict is on another alert
    as_json = [json.loads(line) for line in ok(cli("--verdict-history", target, "--json")
                                               ).stdout.splitlines()]
    assert [(v["id"], v["verdict"], v["analyst"]) for v in as_json] == [
        (1, "unsure", "bob"), (2, "legit", "carol")]
    with store_of(env) as store:
        assert [v.to_dict() for v in store.history(target)] == [
            {k: v[k] for k in ("alert_id", "verdict", "note", "analyst", "decided_at")}
            for v in as_json]


def test_show_verdicts_adds_the_current_verdict_to_each_line(
        cli: Cli, env: dict[str, str]) -> None:
    user = f"show-{uuid.uuid4().hex[:6]}"
    decided, undecided = make_alert(user, 1), make_alert(user, 2)
    produce_alerts(env, [decided, undecided])
    ok(cli("--verdict", decided["alert_id"], "legit", "--analyst", "bob"))
    ok(cli("--verdict", decided["alert_id"], "fraud", "--analyst", "carol"))
    tail = ["--from-beginning", "--max-alerts", "2", "--idle-timeout", "30"]
    result = ok(cli(*tail, "--show-verdicts", "--color", "never"))
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(decided["detected_at"])
    assert lines[0].endswith(f"{decided['reason']}  [fraud by carol]")
    assert lines[1].endswith(undecided["reason"])
    as_json = [json.loads(line) for line in ok(cli(*tail, "--show-verdicts", "--json")
                                               ).stdout.splitlines()]
    assert [(a["alert_id"], (a["verdict"] or {}).get("verdict")) for a in as_json] == [
        (decided["alert_id"], "fraud"), (undecided["alert_id"], None)]
    # Without the flag the lines are as before, and the database is not needed.
    plain = ok(cli(*tail, "--color", "never", VERDICTS_URL="postgresql://x@127.0.0.1:1/x"))
    assert plain.stdout.splitlines()[0].endswith(decided["reason"])


def test_show_verdicts_with_an_unreachable_database_exits_1(cli: Cli) -> None:
    url = f"postgresql+psycopg://fraud@127.0.0.1:{free_port()}/fraud"
    result = cli("--show-verdicts", "--idle-timeout", "5", VERDICTS_URL=url)
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "127.0.0.1" in result.stderr
