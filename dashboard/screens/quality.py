"""Detection quality: precision and recall per rule against the producer's labels, over the
Parquet history (the numbers ``python -m spark_job.quality`` prints)."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from dashboard.data import resources
from dashboard.screens._charts import chart, plot_text
from fraudstream.rules.kinds import hex_colour
from spark_job.quality import format_ratio

context = resources.get_context()
settings = context.settings

st.title("Detection quality")
st.caption(
    "Ground truth is the producer's label (fraud_pattern) on each transaction. "
    "Precision: share of a rule's alerts whose evidence holds a transaction labelled with that "
    "rule. Recall: share of injected episodes (labelled transactions of one user, split where "
    "the gap exceeds the rule's window; every high_value transaction is its own episode) that "
    "an alert of the rule for that user overlaps. Pending: undetected episodes whose last event "
    "is within the rule's window of the newest event, so they may still be growing (a burst "
    "fires when it completes); recall leaves them out. n/a: nothing to divide by."
)
st.button("Recompute", help="Re-read the Parquet history now (it is also re-read on every "
          "visit; unchanged data is not recomputed)")

report = resources.quality(context)
shown = report.reset_index()
for column in ("precision", "recall"):
    shown[column] = shown[column].map(format_ratio)
st.dataframe(shown, hide_index=True, key="quality.table")

long = report.reset_index().melt(id_vars="rule", value_vars=["precision", "recall"],
                                 var_name="measure", value_name="value").dropna()
if long.empty:
    st.info("No alerts and no labelled transactions in the Parquet history yet.")
else:
    long["rule"] = plot_text(long["rule"])
    figure = px.bar(long, x="rule", y="value", color="measure", barmode="group",
                    range_y=[0, 1.05], labels={"value": ""}, title="Precision and recall",
                    color_discrete_sequence=[hex_colour("velocity"),
                                             hex_colour("multi_location")])
    figure.update_yaxes(tickformat=".0%")
    chart(figure)

spans = ", ".join(f"{rule} {seconds:g} s" for rule, seconds in sorted(context.spans.items()))
st.text(f"Episode spans: {spans}. Same numbers from the command line:")
st.code(f"python -m spark_job.quality --parquet-dir {settings.parquet_dir}", language="bash")
