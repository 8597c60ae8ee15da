"""The harness shared by the test suite and the benchmarks: a real broker, fresh topics,
producing and reading records, programs in their own process groups, waiting, and quantiles.

Everything here talks to real processes (a Tansu broker, ``python -m spark_job``, the
dashboard); nothing is mocked. One home for these helpers means a test and a benchmark can never
disagree on what "the topic went quiet" or "the detector has stopped" means.

A test or benchmark typically::

    with running_broker(work) as broker:
        topics = fresh_topics(broker.bootstrap_servers, "demo", rules=True)
        produce(broker.bootstrap_servers, topics.transactions, records)
        detector = start_process([sys.executable, "-m", "spark_job", "--available-now"],
                                 work / "detector.log", child_env(topics.env()))
        wait_for(lambda: detector.poll() is not None, 300, "the backfill to finish")
        alerts = read_json(broker.bootstrap_servers, topics.alerts)

Reading a topic always goes from offset 0 with ``assign()`` (no group join, so no rebalance
wait) until the expected count arrived or nothing new came for ``idle_seconds``: Tansu's end
offsets lag behind what it has acknowledged, so reading is the only reliable end check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer
from confluent_kafka import TopicPartition as KafkaPartition

from fraudstream.broker import EmbeddedBroker
from fraudstream.kafka import ensure_topics, wait_for_broker
from fraudstream.topics import TopicSpec

__all__ = [
    "REPO_ROOT",
    "TOPIC_CONFIG",
    "Record",
    "Topics",
    "child_env",
    "create_topics",
    "end_group",
    "end_process",
    "fresh_topics",
    "group_alive",
    "log_tail",
    "produce",
    "quantile",
    "read_json",
    "read_messages",
    "read_values",
    "run_timed",
    "running_broker",
    "start_process",
    "stop_process",
    "summarize",
    "wait_for",
    "wait_until",
]

#: The source checkout (programs are started from here, so ``python -m spark_job`` resolves).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Topic config set explicitly on every topic made here. Tansu's DescribeConfigs returns only
#: configs given at creation, and Quix Streams needs ``retention.ms`` of its input topic to derive
#: its state changelog topics (KeyError otherwise). -1 is what Tansu's memory storage does anyway.
TOPIC_CONFIG: Mapping[str, str] = {"retention.ms": "-1"}

#: A record as sent: (key, value), either may be None.
Record = tuple[bytes | None, bytes | None]


# --- broker and topics ---------------------------------------------------------------------


@contextlib.contextmanager
def running_broker(work: Path) -> Iterator[EmbeddedBroker]:
    """A private Tansu broker on a free port (no default topics: each run makes its own)."""
    with EmbeddedBroker(topics=[], log_path=work / "tansu.log") as broker:
        yield broker


@dataclass(frozen=True)
class Topics:
    """The topics one run of the pipeline uses; ``rules`` None means the default
    ``fraud-rules``."""

    bootstrap: str
    transactions: str
    alerts: str
    dlq: str
    rules: str | None = None

    def env(self) -> dict[str, str]:
        """The environment variables that point every program at these topics."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
               "TRANSACTIONS_TOPIC": self.transactions, "ALERTS_TOPIC": self.alerts,
               "DLQ_TOPIC": self.dlq}
        return env if self.rules is None else {**env, "RULES_TOPIC": self.rules}

    def detector_flags(self) -> list[str]:
        """The same choice as ``python -m spark_job`` flags."""
        flags = [f"--transactions-topic={self.transactions}", f"--alerts-topic={self.alerts}",
                 f"--dlq-topic={self.dlq}"]
        return flags if self.rules is None else [*flags, f"--rules-topic={self.rules}"]


def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    """Create ``names`` with ``partitions`` each; topics that exist are left as they are."""
    admin = wait_for_broker({"bootstrap.servers": bootstrap}, 30)
    ensure_topics(admin, [TopicSpec(name, partitions, config=tuple(TOPIC_CONFIG.items()))
                          for name in names], timeout=30)


def fresh_topics(bootstrap: str, label: str, partitions: int = 3, *,
                 transactions: str | None = None, rules: bool = False) -> Topics:
    """New transactions, alerts and DLQ topics named after ``label`` plus a random tag (an
    existing ``transactions`` topic is reused when given). ``rules=True`` also names a private
    rules topic, which the detector creates (compacted, one partition) on start."""
    tag = f"{label}-{uuid.uuid4().hex[:6]}"
    topics = Topics(bootstrap, transactions or f"tx-{tag}", f"alerts-{tag}", f"dlq-{tag}",
                    f"rules-{tag}" if rules else None)
    names = [topics.alerts, topics.dlq] + ([] if transactions else [topics.transactions])
    create_topics(bootstrap, names, partitions)
    return topics


# --- producing and reading ------------------------------------------------------------------


def produce(bootstrap: str, topic: str, records: Iterable[Record],
            extra_config: Mapping[str, Any] | None = None, timeout: float = 60,
            partition: int | None = None) -> list[tuple[int, int]]:
    """Send (key, value) pairs byte for byte with an idempotent producer and ordinary batching
    (the local broker then under-reports its end offsets, which the source must cope with).
    ``partition`` pins every record to one partition (default: by key). Raises unless every
    record was acknowledged; returns each record's (partition, offset), in input order."""
    failures: list[KafkaError] = []
    positions: list[tuple[int, int]] = []

    def on_delivery(index: int) -> Callable[[KafkaError | None, Any], None]:
        def report(error: KafkaError | None, message: Any) -> None:
            if error is not None:
                failures.append(error)
            else:
                positions[index] = (message.partition(), message.offset())
        return report

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "enable.idempotence": True, "acks": "all", **(extra_config or {})})
    pinned = {} if partition is None else {"partition": partition}
    for index, (key, value) in enumerate(records):
        positions.append((-1, -1))
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery(index),
                                 **pinned)
                break
            except BufferError:
                producer.poll(0.1)
    remaining = producer.flush(timeout)
    if remaining or failures:
        raise AssertionError(f"{remaining} records undelivered, failures: {failures[:3]}")
    return positions


def read_messages(bootstrap: str, topic: str, *, expected: int | None = None,
                  idle_seconds: float = 3.0, deadline_seconds: float = 120.0) -> list[Message]:
    """Every message of ``topic`` from offset 0, until ``expected`` arrived, nothing new came
    for ``idle_seconds``, or ``deadline_seconds`` passed."""
    consumer = Consumer({"bootstrap.servers": bootstrap,
                         "group.id": f"fraudstream-read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    messages: list[Message] = []
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([KafkaPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        end = time.monotonic() + deadline_seconds
        last = time.monotonic()
        while time.monotonic() - last < idle_seconds and time.monotonic() < end:
            if expected is not None and len(messages) >= expected:
                break
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is None:
                    messages.append(message)
                    last = time.monotonic()
    finally:
        consumer.close()
    return messages


def read_values(bootstrap: str, topic: str, **kwargs: Any) -> list[bytes]:
    """The values of :func:`read_messages`."""
    return [message.value() for message in read_messages(bootstrap, topic, **kwargs)]


def read_json(bootstrap: str, topic: str, **kwargs: Any) -> list[dict[str, Any]]:
    """The values of :func:`read_messages`, decoded as JSON."""
    return [json.loads(value) for value in read_values(bootstrap, topic, **kwargs)]


# --- programs in their own process group ------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Spark on the loopback interface and unbuffered output."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYARROW_IGNORE_TIMEZONE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def start_process(cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
                  ) -> subprocess.Popen[bytes]:
    """Start ``cmd`` from the checkout in a new session (its own process group, so stopping it
    reaches Spark's JVM and Python workers too), output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=dict(env or child_env()),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group of zombies still answers killpg; look for a live member.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def end_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM what is left of a process group (e.g. an orphaned JVM), SIGKILL after
    ``grace`` seconds."""
    if not group_alive(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def end_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if ``process`` outlives ``timeout``; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int | None:
    """SIGTERM the program (its clean stop), then clear its process group; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    end_group(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


def run_timed(cmd: Sequence[str], log_path: Path, timeout: float,
              env: Mapping[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds from process start to exit, and the exit code (-1 when it outlived
    ``timeout`` and was stopped)."""
    started = time.monotonic()
    proc = start_process(cmd, log_path, env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return time.monotonic() - started, -1
    seconds = time.monotonic() - started
    end_group(proc.pid)
    return seconds, code


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" when it cannot be read)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- waiting ----------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.25,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll ``condition()`` until it is truthy or ``timeout`` passed (or ``alive()`` turned
    false: the process under test has gone); whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if alive is not None and not alive():
            return bool(condition())
        time.sleep(interval)
    return bool(condition())


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2, alive: Callable[[], bool] | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy and return that; fail with
    ``what`` after ``timeout`` s, or as soon as ``alive`` says the process under test has
    gone."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if alive is not None and not alive():
            raise AssertionError(f"process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- statistics -------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (no interpolation: every reported value was observed)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Count, p50/p95/p99, max and mean of ``values``, rounded to ``digits``."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(quantile(values, 0.50), digits),  # type: ignore[arg-type]
        "p95": round(quantile(values, 0.95), digits),  # type: ignore[arg-type]
        "p99": round(quantile(values, 0.99), digits),  # type: ignore[arg-type]
        "max": round(max(values), digits),
        "mean": round(statistics.fmean(values), digits),
    }
