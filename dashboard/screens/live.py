"""Live alerts: newest first with each alert's current verdict and risk score, refreshed in
place; filters; the distribution of the risk scores in view; one alert's evidence with the
reasons for its score, its verdicts, and buttons to give one."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.data import resources
from dashboard.data.verdicts import UNREVIEWED, VerdictsSnapshot, verdict_labels
from dashboard.data.views import (
    TIME_RANGES,
    alert_label,
    alert_record,
    alert_table,
    filter_alerts,
    kpis,
)
from dashboard.screens._charts import (
    EMPTY,
    RISK_COLUMN,
    alerts_over_time_figure,
    chart,
    evidence_table,
    kafka_banner,
    kpi_values,
    metric_rows,
    score_distribution_chart,
)
from dashboard.screens._verdicts import (
    analyst_hint,
    read_only_banner,
    record_verdict,
    show_message,
    verdict_trail,
)
from fraudstream.schemas import RULES
from fraudstream.verdicts.model import MAX_NOTE, VERDICTS

#: Rows sent to the browser per refresh; the filters reach everything in memory.
TABLE_ROWS = 200
#: Alerts offered in the detail picker.
PICKER_ROWS = 200

context = resources.get_context()
settings = context.settings
desk = resources.verdicts(context)
_PLACE = "live"

st.title("Live alerts")


def _note_key(alert_id: str) -> str:
    """Keyed by alert: a note typed for one alert never lands on another."""
    return f"live.note.{alert_id}"


def _decide(alert_id: str, verdict: str) -> None:
    if record_verdict(context, alert_id, verdict, st.session_state.get(_note_key(alert_id)) or "",
                      _PLACE):
        st.session_state[_note_key(alert_id)] = ""


def verdict_panel(alert_id: str, snapshot: VerdictsSnapshot) -> None:
    """The alert's verdicts, a note, and one button per verdict (the note goes with it)."""
    st.text("Verdict")
    show_message(_PLACE)
    verdict_trail(desk, snapshot, alert_id, key=f"live.trail.{alert_id}")
    analyst = resources.analyst()
    analyst_hint(analyst)
    can_record = bool(analyst) and not snapshot.read_only
    # Enter must not submit: with three verdict buttons it would pick one for the analyst.
    with st.form(f"live.verdict.{alert_id}", enter_to_submit=False, border=False):
        st.text_input("Note", key=_note_key(alert_id), max_chars=MAX_NOTE,
                      placeholder="why (optional): what was checked, who confirmed it")
        for column, verdict in zip(st.columns([1, 1, 1, 3]), VERDICTS, strict=False):
            with column:
                st.form_submit_button(verdict, key=f"live.decide.{alert_id}.{verdict}",
                                      disabled=not can_record, on_click=_decide,
                                      args=(alert_id, verdict),
                                      help=f"record the verdict {verdict!r} on this alert")


def alert_detail(alert: pd.Series, snapshot: VerdictsSnapshot) -> None:
    record = alert_record(alert)
    left, right = st.columns([2, 3])
    with left:
        st.text("Alert")
        st.json(record)
    with right:
        evidence_table(resources.transactions(context)[0], record)
    verdict_panel(str(record["alert_id"]), snapshot)


def score_chart(shown: pd.DataFrame, verdicts: pd.Series) -> None:
    """The risk scores of the alerts in view: split by verdict once any of them has one,
    by rule before that."""
    reviewed = verdicts.notna() & (verdicts != UNREVIEWED)
    if reviewed.any():
        score_distribution_chart(shown, verdicts.fillna(UNREVIEWED), "verdict")
    else:
        score_distribution_chart(shown, shown["rule"], "rule")


@st.fragment(run_every=settings.refresh_seconds)
def live() -> None:
    data = resources.live_alerts(context)
    kafka_banner(data.status)
    snapshot = desk.snapshot()
    read_only_banner(desk, snapshot)
    metric_rows(kpi_values(kpis(resources.metrics(context).batches, data.alerts, data.now)))

    rule_col, user_col, range_col = st.columns([3, 3, 2])
    rules = rule_col.multiselect("Rule", sorted(set(RULES) | set(data.counts.index)),
                                 key="live.rules", placeholder="All rules")
    user = user_col.text_input("User", key="live.user", placeholder="user id contains…")
    time_range = range_col.selectbox("Time range", list(TIME_RANGES), key="live.range")
    look_back = TIME_RANGES[time_range]
    shown = filter_alerts(data.alerts, rules, user,
                          data.now - look_back if look_back else None)

    st.caption(f"{len(shown):,} matching alerts (of {len(data.alerts):,} in memory, "
               f"newest first; the table shows up to {TABLE_ROWS}). Refreshes every "
               f"{settings.refresh_seconds:g} s.")
    table = alert_table(shown.head(TABLE_ROWS))
    table.insert(1, "verdict", verdict_labels(table["alert_id"], snapshot))
    st.dataframe(table, hide_index=True, key="live.table", placeholder=EMPTY,
                 column_config={
                     "detected_at": st.column_config.DatetimeColumn(
                         "detected at", format="YYYY-MM-DD HH:mm:ss"),
                     "verdict": st.column_config.TextColumn(
                         "verdict", help="the newest analyst verdict on the alert"),
                     "rule_version": st.column_config.NumberColumn(
                         "version", format="%d", help="version of the rule that fired"),
                     "risk_score": RISK_COLUMN,
                     "user_id": st.column_config.TextColumn("user"),
                     "transaction_count": st.column_config.NumberColumn("txs"),
                     "total_amount": st.column_config.NumberColumn("total", format="%.2f"),
                     "window_start": st.column_config.DatetimeColumn(
                         "window start", format="HH:mm:ss"),
                     "window_end": st.column_config.DatetimeColumn(
                         "window end", format="HH:mm:ss"),
                 })
    chart(alerts_over_time_figure(shown))
    score_chart(shown, verdict_labels(shown["alert_id"], snapshot))

    st.subheader("Alert detail")
    picked = st.session_state.get("live.alert")
    choices = list(shown["alert_id"].head(PICKER_ROWS))
    if picked and picked not in choices and picked in set(data.alerts["alert_id"]):
        choices.append(picked)  # keep the open alert while newer ones push it down
    by_id = data.alerts.set_index("alert_id", drop=False)
    selected = st.selectbox("Alert", choices, index=None, key="live.alert",
                            format_func=lambda alert_id: alert_label(by_id.loc[alert_id]),
                            placeholder="Choose an alert to see its evidence and verdicts")
    if selected is not None:
        alert_detail(by_id.loc[selected], snapshot)


live()
