"""``python -m fraudstream.rules`` as a real subprocess against the session broker.

Each test gets its own rules topic (``unique_topics``) and its own Parquet folder, and reads
the topic back with ``RulesTopic`` to check what was (or was not) published.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraudstream.broker import EmbeddedBroker
from fraudstream.datasets import RULE_CHANGES_SCHEMA
from fraudstream.rules import default_definitions
from fraudstream.rules.definition import DEFAULTS_AUTHOR
from fraudstream.rules.store import RuleRecord, RulesTopic
from fraudstream.schemas import RULE_CHANGES_DATASET

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
HORIZON_US = 600 * 1_000_000
#: Settings of the CLI that must not leak in from the environment running the tests.
OWN_ENV = ("KAFKA_", "FRAUDSTREAM_", "RULES_", "RETENTION_SECONDS", "PARQUET_DIR", "LOG_LEVEL")

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def env(unique_topics: dict[str, str], tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(OWN_ENV)}
    return {**base, **unique_topics, "PARQUET_DIR": str(tmp_path / "parquet"),
            "FRAUDSTREAM_ANALYST": "alice", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cli(env: dict[str, str]) -> Cli:
    def run(*args: str, stdin: str | None = None, **extra_env: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fraudstream.rules", *args], cwd=REPO_ROOT,
                              env={**env, **extra_env}, input=stdin, capture_output=True,
                              text=True, timeout=TIMEOUT, check=False)

    return run


@pytest.fixture
def topic(broker: EmbeddedBroker, env: dict[str, str]) -> RulesTopic:
    return RulesTopic(broker.client_config(), env["RULES_TOPIC"])


@pytest.fixture
def defaults(topic: RulesTopic) -> RulesTopic:
    """The topic holding the four default rules, version 1 (what the detector publishes)."""
    for definition in default_definitions():
        topic.publish(definition)
    return topic


def records(topic: RulesTopic) -> list[RuleRecord]:
    return topic.read()


def in_force(topic: RulesTopic, horizon_us: int = HORIZON_US) -> dict[str, Any]:
    ruleset, _ = topic.state(horizon_us)
    return {rule_id: d.to_dict() for rule_id, d in ruleset.rules.items()}


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


# --- reading -----------------------------------------------------------------------------------


def test_list_on_an_empty_topic(cli: Cli, topic: RulesTopic) -> None:
    human = ok(cli("list"))
    assert "no rules" in human.stdout
    assert json.loads(ok(cli("list", "--json")).stdout) == []
    assert json.loads(ok(cli("export")).stdout) == []
    assert records(topic) == []


def test_list_and_show_the_rules_in_force(cli: Cli, defaults: RulesTopic) -> None:
    listed = json.loads(ok(cli("list", "--json")).stdout)
    assert [r["rule_id"] for r in listed] == sorted(d.rule_id for d in default_definitions())
    velocity = next(r for r in listed if r["rule_id"] == "velocity")
    assert velocity["version"] == 1 and velocity["enabled"] is True
    assert velocity["summary"] == "more than 3 transactions within 60 s"
    human = ok(cli("list")).stdout
    assert "more than 3 transactions within 60 s" in human
    assert DEFAULTS_AUTHOR in human
    shown = json.loads(ok(cli("show", "velocity")).stdout)
    assert shown == in_force(defaults)["velocity"]
    missing = cli("show", "nothere")
    assert missing.returncode == 2 and "no rule 'nothere'" in missing.stderr


# --- changing ----------------------------------------------------------------------------------


def test_set_changes_a_rule_as_the_analyst(cli: Cli, defaults: RulesTopic) -> None:
    before = len(records(defaults))
    result = ok(cli("set", "velocity", "count=5"))
    assert "velocity v2" in result.stdout
    velocity = in_force(defaults)["velocity"]
    assert velocity["version"] == 2
    assert velocity["params"] == {"count": 5, "window_seconds": 60.0}
    assert velocity["updated_by"] == "alice"
    assert len(records(defaults)) == before + 1

    # The flag wins over FRAUDSTREAM_ANALYST, and settings flags work after the command.
    ok(cli("set", "velocity", "window_seconds=90", "--analyst", "bob",
           "--rules-topic", defaults.topic))
    velocity = in_force(defaults)["velocity"]
    assert (velocity["version"], velocity["updated_by"]) == (3, "bob")
    assert velocity["params"] == {"count": 5, "window_seconds": 90.0}

    unchanged = ok(cli("set", "velocity", "count=5"))
    assert "unchanged" in unchanged.stdout
    assert len(records(defaults)) == before + 2


def test_set_with_kind_creates_a_rule(cli: Cli, defaults: RulesTopic) -> None:
    result = ok(cli("set", "velocity_10m", "--kind", "velocity", "count=10",
                    "window_seconds=600", "--json"))
    actions = json.loads(result.stdout)
    assert [(a["rule_id"], a["action"], a["version"]) for a in actions] == [
        ("velocity_10m", "published", 1)]
    created = in_force(defaults)["velocity_10m"]
    assert created["kind"] == "velocity" and created["enabled"] is True
    assert created["params"] == {"count": 10, "window_seconds": 600.0}
    assert created["updated_by"] == "alice"
    assert "more than 10 transactions within 600 s" in ok(cli("list")).stdout
    assert in_force(defaults)["velocity"]["version"] == 1  # the default rule is untouched


@pytest.mark.parametrize("args, reason", [
    (["set", "velocity", "count=-1"], "params.count: must be >= 1"),
    (["set", "velocity", "window_seconds=0"], "params.window_seconds: must be > 0"),
    (["set", "velocity", "window_seconds=601"], "exceeds the retention horizon of 600 s"),
    (["set", "velocity", "limit=4"], "limit not a parameter of velocity"),
    (["set", "velocity", "count=many"], "expected a number"),
    (["set", "velocity", "enabled=false"], "use `enable RULE` or `disable RULE`"),
    (["set", "burst", "--kind", "surge", "count=3"], "unknown kind 'surge'"),
    (["set", "burst", "--kind", "velocity", "count=3"], "window_seconds missing"),
    (["set", "burst", "count=3"], "give --kind"),
    (["set", "velocity", "--kind", "high_value", "amount=5"], "kind does not change"),
    (["disable", "burst"], "no rule 'burst' in force"),
    (["delete", "burst"], "no rule 'burst' in force"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_a_refused_change_exits_2_and_publishes_nothing(
        cli: Cli, defaults: RulesTopic, args: list[str], reason: str) -> None:
    before = records(defaults)
    result = cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert reason in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert "refused" in result.stderr
    assert records(defaults) == before


def test_the_horizon_is_the_retention_setting(cli: Cli, defaults: RulesTopic) -> None:
    ok(cli("set", "velocity", "window_seconds=601", RETENTION_SECONDS="900"))
    velocity = in_force(defaults, horizon_us=900 * 1_000_000)["velocity"]
    assert velocity["params"]["window_seconds"] == 601.0


def test_disable_enable_delete(cli: Cli, defaults: RulesTopic) -> None:
    ok(cli("disable", "velocity"))
    assert (in_force(defaults)["velocity"]["enabled"], in_force(defaults)["velocity"]["version"]
            ) == (False, 2)
    listed = {r["rule_id"]: r for r in json.loads(ok(cli("list", "--json")).stdout)}
    assert listed["velocity"]["enabled"] is False
    count = len(records(defaults))
    assert "unchanged" in ok(cli("disable", "velocity")).stdout
    assert len(records(defaults)) == count

    ok(cli("enable", "velocity"))
    assert (in_force(defaults)["velocity"]["enabled"], in_force(defaults)["velocity"]["version"]
            ) == (True, 3)

    ok(cli("delete", "velocity"))
    last = records(defaults)[-1]
    assert (last.key, last.value) == (b"velocity", None)
    assert "velocity" not in in_force(defaults)
    shown = cli("show", "velocity")
    assert shown.returncode == 2 and "deleted (last version 3)" in shown.stderr

    # Created again, it continues the numbering: a version names one definition forever.
    ok(cli("set", "velocity", "--kind", "velocity", "count=4", "window_seconds=60"))
    assert in_force(defaults)["velocity"]["version"] == 4


def test_dry_run_publishes_nothing(cli: Cli, defaults: RulesTopic, tmp_path: Path) -> None:
    before = records(defaults)
    result = ok(cli("set", "velocity", "count=5", "--dry-run"))
    assert "would publish velocity v2" in result.stdout
    assert '"count":5' in result.stdout
    assert "would delete velocity" in ok(cli("delete", "velocity", "--dry-run")).stdout
    assert "would publish" in ok(cli("disable", "velocity", "--dry-run")).stdout
    file = tmp_path / "rules.json"
    file.write_text(json.dumps({"rule_id": "big", "kind": "high_value",
                                "params": {"amount": 9000}}))
    planned = json.loads(ok(cli("apply", str(file), "--dry-run", "--json")).stdout)
    assert [(a["rule_id"], a["action"], a["version"]) for a in planned] == [
        ("big", "would publish", 1)]
    # A refusal is still a refusal when dry.
    assert cli("set", "velocity", "count=0", "--dry-run").returncode == 2
    assert records(defaults) == before


# --- history -----------------------------------------------------------------------------------


def test_history_shows_old_to_new_and_refused_records(cli: Cli, defaults: RulesTopic) -> None:
    ok(cli("set", "velocity", "count=5"))
    defaults.publish_raw("velocity", b"{not json")
    stale = {**in_force(defaults)["velocity"], "params": {"count": 9, "window_seconds": 60},
             "updated_by": "mallory"}
    defaults.publish_raw("velocity", json.dumps(stale).encode())

    human = ok(cli("history", "velocity")).stdout
    assert "count 3 -> 5" in human
    assert "alice" in human and "mallory" in human
    assert "not valid JSON" in human
    assert "stale version 2" in human
    assert "high_value" not in human  # only the rule asked for

    rows = json.loads(ok(cli("history", "velocity", "--json")).stdout)
    assert [(r["status"], r["version"]) for r in rows] == [
        ("applied", 1), ("applied", 2), ("refused", None), ("refused", 2)]
    assert json.loads(rows[1]["previous_params"])["count"] == 3
    assert rows[1]["updated_by"] == "alice"
    everything = json.loads(ok(cli("history", "--json")).stdout)
    assert len(everything) == len(records(defaults))


def test_history_merges_the_parquet_dataset(cli: Cli, defaults: RulesTopic, env: dict[str, str]
                                            ) -> None:
    ok(cli("set", "velocity", "count=5"))
    _, changes = defaults.state(HORIZON_US)
    applied_at = datetime.now(UTC)
    # What the detector wrote: every record it read (so the same ones as the topic holds) ...
    rows = [{**change.to_record(), "applied_at": applied_at} for change in changes]
    # ... and a refused record the compacted topic no longer holds.
    rows.append({"rule_id": "velocity", "status": "refused", "reason": "only in parquet",
                 "version": None, "kind": None, "enabled": None, "params": None,
                 "previous_version": None, "previous_params": None, "updated_at": None,
                 "updated_by": None, "raw": "{", "offset": 99, "applied_at": applied_at})
    folder = Path(env["PARQUET_DIR"]) / RULE_CHANGES_DATASET / "batch_id=0"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RULE_CHANGES_SCHEMA),
                   folder / "part-0.parquet")

    history = json.loads(ok(cli("history", "velocity", "--json")).stdout)
    assert [(r["offset"], r["status"]) for r in history] == [
        (1, "applied"), (4, "applied"), (99, "refused")]
    # The records read from both sides carry both times; the Parquet-only one its own.
    assert all(r["published_at"] and r["applied_at"] for r in history[:2])
    assert history[2]["published_at"] is None and history[2]["reason"] == "only in parquet"
    assert "only in parquet" in ok(cli("history", "velocity")).stdout


# --- files -------------------------------------------------------------------------------------


def test_export_then_apply_publishes_nothing(cli: Cli, defaults: RulesTopic, tmp_path: Path
                                             ) -> None:
    ok(cli("set", "velocity", "count=5"))
    ok(cli("disable", "paypal_micro"))
    exported = json.loads(ok(cli("export")).stdout)
    assert {d["rule_id"]: d["version"] for d in exported} == {
        "high_value": 1, "multi_location": 1, "paypal_micro": 2, "velocity": 2}
    file = tmp_path / "rules.json"
    file.write_text(json.dumps(exported))
    before = records(defaults)
    result = ok(cli("apply", str(file)))
    assert result.stdout.count("unchanged") == 4
    assert records(defaults) == before


def test_apply_publishes_what_changed(cli: Cli, defaults: RulesTopic, tmp_path: Path) -> None:
    exported = json.loads(ok(cli("export")).stdout)
    velocity = next(d for d in exported if d["rule_id"] == "velocity")
    velocity["params"]["count"] = 7
    del velocity["version"]  # optional in a file: the next version is used
    file = tmp_path / "rules.json"
    file.write_text(json.dumps(exported))
    before = len(records(defaults))
    result = ok(cli("apply", str(file)))
    assert "published velocity v2" in result.stdout
    assert len(records(defaults)) == before + 1
    assert in_force(defaults)["velocity"]["params"]["count"] == 7
    assert in_force(defaults)["velocity"]["updated_by"] == "alice"

    # YAML, a single definition, with the next version written out.
    yaml_file = tmp_path / "rule.yaml"
    yaml_file.write_text("rule_id: velocity\nkind: velocity\nversion: 3\n"
                         "params: {count: 8, window_seconds: 60}\n")
    ok(cli("apply", str(yaml_file)))
    assert (in_force(defaults)["velocity"]["version"],
            in_force(defaults)["velocity"]["params"]["count"]) == (3, 8)


def test_apply_refuses_the_whole_file(cli: Cli, defaults: RulesTopic, tmp_path: Path) -> None:
    file = tmp_path / "rules.json"
    file.write_text(json.dumps([
        {"rule_id": "big", "kind": "high_value", "params": {"amount": 9000}},  # fine alone
        {"rule_id": "velocity", "kind": "velocity", "version": 1,  # stale: v1 is in force
         "params": {"count": 4, "window_seconds": 60}},
        {"rule_id": "slow", "kind": "velocity", "params": {"count": 4, "window_seconds": 900}},
    ]))
    before = records(defaults)
    result = cli("apply", str(file))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any("velocity" in line and "write version 2" in line for line in lines), lines
    assert any("slow" in line and "retention horizon" in line for line in lines), lines
    assert not any("big" in line for line in lines)
    assert records(defaults) == before

    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2\n")
    result = cli("apply", str(bad))
    assert result.returncode == 2 and "neither JSON nor YAML" in result.stderr


def test_a_concurrent_change_is_reported(defaults: RulesTopic, env: dict[str, str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Someone else publishes velocity v2 between our read and our write: the fold refuses
    ours as stale, and the CLI says so instead of reporting success."""
    from fraudstream.rules import cli as rules_cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    real_history = RulesTopic.history
    calls = []

    def history_then_race(self: RulesTopic, horizon_us: int) -> Any:
        result = real_history(self, horizon_us)
        if not calls:
            current = result[0].rules["velocity"]
            self.publish(current.changed(version=2, updated_by="carol", params={
                "count": 4, "window_seconds": 60}))
        calls.append(horizon_us)
        return result

    monkeypatch.setattr(RulesTopic, "history", history_then_race)
    with pytest.raises(SystemExit) as exit_info:
        rules_cli.main(["set", "velocity", "count=5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "published at offset" in err and "stale version 2" in err
    velocity = in_force(defaults)["velocity"]
    assert (velocity["version"], velocity["updated_by"]) == (2, "carol")


# --- the command line itself -------------------------------------------------------------------


def test_unreachable_broker_is_one_line_and_exit_1(cli: Cli) -> None:
    for args in (["list"], ["set", "velocity", "count=5"]):
        started = time.monotonic()
        result = cli(*args, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", RULES_TIMEOUT="2")
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - started < 30
        assert result.stderr.count("\n") == 1, result.stderr
        assert "127.0.0.1:1" in result.stderr and "did not answer" in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("command", ["list", "show", "set", "enable", "disable", "delete",
                                     "history", "apply", "export"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fraudstream.rules import cli as rules_cli

    with pytest.raises(SystemExit) as exit_info:
        rules_cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m fraudstream.rules {command}")
    assert "--bootstrap-servers" in out
