"""Build the SparkSession every fraudstream Spark program and test uses.

One place decides the settings that must match between the detector, the benchmarks and the
tests: UTC session time zone (event times are UTC and must never be shifted by the host zone),
Arrow for Python <-> JVM transfer, the Python interpreter of the workers, and the registration
of the ``fraudstream-kafka`` data source.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping

from pyspark.sql import SparkSession

from spark_job.kafka_source import KafkaDataSource

__all__ = ["build_spark_session", "session_conf"]

#: Short names accepted for ``state_store_provider``; anything else is taken as a class name.
STATE_STORE_PROVIDERS: dict[str, str] = {
    "rocksdb": "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider",
    "hdfs": "org.apache.spark.sql.execution.streaming.state.HDFSBackedStateStoreProvider",
}


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith("local[") or master.startswith("local-cluster")


def rocksdb_conf(memory_mb: int) -> dict[str, str]:
    """RocksDB state store settings: a batch's commit uploads only its changes (changelog
    checkpointing, snapshots in the background), and every RocksDB instance of the process
    shares one bounded block cache and write-buffer budget, so the state does not grow the
    JVM heap nor native memory without limit."""
    prefix = "spark.sql.streaming.stateStore.rocksdb"
    return {
        f"{prefix}.changelogCheckpointing.enabled": "true",
        f"{prefix}.boundedMemoryUsage": "true",
        f"{prefix}.maxMemoryUsageMB": str(memory_mb),
    }


def spark_conf(
    master: str = "local[2]",
    shuffle_partitions: int = 2,
    extra_conf: Mapping[str, str] | None = None,
    *,
    state_store_provider: str | None = None,
    state_store_memory_mb: int = 256,
    driver_memory: str | None = "2g",
) -> dict[str, str]:
    """The Spark configuration ``build_spark_session`` applies (separate so it can be inspected
    and logged). ``extra_conf`` wins over every default here."""
    conf: dict[str, str] = {
        # Event time is UTC by contract; a host in another zone must not shift timestamps.
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # The UI costs ~100 MB and a port per session; local runs and tests do not look at it.
        "spark.ui.enabled": "false" if is_local_master(master) else "true",
        "spark.ui.showConsoleProgress": "false",
        # Parquet timestamps as microseconds with UTC semantics, like the driver-written datasets.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    }
    if is_local_master(master):
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    if driver_memory:
        # Only effective when this call starts the JVM (the usual case for `python -m`).
        conf["spark.driver.memory"] = driver_memory
    if state_store_provider:
        provider = STATE_STORE_PROVIDERS.get(state_store_provider.lower(), state_store_provider)
        conf["spark.sql.streaming.stateStore.providerClass"] = provider
        if provider == STATE_STORE_PROVIDERS["rocksdb"]:
            conf.update(rocksdb_conf(state_store_memory_mb))
    conf.update({str(k): str(v) for k, v in (extra_conf or {}).items()})
    return conf


def build_spark_session(
    master: str = "local[2]",
    app_name: str = "fraudstream",
    shuffle_partitions: int = 2,
    extra_conf: Mapping[str, str] | None = None,
    *,
    state_store_provider: str | None = None,
    state_store_memory_mb: int = 256,
    driver_memory: str | None = "2g",
    log_level: str = "WARN",
) -> SparkSession:
    """Create (or reuse) the SparkSession and register the ``fraudstream-kafka`` source.

    ``state_store_provider`` is ``"rocksdb"``, ``"hdfs"`` or a provider class name; None keeps
    Spark's default. Settings that only apply when the JVM starts (driver memory, Python
    interpreter) have no effect if a session already exists in this process.
    """
    if is_local_master(master):
        # Spark otherwise resolves the host name, which can pick an unreachable interface.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # glibc gives each thread that allocates its own malloc arena (up to 8 per core), which
    # the JVM's many threads turn into hundreds of MB of mostly empty heap. Two arenas cost no
    # measurable speed here and took ~200 MB off the detector's JVM (benchmarks.memory). Set
    # before the JVM starts; the Python workers inherit it.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    # Workers must import the same packages as the driver (confluent-kafka, this project), so
    # they run this interpreter unless the operator chose another one explicitly.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    builder = SparkSession.builder.master(master).appName(app_name)
    conf = spark_conf(
        master, shuffle_partitions, extra_conf,
        state_store_provider=state_store_provider, state_store_memory_mb=state_store_memory_mb,
        driver_memory=driver_memory,
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(log_level)
    spark.dataSource.register(KafkaDataSource)
    return spark


@contextlib.contextmanager
def session_conf(spark: SparkSession, values: Mapping[str, str]) -> Iterator[None]:
    """Runtime SQL settings for the block, restored afterwards (the session may be shared)."""
    before = {key: spark.conf.get(key, None) for key in values}
    for key, value in values.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
