"""What every benchmark shares: machine facts, versions, result files, the broker and topics,
seeded data, preloading, running the detector as a subprocess, live senders and tails, and the
process-tree memory sampler.

The detector is always measured through its public CLI (``python -m spark_job``) in a
subprocess, so start-up, the JVM and the Python workers are all inside the measurement, exactly
as an operator would run it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import NewTopic

from fraudstream import schemas
from fraudstream.broker import EmbeddedBroker
from fraudstream.kafka import wait_for_broker
from fraudstream.rules import RuleDefinition
from fraudstream.rules.oracle import expected_alerts
from producer.generator import (
    HIGH_VALUE_AMOUNT,
    VELOCITY_COUNT,
    TransactionGenerator,
    encode_transaction,
    to_ms,
    users_needed,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
#: Seed of every generated data set unless --seed says otherwise (same seed, same bytes).
DEFAULT_SEED = 20261122
#: Interpreter that has quixstreams (it pins confluent-kafka < 2.13, so it may live in its own
#: virtualenv); the default is the running one.
QUIX_PYTHON_ENV = "QUIX_PYTHON"
#: Topic config set explicitly on every benchmark topic. Tansu's DescribeConfigs returns only
#: configs given at creation, and Quix Streams needs ``retention.ms`` of its input topic to derive
#: its state changelog topics (KeyError otherwise). -1 is what Tansu's memory storage does anyway.
TOPIC_CONFIG: Mapping[str, str] = {"retention.ms": "-1"}
#: Fast preloading: big batches, many in flight. Offsets stay exact (idempotent, acks=all).
PRELOAD_PRODUCER_CONFIG: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 50,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
MB = 1024 * 1024


# --- machine facts and versions ---------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _mem_total_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on. Load average is sampled again at the end of the run: a
    busy machine (other jobs on the same cores) makes any figure meaningless."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "ram_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _command_output(cmd: Sequence[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text or None


def java_version() -> str | None:
    java = shutil.which("java")
    if java is None and os.environ.get("JAVA_HOME"):
        java = str(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    text = _command_output([java, "-version"]) if java else None
    return text.splitlines()[0] if text else None


def resolve_quix_python(explicit: str | None = None) -> str:
    return explicit or os.environ.get(QUIX_PYTHON_ENV) or sys.executable


def quix_versions(python: str) -> dict[str, str] | None:
    """quixstreams and confluent-kafka as seen by the interpreter that runs the Quix peer."""
    code = ("import json, quixstreams, confluent_kafka; print(json.dumps({'quixstreams': "
            "quixstreams.__version__, 'confluent_kafka': confluent_kafka.__version__, "
            "'librdkafka': confluent_kafka.libversion()[0]}))")
    try:
        done = subprocess.run([python, "-W", "ignore", "-c", code], capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(lines[-1])
    return None


def versions(quix_python: str | None = None) -> dict[str, Any]:
    import confluent_kafka

    from fraudstream.broker import tansu_binary

    tansu = None
    with contextlib.suppress(FileNotFoundError):
        tansu = _command_output([tansu_binary(), "--version"])
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "fraudstream": _package_version("fraudstream"),
        "pyspark": _package_version("pyspark"),
        "java": java_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "pyarrow": _package_version("pyarrow"),
        "pandas": _package_version("pandas"),
        "tansu": tansu,
        "quixstreams": _package_version("quixstreams"),
    }
    if quix_python is not None:
        quix = quix_versions(quix_python)
        out["quix_python"] = quix_python
        out["quix_env"] = quix
        if quix:
            out["quixstreams"] = quix["quixstreams"]
    return out


def git_revision() -> dict[str, Any]:
    """The commit measured, and whether the detector had uncommitted changes (read-only git)."""
    commit = _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = _command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                             "spark_job", "fraudstream", "producer"])
    return {"commit": commit if commit and re.fullmatch(r"[0-9a-f]{40}", commit) else None,
            "uncommitted_changes": sorted(dirty.splitlines()) if dirty else []}


# --- results ----------------------------------------------------------------------------------


def write_results(name: str, payload: Mapping[str, Any], results_dir: Path) -> tuple[Path, Path]:
    """``<name>-<UTC timestamp>.json`` (kept) and ``<name>-latest.json`` (overwritten)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    stamped = results_dir / f"{name}-{stamp}.json"
    latest = results_dir / f"{name}-latest.json"
    stamped.write_text(text, encoding="utf-8")
    latest.write_text(text, encoding="utf-8")
    return stamped, latest


def read_latest(name: str, results_dir: Path) -> dict[str, Any] | None:
    path = results_dir / f"{name}-latest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class Report:
    """Collects one benchmark's JSON payload: the machine before/after, versions, settings."""

    def __init__(self, name: str, args: argparse.Namespace, settings: Mapping[str, Any],
                 quix_python: str | None = None) -> None:
        self.name = name
        self.args = args
        self.started = utc_now()
        self.payload: dict[str, Any] = {
            "benchmark": name,
            "quick": bool(args.quick),
            "started_at": self.started.isoformat(),
            "command": [sys.executable, "-m", f"benchmarks.{name}", *sys.argv[1:]],
            "machine": {**machine_facts(), "load_average_before": load_average()},
            "versions": versions(quix_python),
            "git": git_revision(),
            "settings": dict(settings),
        }

    def finish(self, **sections: Any) -> tuple[Path, Path]:
        self.payload.update(sections)
        self.payload["machine"]["load_average_after"] = load_average()
        self.payload["finished_at"] = utc_now().isoformat()
        self.payload["elapsed_seconds"] = round((utc_now() - self.started).total_seconds(), 1)
        return write_results(self.name, self.payload, Path(self.args.results_dir))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
              for r in body]
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks the harness works, measures nothing")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR),
                        help="where the JSON results go (default: benchmarks/results)")
    parser.add_argument("--work-dir", default=None,
                        help="scratch folder for checkpoints, Parquet and logs (default: a "
                             "temporary folder, removed at the end unless --keep-work)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    parser.add_argument("--partitions", type=int, default=3,
                        help="partitions of the transactions topic")
    return parser


def add_detector_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for python -m spark_job (repeatable), e.g. "
                             "--detector-arg=--shuffle-partitions=4")


@contextlib.contextmanager
def work_dir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    if args.work_dir:
        path = Path(args.work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=f"fraudstream-bench-{name}-"))
    try:
        yield path
    finally:
        if args.keep_work:
            print(f"work folder kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the result table."""
    print(f"[{utc_now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- broker and topics ------------------------------------------------------------------------


@contextlib.contextmanager
def running_broker(work: Path) -> Iterator[EmbeddedBroker]:
    """A private Tansu broker on a free port (no default topics: each run makes its own)."""
    with EmbeddedBroker(topics=[], log_path=work / "tansu.log") as broker:
        yield broker


@dataclass(frozen=True)
class Topics:
    transactions: str
    alerts: str
    dlq: str

    def detector_flags(self) -> list[str]:
        return [f"--transactions-topic={self.transactions}", f"--alerts-topic={self.alerts}",
                f"--dlq-topic={self.dlq}"]


def create_topics(bootstrap: str, names: Iterable[str], partitions: int) -> None:
    admin = wait_for_broker({"bootstrap.servers": bootstrap}, 30)
    wanted = [NewTopic(n, num_partitions=partitions, replication_factor=1,
                       config=dict(TOPIC_CONFIG)) for n in names]
    for name, future in admin.create_topics(wanted, request_timeout=30).items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise RuntimeError(f"cannot create topic {name}: {exc}") from exc


def fresh_topics(bootstrap: str, stem: str, partitions: int,
                 transactions: str | None = None) -> Topics:
    """New alerts and DLQ topics (and transactions, unless an existing one is given)."""
    tag = f"{stem}-{uuid.uuid4().hex[:6]}"
    topics = Topics(transactions or f"tx-{tag}", f"alerts-{tag}", f"dlq-{tag}")
    names = [topics.alerts, topics.dlq] + ([] if transactions else [topics.transactions])
    create_topics(bootstrap, names, partitions)
    return topics


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A generated stream: ``count`` events on a simulated clock at ``rate`` tx/s whose event
    times end about now (so no event is in the detector's future and none is ancient)."""

    count: int
    rate: float = 100.0
    users: int = 5000
    fraud_ratio: float = 0.02
    seed: int = DEFAULT_SEED
    merchants: int = 200

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(spec: DataSpec, end: datetime | None = None) -> list[schemas.Transaction]:
    end = end or utc_now()
    start = end - timedelta(seconds=spec.count / spec.rate)
    generator = TransactionGenerator(users=spec.users, merchants=spec.merchants,
                                     fraud_ratio=spec.fraud_ratio, seed=spec.seed)
    return generator.generate(spec.count, start=start, rate=spec.rate)


def preload(bootstrap: str, topic: str, transactions: Sequence[schemas.Transaction]
            ) -> dict[str, Any]:
    """Produce every transaction (keyed by user) and wait for all acknowledgements."""
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, _message: object) -> None:
        if error is not None and len(failures) < 5:
            failures.append(str(error))

    producer = Producer({"bootstrap.servers": bootstrap, **PRELOAD_PRODUCER_CONFIG,
                         "on_delivery": on_delivery, "delivery.report.only.error": True})
    started = time.monotonic()
    for tx in transactions:
        value = encode_transaction(tx)
        while True:
            try:
                producer.produce(topic, value, tx["user_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(300)
    seconds = time.monotonic() - started
    if remaining or failures:
        raise RuntimeError(f"preload of {topic}: {remaining} undelivered, errors: {failures}")
    return {"topic": topic, "records": len(transactions), "seconds": round(seconds, 2),
            "records_per_second": round(len(transactions) / seconds, 1) if seconds else None}


def distinct_users_in_window(transactions: Sequence[schemas.Transaction], window_ms: int
                             ) -> int:
    """The largest number of distinct users seen within any ``window_ms`` of event time."""
    events = sorted((to_ms(schemas.parse_timestamp(tx["timestamp"])), tx["user_id"])
                    for tx in transactions)
    counts: dict[str, int] = {}
    best = 0
    left = 0
    for t, user in events:
        counts[user] = counts.get(user, 0) + 1
        while events[left][0] < t - window_ms:
            old = events[left][1]
            counts[old] -= 1
            if not counts[old]:
                del counts[old]
            left += 1
        best = max(best, len(counts))
    return best


def oracle_by_id(transactions: Sequence[Mapping[str, Any]],
                 rules: Sequence[RuleDefinition] | None = None) -> dict[str, dict[str, Any]]:
    """The oracle's alerts by id, under ``rules`` (default: the four default rules)."""
    return {a["alert_id"]: a for a in expected_alerts(transactions, rules)}


def compare_alerts(found: Sequence[Mapping[str, Any]], expected: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """Alerts found vs the oracle, by alert_id, overall and per rule."""
    found_ids = [a["alert_id"] for a in found]
    found_by_id = {a["alert_id"]: a for a in found}
    missing = sorted(set(expected) - set(found_by_id))
    unexpected = sorted(set(found_by_id) - set(expected))
    by_rule: dict[str, dict[str, int]] = {}
    seen = {a["rule"] for a in expected.values()} | {a["rule"] for a in found_by_id.values()}
    for rule in [*schemas.RULES, *sorted(seen - set(schemas.RULES))]:
        want = {i for i, a in expected.items() if a["rule"] == rule}
        got = {i for i, a in found_by_id.items() if a["rule"] == rule}
        by_rule[rule] = {"expected": len(want), "found": len(got),
                         "missing": len(want - got), "unexpected": len(got - want)}
    return {
        "match": not missing and not unexpected,
        "expected": len(expected),
        "found": len(found_by_id),
        "duplicates": len(found_ids) - len(found_by_id),
        "missing": len(missing),
        "unexpected": len(unexpected),
        "missing_sample": [dict(expected[i]) for i in missing[:5]],
        "unexpected_sample": [dict(found_by_id[i]) for i in unexpected[:5]],
        "by_rule": by_rule,
    }


def loud_mismatch(label: str, comparison: Mapping[str, Any]) -> None:
    if comparison["match"]:
        return
    banner = "!" * 78
    say(f"{banner}\nALERTS DIFFER FROM THE ORACLE ({label}): expected {comparison['expected']}, "
        f"found {comparison['found']}, missing {comparison['missing']}, unexpected "
        f"{comparison['unexpected']}\nper rule: {json.dumps(comparison['by_rule'])}\n{banner}")


# --- statistics -------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (no interpolation: every reported value was observed)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
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


# --- processes --------------------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYARROW_IGNORE_TIMEZONE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def detector_command(bootstrap: str, topics: Topics, run_dir: Path, *, available_now: bool,
                     extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m spark_job`` on fresh Parquet and checkpoint folders, alerts off the console."""
    cmd = [sys.executable, "-m", "spark_job", f"--bootstrap-servers={bootstrap}",
           *topics.detector_flags(), f"--parquet-dir={run_dir / 'parquet'}",
           f"--checkpoint-dir={run_dir / 'checkpoint'}", "--no-console-alerts"]
    if available_now:
        cmd.append("--available-now")
    # Scoring is on only where a benchmark names a model (--models-dir in extra_args).
    if not any(arg.startswith("--models-dir") for arg in extra_args):
        cmd.append(f"--models-dir={run_dir / 'models'}")
    return [*cmd, *extra_args]


def start_process(cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
                  ) -> subprocess.Popen[bytes]:
    """Start in a new session (its own process group), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), cwd=REPO_ROOT, env=dict(env or child_env()),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_group(pgid: int, grace: float = 10.0) -> None:
    """Stop what is left of a process group this harness started (e.g. an orphaned JVM)."""
    if not _group_alive(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int | None:
    """SIGTERM the program (its clean stop), then clear its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"pid {proc.pid} did not stop within {timeout:.0f} s; killing its group")
    end_group(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return proc.returncode


def run_timed(cmd: Sequence[str], log_path: Path, timeout: float,
              env: Mapping[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds from process start to exit, and the exit code."""
    started = time.monotonic()
    proc = start_process(cmd, log_path, env)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{cmd[:3]} still running after {timeout:.0f} s: stopping it")
        stop_process(proc)
        return time.monotonic() - started, -1
    seconds = time.monotonic() - started
    end_group(proc.pid)
    return seconds, code


def log_tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- detector outputs -------------------------------------------------------------------------


def parquet_alerts(parquet_dir: Path) -> list[dict[str, Any]]:
    """Every alert row the detector wrote (every epoch, repeats kept: the comparison with the
    oracle counts duplicates)."""
    import pyarrow as pa

    from fraudstream.datasets import ALERTS_SCHEMA, read_dataset

    columns = ["alert_id", "rule", "user_id", "transaction_ids"]
    schema = pa.schema([ALERTS_SCHEMA.field(name) for name in columns])
    return read_dataset(parquet_dir, schemas.ALERTS_DATASET, schema, distinct=False).to_pylist()


def metrics_path(parquet_dir: Path) -> Path:
    return parquet_dir / schemas.METRICS_FOLDER / schemas.METRICS_FILE_NAME


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every parseable line of a JSON-lines file that may still be being written."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def summarize_batches(lines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The detector's own per-batch metrics, summarised (rows, batch time, rows/s, latency)."""
    busy = [line for line in lines if line.get("input_rows")]
    seconds = [float(line["batch_seconds"]) for line in busy]
    rates = [float(line["rows_per_second"]) for line in busy]
    rows = sum(int(line.get("input_rows") or 0) for line in lines)

    def values(key: str) -> list[float]:
        return [float(line[key]) for line in lines if line.get(key) is not None]

    return {
        "batches": len(lines),
        "input_rows": rows,
        "late_rows": sum(int(line.get("late_rows") or 0) for line in lines),
        "dlq_rows": sum(int(line.get("dlq_rows") or 0) for line in lines),
        "alerts": {rule: sum(int((line.get("alerts") or {}).get(rule, 0)) for line in lines)
                   for rule in schemas.RULES},
        "batch_seconds": summarize(seconds),
        "batch_seconds_total": round(sum(seconds), 3),
        "rows_per_second_overall": round(rows / sum(seconds), 1) if sum(seconds) else None,
        "rows_per_second": summarize(rates, 1),
        "latency_ms_p50": summarize(values("latency_ms_p50"), 1),
        "latency_ms_p95": summarize(values("latency_ms_p95"), 1),
        "latency_ms_max": summarize(values("latency_ms_max"), 1),
    }


def read_topic(bootstrap: str, topic: str, expected: int | None = None, idle: float = 5.0,
               deadline: float = 300.0) -> list[bytes]:
    """Every value of a topic, read with assign() from the beginning until ``expected`` values
    arrived or nothing came for ``idle`` seconds."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    values: list[bytes] = []
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        consumer.assign([KafkaPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        end = time.monotonic() + deadline
        last = time.monotonic()
        while time.monotonic() - last < idle and time.monotonic() < end:
            if expected is not None and len(values) >= expected:
                break
            for message in consumer.consume(1000, timeout=0.5):
                if message.error() is None:
                    values.append(message.value())
                    last = time.monotonic()
    finally:
        consumer.close()
    return values


def wait_for(condition: Any, timeout: float, interval: float = 0.25,
             alive: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``condition()`` until true or the deadline (or ``alive`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if alive is not None and alive.poll() is not None:
            return bool(condition())
        time.sleep(interval)
    return bool(condition())


# --- live traffic -----------------------------------------------------------------------------


@dataclass
class SentTx:
    send_time: float  # time.time() just before produce()
    event_ms: int
    ack_time: float | None = None


class TriggerInjector:
    """Scheduled rule triggers mixed into live traffic, each on a fresh user of its own.

    The generator's own episodes wait for a user idle for 250 s, so in a short live run they
    start minutes late; these give a steady supply of samples instead. Each high_value trigger
    is one card payment above the default rule's amount; each velocity episode is one more small
    card payment than the default rule's count (four), ``gap`` s apart in one place (the last
    makes the rule true). Fresh user ids (``bench-`` prefix) never meet normal traffic, so no
    other rule can fire for them.
    """

    def __init__(self, high_value_per_s: float, velocity_per_s: float, gap_s: float = 2.0,
                 seed: int = DEFAULT_SEED) -> None:
        import heapq
        import random

        self._heapq = heapq
        self.rng = random.Random(seed)
        self.gap_ms = int(gap_s * 1000)
        self.periods_ms = {schemas.HIGH_VALUE: 1000 / high_value_per_s if high_value_per_s
                           else None,
                           schemas.VELOCITY: 1000 / velocity_per_s if velocity_per_s else None}
        self.next_start: dict[str, float] = {}
        self.pending: list[tuple[int, int, dict[str, Any]]] = []
        self.seq = 0
        self.users = 0

    def _tx(self, user: str, pattern: str, amount: float, at_ms: int) -> dict[str, Any]:
        return {"transaction_id": f"{self.rng.getrandbits(128):032x}", "user_id": user,
                "amount": amount, "currency": "EUR", "timestamp": "", "location": "Paris",
                "payment_method": "card", "merchant_id": "m000", "device_ip": "198.51.100.7",
                "is_fraud": True, "fraud_pattern": pattern, "_due": at_ms}

    def _schedule(self, now_ms: int) -> None:
        for rule, period in self.periods_ms.items():
            if period is None:
                continue
            start = self.next_start.setdefault(rule, now_ms + period)
            while start <= now_ms:
                self.users += 1
                user = f"bench-{rule.replace('_', '')}-{self.users:06d}"
                if rule == schemas.HIGH_VALUE:
                    low = HIGH_VALUE_AMOUNT + 100
                    events = [self._tx(user, rule, round(self.rng.uniform(low, 9000), 2),
                                       int(start))]
                else:
                    events = [self._tx(user, rule, round(self.rng.uniform(5, 45), 2),
                                       int(start) + k * self.gap_ms)
                              for k in range(VELOCITY_COUNT + 1)]
                for event in events:
                    self.seq += 1
                    self._heapq.heappush(self.pending, (event["_due"], self.seq, event))
                start += period
            self.next_start[rule] = start

    def pop_due(self, now_ms: int) -> dict[str, Any] | None:
        """The next injected transaction due by ``now_ms``, stamped with event time now."""
        self._schedule(now_ms)
        if not self.pending or self.pending[0][0] > now_ms:
            return None
        event = self._heapq.heappop(self.pending)[2]
        event.pop("_due")
        event["timestamp"] = schemas.format_timestamp(
            datetime.fromtimestamp(now_ms / 1000, UTC))
        return event


class PacedSender(threading.Thread):
    """Generated transactions at a fixed rate, event time = wall clock, keyed by user.

    Remembers, per transaction_id, when it was handed to the client and when the broker
    acknowledged it, so an alert's latency can be measured from its trigger transaction.
    """

    def __init__(self, bootstrap: str, topic: str, rate: float, generator: TransactionGenerator,
                 injector: TriggerInjector | None = None,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        super().__init__(name="paced-sender", daemon=True)
        from producer.app import PRODUCER_DEFAULTS

        self.topic = topic
        self.rate = rate
        self.generator = generator
        self.injector = injector
        self.config = {**PRODUCER_DEFAULTS, "client.id": "fraudstream-bench",
                       **(producer_config or {}), "bootstrap.servers": bootstrap}
        self.sent: dict[str, SentTx] = {}
        self.transactions: list[schemas.Transaction] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    def _acked(self, tx_id: str, error: KafkaError | None, _message: object) -> None:
        if error is None:
            self.sent[tx_id].ack_time = time.time()
        elif len(self.errors) < 10:
            self.errors.append(str(error))

    def run(self) -> None:
        producer = Producer(self.config)
        produce, poll = producer.produce, producer.poll
        started = time.monotonic()
        self.started_at = time.time()
        budget, last = 0.0, started
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                # A stall is forgiven beyond one second's worth, never caught up in a burst.
                budget = min(budget + (now - last) * self.rate, max(1.0, self.rate))
                last = now
                while budget >= 1.0:
                    budget -= 1.0
                    now_ms = time.time_ns() // 1_000_000
                    tx = self.injector.pop_due(now_ms) if self.injector else None
                    if tx is None:
                        tx = self.generator.next_at(now_ms)
                    tx_id = tx["transaction_id"]
                    event_ms = to_ms(schemas.parse_timestamp(tx["timestamp"]))
                    self.sent[tx_id] = SentTx(time.time(), event_ms)
                    while True:
                        try:
                            produce(self.topic, encode_transaction(tx), tx["user_id"].encode(),
                                    on_delivery=functools.partial(self._acked, tx_id))
                            break
                        except BufferError:
                            poll(0.01)
                    self.transactions.append(tx)
                poll(0)
                time.sleep(max(0.0, min(0.005, (1.0 - budget) / self.rate)))
        finally:
            self.stopped_at = time.time()
            producer.flush(30)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


@dataclass
class Received:
    receive_time: float
    value: bytes


class AlertTail(threading.Thread):
    """An assign()-based reader of every partition of the alerts topic from the beginning
    (no consumer group: on this broker a group join takes ~23 s), stamping receive times."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="alert-tail", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.received: list[Received] = []
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"bench-tail-{uuid.uuid4().hex}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 10, "fetch.min.bytes": 1,
        })
        try:
            partitions = sorted(consumer.list_topics(self.topic, timeout=30)
                                .topics[self.topic].partitions)
            consumer.assign([KafkaPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
            self.ready.set()
            while not self.stopping.is_set():
                for message in consumer.consume(500, timeout=0.05):
                    if message.error() is None:
                        self.received.append(Received(time.time(), message.value()))
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def alerts(self) -> list[tuple[float, dict[str, Any]]]:
        """(first receive time, alert) per alert_id."""
        seen: dict[str, tuple[float, dict[str, Any]]] = {}
        for item in list(self.received):
            with contextlib.suppress(ValueError):
                alert = json.loads(item.value)
                seen.setdefault(alert["alert_id"], (item.receive_time, alert))
        return list(seen.values())


def live_generator(rate: float, fraud_ratio: float, seed: int) -> TransactionGenerator:
    users = max(5000, users_needed(rate, fraud_ratio))
    return TransactionGenerator(users=users, fraud_ratio=fraud_ratio, seed=seed)


# --- memory -----------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command, which may contain spaces.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    head = Path(argv[0].decode(errors="replace")).name if argv and argv[0] else ""
    joined = b" ".join(argv)
    if head == "java":
        return "jvm"
    if b"pyspark" in joined or b"daemon" in joined or head.startswith("python"):
        return "python_worker"
    return f"other:{head or pid}"


@dataclass
class MemorySample:
    t: float  # seconds since the sampler started
    rss_mb: float
    pss_mb: float
    processes: int
    by_kind_rss_mb: dict[str, float] = field(default_factory=dict)


class ProcessTreeSampler(threading.Thread):
    """Every ``interval`` s: the RSS (and PSS, which splits pages shared by forked Python
    workers fairly) summed over a process and all its descendants, read from /proc."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.root = root_pid
        self.interval = interval
        self.samples: list[MemorySample] = []
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def sample(self) -> MemorySample:
        by_kind: dict[str, float] = {}
        rss = pss = 0
        pids = process_tree(self.root)
        for pid in pids:
            kb = _status_kb(pid, "VmRSS:")
            if not kb:
                continue  # exited meanwhile, or a zombie
            rss += kb
            pss += _pss_kb(pid)
            kind = _kind(pid, self.root)
            by_kind[kind] = by_kind.get(kind, 0.0) + kb / 1024
        return MemorySample(round(time.monotonic() - self.started_at, 2), round(rss / 1024, 1),
                            round(pss / 1024, 1), len(pids),
                            {k: round(v, 1) for k, v in sorted(by_kind.items())})

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(self.sample())
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)

