"""Backtest: replay the stored transaction history through a set of rule definitions.

``python -m spark_job.backtest --rules FILE --parquet-dir DIR --output OUT --json REPORT``

1. Reads the definitions in ``FILE`` (JSON or YAML, a list or one; the ``fraud-rules`` format)
   and validates each exactly as the detector would (``definition_from_dict`` and
   ``RuleSet.check`` against the retention horizon). A refused file stops here (exit 2).
2. Reads the bronze history ``DIR/transactions/`` through ``fraudstream.datasets.read_dataset``
   (every epoch, each transaction once), within ``--from``/``--to`` (event time).
3. Runs the detector's own plan (``spark_job.plan.build_detection_plan``) on a static DataFrame
   of those rows, with the file's rules as the rules in force: the same per-bucket state step
   and rule engine as the live detector, in Spark batch mode.
4. Writes the alerts it raised to ``OUT`` (``OUT/part-0.parquet``, the alert fields).
5. Reports per rule: alerts, precision and recall against the generator's labels (the
   evaluation of ``fraudstream.quality``), precision against analysts' verdicts where there are
   any, and the alerts added and removed compared with what the live detector wrote to
   ``DIR/alerts/`` for the same event-time range; with the time taken and rows per second.

The backtest sees the whole history at once, in event-time order per user; the live detector
saw it in micro-batches behind a watermark. They agree whenever no transaction reached the live
detector later than the watermark (see docs/backtest.md for what differs and why).

Exit status: 0 done; 1 the run failed (Spark, the file system); 2 invalid input (rules file,
range, empty history, an output that already holds data without ``--overwrite``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraudstream import datasets
from fraudstream.datasets import ALERTS_SCHEMA, RULE_CHANGES_SCHEMA, read_dataset
from fraudstream.logs import setup_logging
from fraudstream.model import newest_model
from fraudstream.quality import (
    ANY_FRAUD,
    REPORT_COLUMNS,
    definition_spans,
    format_ratio,
    quality_report,
    report_records,
)
from fraudstream.rules.definition import DefinitionError, RuleDefinition, definition_from_dict
from fraudstream.rules.ruleset import RuleSet, rules_in_force
from fraudstream.schemas import (
    ALERTS_DATASET,
    DLQ_DATASET,
    METRICS_FOLDER,
    RULE_CHANGES_DATASET,
    TRANSACTIONS_DATASET,
    format_timestamp,
    utc_now,
)
from fraudstream.settings import (
    VERDICTS_URL_DEFAULT,
    DetectorSettings,
    load_settings,
    run_entry_point,
)

PROG: Final = "python -m spark_job.backtest"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
#: The Parquet file of ``OUT`` holding the backtest's alerts.
OUTPUT_FILE: Final = "part-0.parquet"
#: Who a definition is attributed to when the file leaves ``updated_by`` out.
FILE_AUTHOR: Final = "backtest file"
#: Alert ids listed per rule in the report as examples of added and removed alerts.
SAMPLE_SIZE: Final = 10

_TS: Final = pa.timestamp("us", tz="UTC")
#: The bronze columns the backtest reads: what the rules read, and the labels.
HISTORY_SCHEMA: Final = pa.schema([
    ("transaction_id", pa.string()), ("user_id", pa.string()), ("amount", pa.float64()),
    ("event_time", _TS), ("location", pa.string()), ("payment_method", pa.string()),
    ("kafka_timestamp", _TS), ("fraud_pattern", pa.string()), ("is_fraud", pa.bool_()),
    ("merchant_id", pa.string()), ("device_ip", pa.string()),
])
#: The live alerts' columns the comparison needs.
LIVE_SCHEMA: Final = pa.schema([
    ALERTS_SCHEMA.field(name) for name in
    ("alert_id", "rule", "rule_version", "user_id", "window_start", "window_end",
     "transaction_ids")
])


class BacktestError(Exception):
    """Input the backtest refuses (exit 2) or a step that failed (exit 1); one line for people."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- the event-time range -------------------------------------------------------------------


def parse_moment(text: str, flag: str) -> datetime:
    """An ISO-8601 time (a date alone means its midnight); without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BacktestError(f"{flag}: expected an ISO-8601 time such as "
                            f"2026-11-22T10:00:00Z, got {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class TimeRange:
    """Event times ``start <= t < end``; either bound may be open."""

    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        if self.start and self.end and self.start >= self.end:
            raise BacktestError(f"--from ({format_timestamp(self.start)}) must be before --to "
                                f"({format_timestamp(self.end)})")

    def expression(self, first: str, last: str | None = None) -> pc.Expression | None:
        """Rows whose ``first`` .. ``last`` column values (one column if ``last`` is None) lie
        within the range."""
        parts = []
        if self.start is not None:
            parts.append(pc.field(first) >= pa.scalar(self.start, _TS))
        if self.end is not None:
            parts.append(pc.field(last or first) < pa.scalar(self.end, _TS))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0] & parts[1]

    def describe(self) -> str:
        if self.start is None and self.end is None:
            return "the whole history"
        start = format_timestamp(self.start) if self.start else "the start"
        end = format_timestamp(self.end) if self.end else "the end"
        return f"from {start} to {end}"

    def to_json(self) -> dict[str, str | None]:
        return {"from": format_timestamp(self.start) if self.start else None,
                "to": format_timestamp(self.end) if self.end else None}


# --- the rules file ---------------------------------------------------------------------------


def read_rules_file(path: Path, horizon_us: int) -> list[RuleDefinition]:
    """The definitions in a JSON or YAML file (a list, or one), each validated as the detector
    validates a ``fraud-rules`` record. As in ``python -m fraudstream.rules apply``, a file
    needs only ``rule_id``, ``kind`` and ``params``: ``enabled`` defaults to true, ``version``
    to 1, ``updated_at`` to now and ``updated_by`` to ``backtest file``.

    Raises BacktestError naming the rule and the reason for the first refused definition."""
    from fraudstream.rules.cli import Refusal, read_definitions_file

    if not path.exists():
        raise BacktestError(f"rules file {path} does not exist")
    try:
        items = read_definitions_file(str(path))
    except Refusal as exc:
        raise BacktestError(f"rules file: {exc.reason}") from None
    if not items:
        raise BacktestError(f"rules file {path} holds no definitions")
    stamp = format_timestamp(utc_now())
    definitions: list[RuleDefinition] = []
    seen: set[str] = set()
    for number, item in enumerate(items, 1):
        rule_id = item.get("rule_id")
        name = rule_id if isinstance(rule_id, str) and rule_id else f"definition {number}"
        data = {"enabled": True, "version": 1, "updated_at": stamp, "updated_by": FILE_AUTHOR,
                **item}
        try:
            definition = definition_from_dict(data)
            if definition.rule_id in seen:
                raise DefinitionError("defined more than once in the file", definition.rule_id)
            RuleSet().check(definition, horizon_us)
        except DefinitionError as exc:
            raise BacktestError(f"rules file {path}: refused {name}: {exc.reason}") from None
        seen.add(definition.rule_id)
        definitions.append(definition)
    return definitions


# --- the output folder ------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(output: Path, parquet_dir: Any, overwrite: bool) -> list[Path]:
    """Refuse an output that would mix with the detector's history, or that already holds
    data (unless ``overwrite``). Returns the earlier backtest files ``overwrite`` replaces.
    ``parquet_dir`` is a local folder (``Path``) or an object-store location."""
    out = output.resolve()
    root = parquet_dir.resolve() if isinstance(parquet_dir, Path) else None
    protected = [root / name for name in (ALERTS_DATASET, TRANSACTIONS_DATASET, DLQ_DATASET,
                                          RULE_CHANGES_DATASET, METRICS_FOLDER)] if root else []
    if root is not None and (out == root or _inside(root, out)
                             or any(_inside(out, folder) for folder in protected)):
        raise BacktestError(f"--output {output} would mix the backtest's alerts with the "
                            f"detector's history under {parquet_dir}; choose another folder "
                            f"(e.g. backtests/<name>)")
    if out.exists() and not out.is_dir():
        raise BacktestError(f"--output {output} is a file, not a folder")
    if not out.exists():
        return []
    present = sorted(out.iterdir())
    if not present:
        return []
    if not overwrite:
        raise BacktestError(f"--output {output} already holds data ({len(present)} "
                            f"entr{'y' if len(present) == 1 else 'ies'}); choose an empty "
                            f"folder, or pass --overwrite to replace an earlier backtest's "
                            f"alerts")
    foreign = [p.name for p in present if not (p.is_file() and p.suffix == ".parquet")]
    if foreign:
        raise BacktestError(f"--output {output} holds more than an earlier backtest's Parquet "
                            f"files ({', '.join(foreign[:3])}); --overwrite replaces only "
                            f"those: choose another folder")
    return present


def check_report_path(report: Path | None, overwrite: bool) -> None:
    if report is None:
        return
    if report.is_dir():
        raise BacktestError(f"--json {report} is a folder; give a file name")
    if report.exists() and not overwrite:
        raise BacktestError(f"--json {report} already exists; pass --overwrite to replace it")


def write_alerts(output: Path, alerts: pa.Table, replaced: Sequence[Path]) -> Path:
    """``OUT/part-0.parquet``, written under a temporary name and renamed into place; the
    earlier backtest files in ``replaced`` are removed only once the new file is complete."""
    output.mkdir(parents=True, exist_ok=True)
    target = output / OUTPUT_FILE
    temporary = output / f".{OUTPUT_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(alerts, temporary)
        for path in replaced:
            if path != target:
                path.unlink(missing_ok=True)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


# --- reading the history ----------------------------------------------------------------------


def read_history(parquet_dir: Any, time_range: TimeRange) -> pa.Table:
    """Bronze transactions within the range, each once (HISTORY_SCHEMA). BacktestError if
    there are none, saying what the history holds."""
    table = read_dataset(parquet_dir, TRANSACTIONS_DATASET, HISTORY_SCHEMA,
                         time_range.expression("event_time"))
    if table.num_rows:
        return table
    folder = parquet_dir / TRANSACTIONS_DATASET
    times = read_dataset(parquet_dir, TRANSACTIONS_DATASET,
                         pa.schema([("event_time", _TS)]))["event_time"]
    if not len(times):
        raise BacktestError(f"no transaction history under {folder}/ (nothing to replay); "
                            f"--parquet-dir must be the detector's PARQUET_DIR")
    span = pc.min_max(times).as_py()
    raise BacktestError(
        f"no transactions under {folder}/ {time_range.describe()}; the history holds "
        f"{len(times):,} from {format_timestamp(span['min'])} to "
        f"{format_timestamp(span['max'])}")


def read_live_alerts(parquet_dir: Any, time_range: TimeRange) -> pa.Table:
    """The live detector's alerts whose evidence lies within the range, each once."""
    return read_dataset(parquet_dir, ALERTS_DATASET, LIVE_SCHEMA,
                        time_range.expression("window_start", "window_end"))


def live_definitions(parquet_dir: Any) -> dict[str, RuleDefinition]:
    """The definitions in force at the end of the detector's rule history (for the kind and
    span of live rules the rules file leaves out)."""
    rows = read_dataset(parquet_dir, RULE_CHANGES_DATASET, RULE_CHANGES_SCHEMA).to_pylist()
    return {d.rule_id: d for d in rules_in_force(rows)}


def detection_input_table(history: pa.Table) -> pa.Table:
    """The plan's input columns (``DETECTION_INPUT_SCHEMA``) for the bronze rows: one rule row
    per transaction, no archive rows (bronze is already written) and no rule records (the
    rules come in force as ``initial_rules``)."""
    from spark_job.detection_input import ARCHIVE, DETECTION_INPUT_ARROW_SCHEMA, RULE_RECORD

    rows = history.num_rows
    columns = {
        "user_id": history["user_id"], "transaction_id": history["transaction_id"],
        "event_time": history["event_time"], "amount": history["amount"],
        "location": history["location"], "payment_method": history["payment_method"],
        # Rows written before bronze kept Kafka times: the event time stands in (only
        # latency figures read it).
        "kafka_timestamp": pc.coalesce(history["kafka_timestamp"], history["event_time"]),
        "merchant_id": history["merchant_id"], "device_ip": history["device_ip"],
        ARCHIVE: pa.nulls(rows, pa.binary()), RULE_RECORD: pa.nulls(rows, pa.string()),
    }
    arrays = [columns[f.name].cast(f.type) for f in DETECTION_INPUT_ARROW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=DETECTION_INPUT_ARROW_SCHEMA)


# --- progress on the terminal -----------------------------------------------------------------


class Progress:
    """Phases and a percentage on stderr (nothing with ``quiet``). On a terminal the running
    line is redrawn in place; otherwise a line is printed at every tenth done."""

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None,
                 interval: float = 0.5) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"{PROG}: {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def spark_jobs(self, spark: Any, label: str) -> Iterator[None]:
        """Show the progress of the Spark jobs run inside the block (a job group polled
        through ``statusTracker``)."""
        context = spark.sparkContext
        group = f"fraudstream-backtest-{uuid.uuid4().hex[:8]}"
        context.setJobGroup(group, label)
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(context, group, label, stop),
                                  name="backtest-progress", daemon=True)
        if not self.quiet:
            poller.start()
        try:
            yield
        finally:
            stop.set()
            if poller.is_alive():
                poller.join(5)
            with contextlib.suppress(Exception):
                context._jsc.clearJobGroup()  # PySpark has no wrapper for it

    def _poll(self, context: Any, group: str, label: str, stop: threading.Event) -> None:
        tracker = context.statusTracker()
        started = time.monotonic()
        shown = -1
        while True:
            finished = stop.wait(self.interval)
            with contextlib.suppress(Exception):  # the tracker forgets old jobs; never fatal
                status = job_progress(tracker, group)
                percent = 100 if finished else status.percent
                elapsed = time.monotonic() - started
                line = (f"{label}: {bar(percent)} {percent:3d}% ({status.describe()}) "
                        f"{elapsed:.0f} s")
                if self.tty:
                    print(f"\r{PROG}: {line}", end="\n" if finished else "", file=self.stream,
                          flush=True)
                elif finished or percent // 10 > shown // 10:
                    print(f"{PROG}: {line}", file=self.stream, flush=True)
                shown = percent
            if finished:
                return


@dataclass(frozen=True)
class JobProgress:
    """Tasks done and in all per stage of a job group, in the order the stages appeared."""

    stages: tuple[tuple[int, int], ...]  # (done, tasks)
    #: The plan runs as two stages (the input with its shuffle write, the rules); Spark's
    #: adaptive execution submits the second only when the first is done.
    expected_stages: int = 2

    @property
    def percent(self) -> int:
        parts = [done / tasks for done, tasks in self.stages if tasks]
        if not parts:
            return 0
        return min(99, int(100 * sum(parts) / max(self.expected_stages, len(parts))))

    def describe(self) -> str:
        if not self.stages:
            return "starting"
        done, tasks = self.stages[-1]
        count = max(self.expected_stages, len(self.stages))
        return f"stage {len(self.stages)}/{count}: {done}/{tasks} tasks"


def job_progress(tracker: Any, group: str) -> JobProgress:
    """The stages of a job group's jobs so far (``statusTracker``). A stage that a finished job
    never ran (skipped: its output already existed) is left out."""
    stages: list[tuple[int, int]] = []
    seen: set[int] = set()
    for job_id in sorted(tracker.getJobIdsForGroup(group)):
        job = tracker.getJobInfo(job_id)
        if job is None:
            continue
        for stage_id in sorted(job.stageIds):
            stage = tracker.getStageInfo(stage_id)
            if stage is None or stage_id in seen:
                continue
            seen.add(stage_id)
            ran = stage.numCompletedTasks or stage.numActiveTasks
            if job.status == "SUCCEEDED" and not ran:
                continue
            stages.append((stage.numCompletedTasks, stage.numTasks))
    return JobProgress(tuple(stages))


def bar(percent: int, width: int = 24) -> str:
    filled = width * max(0, min(100, percent)) // 100
    return "[" + "#" * filled + "." * (width - filled) + "]"


# --- running the rules ------------------------------------------------------------------------


def run_rules(spark: Any, history: pa.Table, ruleset: RuleSet, settings: DetectorSettings,
              progress: Progress) -> pa.Table:
    """The alerts the detector's plan raises over ``history`` with ``ruleset`` in force, as
    rows of ``ALERTS_SCHEMA`` (one Spark job: the per-bucket state step through
    applyInPandas, the alert rows collected as Arrow)."""
    from pyspark.sql import functions as F

    from spark_job.detection_input import DETECTION_INPUT_SCHEMA
    from spark_job.plan import ALERT_COLUMNS, KIND_ALERT, build_detection_plan
    from spark_job.session import session_conf

    # The bucket keys are spread over the session's shuffle partitions: use its real value
    # (a session that already existed keeps its own).
    partitions = int(spark.conf.get("spark.sql.shuffle.partitions",
                                    str(settings.shuffle_partitions)))
    frame = spark.createDataFrame(detection_input_table(history), schema=DETECTION_INPUT_SCHEMA)
    plan = build_detection_plan(
        frame, watermark_seconds=settings.watermark_seconds,
        horizon_seconds=settings.retention_seconds, initial_rules=ruleset,
        state_buckets=settings.state_buckets, shuffle_partitions=partitions,
        models_dir=str(settings.models_dir.resolve()))
    alerts = plan.where(F.col("kind") == KIND_ALERT).select(*ALERT_COLUMNS)
    # Adaptive execution would merge the small shuffle partitions into one task, leaving a
    # core idle: keep the buckets spread over every partition as the live detector does.
    with session_conf(spark, {"spark.sql.adaptive.enabled": "false"}), \
            progress.spark_jobs(spark, "running rules"):
        table = alerts.toArrow()
    return alert_table(table)


def alert_table(rows: pa.Table) -> pa.Table:
    """The plan's alert rows as ``ALERTS_SCHEMA`` (``alert_user_id`` is the alert's user),
    sorted by window end, rule, user and id."""
    renamed = rows.rename_columns(["user_id" if name == "alert_user_id" else name
                                   for name in rows.column_names])
    table = datasets.conform(renamed, ALERTS_SCHEMA)
    if not table.num_rows:
        return table
    return table.sort_by([("window_end", "ascending"), ("rule", "ascending"),
                          ("user_id", "ascending"), ("alert_id", "ascending")])


# --- verdicts ---------------------------------------------------------------------------------


@dataclass
class VerdictLookup:
    """The verdicts in force on a set of alert ids, and where they came from."""

    url: str
    verdicts: dict[str, str] = field(default_factory=dict)
    status: str = "read"  # read | no database | unavailable
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        counts = Counter(self.verdicts.values())
        return {"database": self.url, "status": self.status, "detail": self.detail,
                "alerts_with_verdicts": len(self.verdicts), "by_verdict": dict(counts)}


def load_verdicts(url: str, alert_ids: Iterable[str]) -> VerdictLookup:
    """The verdict in force on each of ``alert_ids`` that has one. A SQLite file that does not
    exist means no verdicts (it is not created); a database that cannot be read is reported,
    not fatal: verdicts are an extra column of the report."""
    from fraudstream.verdicts.model import check_store_url
    from fraudstream.verdicts.store import (
        VerdictStore,
        VerdictStoreError,
        sqlite_file,
        store_url_for_display,
    )

    shown = store_url_for_display(url)
    try:
        check_store_url(url)
    except ValueError as exc:
        raise BacktestError(f"--verdicts-url: {exc}") from None
    database_file = sqlite_file(url)
    if database_file is not None and not database_file.is_file():
        return VerdictLookup(shown, status="no database",
                             detail=f"{database_file} does not exist: no verdicts")
    ids = list(alert_ids)
    try:
        with VerdictStore(url) as store:
            found = store.latest(ids) if ids else {}
    except VerdictStoreError as exc:
        return VerdictLookup(shown, status="unavailable", detail=str(exc))
    return VerdictLookup(shown, {alert_id: v.verdict for alert_id, v in found.items()})


def verdict_counts(alert_ids: Iterable[str], verdicts: Mapping[str, str]) -> dict[str, Any]:
    """Verdicts on a rule's alerts and the precision they give: fraud / (fraud + legit)
    (``unsure`` is no answer; undefined without any fraud or legit verdict)."""
    counts = Counter(verdicts[i] for i in alert_ids if i in verdicts)
    fraud, legit = counts.get("fraud", 0), counts.get("legit", 0)
    return {"fraud": fraud, "legit": legit, "unsure": counts.get("unsure", 0),
            "precision": fraud / (fraud + legit) if fraud + legit else None}


# --- the report -------------------------------------------------------------------------------


def _frame(alerts: pa.Table) -> pd.DataFrame:
    return pd.DataFrame({"alert_id": alerts["alert_id"].to_pylist(),
                         "rule": alerts["rule"].to_pylist(),
                         "user_id": alerts["user_id"].to_pylist(),
                         "transaction_ids": alerts["transaction_ids"].to_pylist()})


def label_of(rule_id: str, definition: RuleDefinition | None, patterns: set[str]) -> str:
    """The generator label a rule is judged against: its own id when transactions carry it,
    else its kind (the generator names each injected scenario after the kind it exercises)."""
    if definition is not None and definition.impl.judged_against_any_fraud:
        return ANY_FRAUD
    if rule_id in patterns or definition is None:
        return rule_id
    return definition.kind


def build_report(*, definitions: Sequence[RuleDefinition], history: pa.Table,
                 alerts: pa.Table, live: pa.Table, live_rules: Mapping[str, RuleDefinition],
                 verdicts: VerdictLookup) -> dict[str, Any]:
    """The per-rule figures (the timings and run facts are added by the caller)."""
    in_file = {d.rule_id: d for d in definitions}
    live_only = sorted(set(live["rule"].to_pylist()) - set(in_file))
    rule_ids = [*in_file, *live_only]
    known = {**{r: live_rules[r] for r in live_only if r in live_rules}, **in_file}

    labelled = history.filter(pc.invert(pc.is_null(history["fraud_pattern"])))
    transactions = pd.DataFrame({
        "transaction_id": labelled["transaction_id"].to_pylist(),
        "user_id": labelled["user_id"].to_pylist(),
        "event_time": labelled["event_time"].to_pandas(),
        "fraud_pattern": labelled["fraud_pattern"].to_pylist(),
        "is_fraud": labelled["is_fraud"].to_pylist()})
    patterns = set(transactions["fraud_pattern"])
    labels = {r: label_of(r, known.get(r), patterns) for r in rule_ids}
    spans = definition_spans(known.values())
    as_of = pc.max(history["event_time"]).as_py()
    # One evaluation (fraudstream.quality) for both sides, on the same labelled episodes.
    backtest_quality = quality_report(transactions, _frame(alerts), spans, as_of,
                                      rules=rule_ids, labels=labels)
    live_quality = quality_report(transactions, _frame(live), spans, as_of,
                                  rules=rule_ids, labels=labels)

    def ids_by_rule(table: pa.Table) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for alert_id, rule, version in zip(table["alert_id"].to_pylist(),
                                           table["rule"].to_pylist(),
                                           table["rule_version"].to_pylist(), strict=True):
            out.setdefault(rule, {}).setdefault(alert_id, version)
        return out

    ours, theirs = ids_by_rule(alerts), ids_by_rule(live)
    quality = {row["rule"]: row for row in report_records(backtest_quality)}
    before = {row["rule"]: row for row in report_records(live_quality)}
    rows = []
    for rule_id in rule_ids:
        definition = in_file.get(rule_id)
        mine, live_ids = ours.get(rule_id, {}), theirs.get(rule_id, {})
        added = sorted(set(mine) - set(live_ids))
        removed = sorted(set(live_ids) - set(mine))
        kept = set(mine) & set(live_ids)
        removed_verdicts = verdict_counts(removed, verdicts.verdicts)
        row: dict[str, Any] = {
            "rule": rule_id,
            "kind": known[rule_id].kind if rule_id in known else None,
            "version": definition.version if definition else None,
            "enabled": definition.enabled if definition else None,
            "in_rules_file": definition is not None,
            "fires_when": definition.summary() if definition else None,
            "label": labels[rule_id],
            **{column: quality[rule_id][column] for column in REPORT_COLUMNS},
            "verdicts": verdict_counts(mine, verdicts.verdicts),
            "live_alerts": len(live_ids),
            "live_precision": before[rule_id]["precision"],
            "live_recall": before[rule_id]["recall"],
            "live_verdicts": verdict_counts(live_ids, verdicts.verdicts),
            "added": len(added),
            "removed": len(removed),
            "unchanged": len(kept),
            "version_changed": sum(1 for i in kept if mine[i] != live_ids[i]),
            "removed_confirmed_fraud": removed_verdicts["fraud"],
            "added_sample": added[:SAMPLE_SIZE],
            "removed_sample": removed[:SAMPLE_SIZE],
        }
        rows.append(row)
    return {
        "transactions": history.num_rows,
        "labelled_transactions": labelled.num_rows,
        "alerts": alerts.num_rows,
        "live_alerts": live.num_rows,
        "added": sum(row["added"] for row in rows),
        "removed": sum(row["removed"] for row in rows),
        "unchanged": sum(row["unchanged"] for row in rows),
        "verdicts": verdicts.to_json(),
        "rules": rows,
    }


def _ratio(value: float | None) -> str:
    return format_ratio(float("nan") if value is None else value)


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a table for people."""
    headers = ["RULE", "VERSION", "ALERTS", "LIVE", "ADDED", "REMOVED", "PRECISION", "RECALL",
               "LIVE PREC", "LIVE RECALL", "VERDICT PREC"]
    body = []
    for row in report["rules"]:
        version = "-" if row["version"] is None else f"v{row['version']}"
        if row["enabled"] is False:
            version += " (off)"
        body.append([row["rule"], version, f"{row['alerts']:,}", f"{row['live_alerts']:,}",
                     f"+{row['added']:,}", f"-{row['removed']:,}", _ratio(row["precision"]),
                     _ratio(row["recall"]), _ratio(row["live_precision"]),
                     _ratio(row["live_recall"]), _ratio(row["verdicts"]["precision"])])
    body.append(["total", "", f"{report['alerts']:,}", f"{report['live_alerts']:,}",
                 f"+{report['added']:,}", f"-{report['removed']:,}", "", "", "", "", ""])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    timing = report["timing"]
    verdicts = report["verdicts"]
    lines = [
        f"backtest of {report['transactions']:,} transactions ({report['range_description']}; "
        f"{report['labelled_transactions']:,} labelled) with {report['rules_file']}",
        line(headers), *(line(r) for r in body), "",
        f"{report['added']:,} added / {report['removed']:,} removed compared with the live "
        f"detector's {report['live_alerts']:,} alerts in the same range",
        f"verdicts: {verdicts['alerts_with_verdicts']:,} alerts with a verdict "
        f"({verdicts['status']}: {verdicts['database']})",
        f"{timing['wall_seconds']:.1f} s, {timing['rows_per_second']:,.0f} rows/s "
        f"(read {timing['read_seconds']:.1f} s, Spark start "
        f"{timing['spark_start_seconds']:.1f} s, rules {timing['rules_seconds']:.1f} s, "
        f"write {timing['write_seconds']:.1f} s)",
        f"alerts: {report['output']}" + (f"  report: {report['report']}"
                                         if report.get("report") else ""),
    ]
    confirmed = sum(r["removed_confirmed_fraud"] for r in report["rules"])
    if confirmed:
        lines.insert(-2, f"warning: {confirmed:,} removed alerts were confirmed fraud by an "
                         f"analyst")
    return "\n".join(lines)


# --- the whole run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BacktestOptions:
    rules_file: Path
    parquet_dir: Any  # a local Path, or an object-store location (fraudstream.storage)
    output: Path
    report: Path | None = None
    time_range: TimeRange = TimeRange()
    verdicts_url: str = VERDICTS_URL_DEFAULT
    overwrite: bool = False


def run_backtest(options: BacktestOptions, settings: DetectorSettings,
                 progress: Progress | None = None, spark: Any = None) -> dict[str, Any]:
    """Validate, replay, write the alerts and the report; returns the report. Raises
    BacktestError for refused input (nothing is written then). Without ``spark``, a session
    of the detector's settings is started once the input is known to be good, and stopped
    when the rules have run."""
    progress = progress or Progress(quiet=True)
    started_at = utc_now()
    started = time.monotonic()
    definitions = read_rules_file(options.rules_file, settings.retention_us)
    ruleset = RuleSet.of(definitions)
    replaced = check_output(options.output, options.parquet_dir, options.overwrite)
    check_report_path(options.report, options.overwrite)
    progress.say(f"{len(definitions)} rule{'s' if len(definitions) != 1 else ''} from "
                 f"{options.rules_file}: " + ", ".join(
                     f"{d.rule_id} v{d.version}{'' if d.enabled else ' (disabled)'}"
                     for d in definitions))

    progress.say(f"reading history under {options.parquet_dir / TRANSACTIONS_DATASET}/ "
                 f"({options.time_range.describe()}) ...")
    mark = time.monotonic()
    history = read_history(options.parquet_dir, options.time_range)
    read_seconds = time.monotonic() - mark
    progress.say(f"reading history: {history.num_rows:,} transactions ({read_seconds:.1f} s)")
    model, problems = newest_model(settings.models_dir)
    for problem in problems:
        progress.say(f"model not used: {problem}")
    progress.say(f"scoring with {model.summary}" if model is not None else
                 f"no usable model under {settings.models_dir}: no risk scores, ml_score rules "
                 "do not fire")

    mark = time.monotonic()
    if spark is None:
        progress.say("starting Spark ...")
    with _spark_session(settings, progress.quiet, spark) as session:
        spark_seconds = time.monotonic() - mark
        mark = time.monotonic()
        alerts = run_rules(session, history, ruleset, settings, progress)
        rules_seconds = time.monotonic() - mark
        partitions = int(session.conf.get("spark.sql.shuffle.partitions"))
        master = session.sparkContext.master
    progress.say(f"running rules: {alerts.num_rows:,} alerts ({rules_seconds:.1f} s)")

    mark = time.monotonic()
    live = read_live_alerts(options.parquet_dir, options.time_range)
    ids = set(alerts["alert_id"].to_pylist()) | set(live["alert_id"].to_pylist())
    verdicts = load_verdicts(options.verdicts_url, ids)
    if verdicts.status == "unavailable":
        progress.say(f"warning: verdicts not read: {verdicts.detail}")
    report = build_report(definitions=definitions, history=history, alerts=alerts, live=live,
                          live_rules=live_definitions(options.parquet_dir), verdicts=verdicts)
    report_seconds = time.monotonic() - mark

    progress.say(f"writing {alerts.num_rows:,} alerts to {options.output}/ ...")
    mark = time.monotonic()
    try:
        target = write_alerts(options.output, alerts, replaced)
    except OSError as exc:
        raise BacktestError(f"cannot write {options.output}: {exc.strerror or exc}",
                            EXIT_FAILED) from None
    write_seconds = time.monotonic() - mark
    wall = time.monotonic() - started
    event_times = pc.min_max(history["event_time"]).as_py()
    report = {
        "backtest": "fraudstream",
        "rules_file": str(options.rules_file),
        "parquet_dir": str(options.parquet_dir),
        "output": str(target),
        "report": str(options.report) if options.report else None,
        "range": {**options.time_range.to_json(),
                  "first_event": format_timestamp(event_times["min"]),
                  "last_event": format_timestamp(event_times["max"])},
        "range_description": options.time_range.describe(),
        "definitions": [d.to_dict() for d in definitions],
        "settings": {"watermark_seconds": settings.watermark_seconds,
                     "retention_seconds": settings.retention_seconds,
                     "state_buckets": settings.state_buckets,
                     "shuffle_partitions": partitions, "spark_master": master},
        # The newest usable model when the backtest started: it scores the replayed
        # transactions as the live detector would (ml_score rules included).
        "model": model.summary if model is not None else None,
        **report,
        "timing": {"read_seconds": round(read_seconds, 3),
                   "spark_start_seconds": round(spark_seconds, 3),
                   "rules_seconds": round(rules_seconds, 3),
                   "report_seconds": round(report_seconds, 3),
                   "write_seconds": round(write_seconds, 3), "wall_seconds": round(wall, 3),
                   "rows_per_second": round(history.num_rows / wall, 1) if wall else None},
        "started_at": format_timestamp(started_at),
        "finished_at": format_timestamp(utc_now()),
    }
    if options.report is not None:
        try:
            options.report.parent.mkdir(parents=True, exist_ok=True)
            temporary = options.report.with_name(f".{options.report.name}.tmp")
            temporary.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, options.report)
        except OSError as exc:
            raise BacktestError(f"cannot write --json {options.report}: "
                                f"{exc.strerror or exc}", EXIT_FAILED) from None
    return report


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.prog = PROG
    parser.description = (
        "Replay the stored transaction history (<parquet-dir>/transactions/) through the rule "
        "definitions of a file with the live detector's rule code, write the alerts it would "
        "have raised to --output as Parquet, and report per rule the alerts, precision and "
        "recall against the generator's labels and analysts' verdicts, and the alerts added "
        "and removed compared with the live detector. Spark and rule settings are the "
        "detector's (same flags and environment).")
    group = parser.add_argument_group("backtest")
    group.add_argument("--rules", dest="rules_file", metavar="FILE", required=True,
                       help="JSON or YAML list of rule definitions (the fraud-rules format; "
                            "python -m fraudstream.rules export writes one)")
    group.add_argument("--output", metavar="OUT", required=True,
                       help="folder for the backtest's alerts (Parquet); must be empty")
    group.add_argument("--json", dest="report", metavar="REPORT", default=None,
                       help="write the report as JSON to this file")
    group.add_argument("--from", dest="start", metavar="TIME", default=None,
                       help="first event time replayed (ISO-8601, inclusive; default: the "
                            "history's start)")
    group.add_argument("--to", dest="end", metavar="TIME", default=None,
                       help="event time where the replay stops (ISO-8601, exclusive; default: "
                            "the history's end)")
    group.add_argument("--verdicts-url", default=None,
                       help="verdict database (default: $VERDICTS_URL, else "
                            f"{VERDICTS_URL_DEFAULT}); a missing SQLite file means no "
                            "verdicts. Prefer VERDICTS_URL for a URL with a password")
    group.add_argument("--overwrite", action="store_true", default=False,
                       help="replace an earlier backtest's alerts in --output and --json")
    group.add_argument("--quiet", action="store_true", default=False,
                       help="no progress on stderr")


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, namespace = load_settings(DetectorSettings, argv, extra_args=_add_flags)
        setup_logging("backtest", os.environ.get("LOG_LEVEL", "WARNING"))
        progress = Progress(quiet=namespace.quiet)
        try:
            options = BacktestOptions(
                rules_file=Path(namespace.rules_file), parquet_dir=settings.parquet_dir,
                output=Path(namespace.output),
                report=Path(namespace.report) if namespace.report else None,
                time_range=TimeRange(
                    parse_moment(namespace.start, "--from") if namespace.start else None,
                    parse_moment(namespace.end, "--to") if namespace.end else None),
                verdicts_url=(namespace.verdicts_url or os.environ.get("VERDICTS_URL")
                              or VERDICTS_URL_DEFAULT),
                overwrite=namespace.overwrite)
            report = run_backtest(options, settings, progress)
        except BacktestError as exc:
            print(f"{PROG}: {exc.message}", file=sys.stderr)
            return exc.code
        except Exception as exc:  # Spark or the file system: one line, details in the log
            logging.getLogger(__name__).debug("backtest failed", exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{PROG}: failed: {type(exc).__name__}: {first} (LOG_LEVEL=DEBUG shows "
                  f"the details)", file=sys.stderr)
            return EXIT_FAILED
        print(format_report(report))
        return EXIT_OK

    run_entry_point(PROG, run)


@contextlib.contextmanager
def _spark_session(settings: DetectorSettings, quiet: bool, given: Any = None
                   ) -> Iterator[Any]:
    """``given``, or the session of the detector's settings; one that already runs in this
    process (tests, notebooks) is used as it is and left running."""
    from pyspark.sql import SparkSession

    from spark_job.session import build_spark_session

    existing = given or SparkSession.getActiveSession()
    if existing is not None:
        yield existing
        return
    spark = build_spark_session(settings.spark_master, app_name="fraudstream-backtest",
                                shuffle_partitions=settings.shuffle_partitions,
                                driver_memory=settings.driver_memory,
                                log_level="ERROR" if quiet else "WARN")
    try:
        yield spark
    finally:
        spark.stop()


__all__ = ["BacktestError", "BacktestOptions", "TimeRange", "main", "read_rules_file",
           "run_backtest"]


if __name__ == "__main__":
    main()
