"""Verdict drawing shared by the live page's alert detail, the review queue and the quality page:
the read-only banner, the outcome of the last decision, an alert's current verdict and audit
trail, and the recording step their buttons run.

Recording runs in widget callbacks. Callbacks run before the page script, so the page drawn
right after a decision already shows it, and the outcome is handed to that drawing through
session state (shown once, where the decision was made).
"""

from __future__ import annotations

import streamlit as st

from dashboard.data import resources
from dashboard.data.resources import DashboardContext
from dashboard.data.verdicts import (
    VerdictDesk,
    VerdictNotPublished,
    VerdictNotRecorded,
    VerdictsSnapshot,
    trail_table,
)
from dashboard.screens._charts import code_span, show_outcome

#: (level, text, place): the outcome of the last decision.
_MESSAGE = "verdicts.message"

TRAIL_CONFIG = {
    "decided_at": st.column_config.DatetimeColumn("when", format="YYYY-MM-DD HH:mm:ss"),
    "analyst": st.column_config.TextColumn("who"),
    "verdict": st.column_config.TextColumn("verdict"),
    "note": st.column_config.TextColumn("note"),
    "recorded_at": st.column_config.DatetimeColumn("recorded at",
                                                   format="YYYY-MM-DD HH:mm:ss"),
}


def read_only_banner(desk: VerdictDesk, snapshot: VerdictsSnapshot) -> None:
    """Say that verdicts cannot be recorded and why; the rest of the page keeps working."""
    if not snapshot.read_only:
        return
    shown = ("showing the verdicts as last read" if snapshot.read_at is not None
             else "no verdicts could be read")
    st.warning(f"Verdicts are read-only: {code_span(snapshot.error or '')}", icon=":material/lock:")
    st.caption(f"Verdict database {code_span(desk.display_url)}: {shown}; recording is off until "
               f"it answers again (tried again every {desk.retry_seconds:g} s).")


def analyst_hint(analyst: str) -> None:
    if not analyst:
        st.info("Enter your name as Analyst in the sidebar to record verdicts: every verdict "
                "records who gave it.", icon=":material/badge:")


def show_message(place: str) -> None:
    show_outcome(_MESSAGE, place)


def refuse(text: str, place: str) -> None:
    """Keep a refusal for the page to show (nothing was recorded)."""
    st.session_state[_MESSAGE] = ("error", text, place)


def record_verdict(context: DashboardContext, alert_id: str, verdict: str, note: str,
                   place: str) -> bool:
    """Record one verdict from a callback and keep its outcome for the page; True when it is
    stored (published or not), so the caller can move on."""
    desk = resources.verdicts(context)
    analyst = resources.analyst()
    what = f"{code_span(verdict)} on alert {code_span(alert_id[:8])}"
    try:
        desk.record(alert_id, verdict, analyst, note, resources.alert_is_known(context))
    except VerdictNotRecorded as exc:
        refuse(f"Not recorded: {code_span(exc.reason)}", place)
        return False
    except VerdictNotPublished as exc:
        st.session_state[_MESSAGE] = (
            "warning", f"Recorded {what} by {code_span(analyst)}, but not published to "
                       f"{code_span(desk.topic)}: {code_span(exc.reason)}", place)
        return True
    st.session_state[_MESSAGE] = (
        "success", f"Recorded {what} by {code_span(analyst)} and published it to "
                   f"{code_span(desk.topic)}.", place)
    return True


def verdict_trail(desk: VerdictDesk, snapshot: VerdictsSnapshot, alert_id: str, key: str
                  ) -> None:
    """The alert's current verdict (the newest, which counts) and every verdict given on it."""
    current = snapshot.latest.get(alert_id)
    if current is not None:
        when = current.decided_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        st.text(f"Current verdict: {current.verdict} by {current.analyst} at {when}"
                + (f"\nNote: {current.note}" if current.note else ""))
    elif snapshot.read_at is not None:
        st.text("Current verdict: none yet (unreviewed)")
    history, error = desk.trail(alert_id)
    if error is not None:
        st.text("Audit trail not available while the verdict database cannot be read.")
    elif history:
        st.text(f"Audit trail ({len(history)} verdict{'s' if len(history) > 1 else ''}, "
                "oldest first)")
        st.dataframe(trail_table(history), hide_index=True, key=key, column_config=TRAIL_CONFIG)
