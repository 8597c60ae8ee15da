"""kill -9 right after a rule change: the replayed batch applies the same rule versions.

The rules topic is read by the same query as the transactions, so the batch that carries a
rule change has the rules topic's offsets in the checkpoint's offset log. The detector's whole
process group is killed while that batch is planned but not committed; the restart replays it
with the same records of both topics, and the alerts in Parquet are exactly the piecewise
oracle's, each once, as are the recorded rule changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from support.pipeline import (
    alert_rows,
    batch_logs,
    caught_up,
    detector_env,
    duplicates,
    parquet_rows,
    start_detector,
    transaction_records,
)
from support.rule_change import rule_change_stream

from fraudstream import schemas
from fraudstream.broker import EmbeddedBroker
from fraudstream.rules.store import RulesTopic
from fraudstream.testing import fresh_topics, produce, wait_for


def rules_offset(checkpoint: Path, batch_id: int) -> int:
    """End offset of the rules topic in a planned batch (its source's line in the offset
    log comes after the transactions topic's)."""
    lines = (checkpoint / "query" / "offsets" / str(batch_id)).read_text().splitlines()
    return sum(int(v) for v in json.loads(lines[3]).values())


def change_in_flight(checkpoint: Path, rules_end: int) -> bool:
    """The batch that reads the rule change is planned and not committed yet."""
    planned, committed = batch_logs(checkpoint)
    try:
        return bool(planned) and planned[-1] not in committed and \
            rules_offset(checkpoint, planned[-1]) >= rules_end
    except (FileNotFoundError, ValueError, IndexError):
        return False


def test_kill_right_after_a_rule_change_replays_to_the_same_alerts(
        broker: EmbeddedBroker, tmp_path: Path) -> None:
    topics = fresh_topics(broker.bootstrap_servers, "rule-kill", rules=True).env()
    # The broker may report one partition's end offset late, so its share of a phase can reach
    # the detector a batch after the others' and fall behind a 60 s watermark: late data is not
    # what this test is about, so no event may be late here (the phases span minutes).
    env = detector_env(topics, tmp_path, WATERMARK_SECONDS="3600")
    checkpoint, parquet = tmp_path / "checkpoint", tmp_path / "parquet"
    changes_dir = parquet / schemas.RULE_CHANGES_DATASET
    stream = rule_change_stream(seed=11)
    rules = RulesTopic(broker.client_config(), topics["RULES_TOPIC"])
    log = tmp_path / "detector.log"
    detector = start_detector(env, log)
    try:
        wait_for(lambda: len(parquet_rows(changes_dir)) == 4, 180, "the default rules applied",
                 alive=detector.alive)
        produce(broker.bootstrap_servers, topics["TRANSACTIONS_TOPIC"],
                transaction_records(stream.phase1))
        wait_for(lambda: caught_up(checkpoint, len(stream.phase1)), 180, "phase 1",
                 alive=detector.alive)
        for definition in stream.changes:
            rules.publish(definition)
        produce(broker.bootstrap_servers, topics["TRANSACTIONS_TOPIC"],
                transaction_records(stream.phase2))
        rules_end = 4 + len(stream.changes)
        caught = wait_for(lambda: change_in_flight(checkpoint, rules_end), 120,
                          "the batch with the rule change in flight", interval=0.02,
                          alive=detector.alive)
        assert caught
    finally:
        detector.kill_and_reap()
    killed_at = batch_logs(checkpoint)
    print(f"\nkilled with offset log {killed_at[0][-3:]} / commit log {killed_at[1][-3:]}")

    total = len(stream.phase1) + len(stream.phase2)
    again = start_detector(env, log)
    try:
        wait_for(lambda: caught_up(checkpoint, total), 240, "the replay and phase 2",
                 alive=again.alive)
    finally:
        code = again.stop()
    assert code == 0, again.tail()

    expected = stream.expected()
    alerts = alert_rows(parquet)
    ids = [a["alert_id"] for a in alerts]
    assert duplicates(ids) == {}, "a replayed batch must replace its rows, not add to them"
    assert {(a["alert_id"], a["rule"], a["rule_version"]) for a in alerts} == {
        (i, a["rule"], a["rule_version"]) for i, a in expected.items()}
    history = parquet_rows(changes_dir)
    assert sorted((row["rule_id"], row["version"]) for row in history) == sorted(
        [(d.rule_id, 1) for d in stream.before] + [(d.rule_id, d.version) for d in stream.changes])
