"""How the detector's Spark processes are configured and launched, without starting them: the
standalone cluster's command lines and settings, the state store choice, and the memory
release between batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fraudstream.settings import ClusterSettings, DetectorSettings, SettingsError, load_settings
from spark_job import memory
from spark_job.session import STATE_STORE_PROVIDERS, spark_conf
from spark_job.standalone import (
    MASTER_CLASS,
    WORKER_CLASS,
    launch_env,
    master_command,
    spark_home,
    worker_command,
)


def test_master_and_worker_commands_use_the_installed_pyspark_launcher(tmp_path: Path) -> None:
    settings = ClusterSettings(host="127.0.0.1", master_port=17077, master_webui_port=18080,
                               worker_port=17078, worker_cores=2, worker_memory="1536m",
                               work_dir=tmp_path / "work")
    launcher = spark_home() / "bin" / "spark-class"
    assert launcher.is_file()
    assert master_command(settings) == [str(launcher), MASTER_CLASS, "--host", "127.0.0.1",
                                        "--port", "17077", "--webui-port", "18080"]
    worker = worker_command(settings)
    assert worker[:3] == [str(launcher), WORKER_CLASS, "spark://127.0.0.1:17077"]
    flags = dict(zip(worker[3::2], worker[4::2], strict=True))
    assert flags == {"--host": "127.0.0.1", "--port": "17078", "--cores": "2",
                     "--memory": "1536m", "--webui-port": "0",
                     "--work-dir": str((tmp_path / "work").resolve())}
    env = launch_env(settings, base={"PATH": "/usr/bin"})
    assert env["SPARK_HOME"] == str(spark_home())
    assert env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert env["PYSPARK_PYTHON"] == sys.executable
    assert env["SPARK_DAEMON_MEMORY"] == "512m"


def test_cluster_settings_come_from_spark_s_own_variable_names() -> None:
    settings, _ = load_settings(ClusterSettings, [], environ={
        "SPARK_MASTER_PORT": "27077", "SPARK_WORKER_MEMORY": "2g", "SPARK_WORKER_CORES": "3"})
    assert settings.master_url == "spark://127.0.0.1:27077"
    assert (settings.worker_memory, settings.worker_cores) == ("2g", 3)


@pytest.mark.parametrize(("env", "key"), [
    ({"SPARK_WORKER_MEMORY": "lots"}, "SPARK_WORKER_MEMORY"),
    ({"SPARK_DAEMON_MEMORY": "0"}, "SPARK_DAEMON_MEMORY"),
    ({"SPARK_MASTER_PORT": "70000"}, "SPARK_MASTER_PORT"),
    ({"SPARK_WORKER_CORES": "0"}, "SPARK_WORKER_CORES"),
])
def test_invalid_cluster_settings_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(ClusterSettings, [], environ=env)
    assert raised.value.key.startswith(key)


def test_the_standalone_program_refuses_a_bad_size_and_reports_a_silent_master() -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "spark_job.standalone", "worker", "--worker-memory=abc"],
        capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2
    assert "SPARK_WORKER_MEMORY / cluster.worker_memory / --worker-memory" in refused.stderr
    silent = subprocess.run(
        [sys.executable, "-m", "spark_job.standalone", "status", "--master-webui-port=1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert silent.returncode == 1
    assert "not answering" in silent.stdout


def test_rocksdb_state_store_gets_changelog_checkpointing_and_a_memory_bound() -> None:
    rocks = spark_conf(state_store_provider="rocksdb", state_store_memory_mb=96)
    prefix = "spark.sql.streaming.stateStore"
    assert rocks[f"{prefix}.providerClass"] == STATE_STORE_PROVIDERS["rocksdb"]
    assert rocks[f"{prefix}.rocksdb.changelogCheckpointing.enabled"] == "true"
    assert rocks[f"{prefix}.rocksdb.boundedMemoryUsage"] == "true"
    assert rocks[f"{prefix}.rocksdb.maxMemoryUsageMB"] == "96"
    hdfs = spark_conf(state_store_provider="hdfs")
    assert hdfs[f"{prefix}.providerClass"] == STATE_STORE_PROVIDERS["hdfs"]
    assert not any(".rocksdb." in key for key in hdfs)
    with pytest.raises(SettingsError) as raised:
        load_settings(DetectorSettings, [], environ={"STATE_STORE": "memory"})
    assert raised.value.key.startswith("STATE_STORE")


def test_memory_is_released_once_per_threshold_of_rows(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    released: list[int] = []
    monkeypatch.setattr(memory, "_rows_since_release", 0)
    monkeypatch.setattr(memory, "release_free_memory", lambda: released.append(1))
    assert [memory.handled_rows(400, threshold=1000) for _ in range(6)] == [
        False, False, True, False, False, True]
    assert len(released) == 2
    assert memory.handled_rows(5000, threshold=1000) is True


def test_releasing_free_memory_runs_on_this_c_library() -> None:
    memory.release_free_memory()  # glibc here: malloc_trim must be found and callable
    assert memory._MALLOC_TRIM is not None
