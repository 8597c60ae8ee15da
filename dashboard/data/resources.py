"""Where the pages meet the data: one shared instance per process of each reader (Kafka tail,
Parquet datasets, metrics file, verdict database) in ``st.cache_resource``, and the settings
handed from the app to its pages through session state (``st.navigation`` pages are scripts and
take no arguments).

Everything returned here is shared between sessions: pages read it, never mutate it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import streamlit as st

from dashboard.data.kafka import AlertTail, TailStatus
from dashboard.data.metrics import MetricsSnapshot, MetricsTail
from dashboard.data.model import ModelCatalog, ModelsSnapshot
from dashboard.data.parquet import DLQ_VIEW_SCHEMA, TRANSACTION_VIEW_SCHEMA, DatasetCache
from dashboard.data.rules import RulesStore
from dashboard.data.verdicts import VerdictDesk, VerdictsSnapshot
from dashboard.data.verdicts import analyst_precision as _analyst_precision
from dashboard.data.views import count_by_rule, merge_alerts
from fraudstream.datasets import ALERTS_SCHEMA, RULE_CHANGES_SCHEMA
from fraudstream.quality import REPORT_COLUMNS, definition_labels, quality_report
from fraudstream.rules.ruleset import rules_in_force
from fraudstream.schemas import (
    ALERTS_DATASET,
    DLQ_DATASET,
    RULE_CHANGES_DATASET,
    RULES,
    TRANSACTIONS_DATASET,
    utc_now,
)
from fraudstream.settings import DashboardSettings

__all__ = [
    "ANALYST_KEY",
    "DashboardContext",
    "alert_history",
    "alert_is_known",
    "analyst",
    "analyst_precision",
    "dlq_rows",
    "get_context",
    "live_alerts",
    "metrics",
    "models",
    "quality",
    "quality_over_time",
    "rules",
    "set_context",
    "transactions",
    "verdicts",
]

_CONTEXT_KEY = "fraudstream.dashboard.context"
#: Session-state key of the analyst's name (the sidebar input); recorded on every rule change
#: and every verdict.
ANALYST_KEY = "fraudstream.analyst"


@dataclass(frozen=True)
class DashboardContext:
    """What the app loaded once and every page needs."""

    settings: DashboardSettings
    #: rule id -> window span in seconds, for the detection-quality episodes
    spans: Mapping[str, float]


def set_context(context: DashboardContext) -> None:
    st.session_state[_CONTEXT_KEY] = context


def get_context() -> DashboardContext:
    context = st.session_state.get(_CONTEXT_KEY)
    if context is None:  # a page script run on its own instead of through app.py
        raise RuntimeError("run the dashboard through dashboard/app.py (python -m dashboard)")
    return context


@st.cache_resource(show_spinner=False)
def _dataset(root: str, dataset: str, _schema: pa.Schema) -> DatasetCache:
    return DatasetCache(root, dataset, _schema)


@st.cache_resource(show_spinner=False)
def _metrics(path: str) -> MetricsTail:
    return MetricsTail(path)


@st.cache_resource(show_spinner=False)
def _tail(client_config: tuple[tuple[str, str], ...], topic: str, max_alerts: int) -> AlertTail:
    return AlertTail(dict(client_config), topic, max_alerts)


@st.cache_resource(show_spinner=False)
def _rules(client_config: tuple[tuple[str, str], ...], topic: str, root: str,
           retention_seconds: float, max_age: float) -> RulesStore:
    return RulesStore(dict(client_config), topic, root, retention_seconds, max_age=max_age)


@st.cache_resource(show_spinner=False)
def _verdicts(url: str, client_config: tuple[tuple[str, str], ...], topic: str,
              max_age: float) -> VerdictDesk:
    return VerdictDesk(url, dict(client_config), topic, max_age=max_age)


@st.cache_resource(show_spinner=False)
def _models(models_dir: str, max_age: float) -> ModelCatalog:
    return ModelCatalog(models_dir, max_age=max_age)


@st.cache_resource(show_spinner=False, max_entries=4)
def _newest(root: str, version: int, limit: int, _table: pa.Table) -> pd.DataFrame:
    """The newest ``limit`` alerts of the history as pandas, converted once per version."""
    if _table.num_rows > limit:
        order = pc.sort_indices(_table, sort_keys=[("detected_at", "descending")])
        _table = _table.take(order[:limit])
    return _table.to_pandas()


def alert_history(context: DashboardContext) -> tuple[pa.Table, int]:
    root = str(context.settings.parquet_dir)
    return _dataset(root, ALERTS_DATASET, ALERTS_SCHEMA).refresh()


def transactions(context: DashboardContext) -> tuple[pa.Table, int]:
    root = str(context.settings.parquet_dir)
    return _dataset(root, TRANSACTIONS_DATASET, TRANSACTION_VIEW_SCHEMA).refresh()


def dlq_rows(context: DashboardContext) -> int:
    root = str(context.settings.parquet_dir)
    return _dataset(root, DLQ_DATASET, DLQ_VIEW_SCHEMA).refresh()[0].num_rows


def rules(context: DashboardContext) -> RulesStore:
    """The rules topic of these settings: one store (and one cached read) per process."""
    settings = context.settings
    return _rules(tuple(sorted(settings.client_config().items())), settings.rules_topic,
                  str(settings.parquet_dir), settings.retention_seconds,
                  settings.refresh_seconds)


def analyst() -> str:
    """The name this session entered as analyst (blank if none)."""
    return str(st.session_state.get(ANALYST_KEY) or "").strip()


def metrics(context: DashboardContext) -> MetricsSnapshot:
    return _metrics(str(context.settings.resolved_metrics_file)).refresh()


def models(context: DashboardContext) -> ModelsSnapshot:
    """The trained model versions under ``MODELS_DIR`` (listed again at most once per refresh
    interval; a version's metrics.json read again only when it changed)."""
    settings = context.settings
    return _models(str(settings.models_dir), settings.refresh_seconds).snapshot()


@dataclass(frozen=True)
class LiveAlerts:
    alerts: pd.DataFrame  # history + tail, deduplicated, newest first, at most max_alerts
    counts: pd.Series  # alerts per rule over the whole history + tail
    status: TailStatus
    now: datetime


def _alert_tail(context: DashboardContext) -> AlertTail:
    settings = context.settings
    return _tail(tuple(sorted(settings.client_config().items())), settings.alerts_topic,
                 settings.max_alerts)


def live_alerts(context: DashboardContext) -> LiveAlerts:
    """One refresh: poll the Kafka tail, pick up new Parquet files, merge."""
    settings = context.settings
    live, status = _alert_tail(context).poll()
    history, version = alert_history(context)
    newest = _newest(str(settings.parquet_dir), version, settings.max_alerts, history)
    return LiveAlerts(merge_alerts(newest, live, settings.max_alerts),
                      count_by_rule(history, live), status, utc_now())


@st.cache_data(show_spinner=False, max_entries=4)
def _quality(root: str, alerts_version: int, transactions_version: int,
             spans: tuple[tuple[str, float], ...], labels: tuple[tuple[str, str], ...],
             _alerts: pa.Table, _transactions: pa.Table) -> pd.DataFrame:
    labelled = _transactions.filter(pc.is_valid(_transactions["fraud_pattern"]))
    return quality_report(labelled.to_pandas(), _alerts.to_pandas(), dict(spans),
                          as_of=pc.max(_transactions["event_time"]).as_py(),
                          labels=dict(labels))


def rule_labels(context: DashboardContext) -> dict[str, str]:
    """What each rule in force is judged against, where it is not its own id (``ml_score``
    rules: any fraud), from the detector's rule history."""
    root = str(context.settings.parquet_dir)
    history, _ = _dataset(root, RULE_CHANGES_DATASET, RULE_CHANGES_SCHEMA).refresh()
    return definition_labels(rules_in_force(history.to_pylist()))


def quality(context: DashboardContext) -> pd.DataFrame:
    """The detection-quality report over the Parquet history, recomputed only when it changed."""
    alerts, alerts_version = alert_history(context)
    txs, txs_version = transactions(context)
    return _quality(str(context.settings.parquet_dir), alerts_version, txs_version,
                    tuple(sorted(context.spans.items())),
                    tuple(sorted(rule_labels(context).items())), alerts, txs)


#: Bucket widths of quality over time, the first giving at most QUALITY_MAX_BUCKETS buckets.
QUALITY_BUCKETS = ("1h", "6h", "1D", "7D")
QUALITY_MAX_BUCKETS = 48


def quality_bucket(first: pd.Timestamp, last: pd.Timestamp,
                   widths: Sequence[str] = QUALITY_BUCKETS,
                   max_buckets: int = QUALITY_MAX_BUCKETS) -> str:
    """The narrowest width that cuts ``first`` .. ``last`` into at most ``max_buckets``."""
    for width in widths:
        step = pd.Timedelta(width)
        if (last.floor(step) - first.floor(step)) / step + 1 <= max_buckets:
            return width
    return widths[-1]


def quality_over_time_frame(transactions: pa.Table, alerts: pa.Table,
                            spans: Mapping[str, float], width: str | None = None
                            ) -> pd.DataFrame:
    """``quality_report`` per bucket of event time (default width: ``quality_bucket``): one row
    per bucket and rule (``bucket`` and the report's columns). A bucket is judged on its own:
    the labelled transactions whose event time falls in it, the alerts whose window ends in it
    (the event time of the transaction that fired them), and as newest event the bucket's end
    (the history's newest event for the last bucket), so an episode crossing a bucket boundary
    counts in each bucket it touches. Every rule of the whole history has a row in every
    bucket; a ratio with nothing to divide is NaN."""
    columns = ["bucket", "rule", *REPORT_COLUMNS]
    if not transactions.num_rows:
        return pd.DataFrame(columns=columns)
    times = pc.min_max(transactions["event_time"]).as_py()
    first, newest = pd.Timestamp(times["min"]), pd.Timestamp(times["max"])
    step = pd.Timedelta(width or quality_bucket(first, newest))
    fraud = pc.is_valid(transactions["fraud_pattern"])
    labelled = transactions.filter(fraud).to_pandas()
    labelled["event_time"] = pd.to_datetime(labelled["event_time"], utc=True)
    evidence = alerts.select(["alert_id", "rule", "user_id", "transaction_ids",
                              "window_end"]).to_pandas()
    evidence["window_end"] = pd.to_datetime(evidence["window_end"], utc=True)
    seen = set(evidence["rule"].dropna()) | set(labelled["fraud_pattern"].dropna())
    rules = [*RULES, *sorted(seen - set(RULES))]
    frames = []
    start = first.floor(step)
    while start <= newest:
        end = start + step
        txs = labelled[(labelled["event_time"] >= start) & (labelled["event_time"] < end)]
        fired = evidence[(evidence["window_end"] >= start) & (evidence["window_end"] < end)]
        report = quality_report(txs, fired, spans, as_of=min(end, newest), rules=rules)
        frames.append(report.reset_index().assign(bucket=start))
        start = end
    return pd.concat(frames, ignore_index=True)[columns]


@st.cache_data(show_spinner=False, max_entries=4)
def _quality_over_time(root: str, alerts_version: int, transactions_version: int,
                       spans: tuple[tuple[str, float], ...], _alerts: pa.Table,
                       _transactions: pa.Table) -> pd.DataFrame:
    return quality_over_time_frame(_transactions, _alerts, dict(spans))


def quality_over_time(context: DashboardContext) -> pd.DataFrame:
    """The detection-quality report per bucket of event time (``quality_over_time_frame``),
    recomputed only when the Parquet history changed."""
    alerts, alerts_version = alert_history(context)
    txs, txs_version = transactions(context)
    return _quality_over_time(str(context.settings.parquet_dir), alerts_version, txs_version,
                              tuple(sorted(context.spans.items())), alerts, txs)


# --- verdicts -----------------------------------------------------------------------------------


def verdicts(context: DashboardContext) -> VerdictDesk:
    """The verdict database and topic of these settings: one desk per process, so the newest
    verdicts are read once per refresh however many sessions are open."""
    settings = context.settings
    return _verdicts(settings.verdicts_url, tuple(sorted(settings.client_config().items())),
                     settings.verdicts_topic, settings.refresh_seconds)


def alert_is_known(context: DashboardContext) -> Callable[[str], bool]:
    """Whether an alert id is one the dashboard loaded (Parquet history or the Kafka tail):
    verdicts are only taken on alerts someone could have looked at."""
    tail = _alert_tail(context)
    history, _ = alert_history(context)
    ids = history["alert_id"]

    def known(alert_id: str) -> bool:
        return tail.holds(alert_id) or bool(pc.any(pc.equal(ids, alert_id)).as_py())

    return known


def analyst_precision(context: DashboardContext, snapshot: VerdictsSnapshot
                      ) -> tuple[pd.DataFrame, int]:
    """Per rule, the analysts' verdicts on the alerts of the Parquet history (the history the
    label-based figures use), and how many verdicts concern alerts not in it."""
    history, _ = alert_history(context)
    return _analyst_precision(history, snapshot.latest)
