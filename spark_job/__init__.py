"""The PySpark Structured Streaming fraud detector (``python -m spark_job``): a Kafka source on
Spark's Python Data Source API, the transaction validator it decodes with, and the rules."""
