"""Drawing shared by the pages: the Kafka banner, KPI rows, an alert's evidence table and
plotly figures.

Data strings never reach a Markdown or HTML renderer: tables go through ``st.dataframe``, free
text through ``st.text``/``st.code``/``st.json``, and strings placed in plotly labels are
HTML-escaped (plotly.js interprets a subset of HTML tags in text).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import pyarrow as pa
import streamlit as st

from dashboard.data.kafka import TailStatus
from dashboard.data.views import (
    NO_SCORES,
    SCORE_BINS,
    Kpis,
    alert_locations,
    alerts_over_time,
    amount_distribution,
    evidence,
    latency_over_time,
    risk_text,
    score_distribution,
    top_users,
)
from fraudstream.rules.kinds import hex_colour

_CHART_HEIGHT = 320


def code_span(text: str) -> str:
    """``text`` as a Markdown code span: shown literally, whatever it contains."""
    text = " ".join(text.split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def plot_text(values: pd.Series) -> pd.Series:
    return values.astype(str).map(html.escape)


def rule_colours(rules: Iterable[object]) -> dict[str, str]:
    """Plotly's colour map for these rule ids, keyed as ``plot_text`` shows them: every rule id
    gets its colour from the rule core, so a chart, the console and the Rules page agree and a
    rule added at run time is coloured too."""
    return {html.escape(str(rule)): hex_colour(str(rule)) for rule in set(rules)}


def kafka_banner(status: TailStatus) -> None:
    if status.reachable and status.error is None:
        return
    if not status.reachable:
        st.warning(f"Kafka broker unreachable at {code_span(status.address)}: showing the "
                   "Parquet history; retrying on every refresh.", icon=":material/cloud_off:")
    else:
        st.warning(f"Kafka at {code_span(status.address)} answers, but the alerts topic is "
                   "not readable.", icon=":material/warning:")
    if status.error:
        st.text(status.error)


def format_rate(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:,.1f} {unit}"


def format_ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def kpi_values(kpis: Kpis) -> dict[str, str]:
    return {
        "Transactions/s in": format_rate(kpis.transactions_per_second, "/s"),
        "Alerts/min (5 min)": format_rate(kpis.alerts_per_minute, "/min"),
        "Latency p50": format_ms(kpis.latency_p50_ms),
        "Latency p95": format_ms(kpis.latency_p95_ms),
        "Last batch": format_age(kpis.seconds_since_last_batch),
    }


def metric_rows(values: Mapping[str, str], per_row: int = 5) -> None:
    """Bordered metrics, at most ``per_row`` side by side so values are not cut off."""
    items = list(values.items())
    for start in range(0, len(items), per_row):
        row = items[start:start + per_row]
        for column, (label, value) in zip(st.columns(per_row), row, strict=False):
            column.metric(label, value, border=True)


def _layout(figure: go.Figure, title: str) -> go.Figure:
    figure.update_layout(title=title, height=_CHART_HEIGHT, margin={"l": 10, "r": 10, "t": 40,
                                                                     "b": 10},
                         legend_title_text="")
    return figure


def _empty(title: str, message: str) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper",
                          yref="paper")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return _layout(figure, title)


def alerts_over_time_figure(alerts: pd.DataFrame) -> go.Figure:
    title = "Alerts over time, by rule"
    data = alerts_over_time(alerts)
    if data.empty:
        return _empty(title, "no alerts yet")
    colours = rule_colours(data["rule"])
    data["rule"] = plot_text(data["rule"])
    figure = px.bar(data, x="bucket", y="alerts", color="rule",
                    color_discrete_map=colours,
                    labels={"bucket": "detected at (UTC)", "alerts": "alerts"})
    figure.update_layout(barmode="stack")
    return _layout(figure, title)


def alerts_by_rule_figure(counts: pd.Series) -> go.Figure:
    title = "Alerts by rule (all history)"
    if counts.empty:
        return _empty(title, "no alerts yet")
    data = counts.rename("alerts").rename_axis("rule").reset_index()
    colours = rule_colours(data["rule"])
    data["rule"] = plot_text(data["rule"])
    figure = px.bar(data, x="rule", y="alerts", color="rule", color_discrete_map=colours)
    figure.update_layout(showlegend=False)
    return _layout(figure, title)


def top_users_figure(alerts: pd.DataFrame) -> go.Figure:
    title = "Top flagged users"
    data = top_users(alerts)
    if data.empty:
        return _empty(title, "no alerts yet")
    data["user_id"] = plot_text(data["user_id"])
    data["rules"] = plot_text(data["rules"])
    figure = px.bar(data.iloc[::-1], x="alerts", y="user_id", orientation="h",
                    hover_data=["rules"], labels={"user_id": "user"})
    return _layout(figure, title)


def amount_figure(transactions: pa.Table, flagged: set[str]) -> go.Figure:
    title = "Amount distribution: flagged vs all transactions"
    data = amount_distribution(transactions, flagged, bins=30)
    if data.empty:
        return _empty(title, "no transactions in the Parquet history yet")
    figure = px.line(data, x="amount", y="share", color="group", log_x=True, line_shape="hvh",
                     hover_data=["count"], labels={"amount": "amount (log scale)",
                                                   "share": "share of group"})
    figure.update_yaxes(tickformat=".0%")
    return _layout(figure, title)


def map_figure(alerts: pd.DataFrame) -> tuple[go.Figure, int]:
    title = "Alert locations"
    data, unknown = alert_locations(alerts)
    if data.empty:
        return _empty(title, "no located alerts yet"), unknown
    data["city"] = plot_text(data["city"])
    figure = px.scatter_geo(data, lat="lat", lon="lon", size="alerts", hover_name="city",
                            projection="natural earth", color_discrete_sequence=["#d62728"])
    figure.update_geos(fitbounds="locations", showcountries=True, countrycolor="#bbbbbb")
    return _layout(figure, title), unknown


def latency_figure(batches: pd.DataFrame) -> go.Figure:
    title = "Event -> alert latency per batch"
    data = latency_over_time(batches)
    if data.empty:
        return _empty(title, "no batch with alerts in the metrics yet")
    figure = px.line(data, x="written_at", y="ms", color="percentile",
                     labels={"written_at": "batch written at (UTC)", "ms": "latency (ms)"})
    return _layout(figure, title)


#: Plotly config of every chart. ``topojsonURL``: the map's world outline comes from the app's
#: static folder (``dashboard/static``, served at ``app/static/``), not from cdn.plot.ly, so the
#: map draws offline. Relative, so it also works under a ``server.baseUrlPath``. Without the
#: file (an install that left it out) plotly's default, the CDN, is kept.
PLOTLY_CONFIG: dict[str, object] = {"displaylogo": False}
if (Path(__file__).resolve().parents[1] / "static" / "world_110m.json").is_file():
    PLOTLY_CONFIG["topojsonURL"] = "app/static/"


def chart(figure: go.Figure) -> None:
    st.plotly_chart(figure, config=PLOTLY_CONFIG)


_MESSAGE_ICONS = {"success": ":material/check_circle:", "warning": ":material/cloud_off:",
                  "error": ":material/block:"}


def show_outcome(key: str, place: str) -> None:
    """Show, once, the outcome an action kept under ``key`` (a callback runs before the page
    draws, so it keeps ``(level, text, place)`` in the session) if it belongs at ``place``."""
    message = st.session_state.get(key)
    if message is None or message[2] != place:
        return
    level, text, _ = st.session_state.pop(key)
    getattr(st, level)(text, icon=_MESSAGE_ICONS[level])


#: Column settings of every table that lists alerts (live, review queue, backtest changes).
RISK_COLUMN = st.column_config.NumberColumn(
    "risk", format="%.2f", help="the model's fraud probability of the transaction that fired "
    "the rule (empty: no model was loaded)")
#: Missing values in alert tables: an empty cell (a risk score, a rule version, a verdict).
EMPTY = ""

#: Labels of the score bins, in order (every bin on the axis, even an empty one).
_BIN_LABELS = [f"{i / SCORE_BINS:.2f}-{(i + 1) / SCORE_BINS:.2f}" for i in range(SCORE_BINS)]
#: Colours of the verdict split: the verdicts' meaning, not a rule's colour.
VERDICT_COLOURS = {"fraud": "#d62728", "legit": "#1f77b4", "unsure": "#ff7f0e",
                   "unreviewed": "#7f7f7f"}


def score_distribution_figure(alerts: pd.DataFrame, groups: pd.Series, by: str
                              ) -> go.Figure | None:
    """A histogram of the alerts' risk scores, stacked by ``groups`` (``by``: "rule" or
    "verdict"); None when no alert has a score."""
    data = score_distribution(alerts, groups)
    if data.empty:
        return None
    colours = rule_colours(data["group"]) if by == "rule" else {
        html.escape(group): VERDICT_COLOURS.get(group, "#7f7f7f") for group in data["group"]}
    data["group"] = plot_text(data["group"])
    figure = px.bar(data, x="bin", y="alerts", color="group", color_discrete_map=colours,
                    category_orders={"bin": _BIN_LABELS},
                    labels={"bin": "risk score", "alerts": "alerts", "group": by})
    figure.update_layout(barmode="stack", bargap=0.05)
    figure.update_xaxes(type="category")
    return _layout(figure, f"Risk score of the alerts in view, by {by}")


def holdout_histogram_figure(data: pd.DataFrame) -> go.Figure:
    """The trained model's scores on its hold-out, fraud vs legit, each as a share of its
    group (fraud is rare: raw counts would hide its bars); counts on hover."""
    title = "Hold-out risk scores: fraud vs legit transactions"
    if data.empty:
        return _empty(title, "no score histogram in the model's metrics.json")
    figure = px.bar(data, x="bin", y="share", color="group", barmode="group",
                    hover_data=["count"], category_orders={"bin": list(dict.fromkeys(
                        data["bin"])), "group": ["fraud", "legit"]},
                    color_discrete_map={"fraud": VERDICT_COLOURS["fraud"],
                                        "legit": VERDICT_COLOURS["legit"]},
                    labels={"bin": "risk score", "share": "share of group"})
    figure.update_xaxes(type="category")
    figure.update_yaxes(tickformat=".0%")
    return _layout(figure, title)


def score_distribution_chart(alerts: pd.DataFrame, groups: pd.Series, by: str) -> None:
    """The distribution, or the one line saying why there is none."""
    figure = score_distribution_figure(alerts, groups, by)
    if figure is None:
        st.info(NO_SCORES, icon=":material/insights:")
        return
    scored = int(pd.to_numeric(alerts["risk_score"], errors="coerce").notna().sum())
    chart(figure)
    unscored = len(alerts) - scored
    st.caption(f"{scored:,} of {len(alerts):,} alerts in view carry a risk score"
               + (f"; {unscored:,} {'was' if unscored == 1 else 'were'} raised while no model "
                  "was loaded." if unscored else "."))


def evidence_table(transactions: pa.Table, alert: Mapping[str, object],
                   key: str | None = None) -> None:
    """An alert's evidence: its risk score with the features that raised it most, then its
    transactions as found in the Parquet history. ``alert`` is an alert row (live, queue or
    backtest)."""
    st.text(risk_text(alert))
    raw = alert.get("transaction_ids")
    ids = [str(i) for i in raw] if isinstance(raw, Iterable) and not isinstance(raw, str) else []
    found = evidence(transactions, ids)
    st.text(f"Evidence: {len(found)} of {len(ids)} transactions found in the Parquet history")
    st.dataframe(found, hide_index=True, key=key, column_config={
        "event_time": st.column_config.DatetimeColumn("event time", format="iso8601"),
        "kafka_timestamp": st.column_config.DatetimeColumn("kafka time", format="iso8601"),
        "amount": st.column_config.NumberColumn("amount", format="%.2f"),
    })
