"""The Streamlit app: loads the settings once per session, hands them to the pages, and
declares the navigation. Served by ``python -m dashboard``; AppTest runs it directly."""

from __future__ import annotations

import json
import os

import streamlit as st

from dashboard.cli import ARGS_ENV
from dashboard.data import resources
from dashboard.data.resources import ANALYST_KEY, DashboardContext, set_context
from fraudstream.quality import rule_spans
from fraudstream.settings import DashboardSettings, DetectorSettings, SettingsError, load_settings

#: The analyst's name when the sidebar field is left as it starts (shared machines, kiosks).
ANALYST_ENV = "FRAUDSTREAM_ANALYST"


def load_context() -> DashboardContext:
    """Dashboard settings from the flags ``python -m dashboard`` got (env < flags, as usual);
    rule spans from the detector's settings (same YAML file and environment), so quality
    episodes are cut with the windows the detector uses."""
    args = json.loads(os.environ.get(ARGS_ENV, "[]"))
    settings, namespace = load_settings(DashboardSettings, args)
    config = getattr(namespace, "config", None)
    detector, _ = load_settings(DetectorSettings, ["--config", config] if config else [])
    return DashboardContext(settings, rule_spans(detector))


st.set_page_config(page_title="fraudstream", page_icon=":material/shield:", layout="wide")
try:
    context = load_context()
except SettingsError as exc:
    st.error("Invalid dashboard setting")
    st.text(f"{exc.key}: {exc.message}")
    st.stop()
set_context(context)

with st.sidebar:
    # persist_state="session": without it Streamlit forgets the name on every page switch.
    st.text_input("Analyst", value=os.environ.get(ANALYST_ENV, ""), key=ANALYST_KEY,
                  persist_state="session", placeholder="your name",
                  help=f"Recorded as the analyst of every verdict you give and as updated_by on "
                       f"every rule change you publish (default: the environment variable "
                       f"`{ANALYST_ENV}`).")
    st.text(f"Kafka: {context.settings.bootstrap_servers}\n"
            f"Parquet: {context.settings.parquet_dir}\n"
            f"Verdicts: {resources.verdicts(context).display_url}\n"
            f"Refresh: every {context.settings.refresh_seconds:g} s")

navigation = st.navigation([
    st.Page("screens/live.py", title="Live alerts", icon=":material/notifications_active:",
            default=True),
    st.Page("screens/review.py", title="Review queue", icon=":material/fact_check:"),
    st.Page("screens/overview.py", title="Overview", icon=":material/monitoring:"),
    st.Page("screens/quality.py", title="Detection quality", icon=":material/target:"),
    st.Page("screens/rules.py", title="Rules", icon=":material/rule:"),
    st.Page("screens/topics.py", title="Topics", icon=":material/topic:"),
])
navigation.run()
