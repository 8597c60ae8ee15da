"""The detector on a real Spark standalone cluster: a master and two workers as separate
processes from the installed pyspark (``spark_job.standalone``), no Docker.

A seeded stream is preloaded and read in small batches; while a batch is in flight, one worker
is killed with SIGKILL together with its executor (a lost node). The driver reruns the lost
tasks on the executor left, whose stateful tasks reload their state from the checkpoint, and
every alert of the oracle arrives exactly once, on Kafka and in Parquet.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from support.ground import chaos_seed, ground_truth
from support.pipeline import (
    alert_rows,
    caught_up,
    detector_env,
    log_heads,
    start_detector,
    transaction_records,
)

from fraudstream.testing import produce, read_json, wait_for
from spark_job.standalone import StandaloneCluster, alive_workers, driver_api

TRANSACTIONS = 9_000
ROWS_PER_BATCH = 2_000
UI_LINE = re.compile(r"Spark UI of the detector: (\S+) \(application (\S+) on")


def driver_ui(log: str) -> tuple[str, str] | None:
    """(UI address, application id) from the detector's start-up line."""
    found = UI_LINE.search(log)
    return (found.group(1), found.group(2)) if found else None


def running_tasks(ui: str, app_id: str, executor: str) -> int:
    """Tasks executor ``executor`` is running now, as the driver's REST API sees them."""
    for found in driver_api(ui, app_id, "executors") or []:
        if found.get("id") == executor:
            return int(found.get("activeTasks", 0))
    return 0


def executor_of_first_worker(cluster: StandaloneCluster, ui: str, app_id: str) -> str | None:
    """The id of the executor that worker 1 runs for the detector (None until it has one)."""
    for found in driver_api(ui, app_id, "executors") or []:
        if found.get("id") != "driver" and cluster.worker_of_executor(app_id, found["id"]) == 0:
            return str(found["id"])
    return None


def test_alerts_equal_the_oracle_after_a_worker_is_killed_mid_stream(
        unique_topics: dict[str, str], tmp_path: Path) -> None:
    seed = chaos_seed()
    ground = ground_truth(seed, TRANSACTIONS)
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"],
            transaction_records(ground.transactions))
    checkpoint = tmp_path / "checkpoint"

    with StandaloneCluster(tmp_path / "cluster", workers=2) as cluster:
        env = detector_env(unique_topics, tmp_path, SPARK_MASTER=cluster.url,
                           MAX_ROWS_PER_BATCH=str(ROWS_PER_BATCH), CONSOLE_ALERTS="false",
                           TRIGGER_SECONDS="0")
        detector = start_detector(env, tmp_path / "detector.log")
        try:
            ui, app_id = wait_for(lambda: driver_ui(detector.output()), 180,
                                  "the detector's Spark UI line", alive=detector.alive)
            victim = wait_for(lambda: executor_of_first_worker(cluster, ui, app_id), 300,
                              "worker 1's executor", alive=detector.alive)
            wait_for(lambda: log_heads(checkpoint)[1] >= 1, 300, "two committed batches",
                     alive=detector.alive)
            # Worker 1 dies while its executor runs a task: seen busy on two polls in a row,
            # so the task is not about to end (the API reports task ends a little late).
            busy = [False]

            def busy_twice() -> bool:
                now = running_tasks(ui, app_id, victim) > 0
                twice, busy[0] = busy[0] and now, now
                return twice

            wait_for(busy_twice, 300, "worker 1's executor running a task", interval=0.02,
                     alive=detector.alive)
            cluster.kill_worker(0)
            planned, committed = log_heads(checkpoint)
            print(f"seed {seed}: worker 1 killed while its executor {victim} ran a task "
                  f"(batch {planned} planned, {committed} committed)")
            wait_for(lambda: caught_up(checkpoint, TRANSACTIONS), 600,
                     f"all {TRANSACTIONS} transactions committed after the worker loss",
                     alive=detector.alive)
            assert len(alive_workers(cluster.webui) or []) == 1
            executors = {e["id"]: e for e in driver_api(ui, app_id, "allexecutors") or []}
            assert detector.stop() == 0, detector.tail()
        finally:
            if detector.alive():
                detector.kill_and_reap()

    log = detector.output()
    # The driver saw the executor go with the task it was running; it ran again on the
    # executor left, which did all the work after (every alert below is there once).
    assert "Lost executor" in log, log[-4000:]
    lost = [e for e in executors.values() if e["id"] != "driver" and not e["isActive"]]
    left = [e for e in executors.values() if e["id"] != "driver" and e["isActive"]]
    assert len(lost) == 1 and len(left) == 1, executors
    assert lost[0]["id"] == victim, executors
    # A task that died with its executor shows as failed on it, or, when the executor's
    # removal reached the driver's status store first, as still running on the dead executor.
    assert lost[0]["failedTasks"] + lost[0]["activeTasks"] >= 1, lost[0]
    assert left[0]["completedTasks"] > 0, left[0]
    expected = set(ground.expected)
    parquet = Counter(row["alert_id"] for row in alert_rows(tmp_path / "parquet"))
    kafka = Counter(alert["alert_id"] for alert in read_json(
        bootstrap, unique_topics["ALERTS_TOPIC"], expected=len(expected)))
    for where, found in (("Parquet", parquet), ("Kafka", kafka)):
        assert set(found) == expected, (
            f"seed {seed}: {where} missing {sorted(expected - set(found))[:5]}, "
            f"unexpected {sorted(set(found) - expected)[:5]}")
        assert max(found.values()) == 1, f"seed {seed}: repeated in {where}"
