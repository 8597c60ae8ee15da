"""Overview: the model the detector scores with and pipeline KPIs, from the detector's metrics;
charts over the alerts in memory."""

from __future__ import annotations

import streamlit as st

from dashboard.data import resources
from dashboard.data.metrics import model_status
from dashboard.data.views import evidence_ids, kpis
from dashboard.screens._charts import (
    alerts_by_rule_figure,
    alerts_over_time_figure,
    amount_figure,
    chart,
    code_span,
    kafka_banner,
    kpi_values,
    latency_figure,
    map_figure,
    metric_rows,
    top_users_figure,
)

context = resources.get_context()
settings = context.settings

st.title("Overview")


@st.fragment(run_every=settings.refresh_seconds)
def overview() -> None:
    data = resources.live_alerts(context)
    snapshot = resources.metrics(context)
    kafka_banner(data.status)
    status = model_status(snapshot.batches)
    # From the metrics file (a string the detector wrote): plain text, never Markdown.
    st.text("Model: " + (status or "unknown (no batch in the detector's metrics yet)"))
    values = kpi_values(kpis(snapshot.batches, data.alerts, data.now))
    metric_rows({
        **{k: values[k] for k in ("Transactions/s in", "Alerts/min (5 min)", "Last batch")},
        "DLQ rows": f"{resources.dlq_rows(context):,}",
        "Late rows": f"{snapshot.totals.get('late_rows', 0):,}",
    })
    metric_rows({
        **{k: values[k] for k in ("Latency p50", "Latency p95")},
        **{f"Alerts: {code_span(rule)}": f"{count:,}" for rule, count in data.counts.items()},
    }, per_row=6)
    st.caption(f"Counts cover the whole alert history; charts the newest "
               f"{len(data.alerts):,} alerts (at most {settings.max_alerts:,} are kept in "
               f"memory). Rates and latency come from "
               f"{code_span(str(settings.resolved_metrics_file))} "
               f"({len(snapshot.batches):,} recent batches).")

    left, right = st.columns(2)
    with left:
        chart(alerts_over_time_figure(data.alerts))
        chart(top_users_figure(data.alerts))
        figure, unknown = map_figure(data.alerts)
        chart(figure)
        if unknown:
            st.caption(f"{unknown:,} alert locations have no known coordinates.")
    with right:
        chart(alerts_by_rule_figure(data.counts))
        transactions, _ = resources.transactions(context)
        chart(amount_figure(transactions, evidence_ids(data.alerts)))
        chart(latency_figure(snapshot.batches))


overview()
