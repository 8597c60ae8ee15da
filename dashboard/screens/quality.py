"""Detection quality: precision and recall per rule against the producer's labels, over the
Parquet history (the numbers ``python -m spark_job.quality`` prints), and beside them the
analysts' precision from their verdicts: labels exist only for generated traffic, verdicts for
real traffic too. Then the newest trained model against the rules on its hold-out (its
metrics.json): rules alone, model alone and rules + model at the rules' recall. Below, the same
label-based figures per bucket of event time (one line chart per rule), to see a rule drift or a
change take effect."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard.data import resources
from dashboard.data.model import (
    TRAIN_COMMAND,
    ModelsSnapshot,
    candidates_table,
    comparison_recall,
    comparison_table,
    histogram_frame,
    holdout_text,
    model_text,
    number,
    per_rule_table,
    ratio_text,
    score_text,
    versions_table,
)
from dashboard.screens._charts import (
    chart,
    code_span,
    holdout_histogram_figure,
    metric_rows,
    plot_text,
)
from dashboard.screens._verdicts import read_only_banner
from fraudstream.quality import format_ratio
from fraudstream.rules.kinds import hex_colour

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
    "fires when it completes); recall leaves them out. Analyst precision: of a rule's alerts in "
    "the history that have a verdict (reviewed), the share whose newest verdict is fraud "
    "(confirmed_fraud); an unsure verdict counts as reviewed, not as confirmed. "
    "n/a: nothing to divide by."
)
st.button("Recompute", help="Re-read the Parquet history now (it is also re-read on every "
          "visit; unchanged data is not recomputed)")

desk = resources.verdicts(context)
snapshot = desk.snapshot()
read_only_banner(desk, snapshot)
by_analysts, outside = resources.analyst_precision(context, snapshot)
# Verdicts concern alerts of the same history, so their rules are already the report's rows.
report = resources.quality(context).join(by_analysts, how="left")
for column in ("reviewed", "confirmed_fraud"):
    report[column] = report[column].fillna(0).astype("int64")
shown = report.reset_index()
for column in ("precision", "recall", "analyst_precision"):
    shown[column] = shown[column].map(format_ratio)
st.dataframe(shown, hide_index=True, key="quality.table", column_config={
    "reviewed": st.column_config.NumberColumn("reviewed", help="alerts with a verdict"),
    "confirmed_fraud": st.column_config.NumberColumn(
        "confirmed fraud", help="reviewed alerts whose newest verdict is fraud"),
    "analyst_precision": st.column_config.TextColumn(
        "analyst precision", help="confirmed fraud / reviewed"),
})
if outside:
    st.caption(f"Not counted yet: {outside:,} verdict(s) on alerts not in the Parquet history "
               "(counted once the detector has written them).")

long = report.reset_index().melt(id_vars="rule",
                                 value_vars=["precision", "recall", "analyst_precision"],
                                 var_name="measure", value_name="value").dropna()
if long.empty:
    st.info("No alerts and no labelled transactions in the Parquet history yet.")
else:
    long["rule"] = plot_text(long["rule"])
    long["measure"] = long["measure"].str.replace("_", " ")
    figure = px.bar(long, x="rule", y="value", color="measure", barmode="group",
                    range_y=[0, 1.05], labels={"value": ""},
                    title="Precision and recall (labels), analyst precision (verdicts)",
                    color_discrete_sequence=[hex_colour("velocity"),
                                             hex_colour("multi_location"),
                                             hex_colour("paypal_micro")])
    figure.update_yaxes(tickformat=".0%")
    chart(figure)


# --- the model ----------------------------------------------------------------------------------


def _skipped(models: ModelsSnapshot) -> None:
    for version in models.skipped:
        st.text(f"Not used: version {version.name}: {version.state}")


def model_section(models: ModelsSnapshot) -> None:
    """The newest trained version against the rules, on its own hold-out (metrics.json)."""
    st.subheader("Rules alone vs rules + model")
    version = models.newest
    if version is None:
        st.info(f"No trained model under {code_span(str(models.models_dir))} yet: train one "
                f"with {code_span(TRAIN_COMMAND)} and its figures appear here.",
                icon=":material/model_training:")
        _skipped(models)
        return
    metrics = version.metrics
    recall = comparison_recall(metrics)
    st.caption(
        f"From the newest trained version's metrics.json, measured by the trainer on its "
        f"hold-out. At the rules' recall on the hold-out ({recall}): the precision of the rules "
        f"alone, of the model alone (flagging the transactions it scores at or above the "
        f"threshold that reaches that recall) and of rules + model (rule alerts the model "
        f"scores very low are dropped, transactions it scores very high are added). Labels: "
        f"the producer's ground truth, overridden by analysts' verdicts.")
    # Strings from the file: plain text, never Markdown.
    st.text(model_text(version))
    st.text(holdout_text(metrics))
    threshold = number(metrics.get("threshold_at_recall_0_9"))
    metric_rows({
        "Model AUC (hold-out)": score_text(metrics.get("auc")),
        "Precision at recall 90%": ratio_text(metrics.get("precision_at_recall_0_9")),
        "Threshold at recall 90%": score_text(threshold),
        "Rules' recall (hold-out)": recall,
    }, per_row=4)
    st.dataframe(comparison_table(metrics), hide_index=True, key="quality.model.comparison",
                 column_config={
                     "threshold": st.column_config.TextColumn(
                         "threshold", help="the score thresholds that reach the rules' recall"),
                 })
    chart(holdout_histogram_figure(histogram_frame(metrics)))
    candidates = candidates_table(metrics)
    per_rule = per_rule_table(metrics)
    if not per_rule.empty:
        st.text("The rules on the same hold-out")
        st.dataframe(per_rule, hide_index=True, key="quality.model.rules", column_config={
            "flagged": st.column_config.NumberColumn(
                "flagged", help="hold-out transactions in the evidence of the rule's alerts"),
        })
    if not candidates.empty:
        st.text("Algorithms tried (the better on the hold-out is kept)")
        st.dataframe(candidates, hide_index=True, key="quality.model.candidates",
                     column_config={"precision_at_recall_0_9": st.column_config.TextColumn(
                         "precision at recall 90%")})
    _skipped(models)
    with st.expander(f"Every trained version ({len(models.versions)})",
                     key="quality.model.versions"):
        st.dataframe(versions_table(models), hide_index=True, key="quality.model.versions.table",
                     column_config={"precision_at_recall_0_9": st.column_config.TextColumn(
                         "precision at recall 90%")})
    st.text("Train a new version (the running detector takes it between batches):")
    st.code(f"{TRAIN_COMMAND} --models-dir {models.models_dir}", language="bash")


model_section(resources.models(context))


def width_text(width: pd.Timedelta) -> str:
    hours = width / pd.Timedelta("1h")
    return f"{hours / 24:g} d" if hours >= 24 else f"{hours:g} h"


def over_time_figure(over_time: pd.DataFrame) -> object | None:
    """Precision and recall per bucket, one small line chart per rule (None if no rule has a
    defined ratio in any bucket)."""
    long = over_time.melt(id_vars=["bucket", "rule"], value_vars=["precision", "recall"],
                          var_name="measure", value_name="value").dropna(subset=["value"])
    if long.empty:
        return None
    rules = [rule for rule in dict.fromkeys(over_time["rule"]) if rule in set(long["rule"])]
    long["rule"] = plot_text(long["rule"])
    figure = px.line(long, x="bucket", y="value", color="measure", markers=True,
                     facet_col="rule", facet_col_wrap=2, range_y=[0, 1.05],
                     category_orders={"rule": plot_text(pd.Series(rules)).tolist()},
                     labels={"value": "", "bucket": "event time (UTC)"},
                     title="Precision and recall over time (labels), per rule",
                     color_discrete_sequence=[hex_colour("velocity"),
                                              hex_colour("multi_location")])
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    figure.update_yaxes(tickformat=".0%")
    rows = (len(rules) + 1) // 2
    figure.update_layout(height=220 * rows + 80, legend_title_text="",
                         margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return figure


st.subheader("Over time")
over_time = resources.quality_over_time(context)
if over_time.empty:
    st.info("No transactions in the Parquet history yet.")
else:
    width = over_time["bucket"].drop_duplicates().sort_values().diff().min()
    label = "one bucket so far" if pd.isna(width) else f"buckets of {width_text(width)}"
    st.caption(
        f"The same figures per bucket of event time ({label}; an hour unless the history is "
        "too long for that). Each bucket is judged on its own: its labelled transactions, and "
        "the alerts whose window ends in it; an episode that crosses a bucket boundary counts "
        "in both buckets. A gap in a line: nothing to divide by in that bucket.")
    figure = over_time_figure(over_time)
    if figure is None:
        st.info("No alerts and no labelled transactions in the Parquet history yet.")
    else:
        chart(figure)
    with st.expander("Figures per bucket", key="quality.over_time.figures"):
        table = over_time.copy()
        for column in ("precision", "recall"):
            table[column] = table[column].map(format_ratio)
        st.dataframe(table, hide_index=True, key="quality.over_time", column_config={
            "bucket": st.column_config.DatetimeColumn("bucket start", format="iso8601"),
        })

spans = ", ".join(f"{rule} {seconds:g} s" for rule, seconds in sorted(context.spans.items()))
st.text(f"Episode spans: {spans}. Same numbers from the command line:")
st.code(f"python -m spark_job.quality --parquet-dir {settings.parquet_dir}", language="bash")
