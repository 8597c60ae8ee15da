"""Detection quality: precision and recall of each rule, measured against the producer's labels.

Pure pandas/pyarrow (no Spark), so the dashboard and ``python -m spark_job.quality`` compute the
same numbers from the same Parquet history.

Definitions
-----------
- Ground truth is the producer's labels in the ``transactions`` dataset: for fraud
  (``is_fraud`` true) ``fraud_pattern`` names the rule the injected scenario is meant to trip
  (fraud built to evade that rule included); a legitimate look-alike (``is_fraud`` false, e.g.
  ``legit_traveller``) and normal traffic (``null``) are not fraud.
- An alert of rule R is a *true positive* if any of its evidence ``transaction_ids`` is labelled
  ``fraud_pattern == R``. ``precision(R) = true-positive alerts of R / alerts of R``.
- The *injected episodes* of R: the transactions labelled R, grouped by user and ordered by event
  time, split wherever the gap between consecutive labelled events exceeds the rule's span
  (its window length in seconds). For a rule without a span (one that judges each transaction
  on its own, such as ``high_value``, or a rule the spans do not name) every labelled
  transaction is its own episode.
- An episode is *detected* if some alert of R for that user has evidence overlapping the
  episode's transaction ids.
- An undetected episode is *pending* while it may still grow: its rule has a window and its last
  labelled event is within that span of the newest event time in the transactions (``as_of``).
  An alert fires when the transaction that first makes the rule true is processed, so a burst
  whose later transactions have not arrived yet cannot have been detected; counting it as missed
  would make a live pipeline's recall read low for its last few minutes.
- ``recall(R) = detected episodes / (episodes - pending episodes)``.
- A ratio with a zero denominator is undefined: NaN, printed as ``n/a``.
- Which label a rule is judged against: its own rule id by default. A caller may map a rule to
  another label (``labels``): the backtest judges a rule ``velocity_10m`` of kind ``velocity``
  against the generator's ``velocity`` scenarios. Two rules may share a label; each splits the
  labelled transactions into episodes by its own span.

Alerts are deduplicated on ``alert_id`` first (Kafka is at-least-once; Parquet is not, but the
same function serves both), and transactions on ``transaction_id``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fraudstream.datasets import read_dataset
from fraudstream.logs import setup_logging
from fraudstream.rules.definition import RuleDefinition
from fraudstream.rules.kinds import MICROS
from fraudstream.schemas import ALERTS_DATASET, RULES, TRANSACTIONS_DATASET
from fraudstream.settings import DetectorSettings, load_settings, run_entry_point

__all__ = [
    "ANY_FRAUD",
    "EVIDENCE_SCHEMA",
    "LABEL_SCHEMA",
    "REPORT_COLUMNS",
    "definition_labels",
    "definition_spans",
    "format_ratio",
    "load_report",
    "main",
    "quality_report",
    "report_records",
    "rule_spans",
]

log = logging.getLogger(__name__)

PROG = "python -m spark_job.quality"
REPORT_COLUMNS = (
    "alerts", "true_positive_alerts", "precision", "episodes", "detected_episodes",
    "pending_episodes", "recall",
)
#: The columns quality needs: labels of transactions, evidence of alerts.
LABEL_SCHEMA = pa.schema([
    ("transaction_id", pa.string()), ("user_id", pa.string()),
    ("event_time", pa.timestamp("us", tz="UTC")), ("fraud_pattern", pa.string()),
    ("is_fraud", pa.bool_()),
])
EVIDENCE_SCHEMA = pa.schema([
    ("alert_id", pa.string()), ("rule", pa.string()), ("user_id", pa.string()),
    ("transaction_ids", pa.list_(pa.string())),
])


def rule_spans(settings: DetectorSettings) -> dict[str, float]:
    """Span in seconds of each windowed default rule, as the detector is configured (rules
    without a window have no span)."""
    return definition_spans(settings.default_rules())


def definition_spans(definitions: Iterable[RuleDefinition]) -> dict[str, float]:
    """Span in seconds of each windowed rule among ``definitions``, by rule id."""
    return {d.rule_id: d.window_us / MICROS for d in definitions if d.windowed}


#: The label of a rule judged against every labelled fraud, whatever its scenario.
ANY_FRAUD = "*"


def definition_labels(definitions: Iterable[RuleDefinition]) -> dict[str, str]:
    """The labels of rules whose kind is judged against any fraud (``ml_score``): pass as
    ``labels`` to ``quality_report``; other rules keep the default (their own id)."""
    return {d.rule_id: ANY_FRAUD for d in definitions if d.impl.judged_against_any_fraud}


def quality_report(
    transactions: pd.DataFrame, alerts: pd.DataFrame, spans: Mapping[str, float],
    as_of: datetime | None = None, *, rules: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per-rule precision and recall (see the module docstring for the definitions).

    ``transactions`` needs ``transaction_id, user_id, event_time, fraud_pattern`` (unlabelled rows
    may be left out: they never count); ``alerts`` needs ``rule, user_id, transaction_ids`` and
    ``alert_id`` if it may hold duplicates. ``as_of`` is the newest event time processed (default:
    the newest in ``transactions``; pass it when unlabelled rows were left out). ``rules`` are
    the report's rows, in order (default: the four contract rules first, then any other rule
    seen in the data); ``labels`` maps a rule to the ``fraud_pattern`` it is judged against
    (default: its own id; ``ANY_FRAUD``: every labelled fraud). Returns one row per rule,
    indexed by ``rule``.
    """
    labelled = _labelled(transactions)
    alerts = alerts.drop_duplicates("alert_id") if "alert_id" in alerts.columns else alerts
    alerts = alerts.reset_index(drop=True)
    if rules is None:
        seen = set(alerts["rule"].dropna()) | set(labelled["fraud_pattern"])
        rules = [*RULES, *sorted(seen - set(RULES))]
    rules = list(rules)
    episode_labels = _episode_labels(
        labelled, {rule: (labels or {}).get(rule, rule) for rule in rules}, spans)
    evidence = (
        pd.DataFrame({"alert": alerts.index, "rule": alerts["rule"], "user_id": alerts["user_id"],
                      "transaction_id": alerts["transaction_ids"]})
        .explode("transaction_id")
        .dropna(subset=["transaction_id"])
    )
    hits = evidence.merge(
        episode_labels[["rule", "transaction_id", "user_id", "episode"]],
        on=["rule", "transaction_id"], suffixes=("", "_labelled"),
    )
    detected = hits[hits["user_id"] == hits["user_id_labelled"]]

    if as_of is None and len(transactions):
        as_of = pd.to_datetime(transactions["event_time"], utc=True).max()
    episodes = episode_labels.groupby("episode").agg(rule=("rule", "first"),
                                                     last=("event_time", "max"))
    span = episodes["rule"].map(dict(spans)).astype("float64").fillna(0.0)
    age = ((pd.Timestamp(as_of) - episodes["last"]).dt.total_seconds() if as_of is not None
           else pd.Series(float("inf"), index=episodes.index))
    pending = episodes[(span > 0) & (age <= span) & ~episodes.index.isin(detected["episode"])]

    report = pd.DataFrame({
        "alerts": alerts.groupby("rule").size(),
        "true_positive_alerts": hits.groupby("rule")["alert"].nunique(),
        "episodes": episodes.groupby("rule").size(),
        "detected_episodes": detected.groupby("rule")["episode"].nunique(),
        "pending_episodes": pending.groupby("rule").size(),
    }).reindex(rules).fillna(0).astype("int64")
    report["precision"] = _ratio(report["true_positive_alerts"], report["alerts"])
    report["recall"] = _ratio(report["detected_episodes"],
                              report["episodes"] - report["pending_episodes"])
    report.index.name = "rule"
    return report[list(REPORT_COLUMNS)]


def _labelled(transactions: pd.DataFrame) -> pd.DataFrame:
    """The transactions labelled as fraud, each once, event time as UTC timestamps. A
    legitimate look-alike (``is_fraud`` false, ``fraud_pattern`` naming its scenario) is not
    fraud of any rule: it only ever makes a false positive."""
    fraud = transactions["fraud_pattern"].notna()
    if "is_fraud" in transactions.columns:
        fraud &= transactions["is_fraud"].ne(False)  # rows without the label still count
    labelled = (
        transactions.loc[fraud, ["transaction_id", "user_id", "event_time", "fraud_pattern"]]
        .drop_duplicates("transaction_id")
        .reset_index(drop=True)
    )
    labelled["event_time"] = pd.to_datetime(labelled["event_time"], utc=True)
    return labelled


def _episode_labels(labelled: pd.DataFrame, label_of: Mapping[str, str],
                    spans: Mapping[str, float]) -> pd.DataFrame:
    """For each rule, the transactions labelled with its label, with an ``episode`` number
    (unique across rules and users): split per user where the gap exceeds the rule's span."""
    judged = pd.DataFrame({"rule": list(label_of), "fraud_pattern": list(label_of.values())},
                          dtype="object")
    any_fraud = judged["fraud_pattern"] == ANY_FRAUD
    labels = (
        pd.concat([judged[~any_fraud].merge(labelled, on="fraud_pattern"),
                   judged.loc[any_fraud, ["rule"]].merge(labelled, how="cross")],
                  ignore_index=True)
        .sort_values(["rule", "user_id", "event_time", "transaction_id"])
        .reset_index(drop=True)
    )
    gap = labels.groupby(["rule", "user_id"])["event_time"].diff().dt.total_seconds()
    span = labels["rule"].map(dict(spans)).astype("float64").fillna(0.0)
    # Without a span, every labelled transaction is an episode of its own.
    starts = gap.isna() | (gap > span) | (span <= 0)
    labels["episode"] = starts.cumsum()
    return labels


def _ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    return (numerator / denominator.where(denominator > 0)).astype("float64")


def format_ratio(value: float) -> str:
    """A precision or recall for people: a percentage, or ``n/a`` when undefined."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


def report_records(report: pd.DataFrame) -> list[dict[str, object]]:
    """The report as JSON-ready rows (NaN becomes null)."""
    rows = []
    for rule, row in report.iterrows():
        record: dict[str, object] = {"rule": rule}
        for column in REPORT_COLUMNS:
            value = row[column]
            if column in ("precision", "recall"):
                record[column] = None if math.isnan(value) else float(value)
            else:
                record[column] = int(value)
        rows.append(record)
    return rows


def format_report(report: pd.DataFrame) -> str:
    """A plain-text table of the report."""
    shown = report.copy()
    for column in ("precision", "recall"):
        shown[column] = shown[column].map(format_ratio)
    return shown.reset_index().to_string(index=False)


def load_report(parquet_dir: Path, spans: Mapping[str, float]) -> pd.DataFrame:
    """The quality report over the Parquet history under ``parquet_dir``."""
    event_times = read_dataset(parquet_dir, TRANSACTIONS_DATASET,
                               pa.schema([LABEL_SCHEMA.field("event_time")]))
    labelled = ~pc.field("fraud_pattern").is_null()
    transactions = read_dataset(parquet_dir, TRANSACTIONS_DATASET, LABEL_SCHEMA, labelled)
    alerts = read_dataset(parquet_dir, ALERTS_DATASET, EVIDENCE_SCHEMA)
    return quality_report(transactions.to_pandas(), alerts.to_pandas(), spans,
                          as_of=pc.max(event_times["event_time"]).as_py())


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.prog = PROG
    parser.description = (
        "Print precision and recall of each rule, from the alerts and the labelled transactions "
        "in the Parquet history. Rule spans come from the detector settings (same flags)."
    )
    parser.add_argument("--json", action="store_true", default=False,
                        help="print JSON rows instead of a table")


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, namespace = load_settings(DetectorSettings, argv, extra_args=_add_flags)
        setup_logging("quality")
        report = load_report(settings.parquet_dir, rule_spans(settings))
        if namespace.json:
            print(json.dumps(report_records(report), indent=2))
        else:
            print(format_report(report))
        return 0

    run_entry_point(PROG, run)


if __name__ == "__main__":
    main()
