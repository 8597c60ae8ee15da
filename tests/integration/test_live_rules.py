"""Rules changed while the detector runs: a real broker, a real live detector, no restart.

The detector publishes the default rules on an empty rules topic, processes phase 1, then a
rule change is published (``velocity`` 3 -> 5, ``velocity_10m`` added); once the detector has
applied it (its ``rule_changes`` dataset says so), phase 2 is produced. The alerts in Parquet
must be exactly the oracle's for the piecewise rule set, with the versions that fired; refused
definitions published meanwhile change nothing and are each recorded with their reason.
"""

from __future__ import annotations

import time
from pathlib import Path

from support.pipeline import (
    alert_rows,
    caught_up,
    detector_env,
    parquet_rows,
    start_detector,
    transaction_records,
)
from support.rule_change import rule_change_stream

from fraudstream import schemas
from fraudstream.rules.store import RulesTopic
from fraudstream.settings import DetectorSettings, load_settings
from fraudstream.testing import produce, wait_for
from spark_job.app import publish_default_rules

#: (key, value, what the refusal reason must say): bad definitions published live.
BAD_DEFINITIONS: list[tuple[str, bytes | None, str]] = [
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity"', "not valid JSON"),
    ("x1", b'{"rule_id": "x1", "kind": "teleport", "version": 1, "enabled": true, "params": {},'
     b' "updated_at": "2026-12-01T10:00:00Z", "updated_by": "t"}', "unknown kind"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": -1, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "params.count: must be >= 1"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": 3, "window_seconds": 0}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "params.window_seconds: must be > 0"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": NaN, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "not valid JSON"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": "five", "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "expected a number"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "count missing"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": 3, "window_seconds": 3600}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "exceeds the retention horizon"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 1, "enabled": true,'
     b' "params": {"count": 1, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "stale version 1"),
    ("velocity", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": "yes",'
     b' "params": {"count": 3, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "enabled: expected true or false"),
    ("other", b'{"rule_id": "velocity", "kind": "velocity", "version": 9, "enabled": true,'
     b' "params": {"count": 3, "window_seconds": 60}, "updated_at": "2026-12-01T10:00:00Z",'
     b' "updated_by": "t"}', "differs from rule_id"),
    ("ghost", None, "no such rule to delete"),
]


def test_rules_changed_live_give_exactly_the_piecewise_oracle(
        unique_topics: dict[str, str], tmp_path: Path) -> None:
    env = detector_env(unique_topics, tmp_path)
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    checkpoint, parquet = tmp_path / "checkpoint", tmp_path / "parquet"
    stream = rule_change_stream(seed=7)
    rules = RulesTopic({"bootstrap.servers": bootstrap}, unique_topics["RULES_TOPIC"])
    changes_dir = parquet / schemas.RULE_CHANGES_DATASET
    detector = start_detector(env, tmp_path / "detector.log")
    try:
        wait_for(lambda: len(parquet_rows(changes_dir)) == 4, 180,
                 "the default rules published and applied", alive=detector.alive)
        produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"],
                transaction_records(stream.phase1))
        wait_for(lambda: caught_up(checkpoint, len(stream.phase1)), 180, "phase 1",
                 alive=detector.alive)

        # Bad definitions first: each refused, nothing in force changes.
        for key, value, _ in BAD_DEFINITIONS:
            rules.publish_raw(key, value)
        published = time.monotonic()
        for definition in stream.changes:
            rules.publish(definition)
        expected_changes = 4 + len(BAD_DEFINITIONS) + len(stream.changes)
        wait_for(lambda: len(parquet_rows(changes_dir)) == expected_changes, 60,
                 "the rule change applied", alive=detector.alive)
        print(f"\npublished -> applied: {time.monotonic() - published:.2f} s")

        produce(bootstrap, unique_topics["TRANSACTIONS_TOPIC"],
                transaction_records(stream.phase2))
        total = len(stream.phase1) + len(stream.phase2)
        wait_for(lambda: caught_up(checkpoint, total), 180, "phase 2", alive=detector.alive)
    finally:
        code = detector.stop()
    assert code == 0, detector.tail()

    expected = stream.expected()
    alerts = alert_rows(parquet)
    found = {(a["alert_id"], a["rule"], a["rule_version"]) for a in alerts}
    assert found == {(i, a["rule"], a["rule_version"]) for i, a in expected.items()}
    assert len(alerts) == len(found), "each alert once"
    by_user = {(a["user_id"], a["rule"], a["rule_version"]) for a in alerts}
    assert ("u-seven", "velocity", 2) in by_user
    assert not any(user == "u-five" for user, _, _ in by_user), "5 in 50 s is fine under v2"
    assert ("u-slow", "velocity_10m", 1) in by_user
    assert any(version == 1 and rule == "velocity" for _, rule, version in by_user)

    history = sorted(parquet_rows(changes_dir), key=lambda row: row["offset"])
    refused = [row for row in history if row["status"] == "refused"]
    assert len(refused) == len(BAD_DEFINITIONS)
    for row, (_, _, reason) in zip(refused, BAD_DEFINITIONS, strict=True):
        assert reason in row["reason"], (reason, row["reason"])
    applied = [(row["rule_id"], row["version"]) for row in history if row["status"] == "applied"]
    assert applied[-2:] == [("velocity", 2), ("velocity_10m", 1)]
    log = detector.output()
    assert "refused" in log and "the previous version stays in force" in log


def test_defaults_are_published_only_when_no_rule_was_ever_defined(
        unique_topics: dict[str, str]) -> None:
    """A rules topic with nothing but a refused record gets the defaults; one whose rules were
    all deleted on purpose does not (a deletion is a decision, not an empty topic)."""
    settings, _ = load_settings(DetectorSettings, [], environ=unique_topics)
    rules = RulesTopic(settings.client_config(), settings.rules_topic)
    rules.publish_raw("velocity", b"{not json")
    assert publish_default_rules(settings) == 4
    assert publish_default_rules(settings) == 0, "published twice"
    in_force, _ = rules.state(settings.retention_us)
    assert sorted(in_force.rules) == sorted(d.rule_id for d in settings.default_rules())
    for rule_id in list(in_force.rules):
        rules.delete(rule_id)
    assert publish_default_rules(settings) == 0
    assert not rules.state(settings.retention_us)[0].rules
