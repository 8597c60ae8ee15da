"""The detector's workload and outputs as benchmarks see them: seeded data sets, fast
preloading, the oracle and the comparison with it, the detector's command line, and what it
wrote (Parquet alerts, its per-batch metrics).

The detector is always measured through its public CLI (``python -m spark_job``) in a
subprocess, so start-up, the JVM and the Python workers are all inside the measurement, exactly
as an operator would run it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from benchmarks.report import DEFAULT_SEED, say, utc_now
from fraudstream import schemas
from fraudstream.rules import RuleDefinition
from fraudstream.rules.oracle import expected_alerts
from fraudstream.testing import Topics, summarize
from producer.generator import (
    TransactionGenerator,
    encode_transaction,
    to_ms,
)

#: Fast preloading: big batches, many in flight. Offsets stay exact (idempotent, acks=all).
PRELOAD_PRODUCER_CONFIG: Mapping[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 50,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}


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
