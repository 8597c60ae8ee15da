"""Pure pandas/pyarrow shaping of alerts, transactions and metrics for the pages: no I/O, no
Streamlit, so every number on the dashboard can be unit-tested from plain frames."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dashboard import geo
from fraudstream.schemas import ALERT_FIELDS, format_timestamp

__all__ = [
    "NO_SCORES",
    "SCORE_BINS",
    "TIME_RANGES",
    "Kpis",
    "alert_label",
    "alert_locations",
    "alert_record",
    "alert_table",
    "alerts_over_time",
    "amount_distribution",
    "count_by_rule",
    "evidence",
    "evidence_ids",
    "filter_alerts",
    "kpis",
    "latency_over_time",
    "merge_alerts",
    "risk_text",
    "rule_version",
    "score_distribution",
    "top_users",
]

#: Time-range filter choices of the live page: label -> look-back (None = everything).
TIME_RANGES: Mapping[str, timedelta | None] = {
    "All": None,
    "Last 5 minutes": timedelta(minutes=5),
    "Last 15 minutes": timedelta(minutes=15),
    "Last hour": timedelta(hours=1),
    "Last 6 hours": timedelta(hours=6),
    "Last 24 hours": timedelta(hours=24),
}
#: Bucket widths for "alerts over time", the first giving at most ~MAX_BUCKETS bars.
BUCKETS = ("1s", "5s", "10s", "30s", "1min", "5min", "15min", "1h", "6h", "1D")
MAX_BUCKETS = 90
TABLE_COLUMNS = ("detected_at", "rule", "rule_version", "risk_score", "user_id",
                 "transaction_count", "total_amount", "locations", "reason", "window_start",
                 "window_end", "alert_id")
#: Bins of the risk-score distribution: 0-0.05, ..., 0.95-1 (as the trainer's hold-out one).
SCORE_BINS = 20
#: What the distribution shows when no alert in view has a score.
NO_SCORES = ("No risk scores yet: no model is loaded (train one with "
             "python -m spark_job.train)")


def merge_alerts(history: pd.DataFrame, live: pd.DataFrame, limit: int) -> pd.DataFrame:
    """History and the Kafka tail as one frame: deduplicated by ``alert_id`` (the same evidence
    gives the same id), newest first, at most ``limit`` rows."""
    frames = [frame for frame in (history, live) if not frame.empty]
    if not frames:
        return history.iloc[0:0]
    merged = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    merged = merged.drop_duplicates("alert_id")
    return merged.sort_values(["detected_at", "alert_id"], ascending=False).head(limit) \
        .reset_index(drop=True)


def count_by_rule(history: pa.Table, live: pd.DataFrame) -> pd.Series:
    """Alerts per rule over the whole history plus tail alerts not in it yet."""
    counts: dict[str, int] = {}
    for item in pc.value_counts(history["rule"]).to_pylist() if history.num_rows else []:
        if item["values"] is not None:
            counts[item["values"]] = item["counts"]
    if not live.empty:
        # Hash the small side (the tail), scan the history once.
        live_ids = pa.array(live["alert_id"], pa.string())
        stored = set(history["alert_id"].filter(
            pc.is_in(history["alert_id"], value_set=live_ids)).to_pylist())
        for rule in live.loc[~live["alert_id"].isin(stored), "rule"]:
            counts[rule] = counts.get(rule, 0) + 1
    return pd.Series(counts, dtype="int64").sort_index()


def filter_alerts(alerts: pd.DataFrame, rules: Sequence[str], user: str,
                  since: datetime | None) -> pd.DataFrame:
    """Alerts of the chosen rules (all if none chosen), whose user id contains ``user``
    (case-insensitive; blank = everyone), detected at or after ``since``."""
    keep = pd.Series(True, index=alerts.index)
    if rules:
        keep &= alerts["rule"].isin(list(rules))
    if user.strip():
        keep &= alerts["user_id"].str.contains(user.strip(), case=False, regex=False, na=False)
    if since is not None:
        keep &= alerts["detected_at"] >= since
    return alerts[keep]


def alert_table(alerts: pd.DataFrame) -> pd.DataFrame:
    """The alert columns people read, with lists joined into text."""
    table = alerts.reindex(columns=list(TABLE_COLUMNS))
    table["locations"] = table["locations"].map(_join)
    # Alerts written before rules had versions have none: shown empty, not as NaN or 0.
    table["rule_version"] = pd.to_numeric(table["rule_version"], errors="coerce").astype("Int64")
    table["risk_score"] = risk_scores(table["risk_score"])
    return table


def risk_scores(values: pd.Series) -> pd.Series:
    """Risk scores as a nullable float column: sortable, and empty (not 0) where an alert has
    none (no model was loaded when it was raised, or it predates the model)."""
    return pd.to_numeric(values, errors="coerce").astype("Float64")


def risk_score(value: object) -> float | None:
    """One alert's ``risk_score`` as a float; None where it has none (null, NaN, not a number)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def score_reasons(value: object) -> list[str]:
    """One alert's ``score_reasons`` as a list of strings (empty where it has none)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return []
    return [str(item) for item in value if item is not None]


def risk_text(alert: Mapping[str, object]) -> str:
    """The alert's risk score and the features that raised it most, as plain text lines."""
    score = risk_score(alert.get("risk_score"))
    if score is None:
        return "Risk score: none (no model was loaded when this alert was raised)"
    lines = [f"Risk score: {score:.2f} (the model's fraud probability of the transaction "
             "that fired the rule)"]
    reasons = score_reasons(alert.get("score_reasons"))
    if reasons:
        lines.append("Top reasons:")
        lines += [f"  {reason}" for reason in reasons]
    return "\n".join(lines)


def _join(items: Iterable[str] | None) -> str:
    return ", ".join(items) if items is not None else ""


def alert_label(alert: Mapping[str, object]) -> str:
    """One line naming an alert, for pickers."""
    detected = alert["detected_at"]
    when = detected.strftime("%Y-%m-%d %H:%M:%S") if isinstance(detected, datetime) else "?"
    version = rule_version(alert.get("rule_version"))
    rule = f"{alert['rule']} v{version}" if version is not None else alert["rule"]
    return f"{when} · {rule} · {alert['user_id']} · {str(alert['alert_id'])[:8]}"


def rule_version(value: object) -> int | None:
    """An alert's ``rule_version`` as an int; None where the alert has none (alerts from before
    rules had versions, read from older Parquet files, come back as null or NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def alert_record(alert: Mapping[str, object]) -> dict[str, object]:
    """An alert row in the contract's JSON form: ISO timestamps, plain lists and numbers."""
    record: dict[str, object] = {}
    for name in ALERT_FIELDS:
        value = alert.get(name)
        if isinstance(value, datetime):
            value = format_timestamp(value)
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        elif value is pd.NaT or value is pd.NA:
            value = None
        if name == "rule_version":
            value = rule_version(value)
        elif name == "risk_score":
            value = risk_score(value)
        elif name == "score_reasons":
            value = score_reasons(value) if isinstance(value, list | tuple) else None
        record[name] = value
    return record


def alerts_over_time(alerts: pd.DataFrame) -> pd.DataFrame:
    """Alert counts per time bucket and rule (``bucket, rule, alerts``), the bucket width
    chosen from the time span so the chart keeps a readable number of bars."""
    if alerts.empty:
        return pd.DataFrame({"bucket": pd.Series(dtype="datetime64[us, UTC]"),
                             "rule": pd.Series(dtype=str), "alerts": pd.Series(dtype="int64")})
    times = alerts["detected_at"]
    span = (times.max() - times.min()).total_seconds()
    width = next((w for w in BUCKETS if span / pd.Timedelta(w).total_seconds() <= MAX_BUCKETS),
                 BUCKETS[-1])
    buckets = times.dt.floor(width)
    return (alerts.assign(bucket=buckets).groupby(["bucket", "rule"]).size()
            .rename("alerts").reset_index())


def score_distribution(alerts: pd.DataFrame, groups: pd.Series, bins: int = SCORE_BINS
                       ) -> pd.DataFrame:
    """How many alerts fall in each risk-score bin, per group (``groups``: a label per alert,
    e.g. its rule or its verdict): ``start, end, bin, group, alerts``, only non-empty cells.
    Alerts without a score are left out; empty when none has one. A score of exactly 1 falls
    in the last bin."""
    columns = ["start", "end", "bin", "group", "alerts"]
    if alerts.empty or "risk_score" not in alerts.columns:
        return pd.DataFrame(columns=columns)
    scores = pd.to_numeric(alerts["risk_score"], errors="coerce")
    keep = scores.notna() & (scores >= 0) & (scores <= 1)
    if not keep.any():
        return pd.DataFrame(columns=columns)
    index = np.minimum((scores[keep].to_numpy(dtype=float) * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"index": index, "group": groups[keep].astype(str).to_numpy()})
    counts = frame.groupby(["index", "group"]).size().rename("alerts").reset_index()
    counts["start"] = counts["index"] / bins
    counts["end"] = (counts["index"] + 1) / bins
    counts["bin"] = [f"{a:.2f}-{b:.2f}" for a, b in zip(counts["start"], counts["end"],
                                                        strict=True)]
    return counts.sort_values(["index", "group"]).reset_index(drop=True)[columns]


def top_users(alerts: pd.DataFrame, n: int = 15) -> pd.DataFrame:
    """The users with the most alerts: ``user_id, alerts, rules``."""
    if alerts.empty:
        return pd.DataFrame(columns=["user_id", "alerts", "rules"])
    grouped = alerts.groupby("user_id").agg(
        alerts=("alert_id", "size"), rules=("rule", lambda r: ", ".join(sorted(set(r)))))
    return grouped.sort_values(["alerts", "user_id"], ascending=[False, True]).head(n) \
        .reset_index()


def evidence_ids(alerts: pd.DataFrame) -> set[str]:
    return {tid for ids in alerts["transaction_ids"] if ids is not None for tid in ids}


def evidence(transactions: pa.Table, ids: Iterable[str]) -> pd.DataFrame:
    """The transactions with these ids, in event-time order."""
    wanted = pa.array(sorted(set(ids)), pa.string())
    found = transactions.filter(pc.is_in(transactions["transaction_id"], value_set=wanted))
    return found.to_pandas().sort_values(["event_time", "transaction_id"]).reset_index(drop=True)


def amount_distribution(transactions: pa.Table, flagged_ids: set[str], bins: int = 40
                        ) -> pd.DataFrame:
    """Share of transactions per amount bin, for all transactions and for the flagged ones
    (evidence of an alert). Bins are logarithmic: amounts span cents to thousands.
    Columns: ``amount`` (bin centre), ``share``, ``count``, ``group``."""
    amounts = transactions["amount"].to_numpy(zero_copy_only=False)
    amounts = amounts[np.isfinite(amounts) & (amounts > 0)]
    if amounts.size == 0:
        return pd.DataFrame(columns=["amount", "share", "count", "group"])
    edges = np.logspace(math.log10(amounts.min()), math.log10(amounts.max()) + 1e-9, bins + 1)
    centres = np.sqrt(edges[:-1] * edges[1:])
    flagged_mask = pc.is_in(transactions["transaction_id"],
                            value_set=pa.array(sorted(flagged_ids), pa.string()))
    flagged = transactions.filter(flagged_mask)["amount"].to_numpy(zero_copy_only=False)
    frames = []
    for group, values in (("all transactions", amounts), ("flagged (alert evidence)", flagged)):
        values = values[np.isfinite(values) & (values > 0)]
        counts, _ = np.histogram(values, bins=edges)
        share = counts / counts.sum() if counts.sum() else counts.astype(float)
        frames.append(pd.DataFrame({"amount": centres, "share": share, "count": counts,
                                    "group": group}))
    return pd.concat(frames, ignore_index=True)


def alert_locations(alerts: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Alerts per evidence location with coordinates (``city, alerts, lat, lon``), and how many
    alert-locations had no known coordinates."""
    cities = alerts["locations"].explode().dropna() if not alerts.empty else pd.Series(dtype=str)
    counts = cities.value_counts()
    rows, unknown = [], 0
    for city, n in counts.items():
        point = geo.coordinates(str(city))
        if point is None:
            unknown += int(n)
        else:
            rows.append((city, int(n), point[0], point[1]))
    return pd.DataFrame(rows, columns=["city", "alerts", "lat", "lon"]), unknown


# --- detector metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kpis:
    transactions_per_second: float | None
    alerts_per_minute: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    seconds_since_last_batch: float | None


def kpis(batches: pd.DataFrame, alerts: pd.DataFrame, now: datetime,
         window: timedelta = timedelta(minutes=1),
         alert_window: timedelta = timedelta(minutes=5)) -> Kpis:
    """Rates over recent wall-clock time, so a stopped detector reads 0, not its last rate.

    Input rate: rows the detector read in the last ``window`` / its length. Alerts per minute:
    alerts detected in the last ``alert_window``. Latency: the last batch that had alerts.
    """
    rate = None
    age = None
    p50 = p95 = None
    if not batches.empty:
        recent = batches[batches["written_at"] > now - window]
        rate = float(recent["input_rows"].sum()) / window.total_seconds()
        age = max((now - batches["written_at"].iloc[-1]).total_seconds(), 0.0)
        with_latency = batches.dropna(subset=["latency_ms_p50"])
        if not with_latency.empty:
            p50 = float(with_latency["latency_ms_p50"].iloc[-1])
            p95 = float(with_latency["latency_ms_p95"].iloc[-1])
    recent_alerts = 0 if alerts.empty else int((alerts["detected_at"] > now - alert_window).sum())
    per_minute = recent_alerts / (alert_window.total_seconds() / 60)
    return Kpis(rate, per_minute, p50, p95, age)


def latency_over_time(batches: pd.DataFrame) -> pd.DataFrame:
    """Per-batch event->alert latency percentiles in long form: ``written_at, percentile, ms``."""
    columns = {"latency_ms_p50": "p50", "latency_ms_p95": "p95", "latency_ms_max": "max"}
    data = batches.dropna(subset=["latency_ms_p50"])[["written_at", *columns]]
    return (data.rename(columns=columns)
            .melt(id_vars="written_at", var_name="percentile", value_name="ms"))
