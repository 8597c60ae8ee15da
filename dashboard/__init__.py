"""The fraudstream Streamlit dashboard: live alerts, KPIs and charts, detection quality, and a
built-in topic browser. ``python -m dashboard`` serves it (see ``dashboard.cli``)."""
