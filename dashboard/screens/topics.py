"""Topics: a small built-in Kafdrop for local mode: topics, offsets, consumer groups with lag,
and the last messages of a topic."""

from __future__ import annotations

import streamlit as st
from confluent_kafka import KafkaException

from dashboard.data import resources
from dashboard.data.kafka import last_messages, topics_view
from dashboard.screens._charts import code_span

context = resources.get_context()
settings = context.settings
client_config = settings.client_config()

st.title("Topics")
st.button("Refresh")
try:
    view = topics_view(client_config)
except KafkaException as exc:
    st.error(f"Kafka broker unreachable at {code_span(settings.bootstrap_servers)}.",
             icon=":material/cloud_off:")
    st.text(str(exc.args[0]) if exc.args else str(exc))
    st.stop()

summary = (view.partitions.groupby("topic", as_index=False)
           .agg(partitions=("partition", "size"), earliest=("earliest", "sum"),
                latest=("latest", "sum"), messages=("messages", "sum")))
st.dataframe(summary, hide_index=True, key="topics.summary")
st.caption("Offsets and counts are what the broker reports (message count = latest - earliest "
           "per partition). The embedded Tansu broker can under-report the latest offset (it "
           "answers with the last record batch's base offset + 1), so counts and lag may read "
           "low there; the message browser below reads to the real end.")
with st.expander("Partitions"):
    st.dataframe(view.partitions, hide_index=True, key="topics.partitions")

st.subheader("Consumer groups")
if view.groups.empty:
    st.info("No consumer groups (the detector and the dashboard read by partition assignment "
            "and do not show up here).")
else:
    st.dataframe(view.groups, hide_index=True, key="topics.groups")
    st.caption("Lag = latest - committed, floored at 0, from the reported latest offset.")
if view.errors:
    st.warning("Some consumer-group details could not be read:")
    st.text("\n".join(view.errors))

st.subheader("Messages")
topics = sorted(summary["topic"])
if not topics:
    st.info("The broker has no topics.")
    st.stop()
topic_col, partition_col, count_col = st.columns([3, 2, 2])
default_topic = topics.index(settings.alerts_topic) if settings.alerts_topic in topics else 0
topic = topic_col.selectbox("Topic", topics, index=default_topic, key="topics.topic")
partitions = sorted(view.partitions.loc[view.partitions["topic"] == topic, "partition"])
partition = partition_col.selectbox("Partition", ["all", *partitions], key="topics.partition")
count = count_col.number_input("Last N messages", min_value=1, max_value=500, value=20,
                               key="topics.count")
messages = last_messages(client_config, topic,
                         partitions if partition == "all" else [int(partition)], int(count))
st.text(f"{len(messages)} newest messages of {topic}, newest first")
for message in messages:
    when = message.timestamp.isoformat(timespec="milliseconds") if message.timestamp else "?"
    st.text(f"partition {message.partition} · offset {message.offset} · {when} · "
            f"key {message.key!r}")
    if isinstance(message.parsed, dict | list):
        st.json(message.parsed, expanded=1)
    else:
        st.code(message.value if message.value is not None else "(null value)", language=None)
