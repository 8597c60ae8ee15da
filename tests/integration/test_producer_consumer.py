"""The producer and the console consumer as real subprocesses against the session broker.

The broker is shared with other test files: nothing here assumes an empty topic. Records of this
file are told apart by unique user ids, by a private topic, or by reading only from the offsets
recorded before producing and keeping the records timestamped within the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from fraudstream import topics
from fraudstream.broker import EmbeddedBroker, free_port
from fraudstream.schemas import (
    HIGH_VALUE,
    MULTI_LOCATION,
    PAYPAL_MICRO,
    TRANSACTION_FIELDS,
    VELOCITY,
    alert_id,
    parse_timestamp,
)
from fraudstream.settings import CONFIG_ENV
from fraudstream.testing import produce

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def service_env(bootstrap: str | None, **extra: str) -> dict[str, str]:
    """The test process's environment without any fraudstream settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "PRODUCER_", "CONSUMER_")) and k != CONFIG_ENV}
    if bootstrap is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_service(module: str, args: list[str], env: dict[str, str]
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def partitions_of(bootstrap: str, topic: str) -> list[int]:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return sorted(metadata.topics[topic].partitions)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end each partition reports now. Tansu may report less than the true end, which only
    makes the later read include older records; they are filtered out by the caller."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-{uuid.uuid4().hex}"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions_of(bootstrap, topic)}
    finally:
        consumer.close()


def read_records(bootstrap: str, topic: str, start: dict[int, int] | None,
                 done: Callable[[list[tuple[int, bytes | None, bytes]]], bool],
                 timeout: float = 60.0) -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) from ``start`` offsets (None: the beginning) until ``done``
    says so; fails at the deadline."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    offsets = start or dict.fromkeys(partitions_of(bootstrap, topic), OFFSET_BEGINNING)
    consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items()])
    records: list[tuple[int, bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records):
            assert time.monotonic() < deadline, f"gave up after {len(records)} records"
            for message in consumer.consume(1000, timeout=0.5):
                assert message.error() is None, message.error()
                records.append((message.partition(), message.key(), message.value()))
    finally:
        consumer.close()
    return records


class Tail:
    """A service subprocess whose stderr is collected line by line while it runs."""

    def __init__(self, module: str, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr_lines):
            assert self.process.poll() is None, f"exited early: {''.join(self.stderr_lines)}"
            assert time.monotonic() < deadline, f"no {text!r} in: {''.join(self.stderr_lines)}"
            time.sleep(0.05)

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        assert self.process.stdout is not None
        out = self.process.stdout.read()
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code, out, "".join(self.stderr_lines)


@pytest.fixture
def kill_on_exit() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        if tail.process.poll() is None:
            tail.process.kill()
            tail.process.wait(10)


def make_alert(rule: str, user: str, count: int, amount: float) -> dict[str, Any]:
    ids = [f"{user}-{rule}-{i}" for i in range(count)]
    return {
        "alert_id": alert_id(rule, user, ids), "rule": rule, "user_id": user,
        "window_start": "2026-11-22T10:15:02.000Z", "window_end": "2026-11-22T10:15:41.000Z",
        "transaction_count": count, "total_amount": amount, "locations": ["Lyon"],
        "transaction_ids": ids, "reason": f"{rule} evidence ({count})",
        "detected_at": "2026-11-22T10:15:42.310Z",
    }


# --- producer -------------------------------------------------------------------------------------


def test_producer_sends_every_transaction_keyed_by_user(broker: EmbeddedBroker) -> None:
    bootstrap = broker.bootstrap_servers
    start = end_offsets(bootstrap, topics.TRANSACTIONS)
    began = time.time()
    result = run_service("producer", ["--count", "500", "--rate", "0", "--seed", "7"],
                         service_env(bootstrap))
    ended = time.time()
    assert result.returncode == 0, result.stderr
    assert "totals: sent=500 delivered=500 failed=0 undelivered=0" in result.stderr

    def ours(records: list[tuple[int, bytes | None, bytes]]
             ) -> list[tuple[int, bytes | None, bytes, dict[str, Any]]]:
        out = []
        for partition, key, value in records:
            tx = json.loads(value)
            if began - 1 <= parse_timestamp(tx["timestamp"]).timestamp() <= ended + 1:
                out.append((partition, key, value, tx))
        return out

    mine = ours(read_records(bootstrap, topics.TRANSACTIONS, start,
                             lambda r: len(ours(r)) >= 500))
    assert len(mine) == 500
    assert len({tx["transaction_id"] for *_, tx in mine}) == 500
    partitions_by_user: dict[str, set[int]] = defaultdict(set)
    for partition, key, value, tx in mine:
        assert tuple(tx) == TRANSACTION_FIELDS
        assert key == tx["user_id"].encode()
        assert b", " not in value and b": " not in value  # compact JSON
        partitions_by_user[tx["user_id"]].add(partition)
    assert all(len(p) == 1 for p in partitions_by_user.values())
    assert len({next(iter(p)) for p in partitions_by_user.values()}) > 1


def test_producer_replays_a_file_byte_for_byte(broker: EmbeddedBroker, tmp_path: Path) -> None:
    bootstrap = broker.bootstrap_servers
    marker = uuid.uuid4().hex
    lines = [
        json.dumps({"user_id": f"{marker}-a", "amount": 1}).encode(),
        f"not json {marker}".encode(),
        json.dumps({"user_id": f"{marker}-b", "note": "spaced  out"}, indent=None).encode(),
        f'["{marker}"]'.encode(),
    ]
    path = tmp_path / "replay.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    topic = f"it-replay-{marker}"
    result = run_service("producer", ["--from-file", str(path), "--rate", "0",
                                      "--transactions-topic", topic], service_env(bootstrap))
    assert result.returncode == 0, result.stderr
    assert "sent=4 delivered=4" in result.stderr
    records = read_records(bootstrap, topic, None, lambda r: len(r) >= 4)
    by_value = {value: key for _, key, value in records}
    assert by_value == {lines[0]: f"{marker}-a".encode(), lines[1]: None,
                        lines[2]: f"{marker}-b".encode(), lines[3]: None}


def test_producer_stops_cleanly_on_sigterm(broker: EmbeddedBroker,
                                           kill_on_exit: list[Tail]) -> None:
    bootstrap = broker.bootstrap_servers
    topic = f"it-sigterm-{uuid.uuid4().hex}"
    tail = Tail("producer", ["--rate", "300", "--status-interval", "0.3", "--seed", "3",
                             "--transactions-topic", topic], service_env(bootstrap))
    kill_on_exit.append(tail)
    tail.wait_for("delivered=")
    tail.process.send_signal(signal.SIGTERM)
    code, _, err = tail.finish()
    assert code == 0, err
    assert "SIGTERM received" in err
    totals = next(line for line in err.splitlines() if "totals:" in line)
    fields = dict(part.split("=") for part in totals.split("totals: ")[1].split()[:4])
    sent = int(fields["sent"])
    assert sent > 0 and fields["delivered"] == str(sent) and fields["failed"] == "0"
    assert len(read_records(bootstrap, topic, None, lambda r: len(r) >= sent)) == sent


def test_producer_duration_ends_the_run(broker: EmbeddedBroker) -> None:
    bootstrap = broker.bootstrap_servers
    topic = f"it-duration-{uuid.uuid4().hex}"
    result = run_service("producer", ["--duration", "1.5", "--rate-min", "50", "--rate-max",
                                      "80", "--transactions-topic", topic],
                         service_env(bootstrap))
    assert result.returncode == 0, result.stderr
    totals = next(line for line in result.stderr.splitlines() if "totals:" in line)
    sent = int(totals.split("sent=")[1].split()[0])
    assert sent > 0 and f"delivered={sent} failed=0 undelivered=0" in totals
    assert len(read_records(bootstrap, topic, None, lambda r: len(r) >= sent)) == sent


@pytest.mark.parametrize(("module", "args", "env", "key"), [
    ("producer", [], {"KAFKA_BOOTSTRAP_SERVERS": "nohost"}, "KAFKA_BOOTSTRAP_SERVERS"),
    ("producer", ["--rate", "abc"], {}, "--rate"),
    ("producer", [], {"PRODUCER_USERS": "0"}, "PRODUCER_USERS"),
    ("consumer", ["--color", "purple"], {}, "--color"),
    ("consumer", [], {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
])
def test_bad_configuration_exits_2_naming_the_key(module: str, args: list[str],
                                                  env: dict[str, str], key: str) -> None:
    result = run_service(module, args, service_env("127.0.0.1:1", **env))
    assert result.returncode == 2, result.stderr
    assert f"python -m {module}: invalid setting" in result.stderr
    assert key in result.stderr


@pytest.mark.parametrize("module", ["producer", "consumer"])
def test_unreachable_broker_exits_1_naming_the_address(module: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = run_service(module, ["--connect-timeout", "2"], service_env(address))
    assert result.returncode == 1, result.stderr
    assert f"cannot reach Kafka: Kafka at {address} did not answer within 2 s" in result.stderr
    assert time.monotonic() - began < TIMEOUT


# --- consumer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alert_batch(broker: EmbeddedBroker) -> tuple[str, list[dict[str, Any]], tuple[int, int]]:
    """Alerts of one unique user on the shared alerts topic: a malformed record first, then four
    alerts with one duplicate among them (same key: one partition, this order)."""
    user = f"it-{uuid.uuid4().hex[:10]}"
    alerts = [make_alert(VELOCITY, user, 4, 311.2), make_alert(HIGH_VALUE, user, 1, 5000.0),
              make_alert(MULTI_LOCATION, user, 2, 80.5), make_alert(PAYPAL_MICRO, user, 5, 99.0)]
    order = [alerts[0], alerts[1], alerts[0], alerts[2], alerts[3]]
    placed = produce(broker.bootstrap_servers, topics.ALERTS,
                     [(user.encode(), b"{broken json")]
                     + [(user.encode(), json.dumps(a).encode()) for a in order])
    return user, alerts, placed[0]


def test_consumer_prints_each_alert_once_with_totals(
        broker: EmbeddedBroker, alert_batch: tuple[str, list[dict[str, Any]], tuple[int, int]]
) -> None:
    user, alerts, (bad_partition, bad_offset) = alert_batch
    result = run_service("consumer", ["--from-beginning", "--user", user, "--max-alerts", "4",
                                      "--idle-timeout", "30", "--color", "never"],
                         service_env(broker.bootstrap_servers))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [VELOCITY, HIGH_VALUE, MULTI_LOCATION,
                                                   PAYPAL_MICRO]
    for line, alert in zip(lines, alerts, strict=True):
        assert line.startswith(alert["detected_at"])
        assert f"user {user}" in line
        assert f"amount {alert['total_amount']:>10.2f}" in line
        assert f"{alert['transaction_count']:>3} tx" in line
        assert line.endswith(alert["reason"])
    assert "\033" not in result.stdout
    assert (f"skipped malformed alert (partition {bad_partition}, offset {bad_offset}): not JSON"
            in result.stderr)
    assert ("alerts shown: 4 (high_value=1 velocity=1 multi_location=1 paypal_micro=1); "
            "duplicates skipped: 1;") in result.stderr


def test_consumer_json_output_and_rule_filter(
        broker: EmbeddedBroker, alert_batch: tuple[str, list[dict[str, Any]], tuple[int, int]]
) -> None:
    user, alerts, _ = alert_batch
    result = run_service("consumer", ["--from-beginning", "--user", user, "--rule", "paypal_micro",
                                      "--json", "--max-alerts", "1", "--idle-timeout", "30"],
                         service_env(broker.bootstrap_servers))
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [alerts[3]]
    assert "alerts shown: 1 (high_value=0 velocity=0 multi_location=0 paypal_micro=1)" in (
        result.stderr)


def test_consumer_idle_timeout_ends_a_quiet_tail(broker: EmbeddedBroker) -> None:
    result = run_service("consumer", ["--user", f"nobody-{uuid.uuid4().hex}", "--idle-timeout",
                                      "1.5"], service_env(broker.bootstrap_servers))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "no alerts for 1.5 s: exiting" in result.stderr
    assert "alerts shown: 0" in result.stderr


def test_consumer_from_latest_shows_alerts_produced_after_start(
        broker: EmbeddedBroker, kill_on_exit: list[Tail]) -> None:
    user = f"it-{uuid.uuid4().hex[:10]}"
    tail = Tail("consumer", ["--user", user, "--max-alerts", "1", "--idle-timeout", "60",
                             "--color", "always"],
                service_env(broker.bootstrap_servers))
    kill_on_exit.append(tail)
    tail.wait_for("reading fraud-alerts partitions")
    alert = make_alert(VELOCITY, user, 6, 42.0)
    produce(broker.bootstrap_servers, topics.ALERTS, [(user.encode(), json.dumps(alert).encode())])
    code, out, err = tail.finish()
    assert code == 0, err
    assert len(out.splitlines()) == 1
    assert "\033[" in out and user in out and "velocity" in out


def test_consumer_stops_on_sigterm_with_totals(broker: EmbeddedBroker,
                                               kill_on_exit: list[Tail]) -> None:
    tail = Tail("consumer", ["--user", f"nobody-{uuid.uuid4().hex}"],
                service_env(broker.bootstrap_servers))
    kill_on_exit.append(tail)
    tail.wait_for("reading fraud-alerts partitions")
    tail.process.send_signal(signal.SIGTERM)
    code, out, err = tail.finish()
    assert code == 0, err
    assert out == ""
    assert "SIGTERM received" in err and "alerts shown: 0" in err
