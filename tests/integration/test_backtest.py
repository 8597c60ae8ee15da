"""``python -m spark_job.backtest`` in a real Spark session over real Parquet files.

(a) With the live defaults it reproduces exactly what the live detector wrote for the same
    history (the detector runs once with ``--available-now`` on a generated stream).
(b) Under changed definitions it equals the plain-Python oracle over the same transactions, and
    its report counts the alerts added and removed against the live ones, inheriting verdicts.
(c) Bad input: a clear message and exit status 2, nothing written.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.ground import chaos_seed, ground_truth
from support.pipeline import detector_env, run_detector, transaction_records

from fraudstream import datasets, schemas
from fraudstream.rules import default_definitions, definition_from_dict
from fraudstream.rules.oracle import expected_alerts
from fraudstream.testing import fresh_topics, produce
from fraudstream.verdicts import make_verdict
from spark_job.backtest import OUTPUT_FILE, main

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
EPOCH_A, EPOCH_B = "20261122T100000Z-aaaaaa", "20261122T110000Z-bbbbbb"
STAMP = "2026-12-01T10:00:00.000Z"


# --- writing a history by hand ------------------------------------------------------------------


def random_stream(seed: int, count: int = 2500, users: int = 40, seconds: int = 1800
                  ) -> list[dict[str, Any]]:
    """Bursty transactions of a few users: enough collisions for every rule under any params.
    Some carry the generator's labels (fraud_pattern) so precision and recall are defined."""
    rng = random.Random(seed)
    places = ["Lyon", "Paris", "Nice", "Lille"]
    methods = ["card", "PayPal", "PayPal", "apple_pay", "bank_transfer"]
    out = []
    for number in range(count):
        user = f"u{rng.randrange(users):03d}"
        moment = T0 + timedelta(milliseconds=rng.randrange(seconds * 1000))
        amount = round(rng.choice([rng.uniform(1, 60), rng.uniform(20, 400),
                                   rng.uniform(900, 4200)]), 2)
        pattern = rng.choice([None] * 6 + list(schemas.RULES) + ["legit_traveller"])
        out.append({
            "transaction_id": f"t{number:05d}", "user_id": user, "amount": amount,
            "currency": "EUR", "timestamp": schemas.format_timestamp(moment),
            "location": rng.choice(places), "payment_method": rng.choice(methods),
            "merchant_id": f"m{rng.randrange(20):03d}", "device_ip": "203.0.113.7",
            "is_fraud": pattern in schemas.RULES, "fraud_pattern": pattern,
        })
    return out


def bronze_table(transactions: Sequence[Mapping[str, Any]], first_offset: int = 0) -> pa.Table:
    rows = []
    for offset, tx in enumerate(transactions, first_offset):
        moment = schemas.parse_timestamp(tx["timestamp"])
        row = {k: v for k, v in tx.items() if k != "timestamp"}
        row.update(event_time=moment, key=tx["user_id"], topic="transactions", partition=0,
                   offset=offset, kafka_timestamp=moment + timedelta(milliseconds=5))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=datasets.TRANSACTIONS_SCHEMA)


def write_part(root: Path, dataset: str, epoch: str, batch_id: int, table: pa.Table) -> None:
    folder = datasets.batch_folder(datasets.epoch_folder(root, dataset, epoch), batch_id)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / datasets.PART_FILE)


def live_alert_rows(transactions: Sequence[Mapping[str, Any]], definitions: Sequence[Any]
                    ) -> pa.Table:
    """Alerts as the live detector writes them, for the oracle's alerts under ``definitions``."""
    by_id = {tx["transaction_id"]: tx for tx in transactions}
    rows = []
    for alert in expected_alerts(transactions, definitions):
        evidence = [by_id[i] for i in alert["transaction_ids"]]
        times = [schemas.parse_timestamp(tx["timestamp"]) for tx in evidence]
        rows.append({
            "alert_id": alert["alert_id"], "rule": alert["rule"],
            "rule_version": alert["rule_version"], "user_id": alert["user_id"],
            "window_start": min(times), "window_end": max(times),
            "transaction_count": len(evidence),
            "total_amount": round(sum(tx["amount"] for tx in evidence), 2),
            "locations": sorted({tx["location"] for tx in evidence}),
            "transaction_ids": alert["transaction_ids"], "reason": "live",
            "detected_at": max(times) + timedelta(seconds=1),
        })
    return pa.Table.from_pylist(rows, schema=datasets.ALERTS_SCHEMA)


def definitions_file(path: Path, items: Sequence[Mapping[str, Any]], *, as_yaml: bool = False
                     ) -> Path:
    text = yaml.safe_dump(list(items)) if as_yaml else json.dumps(list(items), indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def backtest(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (the session's Spark is reused); (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--verdicts-url", "sqlite:///nonexistent/verdicts.db", *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def output_alerts(folder: Path) -> list[dict[str, Any]]:
    files = list(folder.glob("*.parquet"))
    assert [f.name for f in files] == [OUTPUT_FILE]
    table = pq.read_table(files[0])
    assert table.schema.names == datasets.ALERTS_SCHEMA.names
    return table.to_pylist()


# --- (b) changed thresholds against the oracle --------------------------------------------------

CHANGED = [
    {"rule_id": "high_value", "kind": "high_value", "version": 2, "params": {"amount": 4000}},
    {"rule_id": "velocity", "kind": "velocity", "version": 3,
     "params": {"count": 4, "window_seconds": 90}},
    {"rule_id": "velocity_10m", "kind": "velocity", "params": {"count": 9,
                                                               "window_seconds": 600}},
    {"rule_id": "multi_location", "kind": "multi_location", "version": 2,
     "params": {"count": 3, "window_seconds": 300}},
    {"rule_id": "paypal_micro", "kind": "paypal_micro", "version": 2, "enabled": False,
     "params": {"count": 2, "amount": 60, "window_seconds": 240}},
]


def as_definitions(items: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [definition_from_dict({"enabled": True, "version": 1, "updated_at": STAMP,
                                  "updated_by": "test", **item}) for item in items]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bronze in two epochs (the second re-read the first's transactions), the live alerts of
    the default rules, and a verdict database with verdicts on some live alerts."""
    from fraudstream.verdicts import VerdictStore

    root = tmp_path_factory.mktemp("backtest-history")
    transactions = random_stream(20261202)
    cut = len(transactions) * 2 // 3
    write_part(root / "parquet", schemas.TRANSACTIONS_DATASET, EPOCH_A, 0,
               bronze_table(transactions[:cut]))
    write_part(root / "parquet", schemas.TRANSACTIONS_DATASET, EPOCH_B, 0,
               bronze_table(transactions[:cut // 2]))
    write_part(root / "parquet", schemas.TRANSACTIONS_DATASET, EPOCH_B, 1,
               bronze_table(transactions[cut // 2:], cut // 2))
    defaults = default_definitions()
    live = live_alert_rows(transactions, defaults)
    write_part(root / "parquet", schemas.ALERTS_DATASET, EPOCH_A, 0, live)
    changed = as_definitions(CHANGED)
    expected = expected_alerts(transactions, changed)
    kept = sorted({a["alert_id"] for a in expected} & set(live["alert_id"].to_pylist()))
    removed = sorted(set(live["alert_id"].to_pylist()) - {a["alert_id"] for a in expected})
    assert len(kept) >= 4 and len(removed) >= 2, "the stream should keep and remove alerts"
    url = f"sqlite:///{root / 'verdicts.db'}"
    with VerdictStore(url) as store:
        for alert_id, verdict in [(kept[0], "fraud"), (kept[1], "fraud"), (kept[2], "legit"),
                                  (kept[3], "unsure"), (removed[0], "fraud")]:
            store.record(make_verdict(alert_id, verdict, "analyst", "", T0))
    return {"root": root, "parquet": root / "parquet", "transactions": transactions,
            "live": live.to_pylist(), "changed": changed, "expected": expected,
            "verdicts_url": url, "verdicts": {kept[0]: "fraud", kept[1]: "fraud",
                                              kept[2]: "legit", kept[3]: "unsure",
                                              removed[0]: "fraud"}}


def test_changed_thresholds_equal_the_oracle_and_the_report_compares_with_live(
        spark, history: dict[str, Any], tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    rules = definitions_file(tmp_path / "rules.yaml", CHANGED, as_yaml=True)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    code, stdout, stderr = backtest(
        capsys, "--rules", str(rules), "--parquet-dir", str(history["parquet"]),
        "--output", str(out), "--json", str(report_path),
        "--verdicts-url", history["verdicts_url"])
    assert code == 0, stderr
    alerts = output_alerts(out)
    expected = history["expected"]
    assert sorted((a["alert_id"], a["rule"], a["rule_version"]) for a in alerts) == sorted(
        (a["alert_id"], a["rule"], a["rule_version"]) for a in expected)
    assert {a["rule"] for a in alerts} == {"high_value", "velocity", "velocity_10m",
                                           "multi_location"}, "disabled rules raise nothing"
    by_id = {a["alert_id"]: a for a in expected}
    for alert in alerts:
        assert alert["transaction_ids"] == by_id[alert["alert_id"]]["transaction_ids"]

    report = json.loads(report_path.read_text())
    assert report["transactions"] == len(history["transactions"]), "each transaction once"
    rows = {row["rule"]: row for row in report["rules"]}
    assert list(rows) == [d["rule_id"] for d in CHANGED]
    live = history["live"]
    for rule, row in rows.items():
        mine = {a["alert_id"] for a in alerts if a["rule"] == rule}
        theirs = {a["alert_id"] for a in live if a["rule"] == rule}
        assert row["alerts"] == len(mine) and row["live_alerts"] == len(theirs), rule
        assert (row["added"], row["removed"], row["unchanged"]) == (
            len(mine - theirs), len(theirs - mine), len(mine & theirs)), rule
        assert set(row["added_sample"]) <= mine - theirs
        assert 0 <= row["true_positive_alerts"] <= row["alerts"]
    assert rows["velocity_10m"]["label"] == "velocity", "judged against its kind's scenarios"
    assert rows["velocity_10m"]["live_alerts"] == 0
    assert rows["paypal_micro"]["alerts"] == 0 and rows["paypal_micro"]["enabled"] is False
    assert rows["paypal_micro"]["removed"] == rows["paypal_micro"]["live_alerts"] > 0
    assert rows["velocity"]["version_changed"] == rows["velocity"]["unchanged"]
    assert report["added"] == sum(r["added"] for r in rows.values())

    # Verdicts given on live alerts carry over to the same ids.
    verdicts = history["verdicts"]
    inherited: dict[str, dict[str, int]] = {}
    for alert in alerts:
        if alert["alert_id"] in verdicts:
            counts = inherited.setdefault(alert["rule"], {"fraud": 0, "legit": 0, "unsure": 0})
            counts[verdicts[alert["alert_id"]]] += 1
    assert sum(sum(c.values()) for c in inherited.values()) == 4
    for rule, row in rows.items():
        counts = inherited.get(rule, {"fraud": 0, "legit": 0, "unsure": 0})
        assert {k: row["verdicts"][k] for k in counts} == counts, rule
        decided = counts["fraud"] + counts["legit"]
        assert row["verdicts"]["precision"] == (counts["fraud"] / decided if decided else None)
    assert sum(r["removed_confirmed_fraud"] for r in rows.values()) == 1
    assert report["verdicts"]["status"] == "read"

    # The table on stdout, progress on stderr.
    assert "velocity_10m" in stdout and "added" in stdout and "rows/s" in stdout
    assert "reading history: 2,500 transactions" in stderr
    assert "running rules" in stderr and "100%" in stderr


def test_an_event_time_range_replays_and_compares_only_that_range(
        spark, history: dict[str, Any], tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    start, end = T0 + timedelta(minutes=5), T0 + timedelta(minutes=20)
    inside = [tx for tx in history["transactions"]
              if start <= schemas.parse_timestamp(tx["timestamp"]) < end]
    rules = definitions_file(tmp_path / "rules.json", CHANGED)
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    code, _, stderr = backtest(
        capsys, "--rules", str(rules), "--parquet-dir", str(history["parquet"]),
        "--output", str(out), "--json", str(report_path), "--quiet",
        "--from", "2026-11-22T10:05:00Z", "--to", "2026-11-22T11:20:00+01:00")
    assert code == 0, stderr
    assert stderr == "", "--quiet"
    alerts = output_alerts(out)
    assert sorted(a["alert_id"] for a in alerts) == sorted(
        a["alert_id"] for a in expected_alerts(inside, history["changed"]))
    report = json.loads(report_path.read_text())
    assert report["transactions"] == len(inside)
    assert report["range"]["from"] == "2026-11-22T10:05:00.000Z"
    assert report["range"]["to"] == "2026-11-22T10:20:00.000Z"
    live_inside = [a for a in history["live"]
                   if a["window_start"] >= start and a["window_end"] < end]
    assert report["live_alerts"] == len(live_inside)


# --- (c) bad input ------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_reason_and_nothing_is_written(
        spark, history: dict[str, Any], tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    parquet = str(history["parquet"])
    out = tmp_path / "out"
    good = definitions_file(tmp_path / "good.json", CHANGED[:1])

    def refused(*args: str) -> str:
        code, stdout, stderr = backtest(capsys, *args)
        assert code == 2, (stdout, stderr)
        assert stderr.startswith("python -m spark_job.backtest: "), stderr
        assert not list(out.glob("*.parquet")), "nothing is written"
        return stderr

    assert "does not exist" in refused("--rules", str(tmp_path / "missing.json"),
                                       "--parquet-dir", parquet, "--output", str(out))
    wide = definitions_file(tmp_path / "wide.json", [
        CHANGED[0], {"rule_id": "velocity_15m", "kind": "velocity",
                     "params": {"count": 9, "window_seconds": 900}}])
    err = refused("--rules", str(wide), "--parquet-dir", parquet, "--output", str(out))
    assert "velocity_15m" in err and "retention horizon of 600 s" in err
    unknown = definitions_file(tmp_path / "unknown.yaml", [
        {"rule_id": "odd", "kind": "telepathy", "params": {}}], as_yaml=True)
    err = refused("--rules", str(unknown), "--parquet-dir", parquet, "--output", str(out))
    assert "odd" in err and "unknown kind 'telepathy'" in err
    twice = definitions_file(tmp_path / "twice.json", [CHANGED[0], CHANGED[0]])
    assert "more than once" in refused("--rules", str(twice), "--parquet-dir", parquet,
                                       "--output", str(out))
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    assert "neither JSON nor YAML" in refused("--rules", str(tmp_path / "broken.json"),
                                              "--parquet-dir", parquet, "--output", str(out))

    # No history, or none in the range.
    err = refused("--rules", str(good), "--parquet-dir", str(tmp_path / "empty"),
                  "--output", str(out))
    assert "no transaction history" in err
    err = refused("--rules", str(good), "--parquet-dir", parquet, "--output", str(out),
                  "--from", "2030-01-01")
    assert "no transactions under" in err and "the history holds 2,500" in err
    assert "--from" in refused("--rules", str(good), "--parquet-dir", parquet,
                               "--output", str(out), "--from", "yesterday")

    # The output: never the detector's history, never silently replaced.
    err = refused("--rules", str(good), "--parquet-dir", parquet,
                  "--output", str(history["parquet"] / "alerts" / "backtest"))
    assert "would mix" in err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused("--rules", str(good), "--parquet-dir", parquet, "--output", str(out))
    assert "already holds data" in err
    err = refused("--rules", str(good), "--parquet-dir", parquet, "--output", str(out),
                  "--overwrite")
    assert "notes.txt" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_an_earlier_backtest(
        spark, history: dict[str, Any], tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    first = definitions_file(tmp_path / "first.json", CHANGED[:1])
    args = ["--parquet-dir", str(history["parquet"]), "--output", str(out), "--json",
            str(report), "--quiet"]
    code, _, stderr = backtest(capsys, "--rules", str(first), *args)
    assert code == 0, stderr
    assert {a["rule"] for a in output_alerts(out)} == {"high_value"}
    code, _, stderr = backtest(capsys, "--rules", str(first), *args)
    assert code == 2 and "already holds data" in stderr
    second = definitions_file(tmp_path / "second.json", CHANGED[1:2])
    code, _, stderr = backtest(capsys, "--rules", str(second), *args, "--overwrite")
    assert code == 0, stderr
    assert {a["rule"] for a in output_alerts(out)} == {"velocity"}
    assert json.loads(report.read_text())["rules"][0]["rule"] == "velocity"


# --- (a) the live defaults reproduce the live detector ------------------------------------------


@pytest.mark.timeout(600)
def test_backtest_of_the_live_defaults_reproduces_the_live_alerts(
        spark, broker, tmp_path: Path,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    ground = ground_truth(chaos_seed(), 2000)
    topics_env = fresh_topics(broker.bootstrap_servers, "backtest", rules=True).env()
    produce(broker.bootstrap_servers, topics_env["TRANSACTIONS_TOPIC"],
            transaction_records(ground.transactions))
    env = detector_env(topics_env, tmp_path, CONSOLE_ALERTS="false")
    code, output = run_detector(env, tmp_path / "detector.log", "--available-now")
    assert code == 0, output[-3000:]
    parquet = tmp_path / "parquet"
    live = datasets.read_dataset(parquet, schemas.ALERTS_DATASET, datasets.ALERTS_SCHEMA)
    assert live.num_rows > 0

    rules = definitions_file(tmp_path / "defaults.json",
                             [d.to_dict() for d in default_definitions()])
    out, report_path = tmp_path / "backtest", tmp_path / "report.json"
    code, stdout, stderr = backtest(capsys, "--rules", str(rules), "--parquet-dir", str(parquet),
                                    "--output", str(out), "--json", str(report_path))
    assert code == 0, stderr
    alerts = output_alerts(out)
    assert sorted((a["alert_id"], a["rule"], a["rule_version"]) for a in alerts) == sorted(
        zip(live["alert_id"].to_pylist(), live["rule"].to_pylist(),
            live["rule_version"].to_pylist(), strict=True))
    report = json.loads(report_path.read_text())
    assert report["transactions"] == len(ground.transactions)
    assert (report["added"], report["removed"]) == (0, 0)
    assert all(row["added"] == row["removed"] == row["version_changed"] == 0
               and row["alerts"] == row["live_alerts"] for row in report["rules"])
    assert report["verdicts"]["status"] == "no database"
    assert "0 added / 0 removed" in stdout
