"""A model scoring live: a real broker, a real detector, model versions dropped in while it runs.

The detector starts with no model (rules alone, null ``risk_score``), an ``ml_score`` rule is
published, then a model version appears under MODELS_DIR and is taken between batches without
a restart: every later alert carries the score the model gives its trigger from features over
the user's history (``fraudstream.features`` replayed here independently of the detector's
state), with the reasons for it, and ``ml_score`` raises alerts on its own for exactly the
transactions scored at or above its threshold. A corrupt newer version is refused with a
logged reason while the good one keeps scoring.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from support.pipeline import (
    alert_rows,
    caught_up,
    detector_env,
    metrics_lines,
    parquet_rows,
    start_detector,
    transaction_records,
)

from fraudstream import schemas
from fraudstream.features import FEATURE_NAMES, FEATURE_SET, user_features
from fraudstream.model import MODEL_FILE, MODEL_FORMAT, Scorer
from fraudstream.rules import Tx, definition_from_dict
from fraudstream.rules.oracle import as_tx
from fraudstream.rules.store import RulesTopic
from fraudstream.testing import produce, wait_for

COLUMN = {name: index for index, name in enumerate(FEATURE_NAMES)}
THRESHOLD = 0.8
#: Probe users per round: spread over the state buckets, so both shuffle partitions (and the
#: Python worker of each) see some in every batch.
PROBES = 64


def stump(feature: str, threshold: float, low: float, high: float) -> dict[str, Any]:
    return {"weight": 1.0, "depth": 1, "feature": [COLUMN[feature], -1, -1],
            "threshold": [threshold, 0.0, 0.0], "left": [1, 0, 0], "right": [2, 0, 0],
            "value": [(low + high) / 2, low, high]}


#: Three or more payments in a minute: 0.92 (1.2 margin); a large amount alone: 0.45.
MODEL = {"format": MODEL_FORMAT, "version": "20261202T000000Z", "algorithm": "gbt",
         "feature_set": FEATURE_SET, "features": list(FEATURE_NAMES), "metrics": {"auc": 0.9},
         "trees": [stump("count_1m", 2.5, -1.0, 1.5), stump("amount", 3000.0, -0.3, 0.9)]}


def install(models: Path, version: str, text: str) -> Path:
    """A version as the trainer writes it: into a hidden folder, then renamed into place."""
    hidden = models / f".{version}.tmp"
    hidden.mkdir(parents=True)
    (hidden / MODEL_FILE).write_text(text)
    return hidden.rename(models / version)


def payment(tx_id: str, user: str, at: datetime, amount: float = 25.0,
            location: str = "Lyon") -> dict[str, Any]:
    return {"transaction_id": tx_id, "user_id": user, "amount": amount, "currency": "EUR",
            "timestamp": schemas.format_timestamp(at), "location": location,
            "payment_method": "card", "merchant_id": f"m-{tx_id}", "device_ip": "10.0.0.7",
            "is_fraud": False, "fraud_pattern": None}


def burst(user: str, start: datetime, count: int, gap_seconds: float = 5.0
          ) -> list[dict[str, Any]]:
    return [payment(f"{user}-{i}", user, start + timedelta(seconds=i * gap_seconds))
            for i in range(count)]


def probe_until(done: Callable[[list[dict[str, Any]]], bool], what: str, bootstrap: str,
                topic: str, checkpoint: Path, parquet: Path, produced: int, detector: Any
                ) -> int:
    """Send rounds of high-value probes until ``done`` holds for one round's alerts: the
    detector's workers look for a new model version only while they work (every ~10 s at
    most), so a change shows once batches run. Returns how many records were produced in
    all."""
    deadline = time.monotonic() + 90
    for round_number in range(1000):
        at = datetime.now(UTC) - timedelta(seconds=20)
        probes = [payment(f"probe-{produced}-{round_number}-{i}", f"probe-{i}", at,
                          amount=4100.0) for i in range(PROBES)]
        produce(bootstrap, topic, transaction_records(probes))
        produced += len(probes)
        wait_for(lambda total=produced: caught_up(checkpoint, total), 60, "probes",
                 alive=detector.alive)
        ids = {p["transaction_id"] for p in probes}
        alerts = [a for a in alert_rows(parquet)
                  if a["rule"] == "high_value" and a["transaction_ids"][0] in ids]
        assert len(alerts) == PROBES, alerts
        if done(alerts):
            return produced
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(1)  # pacing between rounds
    raise AssertionError("unreachable")


def expected_scores(scorer: Scorer, transactions: list[dict[str, Any]]
                    ) -> dict[str, tuple[float, list[str]]]:
    """transaction_id -> (score, reasons) from each user's whole history, as training sees it."""
    by_user: dict[str, list[Tx]] = defaultdict(list)
    for record in transactions:
        by_user[record["user_id"]].append(as_tx(record))
    out = {}
    for txs in by_user.values():
        txs.sort()
        for tx, row in zip(txs, user_features(txs, txs), strict=True):
            out[tx.transaction_id] = (float(scorer.score([row])[0]), scorer.explain(row))
    return out


def test_a_model_is_taken_live_scores_alerts_and_drives_ml_score(
        unique_topics: dict[str, str], tmp_path: Path) -> None:
    env = detector_env(unique_topics, tmp_path)
    bootstrap = unique_topics["KAFKA_BOOTSTRAP_SERVERS"]
    topic = unique_topics["TRANSACTIONS_TOPIC"]
    checkpoint, parquet, models = (tmp_path / "checkpoint", tmp_path / "parquet",
                                   Path(env["MODELS_DIR"]))
    changes_dir = parquet / schemas.RULE_CHANGES_DATASET
    detector = start_detector(env, tmp_path / "detector.log")
    produced = 0
    try:
        wait_for(lambda: len(parquet_rows(changes_dir)) == 4, 180,
                 "the default rules published and applied", alive=detector.alive)
        RulesTopic({"bootstrap.servers": bootstrap}, unique_topics["RULES_TOPIC"]).publish(
            definition_from_dict({
                "rule_id": "ml_score", "kind": "ml_score", "version": 1, "enabled": True,
                "params": {"threshold": THRESHOLD}, "updated_at": "2026-12-02T10:00:00.000Z",
                "updated_by": "test"}))
        wait_for(lambda: len(parquet_rows(changes_dir)) == 5, 60, "ml_score applied",
                 alive=detector.alive)

        start = datetime.now(UTC) - timedelta(seconds=50)
        phase1 = [*burst("p1", start, 5), payment("p2-0", "p2", start, amount=4200.0)]
        produce(bootstrap, topic, transaction_records(phase1))
        produced += len(phase1)
        wait_for(lambda: caught_up(checkpoint, produced), 120, "phase 1", alive=detector.alive)
        before = alert_rows(parquet)
        assert sorted(a["rule"] for a in before) == ["high_value", "velocity"], before
        assert all(a["risk_score"] is None and a["score_reasons"] is None for a in before)
        assert "no usable model" in detector.log_path.read_text()

        good = install(models, MODEL["version"], json.dumps(MODEL))
        # A round whose alerts all carry a score: every worker has taken the model.
        produced = probe_until(lambda alerts: all(a["risk_score"] is not None for a in alerts),
                               "every worker to take the model", bootstrap, topic, checkpoint,
                               parquet, produced, detector)
        start = datetime.now(UTC) - timedelta(seconds=40)
        phase2 = [*burst("q1", start, 5), *burst("q2", start, 2),
                  payment("q3-0", "q3", start, amount=4200.0)]
        produce(bootstrap, topic, transaction_records(phase2))
        produced += len(phase2)
        wait_for(lambda: caught_up(checkpoint, produced), 120, "phase 2", alive=detector.alive)

        scorer = Scorer.load(good)
        expected = expected_scores(scorer, phase2)
        after = [a for a in alert_rows(parquet) if a["user_id"].startswith("q")]
        assert after, "phase 2 raised no alert"
        for alert in after:
            trigger = alert["transaction_ids"][-1]
            score, reasons = expected[trigger]
            assert math.isclose(alert["risk_score"], score, abs_tol=1e-9), (alert, score)
            assert list(alert["score_reasons"]) == reasons
        # ml_score: one alert per transaction scored at or above the threshold, no other.
        flagged = sorted(tx_id for tx_id, (score, _) in expected.items() if score >= THRESHOLD)
        ml_alerts = sorted(a["transaction_ids"][0] for a in after if a["rule"] == "ml_score")
        assert ml_alerts == flagged == ["q1-2", "q1-3", "q1-4"]
        high = next(a for a in after if a["rule"] == "high_value")
        assert math.isclose(high["risk_score"], 1 / (1 + math.exp(-2 * (-1.0 + 0.9))),
                            abs_tol=1e-9)
        wait_for(lambda: any(MODEL["version"] in (m.get("model") or "")
                             for m in metrics_lines(parquet)), 30, "the model in the metrics")

        install(models, "20261203T000000Z", "{half a file")
        produced = probe_until(lambda _: "20261203T000000Z" in detector.log_path.read_text(),
                               "the corrupt version to be refused", bootstrap, topic,
                               checkpoint, parquet, produced, detector)
        start = datetime.now(UTC) - timedelta(seconds=30)
        phase3 = burst("r1", start, 4)
        produce(bootstrap, topic, transaction_records(phase3))
        produced += len(phase3)
        wait_for(lambda: caught_up(checkpoint, produced), 120, "phase 3", alive=detector.alive)
        expected = expected_scores(scorer, phase3)
        late = [a for a in alert_rows(parquet) if a["user_id"] == "r1"]
        assert late and all(
            math.isclose(a["risk_score"], expected[a["transaction_ids"][-1]][0], abs_tol=1e-9)
            for a in late), late
        log = detector.log_path.read_text()
        assert "model not used" in log and "20261203T000000Z" in log and "unreadable" in log
    finally:
        detector.stop()
