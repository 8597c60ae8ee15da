"""``python -m spark_job.train`` in a real Spark session over generated bronze Parquet.

The key property: the detector's scorer (``fraudstream.model.Scorer`` reading ``model.json``)
gives the same fraud probability as MLlib's ``transform`` of the saved ``mllib/`` model, to
1e-9, for every algorithm. Then: the training features are ``user_features`` of each user's
sorted buffer; analysts' verdicts override the generator's labels; a version is never
overwritten; refused input exits 2 naming the cause; metrics.json holds the documented figures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.backtest import bronze_table, write_bronze
from fraudstream import datasets, schemas
from fraudstream.features import FEATURE_NAMES, FEATURE_SET, FEATURES, user_features
from fraudstream.model import Scorer
from fraudstream.rules.kinds import Tx
from fraudstream.rules.oracle import expected_alerts
from fraudstream.verdicts import make_verdict
from producer.generator import TransactionGenerator, users_needed
from spark_job import train
from spark_job.backtest import TimeRange

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
SEED = 20261122
RATE, FRAUD_RATIO, COUNT = 20.0, 0.05, 4000
#: Small models: the export is what is tested, not the model's quality.
SMALL = {
    "gbt": {"maxDepth": 4, "maxIter": 8},
    "random_forest": {"numTrees": 8, "maxDepth": 5},
    "logistic_regression": {"maxIter": 50, "regParam": 0.001},
}
NO_VERDICTS = "sqlite:///nonexistent/verdicts.db"


# --- the history --------------------------------------------------------------------------------


def generated(count: int = COUNT, seed: int = SEED) -> list[dict[str, Any]]:
    generator = TransactionGenerator(users=users_needed(RATE, FRAUD_RATIO) + 200,
                                     fraud_ratio=FRAUD_RATIO, seed=seed)
    return [dict(tx) for tx in generator.generate(count, start=T0, rate=RATE)]


def write_history(root: Path, transactions: Sequence[Mapping[str, Any]]) -> Path:
    write_bronze(root, list(transactions), 100_000)
    return root


def write_alerts(root: Path, alerts: Sequence[Mapping[str, Any]]) -> None:
    """Alerts as the detector stores them (only the columns training reads are filled)."""
    folder = datasets.batch_folder(
        datasets.epoch_folder(root, schemas.ALERTS_DATASET, "20261122T100000Z-aaaaaa"), 0)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(
        [{"alert_id": a["alert_id"], "rule": a["rule"], "rule_version": a["rule_version"],
          "user_id": a["user_id"], "transaction_ids": a["transaction_ids"]} for a in alerts])
    pq.write_table(datasets.conform(table, datasets.ALERTS_SCHEMA), folder / datasets.PART_FILE)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train-history")
    transactions = generated()
    write_history(root / "parquet", transactions)
    return {"root": root, "parquet": root / "parquet", "transactions": transactions}


@pytest.fixture(scope="module")
def trained(history: dict[str, Any], spark: Any) -> dict[str, dict[str, Any]]:
    """One small model per algorithm, each in its own models folder."""
    out = {}
    for algorithm in ("gbt", "random_forest", "logistic_regression"):
        options = train.TrainOptions(
            parquet_dir=history["parquet"], models_dir=history["root"] / f"models-{algorithm}",
            verdicts_url=NO_VERDICTS, algorithm=algorithm, params=SMALL)
        out[algorithm] = train.run_training(options, spark=spark)
    return out


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command in this process (the session's Spark is reused); (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--quiet", *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def feature_rows(spark: Any, transactions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The training feature table of ``transactions`` (label = is_fraud), by transaction id."""
    table = bronze_table(transactions, 0)
    table = table.append_column("event_us", table["event_time"].cast(pa.int64()))
    label = table["is_fraud"].cast(pa.float64()).combine_chunks()
    frame = train.feature_frame(spark, train.feature_input(table, label))
    return {row["transaction_id"]: row for row in frame.toArrow().to_pylist()}


# --- the key property: model.json scores exactly as MLlib ---------------------------------------


def mllib_probabilities(spark: Any, algorithm: str, folder: Path, rows: np.ndarray
                        ) -> np.ndarray:
    from pyspark.ml.classification import (
        GBTClassificationModel,
        LogisticRegressionModel,
        RandomForestClassificationModel,
    )
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import Vectors

    loader = {"gbt": GBTClassificationModel, "random_forest": RandomForestClassificationModel,
              "logistic_regression": LogisticRegressionModel}[algorithm]
    model = loader.load(str(folder / "mllib"))
    frame = spark.createDataFrame([(i, Vectors.dense(row.tolist())) for i, row in
                                   enumerate(rows)], ["i", "features"])
    scored = model.transform(frame).select(
        "i", vector_to_array("probability")[1].alias("p")).toPandas().sort_values("i")
    return scored["p"].to_numpy()


@pytest.fixture(scope="module")
def training_rows(history: dict[str, Any], spark: Any) -> np.ndarray:
    return np.array([[row[name] for name in FEATURE_NAMES] for row in
                     feature_rows(spark, history["transactions"]).values()])


def probe_rows(rows: np.ndarray, model_json: dict[str, Any]) -> np.ndarray:
    """Every training feature row, plus rows sitting exactly on split thresholds (the <= edge)
    and just above them."""
    extra = []
    rng = np.random.default_rng(1)
    for tree in model_json.get("trees", [])[:6]:
        for feature, threshold in zip(tree["feature"], tree["threshold"], strict=True):
            if feature < 0:
                continue
            for value in (threshold, np.nextafter(threshold, np.inf)):
                row = rows[rng.integers(len(rows))].copy()
                row[feature] = value
                extra.append(row)
    return np.vstack([rows, *extra]) if extra else rows


@pytest.mark.parametrize("algorithm", ["gbt", "random_forest", "logistic_regression"])
def test_model_json_scores_exactly_as_mllib(trained: dict[str, dict[str, Any]],
                                            training_rows: np.ndarray, spark: Any,
                                            algorithm: str) -> None:
    folder = Path(trained[algorithm]["path"])
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json", "mllib", "model.json"]
    model_json = json.loads((folder / "model.json").read_text())
    assert model_json["algorithm"] == algorithm
    assert model_json["feature_set"] == FEATURE_SET
    assert model_json["features"] == list(FEATURE_NAMES)
    rows = probe_rows(training_rows, model_json)
    scorer = Scorer.load(folder)
    ours = scorer.score(rows)
    theirs = mllib_probabilities(spark, algorithm, folder, rows)
    assert ours.shape == theirs.shape == (len(rows),)
    assert np.max(np.abs(ours - theirs)) <= 1e-9
    assert len(np.unique(np.round(ours, 6))) > 3, "a degenerate model proves little"
    assert trained[algorithm]["export_max_difference"] <= 1e-9

    labels = {(f.label, f.off or f"not {f.label}") for f in FEATURES}
    riskiest = rows[int(np.argmax(ours))]
    for row in (riskiest, rows[0]):
        reasons = scorer.explain(row)
        assert 1 <= len(reasons) <= 3
        for reason in reasons:
            match = re.fullmatch(r"(.+) \(([+-]\d+\.\d\d)\)", reason)
            assert match, reason
            # A value's words: its label (and value), or a flag's words when it is off.
            assert any(match.group(1).startswith(label) or match.group(1) == off
                       for label, off in labels), reason
    assert float(re.fullmatch(r".+ \(([+-]\d+\.\d\d)\)", scorer.explain(riskiest)[0])
                 .group(1)) > 0


# --- features -----------------------------------------------------------------------------------


def test_training_features_are_user_features_of_the_sorted_buffer(
        history: dict[str, Any], spark: Any) -> None:
    transactions = [dict(tx) for tx in history["transactions"]]
    by_user: dict[str, list[dict[str, Any]]] = {}
    for tx in transactions:
        by_user.setdefault(tx["user_id"], []).append(tx)
    user = max(by_user, key=lambda u: (len(by_user[u]), u))
    # Some of the user's transactions unlabelled: no row of their own, but still history.
    ordered = sorted(by_user[user], key=lambda tx: (tx["timestamp"], tx["transaction_id"]))
    unlabelled = {tx["transaction_id"] for tx in ordered[1::3]}
    for tx in transactions:
        if tx["transaction_id"] in unlabelled:
            tx["is_fraud"] = None
    rows = feature_rows(spark, transactions)
    assert not unlabelled & set(rows)
    assert len(rows) == len(transactions) - len(unlabelled)

    def tx_of(record: Mapping[str, Any]) -> Tx:
        moment = schemas.parse_timestamp(record["timestamp"])
        event_us = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        return Tx(event_us, record["transaction_id"], float(record["amount"]),
                  record["location"], record["payment_method"], 0, record["merchant_id"],
                  record["device_ip"])

    buffer = sorted(tx_of(tx) for tx in by_user[user])
    expected = user_features(buffer, buffer)
    checked = 0
    for tx, row in zip(buffer, expected, strict=True):
        if tx.transaction_id in unlabelled:
            continue
        got = rows[tx.transaction_id]
        assert got["user_id"] == user and got["event_us"] == tx.event_us
        assert [got[name] for name in FEATURE_NAMES] == row.tolist()
        checked += 1
    assert checked >= 5
    # The user's first transaction has no history: only itself counts.
    assert buffer[0].transaction_id not in unlabelled
    assert rows[buffer[0].transaction_id]["count_10m"] == 1.0


# --- labels from verdicts -----------------------------------------------------------------------


def test_verdicts_override_the_generator_labels(tmp_path: Path) -> None:
    from fraudstream.verdicts import VerdictStore

    transactions = generated(1500, seed=7)
    root = write_history(tmp_path / "parquet", transactions)
    alerts = expected_alerts(transactions)
    label_of = {tx["transaction_id"]: tx["is_fraud"] for tx in transactions}
    fraud_alert = next(a for a in alerts if all(label_of[i] for i in a["transaction_ids"]))
    legit_alert = next(a for a in alerts if not any(label_of[i] for i in a["transaction_ids"]))
    unsure_alert = next(a for a in alerts if a not in (fraud_alert, legit_alert)
                        and all(label_of[i] for i in a["transaction_ids"]))
    # A "legit" verdict on an alert not stored in alerts/ changes nothing.
    stray = "f" * 32
    write_alerts(root, [fraud_alert, legit_alert, unsure_alert])
    url = f"sqlite:///{tmp_path / 'verdicts.db'}"
    with VerdictStore(url) as store:
        store.record(make_verdict(fraud_alert["alert_id"], "legit", "analyst", "", T0))
        # Newest decided_at wins even when recorded first.
        store.record(make_verdict(legit_alert["alert_id"], "fraud", "analyst", "",
                                  T0 + timedelta(hours=2)))
        store.record(make_verdict(legit_alert["alert_id"], "legit", "analyst", "",
                                  T0 + timedelta(hours=1)))
        store.record(make_verdict(unsure_alert["alert_id"], "unsure", "analyst", "", T0))
        store.record(make_verdict(stray, "legit", "analyst", "", T0))

    found = train.verdict_labels(root, url)
    assert found.verdicts == 3 and found.alerts_found == 2
    expected = {**dict.fromkeys(fraud_alert["transaction_ids"], 0.0),
                **dict.fromkeys(legit_alert["transaction_ids"], 1.0)}
    assert found.labels == expected

    history, inside = train.read_transactions(root, TimeRange())
    label, from_verdicts = train.label_column(history, inside, found.labels)
    assert from_verdicts == len(expected)
    for tid, value in zip(history["transaction_id"].to_pylist(), label.to_pylist(),
                          strict=True):
        assert value == expected.get(tid, float(label_of[tid])), tid

    # A missing SQLite file is no verdicts, not an error.
    assert train.verdict_labels(root, NO_VERDICTS).labels == {}
    assert train.verdict_labels(root, NO_VERDICTS).status == "no database"


# --- the command: versions, metrics, refusals ---------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_cli_saves_a_new_version_each_time_with_documented_metrics(
        history: dict[str, Any], spark: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from fraudstream.verdicts import VerdictStore

    alerts = expected_alerts(history["transactions"])
    write_alerts(history["parquet"], alerts[:3])
    url = f"sqlite:///{tmp_path / 'verdicts.db'}"
    with VerdictStore(url) as store:
        for alert in alerts[:3]:
            store.record(make_verdict(alert["alert_id"], "fraud", "analyst", "", T0))
    judged = {i for alert in alerts[:3] for i in alert["transaction_ids"]}
    models = tmp_path / "models"
    args = ["--parquet-dir", str(history["parquet"]), "--models-dir", str(models),
            "--verdicts-url", url, "--algorithm", "logistic_regression", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    metrics = json.loads(out)
    first = Path(metrics["path"])
    assert first.parent == models and re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", first.name)
    before = snapshot(first)

    code, out, err = cli(capsys, *args[:-1])  # the table this time
    assert code == 0, err
    versions = sorted(p.name for p in models.iterdir())
    assert len(versions) == 2 and versions[0] == first.name, versions
    assert snapshot(first) == before, "an existing version was modified"
    assert "logistic_regression" in out and "rules (any)" in out and "rules + model" in out

    saved = json.loads((first / "metrics.json").read_text())
    assert json.loads((first / "model.json").read_text())["metrics"] == saved
    assert saved["version"] == first.name and saved["algorithm"] == "logistic_regression"
    for key in ("version", "algorithm", "trained_at", "training_seconds", "data", "auc",
                "precision_at_recall_0_9", "threshold_at_recall_0_9", "candidates", "rules",
                "comparison", "score_histogram"):
        assert key in saved, key
    data = saved["data"]
    for key in ("from", "to", "transactions", "labelled", "train_rows", "holdout_rows",
                "holdout_from", "fraud_share_train", "fraud_share_holdout",
                "labels_from_verdicts"):
        assert key in data, key
    assert data["transactions"] == data["labelled"] == COUNT
    assert data["train_rows"] + data["holdout_rows"] == COUNT
    assert abs(data["holdout_rows"] - 0.2 * COUNT) < 0.02 * COUNT
    assert data["labels_from_verdicts"] == len(judged)
    assert 0 < data["fraud_share_train"] < 0.5 and 0 < data["fraud_share_holdout"] < 0.5
    assert 0.5 < saved["auc"] <= 1.0
    assert 0 < saved["precision_at_recall_0_9"] <= 1 and saved["threshold_at_recall_0_9"] >= 0
    assert set(saved["candidates"]) == {"logistic_regression"}
    assert saved["candidates"]["logistic_regression"]["auc"] == saved["auc"]
    rules = saved["rules"]
    assert 0 < rules["precision"] <= 1 and 0 < rules["recall"] <= 1
    assert set(rules["per_rule"]) == set(schemas.RULES)
    for figures in rules["per_rule"].values():
        assert set(figures) >= {"precision", "recall", "flagged"}
    comparison = saved["comparison"]
    assert comparison["recall"] == rules["recall"]
    assert set(comparison["rules_alone"]) >= {"precision", "recall"}
    assert set(comparison["model_alone"]) >= {"precision", "recall", "threshold"}
    assert set(comparison["rules_plus_model"]) >= {"precision", "recall", "veto_threshold",
                                                   "add_threshold"}
    histogram = saved["score_histogram"]
    assert len(histogram["edges"]) == 21 and histogram["edges"][0] == 0.0
    assert histogram["edges"][-1] == 1.0
    assert len(histogram["fraud"]) == len(histogram["legit"]) == 20
    holdout_fraud = round(data["fraud_share_holdout"] * data["holdout_rows"])
    assert sum(histogram["fraud"]) == holdout_fraud
    assert sum(histogram["fraud"]) + sum(histogram["legit"]) == data["holdout_rows"]


def test_metrics_of_each_algorithm_are_sane(trained: dict[str, dict[str, Any]]) -> None:
    for algorithm, metrics in trained.items():
        assert metrics["algorithm"] == algorithm
        assert 0.5 < metrics["auc"] <= 1.0, (algorithm, metrics["auc"])
        comparison = metrics["comparison"]
        for name in ("rules_alone", "model_alone", "rules_plus_model"):
            for key in ("precision", "recall"):
                value = comparison[name][key]
                assert value is None or 0 <= value <= 1, (algorithm, name, key)


def test_auto_keeps_the_candidate_with_the_better_auc(history: dict[str, Any], spark: Any,
                                                      tmp_path: Path) -> None:
    options = train.TrainOptions(parquet_dir=history["parquet"], models_dir=tmp_path,
                                 verdicts_url=NO_VERDICTS, params=SMALL)
    metrics = train.run_training(options, spark=spark)
    candidates = metrics["candidates"]
    assert set(candidates) == {"gbt", "logistic_regression"}
    best = max(candidates, key=lambda name: candidates[name]["auc"])
    assert metrics["algorithm"] == best and metrics["auc"] == candidates[best]["auc"]


def test_a_version_name_that_is_taken_gets_a_suffix(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "utc_now", lambda: datetime(2026, 12, 2, 6, 15, tzinfo=UTC))

    def write(folder: Path, version: str) -> None:
        (folder / "model.json").write_text(version)

    assert train.save_version(tmp_path, write).name == "20261202T061500Z"
    assert train.save_version(tmp_path, write).name == "20261202T061500Z-2"
    (tmp_path / ".20261202T061500Z-3.tmp").mkdir()  # another trainer's version in progress
    assert train.save_version(tmp_path, write).name == "20261202T061500Z-4"
    assert (tmp_path / "20261202T061500Z" / "model.json").read_text() == "20261202T061500Z"

    def broken(folder: Path, version: str) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        train.save_version(tmp_path, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".20261202T061500Z-3.tmp", "20261202T061500Z", "20261202T061500Z-2",
        "20261202T061500Z-4"]


@pytest.mark.parametrize(("case", "args", "cause"), [
    ("empty", [], r"no transaction history under .*PARQUET_DIR"),
    ("too few", ["--min-transactions", "100000"],
     r"only 4,000 labelled transactions.*TRAIN_MIN_TRANSACTIONS"),
    ("one class", [], r"all 4,000 labelled transactions are legit.*both fraud and legit"),
    ("no fraud in the hold-out", [], r"the hold-out .* holds no fraud"),
    ("range", ["--from", "2030-01-01"], r"no transactions under .* from 2030-01-01"),
    ("bad time", ["--to", "yesterday"], r"--to: expected an ISO-8601 time"),
])
def test_refusals_exit_2_naming_the_cause(history: dict[str, Any], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], case: str,
                                          args: list[str], cause: str) -> None:
    parquet = history["parquet"]
    if case == "empty":
        parquet = tmp_path / "empty"
    elif case == "one class":
        parquet = write_history(tmp_path / "legit", [
            {**tx, "is_fraud": False} for tx in history["transactions"]])
    elif case == "no fraud in the hold-out":
        cutoff = history["transactions"][int(COUNT * 0.7)]["timestamp"]
        parquet = write_history(tmp_path / "early-fraud", [
            {**tx, "is_fraud": tx["is_fraud"] and tx["timestamp"] < cutoff}
            for tx in history["transactions"]])
    models = tmp_path / "models"
    code, out, err = cli(capsys, "--parquet-dir", str(parquet), "--models-dir", str(models),
                         "--verdicts-url", NO_VERDICTS, *args)
    assert code == 2, (out, err)
    assert re.search(cause, err), err
    assert err.startswith("python -m spark_job.train: ")
    assert not models.exists() or not any(models.iterdir())


def test_every_hours_retries_a_failed_round_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PARQUET_DIR": str(tmp_path / "empty"),
           "MODELS_DIR": str(tmp_path / "models"), "VERDICTS_URL": NO_VERDICTS,
           "TRAIN_EVERY_HOURS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "spark_job.train"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        assert process.stderr is not None
        while "next round in" not in seen and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            seen += line
        assert "round 1 saved no model: nothing to train on" in seen, seen
        # Refused for lack of history: the next look is soon, not a whole period later.
        assert "next round in 15 min (this one was refused)" in seen, seen
        assert process.poll() is None, "a failed round must not end the schedule"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_during_a_round_cancels_it_and_saves_nothing(history: dict[str, Any],
                                                             tmp_path: Path) -> None:
    models = tmp_path / "models"
    env = {**os.environ, "PARQUET_DIR": str(history["parquet"]), "MODELS_DIR": str(models),
           "VERDICTS_URL": NO_VERDICTS, "TRAIN_EVERY_HOURS": "1", "TRAIN_ALGORITHM": "gbt",
           "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "spark_job.train"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 120
        seen = ""
        while "training gbt on" not in seen and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            seen += line
        assert "training gbt on" in seen, seen
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
        assert process.returncode == 0, rest
        assert time.monotonic() - started < 15, "the stop waited for the fit to finish"
        assert "stopped during round 1: it saved nothing" in rest, rest
        assert not models.exists() or not any(models.iterdir())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
