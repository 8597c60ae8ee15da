"""Backtesting a candidate rule definition from the Rules page, before it is published.

The dashboard never imports Spark: a backtest is ``python -m spark_job.backtest`` run as a
subprocess (this interpreter, the dashboard's working directory, so relative settings resolve
the same way) on a temporary folder holding

- ``rules.json``: the rules in force with the candidate in its rule's place (or added), so the
  backtest answers "what if this rule changed and everything else stayed";
- ``alerts/``: the backtest's alerts (``--output``), ``report.json`` (``--json``);
- ``stderr.log`` / ``stdout.log``: its progress lines and report table.

The range is the last N hours of *event time* of the stored history (ending at its newest
transaction). The detector settings the backtest needs are the dashboard's: the retention horizon
(``RETENTION_SECONDS``, so the backtest refuses exactly what the page refuses), the verdict
database (``VERDICTS_URL``, passed in the environment rather than on the command line), and the
``--config`` file the dashboard was started with, if any; the Spark settings come from the same
environment or file as the detector's.

A ``BacktestRun`` is polled, never waited for: the page asks for its status and last progress
line on every refresh, and may cancel it (the process group is terminated: the Spark JVM is a
child of the backtest process). Its results are read once and kept on the run. No Streamlit in
here: the page keeps the run in its session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dashboard.cli import ARGS_ENV
from fraudstream.datasets import ALERTS_SCHEMA
from fraudstream.quality import format_ratio
from fraudstream.rules.ruleset import RuleSet

__all__ = [
    "CHANGE_COLUMNS",
    "DEFAULT_HOURS",
    "RULE_COLUMNS",
    "BacktestResult",
    "BacktestRun",
    "Candidate",
    "SparkUnavailable",
    "candidate_rules",
    "changed_alerts",
    "history_range",
    "ratio_text",
    "rule_table",
    "start_backtest",
]

MODULE: Final = "spark_job.backtest"
#: How the backtest prefixes its progress and error lines on stderr.
PREFIX: Final = f"python -m {MODULE}: "
#: Hours of history replayed unless the analyst chooses otherwise.
DEFAULT_HOURS: Final = 24.0
REPO: Final = Path(__file__).resolve().parents[2]
RUNNING: Final = "running"
DONE: Final = "done"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
#: Columns of the per-rule results table.
RULE_COLUMNS: Final = ("rule", "version", "enabled", "alerts", "live_alerts", "added",
                       "removed", "unchanged", "precision", "recall", "live_precision",
                       "live_recall", "analyst_precision", "live_analyst_precision")
#: Columns of the added / removed alerts of the candidate's rule.
CHANGE_COLUMNS: Final = ("change", "alert_id", "rule", "rule_version", "risk_score", "user_id",
                         "window_start", "window_end", "transaction_count", "total_amount",
                         "locations", "reason", "transaction_ids", "score_reasons",
                         "detected_at")
_TAIL_BYTES: Final = 64 * 1024


class SparkUnavailable(OSError):
    """This Python has no pyspark (the app image leaves it out), so it cannot run a backtest."""

    def __init__(self) -> None:
        super().__init__(
            f"this dashboard's Python ({sys.executable}) has no pyspark (the app image leaves it "
            f"out). A backtest runs Spark: run python -m {MODULE} where the detector runs "
            f"(Docker: docker compose run --rm trainer python -m {MODULE} ...), or install the "
            "project with pip install -e . and Java 17 here")


# --- what is backtested -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A definition being edited (``base_version`` is the version in force it changes) or added
    (``base_version`` None), as it would be published: ``version`` is the next one."""

    rule_id: str
    kind: str
    params: Mapping[str, Any]
    enabled: bool
    version: int
    base_version: int | None = None

    @property
    def is_new(self) -> bool:
        return self.base_version is None

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "kind": self.kind, "version": self.version,
                "enabled": self.enabled, "params": dict(self.params)}

    def describe(self) -> str:
        params = ", ".join(f"{name}={_number(value)}" for name, value in self.params.items())
        state = "" if self.enabled else ", disabled"
        return f"{self.rule_id} v{self.version} ({params}{state})"


def candidate_rules(ruleset: RuleSet, candidate: Candidate) -> list[dict[str, Any]]:
    """The backtest's rules file: every rule in force (disabled ones too: they raise nothing, as
    live) with the candidate in place of its rule, or after them when it is new."""
    items = [candidate.to_dict() if rule_id == candidate.rule_id else definition.to_dict()
             for rule_id, definition in sorted(ruleset.rules.items())]
    if candidate.rule_id not in ruleset.rules:
        items.append(candidate.to_dict())
    return items


def history_range(event_times: pa.ChunkedArray | pa.Array, hours: float
                  ) -> tuple[datetime, datetime] | None:
    """``(from, to)``: the last ``hours`` of event time up to and including the newest stored
    transaction (``to`` is exclusive, so one microsecond past it). None without history."""
    if not len(event_times):
        return None
    newest = pc.max(event_times).as_py()
    if newest is None:
        return None
    return newest - timedelta(hours=hours), newest + timedelta(microseconds=1)


# --- the subprocess -----------------------------------------------------------------------------


def _config_flag() -> list[str]:
    """``--config FILE`` when the dashboard was started with one (``python -m dashboard``
    hands its flags to the app in ``ARGS_ENV``); FRAUDSTREAM_CONFIG is inherited anyway."""
    try:
        args = json.loads(os.environ.get(ARGS_ENV, "[]"))
    except ValueError:
        return []
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return ["--config", str(args[index + 1])]
        if isinstance(arg, str) and arg.startswith("--config="):
            return ["--config", arg.split("=", 1)[1]]
    return []


def _stop(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate the backtest's process group (it and its Spark JVM), then kill what is left."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _cleanup(process: subprocess.Popen[bytes], folder: str) -> None:
    _stop(process, grace=2.0)
    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class BacktestResult:
    """What a finished backtest wrote: its JSON report and its alerts (``ALERTS_SCHEMA``)."""

    report: dict[str, Any]
    alerts: pa.Table

    def rule(self, rule_id: str) -> dict[str, Any] | None:
        return next((row for row in self.report["rules"] if row["rule"] == rule_id), None)


@dataclass
class BacktestRun:
    """One ``python -m spark_job.backtest`` of a candidate; see ``start_backtest``."""

    candidate: Candidate
    #: Where the page shows it (the rule's section, or the add form).
    place: str
    hours: float
    start: datetime | None
    end: datetime | None
    folder: Path
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancelled: bool = False
    _result: BacktestResult | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # An abandoned run (the session ended) stops its process and removes its files.
        self._finalizer = weakref.finalize(self, _cleanup, self.process, str(self.folder))

    @property
    def rules_file(self) -> Path:
        return self.folder / "rules.json"

    @property
    def output(self) -> Path:
        return self.folder / "alerts"

    @property
    def report_file(self) -> Path:
        return self.folder / "report.json"

    @property
    def stderr_file(self) -> Path:
        return self.folder / "stderr.log"

    @property
    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return RUNNING
        if self.finished is None:
            self.finished = time.monotonic()
        if self.cancelled:
            return CANCELLED
        return DONE if code == 0 and self.report_file.is_file() else FAILED

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def stderr_lines(self) -> list[str]:
        """The last lines the backtest wrote to stderr (carriage-return redraws split)."""
        try:
            with self.stderr_file.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - _TAIL_BYTES))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]

    def _own_lines(self) -> list[str]:
        """The backtest's own lines (not Spark's log), without the program prefix and with the
        temporary paths named for people."""
        names = {str(self.rules_file): "the candidate's rules file",
                 str(self.output): "the backtest folder"}
        lines = []
        for line in self.stderr_lines():
            if not line.startswith(PREFIX):
                continue
            line = line.removeprefix(PREFIX)
            for path, name in names.items():
                line = line.replace(path, name)
            lines.append(line)
        return lines

    def progress(self) -> str:
        """The last progress line (e.g. ``running rules: [####....]  50% ...``)."""
        own = self._own_lines()
        return own[-1] if own else "starting"

    def error(self) -> str:
        """Why the backtest failed, in one line: its own message (the last line it wrote), or
        the last line of stderr if it died without one. Never a traceback."""
        code = self.process.poll()
        own = self._own_lines()
        if own:
            message = own[-1]
        else:
            lines = [line for line in self.stderr_lines()
                     if not line.startswith(("Traceback", "File ", "^"))]
            message = lines[-1] if lines else "no message"
        return f"{message} (exit status {code})"

    def cancel(self) -> None:
        """Stop the backtest (nothing is published; its files go with the run)."""
        if self.process.poll() is None:
            self.cancelled = True
            _stop(self.process)

    def result(self) -> BacktestResult:
        """The report and alerts of a finished backtest, read once."""
        with self._lock:
            if self._result is None:
                report = json.loads(self.report_file.read_text(encoding="utf-8"))
                files = sorted(self.output.glob("*.parquet"))
                alerts = (pa.concat_tables([pq.read_table(f, schema=ALERTS_SCHEMA)
                                            for f in files]) if files
                          else ALERTS_SCHEMA.empty_table())
                self._result = BacktestResult(report, alerts)
            return self._result

    def close(self) -> None:
        """Stop it if it still runs and remove its files."""
        self._finalizer()


def start_backtest(candidate: Candidate, ruleset: RuleSet, *, place: str, hours: float,
                   event_times: pa.ChunkedArray | pa.Array, parquet_dir: Any,
                   retention_seconds: float, verdicts_url: str,
                   cwd: Path | None = None, env: Mapping[str, str] | None = None
                   ) -> BacktestRun:
    """Start ``python -m spark_job.backtest`` on the candidate and the other rules in force over
    the last ``hours`` of ``event_times`` (the stored history's); returns at once.

    Without history the range is left open and the backtest says there is nothing to replay.
    Raises :class:`SparkUnavailable` at once when this Python cannot run it."""
    if importlib.util.find_spec("pyspark") is None:
        raise SparkUnavailable
    folder = Path(tempfile.mkdtemp(prefix="fraudstream-backtest-"))
    run_range = history_range(event_times, hours)
    start, end = run_range if run_range else (None, None)
    try:
        (folder / "rules.json").write_text(
            json.dumps(candidate_rules(ruleset, candidate), indent=1) + "\n", encoding="utf-8")
        command = [sys.executable, "-m", MODULE, *_config_flag(),
                   "--rules", str(folder / "rules.json"),
                   "--parquet-dir", str(parquet_dir),
                   "--output", str(folder / "alerts"), "--json", str(folder / "report.json")]
        if start is not None and end is not None:
            command += ["--from", start.isoformat(), "--to", end.isoformat()]
        base = dict(os.environ if env is None else env)
        python_path = [str(REPO), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
        child_env = {**base, "RETENTION_SECONDS": f"{retention_seconds:g}",
                     "VERDICTS_URL": verdicts_url, "PYTHONPATH": os.pathsep.join(python_path),
                     "PYTHONUNBUFFERED": "1"}
        with (folder / "stderr.log").open("wb") as stderr, \
                (folder / "stdout.log").open("wb") as stdout:
            process = subprocess.Popen(command, cwd=cwd or Path.cwd(), env=child_env,
                                       stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                       start_new_session=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return BacktestRun(candidate=candidate, place=place, hours=hours, start=start, end=end,
                       folder=folder, process=process)


# --- shaping the results (pure) -------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def ratio_text(value: float | None) -> str:
    return format_ratio(float("nan") if value is None else value)


def rule_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """One row per rule of the report: the backtest's and the live detector's alerts, the
    difference, precision and recall against the labels and the analysts' precision (from
    verdicts; ``n/a`` without any)."""
    rows = []
    for row in report["rules"]:
        version = "-" if row["version"] is None else f"v{row['version']}"
        rows.append({
            "rule": row["rule"], "version": version,
            "enabled": "-" if row["enabled"] is None else ("yes" if row["enabled"] else "no"),
            "alerts": row["alerts"], "live_alerts": row["live_alerts"],
            "added": row["added"], "removed": row["removed"], "unchanged": row["unchanged"],
            "precision": ratio_text(row["precision"]), "recall": ratio_text(row["recall"]),
            "live_precision": ratio_text(row["live_precision"]),
            "live_recall": ratio_text(row["live_recall"]),
            "analyst_precision": ratio_text(row["verdicts"]["precision"]),
            "live_analyst_precision": ratio_text(row["live_verdicts"]["precision"]),
        })
    return pd.DataFrame(rows, columns=list(RULE_COLUMNS))


def _in_range(alerts: pa.Table, start: datetime | None, end: datetime | None) -> pa.Table:
    """The live alerts the backtest compares with: evidence within ``start <= t < end``."""
    if start is not None:
        alerts = alerts.filter(pc.greater_equal(alerts["window_start"],
                                                pa.scalar(start, alerts["window_start"].type)))
    if end is not None:
        alerts = alerts.filter(pc.less(alerts["window_end"],
                                       pa.scalar(end, alerts["window_end"].type)))
    return alerts


def changed_alerts(result: BacktestResult, live: pa.Table, rule_id: str,
                   start: datetime | None, end: datetime | None) -> pd.DataFrame:
    """The alerts of ``rule_id`` only the backtest raised (``added``, rows from its output) and
    only the live detector raised in the same range (``removed``, rows from the history),
    by window end. ``live`` is the detector's alert history (``ALERTS_SCHEMA``)."""
    mine = result.alerts.filter(pc.equal(result.alerts["rule"], rule_id))
    theirs = _in_range(live.filter(pc.equal(live["rule"], rule_id)), start, end)
    mine_ids = mine["alert_id"].combine_chunks()
    their_ids = theirs["alert_id"].combine_chunks()
    added = mine.filter(pc.invert(pc.is_in(mine["alert_id"], value_set=their_ids)))
    removed = theirs.filter(pc.invert(pc.is_in(theirs["alert_id"], value_set=mine_ids)))
    frames = []
    for change, table in (("added", added), ("removed", removed)):
        frame = table.to_pandas()
        frame.insert(0, "change", change)
        frames.append(frame)
    both = pd.concat(frames, ignore_index=True)
    both["rule_version"] = pd.to_numeric(both["rule_version"], errors="coerce").astype("Int64")
    both["risk_score"] = pd.to_numeric(both["risk_score"], errors="coerce").astype("Float64")
    both = both.sort_values(["change", "window_end", "alert_id"], kind="stable")
    return both.reindex(columns=list(CHANGE_COLUMNS)).reset_index(drop=True)


def change_label(row: Mapping[str, Any]) -> str:
    """One line naming an added or removed alert, for the evidence picker."""
    end = row["window_end"]
    when = end.strftime("%Y-%m-%d %H:%M:%S") if isinstance(end, datetime) else "?"
    return (f"{row['change']} · {when} · {row['user_id']} · {row['transaction_count']} txs · "
            f"{str(row['alert_id'])[:8]}")
