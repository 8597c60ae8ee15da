"""Broker outages, each on a broker of its own (never the session broker other tests share).

Hung broker (SIGSTOP, then SIGCONT): the live detector must ride it out without a restart: the
source skips triggers it cannot plan, reads and deliveries wait, and the final alerts equal the
oracle's E. The clients' request and socket timeouts are shortened to 5 s through the YAML
``kafka.client_overrides`` (passed verbatim to librdkafka), so a pause of 12-20 s outlasts every
request timeout, and the source's own 10 s metadata timeout, while staying well below the alert
producer's 120 s ``message.timeout.ms``: Tansu fences an idempotent producer for good once one
of its messages times out, and no client could recover from that without a restart.

Stopped broker (memory storage: stopping it loses every topic): the producer keeps its records
in its buffer, keeps reporting, and on SIGTERM exits 1 naming how many were not delivered. The
detector waits while the broker is away (a warning per trigger, nothing lost); when an empty
broker comes back on the same address it stops with exit code 1 and says that records were
lost, rather than silently starting over on the new, empty topic.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.ground import chaos_seed, ground_truth
from support.pipeline import (
    REPO_ROOT,
    alert_rows,
    batch_logs,
    caught_up,
    dedup_by_alert_id,
    detector_env,
    duplicates,
    in_flight,
    parquet_rows,
    start_detector,
    transaction_records,
)

from fraudstream import schemas, topics
from fraudstream.broker import EmbeddedBroker
from fraudstream.testing import produce, read_json, wait_for

TRANSACTIONS = 2_000
ROWS_PER_BATCH = 500
CLIENT_TIMEOUT_MS = 5_000
STEP_TIMEOUT = 600.0


@pytest.mark.timeout(1800)
def test_detector_rides_out_a_hung_broker_and_refuses_an_emptied_one(tmp_path: Path) -> None:
    """One detector run through both outages (its start-up is the expensive part): a hung
    broker it must survive with the alerts equal to E, then a stopped broker it must wait for,
    then an empty broker on the same address that it must refuse with exit code 1."""
    seed = chaos_seed()
    rng = random.Random(seed)
    pause_seconds = rng.uniform(12.0, 20.0)
    ground = ground_truth(seed, TRANSACTIONS)
    expected = ground.expected
    records = transaction_records(ground.transactions)
    half = len(records) // 2
    config = tmp_path / "fraudstream.yaml"
    config.write_text(
        "kafka:\n  client_overrides:\n"
        f"    socket.timeout.ms: '{CLIENT_TIMEOUT_MS}'\n"
        f"    request.timeout.ms: '{CLIENT_TIMEOUT_MS}'\n")
    checkpoint, parquet = tmp_path / "checkpoint", tmp_path / "parquet"

    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    bootstrap, port = broker.bootstrap_servers, broker.port
    env = detector_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path,
                       MAX_ROWS_PER_BATCH=str(ROWS_PER_BATCH), CONSOLE_ALERTS="false",
                       FRAUDSTREAM_CONFIG=str(config))
    replacement: EmbeddedBroker | None = None
    run = None
    try:
        produce(bootstrap, topics.TRANSACTIONS, records[:half])
        run = start_detector(env, tmp_path / "detector.log")

        # 1. Hung broker, with a batch in flight.
        wait_for(lambda: batch_logs(checkpoint)[1], STEP_TIMEOUT,
                 f"seed {seed}: a first committed batch", alive=run.alive)
        wait_for(lambda: in_flight(checkpoint), STEP_TIMEOUT,
                 f"seed {seed}: a batch in flight", interval=0.02, alive=run.alive)
        committed_before = batch_logs(checkpoint)[1][-1]
        output_before = len(run.output())
        broker.pause()
        try:
            time.sleep(pause_seconds)  # the outage itself, not a wait for a condition
            assert run.alive(), f"seed {seed}: the detector exited during the pause:\n" \
                f"{run.tail()}"
        finally:
            broker.resume()
        produce(bootstrap, topics.TRANSACTIONS, records[half:])  # only once it is back
        wait_for(lambda: caught_up(checkpoint, len(records)), STEP_TIMEOUT,
                 f"seed {seed}: the detector to catch up after the pause", alive=run.alive)
        assert batch_logs(checkpoint)[1][-1] > committed_before
        reports = timeouts(run.output()[output_before:])
        published, extra_copies = dedup_by_alert_id(read_json(bootstrap, topics.ALERTS))
        print(f"hung broker, seed {seed}: paused {pause_seconds:.1f} s with batch "
              f"{committed_before + 1} in flight; {len(reports)} client reports of the outage; "
              f"Kafka extra copies {extra_copies}")
        assert reports, f"seed {seed}: no client reported a timeout: the pause was too short " \
            "to prove anything"
        ids = [a["alert_id"] for a in alert_rows(parquet)]
        assert not duplicates(ids), f"seed {seed}: duplicate alert rows after the pause"
        assert set(ids) == set(expected), f"seed {seed}: lost {len(set(expected) - set(ids))}, " \
            f"extra {len(set(ids) - set(expected))} alerts after the pause"
        assert set(published) == set(expected), f"seed {seed}: Kafka alerts differ from E"
        bronze = [(r["partition"], r["offset"])
                  for r in parquet_rows(parquet / schemas.TRANSACTIONS_DATASET)]
        assert len(bronze) == TRANSACTIONS and not duplicates(bronze)

        # 2. Stopped broker: memory storage, so its topics and records are gone.
        broker.stop()
        waiting = "cannot read end offsets"
        seen_before = run.output().count(waiting)
        wait_for(lambda: run.output().count(waiting) > seen_before, STEP_TIMEOUT,
                 "the detector to report the missing broker", alive=run.alive)
        assert run.alive(), "the detector must wait for a stopped broker, not exit"

        # 3. An empty broker on the same address: the offsets in the checkpoint are gone.
        replacement = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log").start()
        wait_for(lambda: not run.alive(), STEP_TIMEOUT,
                 "the detector to stop on the emptied topic")
        code = run.wait(60)
        output = run.output()
    finally:
        if run is not None and run.alive():
            run.kill_and_reap()
        broker.stop()
        if replacement is not None:
            replacement.stop()
    assert code == 1, f"expected exit 1 after data loss, got {code}:\n{output[-3000:]}"
    assert "records were lost" in output and topics.TRANSACTIONS in output, output[-3000:]
    stopped = next(line for line in output.splitlines() if "detector stopped on an error" in line)
    assert "records were lost" in stopped and "./reset.sh" in stopped, stopped
    ids = [a["alert_id"] for a in alert_rows(parquet)]
    assert set(ids) == set(expected) and not duplicates(ids), \
        f"seed {seed}: the outputs changed after the refusal"


def timeouts(log: str) -> list[str]:
    """Lines in which a client reports the hung broker: librdkafka's request timeouts
    (REQTMOUT, "Timed out ... in flight"), transport failures, the source's skipped triggers."""
    pattern = re.compile(r"timed out|_TRANSPORT|brokers are down|cannot read end", re.IGNORECASE)
    return [line for line in log.splitlines() if pattern.search(line)]


STATUS = re.compile(r"sent=(\d+) delivered=(\d+) failed=(\d+) in_flight=(\d+)")


def last_status(log_path: Path) -> tuple[int, int, int, int] | None:
    found = STATUS.findall(log_path.read_text(errors="replace"))
    return tuple(int(x) for x in found[-1]) if found else None  # type: ignore[return-value]


@pytest.mark.timeout(300)
def test_producer_keeps_its_buffer_and_reports_when_the_broker_stops(tmp_path: Path) -> None:
    seed = chaos_seed()
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    log_path = tmp_path / "producer.log"
    with log_path.open("wb") as log:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer", "--rate", "100", "--seed", str(seed),
             "--status-interval", "0.5", "--flush-timeout", "3"],
            cwd=REPO_ROOT, env=detector_env({"KAFKA_BOOTSTRAP_SERVERS":
                                            broker.bootstrap_servers}, tmp_path),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        alive = lambda: producer.poll() is None  # noqa: E731
        wait_for(lambda: (s := last_status(log_path)) and s[1] >= 100, 120,
                 "100 delivered transactions", alive=alive)
        broker.stop()  # memory storage: topics and records are gone
        delivered_at_stop = last_status(log_path)[1]  # type: ignore[index]
        status = wait_for(lambda: (s := last_status(log_path)) and s[3] >= 200 and s, 120,
                          "the producer to buffer 200 records while the broker is down",
                          alive=alive)
        assert status[1] <= delivered_at_stop + 50 and status[2] == 0, status
        producer.send_signal(signal.SIGTERM)
        code = producer.wait(60)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(10)
        broker.stop()
    output = log_path.read_text(errors="replace")
    assert code == 1, f"undelivered records must make the exit code 1:\n{output[-2000:]}"
    undelivered = re.search(r"(\d+) messages were still undelivered", output)
    assert undelivered and int(undelivered.group(1)) >= 200, output[-2000:]
    assert re.search(r"totals: sent=\d+ delivered=\d+ failed=\d+ undelivered=[1-9]", output)
    assert "Connection refused" in output or "brokers are down" in output

