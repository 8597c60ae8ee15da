"""Data access for the dashboard: the Parquet history, the detector's metrics file, Kafka, and
the rules topic (read and published).

Plain modules with no Streamlit in them, except ``resources``, which is the boundary where the
pages get cached, shared instances.
"""
