"""Data access for the dashboard: the Parquet history, the detector's metrics file, Kafka, the
rules topic (read and published), analysts' verdicts (read and recorded), and the trained model
versions' metrics.

Plain modules with no Streamlit in them, except ``resources``, which is the boundary where the
pages get cached, shared instances.
"""
