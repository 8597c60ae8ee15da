"""Review queue: the alerts nobody has given a verdict yet come first, one at a time, with what a
decision needs (reason, user, amount, rule and version, risk score and its reasons, evidence)
and a form worked from the keyboard: pick the verdict, type a note, press Enter. Once a verdict
is recorded the next unreviewed alert comes up.

Order: newest first until the verdict store holds a verdict; from then on highest risk score
first (alerts without a score after every scored one), then newest. The page says which.

The alert under review is kept in session state, not re-derived on every run: alerts arriving
meanwhile (or someone else's verdicts) never swap the alert out from under the analyst.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.data import resources
from dashboard.data.verdicts import (
    QUEUE_VERDICTS,
    UNREVIEWED,
    VerdictsSnapshot,
    next_unreviewed,
    queue_table,
    review_queue,
)
from dashboard.data.views import alert_label, alert_record, rule_version
from dashboard.screens._charts import EMPTY, RISK_COLUMN, code_span, evidence_table, kafka_banner
from dashboard.screens._verdicts import (
    analyst_hint,
    read_only_banner,
    record_verdict,
    refuse,
    show_message,
    verdict_trail,
)
from fraudstream.schemas import RULES
from fraudstream.verdicts.model import MAX_NOTE, VERDICTS

#: Rows of the queue sent to the browser; the filters reach every alert in memory.
TABLE_ROWS = 200
#: Alerts offered by "Jump to alert".
PICKER_ROWS = 200
#: The alert under review (an alert_id, or None for "the first unreviewed one").
_CURRENT = "review.current"
_PICK = "review.pick"
_PLACE = "review"
#: The line saying which order the queue is in.
ORDER_BY_RISK = ("Order: unreviewed first, then highest risk score first (alerts without a "
                 "score after every scored one), then newest first.")
ORDER_NEWEST = ("Order: unreviewed first, then newest first (the queue is ordered by risk "
                "score once the verdict store holds a verdict).")

context = resources.get_context()
settings = context.settings
desk = resources.verdicts(context)


def _verdict_key(alert_id: str) -> str:
    return f"review.verdict.{alert_id}"


def _note_key(alert_id: str) -> str:
    return f"review.note.{alert_id}"


# --- callbacks ------------------------------------------------------------------------------


def _decide(alert_id: str, next_id: str | None) -> None:
    verdict = st.session_state.get(_verdict_key(alert_id))
    if verdict is None:
        refuse(f"Choose a verdict ({', '.join(VERDICTS)}) first: nothing recorded.", _PLACE)
        return
    note = st.session_state.get(_note_key(alert_id)) or ""
    if record_verdict(context, alert_id, str(verdict), note, _PLACE):
        st.session_state[_CURRENT] = next_id


def _skip(next_id: str | None) -> None:
    st.session_state[_CURRENT] = next_id


def _jump() -> None:
    picked = st.session_state.get(_PICK)
    if picked:
        st.session_state[_CURRENT] = picked
        st.session_state[_PICK] = None  # ready for the next jump


# --- drawing --------------------------------------------------------------------------------


def _facts(alert: pd.Series) -> str:
    """What a decision needs, as plain text lines (data never reaches Markdown)."""
    record = alert_record(alert)
    version = rule_version(alert.get("rule_version"))
    ids = record["transaction_ids"] or []
    lines = [
        ("Rule", f"{record['rule']} v{version}" if version is not None else str(record["rule"])),
        ("User", str(record["user_id"])),
        ("Amount", f"{float(record['total_amount'] or 0.0):,.2f} over "
                   f"{record['transaction_count']} transaction(s)"),
        ("Reason", str(record["reason"] or "")),
        ("Window", f"{record['window_start']} → {record['window_end']}"),
        ("Detected", str(record["detected_at"])),
        ("Evidence", ", ".join(ids) if ids else "(none)"),
        ("Alert id", str(record["alert_id"])),
    ]
    return "\n".join(f"{name}: {value}" for name, value in lines)


def review_panel(alert: pd.Series, snapshot: VerdictsSnapshot, can_record: bool, *,
                 after_decision: str | None, after_skip: str | None) -> None:
    """The alert's facts, evidence and verdicts, and the form; ``after_decision`` and
    ``after_skip`` are the alerts that come up next."""
    alert_id = str(alert["alert_id"])
    left, right = st.columns([2, 3])
    with left:
        st.text(_facts(alert))
    with right:
        evidence_table(resources.transactions(context)[0], alert,
                       key=f"review.evidence.{alert_id}")
    verdict_trail(desk, snapshot, alert_id, key=f"review.trail.{alert_id}")

    current = snapshot.latest.get(alert_id)
    with st.form(f"review.form.{alert_id}"):
        st.radio("Verdict", VERDICTS, horizontal=True, key=_verdict_key(alert_id),
                 index=VERDICTS.index(current.verdict) if current is not None else None)
        st.text_input("Note", key=_note_key(alert_id), max_chars=MAX_NOTE,
                      placeholder="why (optional); Enter records the verdict")
        st.form_submit_button("Record verdict", type="primary", key=f"review.submit.{alert_id}",
                              disabled=not can_record, on_click=_decide,
                              args=(alert_id, after_decision))
    st.button("Skip to the next unreviewed alert", key="review.skip", on_click=_skip,
              args=(after_skip,), disabled=after_skip is None)


st.title("Review queue")
st.caption(
    f"Alerts without a verdict come first, then the reviewed ones. A verdict is stored in "
    f"{code_span(desk.display_url)} and published to {code_span(desk.topic)}; the newest "
    f"verdict on an alert is the one that counts, and every earlier one stays in its audit trail."
)
st.button("Refresh", key="review.refresh",
          help="Look for new alerts and verdicts now (also done after every verdict)")

data = resources.live_alerts(context)
kafka_banner(data.status)
snapshot = desk.snapshot()
read_only_banner(desk, snapshot)
analyst = resources.analyst()
analyst_hint(analyst)
can_record = bool(analyst) and not snapshot.read_only

rule_col, verdict_col, analyst_col = st.columns(3)
rules = rule_col.multiselect(
    "Rule", sorted(set(RULES) | set(data.counts.index) | set(st.session_state.get(
        "review.rules") or [])), key="review.rules", placeholder="All rules")
verdicts = verdict_col.multiselect("Verdict", QUEUE_VERDICTS, key="review.verdicts",
                                   placeholder="Any (unreviewed first)")
analysts = analyst_col.multiselect(
    "Analyst", sorted({v.analyst for v in snapshot.latest.values()}
                      | set(st.session_state.get("review.analysts") or [])),
    key="review.analysts", placeholder="Anyone",
    help="who gave the newest verdict (unreviewed alerts have nobody)")
# By risk score once analysts have started deciding (the store holds any verdict); newest
# first before that. A decision puts a verdict in the store, so the alert that comes up after
# one is the next in the risk order, even when this one is the first.
by_risk = bool(snapshot.latest)
queue = review_queue(data.alerts, snapshot.latest, rules=rules, verdicts=verdicts,
                     analysts=analysts, by_risk=by_risk)
queue_after_decision = queue if by_risk else review_queue(
    data.alerts, snapshot.latest, rules=rules, verdicts=verdicts, analysts=analysts,
    by_risk=True)
unreviewed = int((queue["verdict"] == UNREVIEWED).sum())
st.caption(f"{len(queue):,} matching alerts, {unreviewed:,} of them unreviewed (of "
           f"{len(data.alerts):,} alerts in memory; the table shows up to {TABLE_ROWS}).")
st.text(ORDER_BY_RISK if by_risk else ORDER_NEWEST)

by_id = queue.set_index("alert_id", drop=False)
current_id = st.session_state.get(_CURRENT)
if current_id not in by_id.index:
    current_id = next_unreviewed(queue, None)
    st.session_state[_CURRENT] = current_id

st.subheader("Alert under review")
show_message(_PLACE)
if current_id is None:
    st.info("No unreviewed alert matches the filters. Pick any alert below to review it "
            "again.", icon=":material/task_alt:")
else:
    current = by_id.loc[current_id]
    st.text(alert_label(current) + ("" if current["verdict"] == UNREVIEWED
                                    else f" · {current['verdict']} by {current['analyst']}"))
    review_panel(current, snapshot, can_record,
                 after_decision=next_unreviewed(queue_after_decision, current_id),
                 after_skip=next_unreviewed(queue, current_id))

st.subheader("Queue")
choices = list(queue["alert_id"].head(PICKER_ROWS))
st.selectbox("Jump to alert", choices, index=None, key=_PICK, on_change=_jump,
             format_func=lambda alert_id: f"{by_id.loc[alert_id, 'verdict']} · "
                                          f"{alert_label(by_id.loc[alert_id])}",
             placeholder="Choose an alert to review it")
st.dataframe(queue_table(queue.head(TABLE_ROWS)), hide_index=True, key="review.table",
             placeholder=EMPTY, column_config={
                 "verdict": st.column_config.TextColumn("verdict"),
                 "detected_at": st.column_config.DatetimeColumn(
                     "detected at", format="YYYY-MM-DD HH:mm:ss"),
                 "rule_version": st.column_config.NumberColumn(
                     "version", format="%d", help="version of the rule that fired"),
                 "user_id": st.column_config.TextColumn("user"),
                 "total_amount": st.column_config.NumberColumn("total", format="%.2f"),
                 "risk_score": RISK_COLUMN,
                 "analyst": st.column_config.TextColumn("analyst",
                                                        help="who gave the newest verdict"),
                 "decided_at": st.column_config.DatetimeColumn(
                     "decided at", format="YYYY-MM-DD HH:mm:ss"),
             })
