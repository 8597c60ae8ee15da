"""The feature function and the model file the detector evaluates (pure logic, no Spark).

That ``model.json`` equals MLlib's own ``transform`` is shown with a real Spark session in
``tests/integration/test_train.py``; here the semantics are pinned on hand-written models.
"""

from __future__ import annotations

import json
import logging
import math
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fraudstream.features import (
    FEATURE_NAMES,
    FEATURE_SET,
    FEATURES,
    batch_features,
    user_features,
)
from fraudstream.model import (
    MODEL_FILE,
    MODEL_FORMAT,
    ModelError,
    ModelSource,
    Scorer,
    newest_model,
)
from fraudstream.rules import MICROS, BucketState, RuleSet, Tx, definition_from_dict
from fraudstream.schemas import PAYMENT_METHODS

T0 = 1_764_670_000 * MICROS  # 2025-12-02T10:06:40Z
COLUMN = {name: index for index, name in enumerate(FEATURE_NAMES)}


def tx(seconds: float, tx_id: str, amount: float = 10.0, location: str = "Lyon",
       method: str = "card", merchant: str = "m1", device: str = "10.0.0.1") -> Tx:
    return Tx(T0 + round(seconds * MICROS), tx_id, amount, location, method, 0, merchant, device)


def features_of(buffer: list[Tx], target: Tx) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, user_features(sorted(buffer), [target])[0], strict=True))


def test_features_follow_the_timeline_of_the_docstring() -> None:
    a = tx(0, "a", 100.0)
    b = tx(90, "b", 20.0, location="Paris")
    c = tx(400, "c", 30.0)
    d = tx(580, "d", 40.0, method="PayPal")
    e = tx(620, "e", 900.0, location="Nice", method="PayPal", merchant="m9", device="10.9.9.9")
    f = features_of([a, b, c, d, e], e)
    assert f["count_1m"] == 2  # d and e
    assert f["count_5m"] == 3  # c, d, e
    assert f["count_10m"] == 4  # b, c, d, e — a is older than 600 s
    assert f["amount_1m"] == pytest.approx(940.0)
    assert f["amount_10m"] == pytest.approx(990.0)
    assert f["amount_vs_median"] == pytest.approx(900.0 / 30.0)  # median of b, c, d
    assert f["locations_5m"] == 2  # Lyon (c, d) and Nice
    assert f["locations_10m"] == 3
    assert f["paypal_micro_5m"] == 1  # d; e is not under 50
    assert f["seconds_since_previous"] == 40
    assert (f["new_location"], f["new_device"], f["new_merchant"]) == (1, 1, 1)
    assert f["hour_of_day"] == 10
    assert f["method_paypal"] == 1 and f["method_card"] == 0


def test_history_is_strictly_earlier_and_inclusive_at_600_seconds() -> None:
    first = tx(0, "a")
    same_time_lower_id = tx(600, "b")
    target = tx(600, "c")
    later = tx(601, "d")
    f = features_of([first, same_time_lower_id, target, later], target)
    # a is exactly 600 s older (kept), b ties in time with a smaller id (earlier), d is later.
    assert f["count_10m"] == 3
    alone = features_of([], tx(5, "x"))
    assert alone["count_1m"] == 1 and alone["seconds_since_previous"] == 600
    assert (alone["new_location"], alone["amount_vs_median"]) == (0, 1.0)


def test_the_target_need_not_be_in_the_buffer_and_order_of_arrival_does_not_matter() -> None:
    history = [tx(s, f"t{s}", amount=s + 1.0) for s in (10, 20, 30)]
    target = tx(25, "late")
    assert features_of(history, target) == features_of([*history, target], target)
    assert len(FEATURES) == len(FEATURE_NAMES) == len(set(FEATURE_NAMES))


def plain_features(buffer: list[Tx], target: Tx) -> list[float]:
    """The features of one transaction, written from the definitions alone (filters and sets,
    no bisect, no shared pass): what the detector's code must reproduce to the last bit."""
    history = [h for h in buffer if (h.event_us, h.transaction_id)
               < (target.event_us, target.transaction_id)
               and h.event_us >= target.event_us - 600 * MICROS]
    t, amount = target.event_us, target.amount
    in_5m = [h for h in history if h.event_us >= t - 300 * MICROS]
    in_1m = [h for h in history if h.event_us >= t - 60 * MICROS]

    def total(window: list[Tx]) -> float:
        """The window's amounts summed exactly, rounded once, plus the transaction's."""
        return float(sum(Fraction(h.amount) for h in window)) + amount

    def micro(h: Tx) -> bool:
        return h.payment_method == "PayPal" and h.amount < 50.0

    amounts = sorted(h.amount for h in history)
    middle = len(amounts) // 2
    typical = (0.0 if not amounts else amounts[middle] if len(amounts) % 2
               else (amounts[middle - 1] + amounts[middle]) / 2)
    known = bool(history)
    return [
        amount, amount / typical if typical > 0 else 1.0,
        1.0 + len(in_1m), 1.0 + len(in_5m), 1.0 + len(history),
        total(in_1m), total(in_5m), total(history),
        float(len({target.location} | {h.location for h in in_5m})),
        float(len({target.location} | {h.location for h in history})),
        float(micro(target) + sum(map(micro, in_5m))),
        (t - history[-1].event_us) / MICROS if known else 600.0,
        float(known and target.location not in {h.location for h in history}),
        float(known and target.device_ip not in {h.device_ip for h in history}),
        float(known and target.merchant_id not in {h.merchant_id for h in history}),
        float((t // (3600 * MICROS)) % 24),
        *(1.0 if target.payment_method == m else 0.0 for m in PAYMENT_METHODS),
    ]


def random_user(rng: random.Random, user: int) -> list[Tx]:
    """A user's buffer: bursts and quiet spells, few places, devices and merchants, PayPal
    micro-payments, equal timestamps (ties broken by id)."""
    clock, out = rng.uniform(0, 7200), []
    for n in range(rng.choice([0, 1, 2, 5, 20, 80])):
        clock += rng.choice([0.0, 0.5, 3.0, 40.0, 250.0, 700.0]) * rng.random()
        out.append(tx(clock, f"u{user}-{rng.randrange(10**6):06d}-{n}",
                      round(rng.choice([4.99, 30.0, 120.0, 2500.0]) * rng.random(), 2),
                      location=rng.choice(["Lyon", "Paris", "Nice"]),
                      method=rng.choice(["card", "PayPal", "bank_transfer"]),
                      merchant=rng.choice(["m1", "m2", "m3", "m4"]),
                      device=rng.choice(["10.0.0.1", "10.0.0.2"])))
    return sorted(out)


def test_features_equal_the_plain_definition_bit_for_bit_however_grouped() -> None:
    rng = random.Random(20261202)
    groups = []
    for user in range(300):
        buffer = random_user(rng, user)
        # Targets in the buffer, and late ones that are not (scored against it).
        targets = [t for t in buffer if rng.random() < 0.5]
        targets += [tx(rng.uniform(0, 9000), f"late{user}-{k}", 17.0)
                    for k in range(rng.choice([0, 1]))]
        groups.append((buffer, targets))
    expected = [plain_features(buffer, t) for buffer, targets in groups for t in targets]
    together = batch_features(groups)
    one_by_one = np.vstack([user_features(buffer, [t]) for buffer, targets in groups
                            for t in targets])
    assert len(expected) > 1000
    assert np.array_equal(together, np.asarray(expected))
    assert np.array_equal(one_by_one, together)
    assert batch_features([([], [])]).shape == (0, len(FEATURE_NAMES))


# --- hand-written models ---------------------------------------------------------------------


def stump(feature: str, threshold: float, low: float, high: float, weight: float = 1.0
          ) -> dict[str, Any]:
    """One split: x[feature] <= threshold -> low, else high (root value = their mean)."""
    return {"weight": weight, "depth": 1, "feature": [COLUMN[feature], -1, -1],
            "threshold": [threshold, 0.0, 0.0], "left": [1, 0, 0], "right": [2, 0, 0],
            "value": [(low + high) / 2, low, high]}


def model_json(algorithm: str = "gbt", **extra: Any) -> dict[str, Any]:
    return {"format": MODEL_FORMAT, "version": "v1", "algorithm": algorithm,
            "feature_set": FEATURE_SET, "features": list(FEATURE_NAMES),
            "metrics": {"auc": 0.93}, **extra}


def write_model(root: Path, name: str, data: dict[str, Any] | str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (folder / MODEL_FILE).write_text(text)
    return folder


def row(**values: float) -> list[float]:
    out = [0.0] * len(FEATURE_NAMES)
    for name, value in values.items():
        out[COLUMN[name]] = value
    return out


def test_gbt_margin_and_link_and_forest_mean() -> None:
    trees = [stump("amount", 1000.0, -0.5, 0.8, weight=1.0),
             stump("count_1m", 3.0, -0.2, 0.6, weight=0.5)]
    gbt = Scorer.from_json(model_json("gbt", trees=trees), Path("m"))
    x = [row(amount=50.0, count_1m=1), row(amount=5000.0, count_1m=5),
         row(amount=1000.0, count_1m=3.5)]
    margins = np.array([-0.5 - 0.1, 0.8 + 0.3, -0.5 + 0.3])
    assert gbt.score(x) == pytest.approx(1 / (1 + np.exp(-2 * margins)), abs=1e-12)
    forest = Scorer.from_json(model_json("random_forest", trees=[
        stump("amount", 1000.0, 0.1, 0.9), stump("new_device", 0.5, 0.2, 0.7)]), Path("m"))
    assert forest.score([row(amount=5000.0, new_device=1)]) == pytest.approx([0.8])
    assert forest.score([row(amount=5.0)]) == pytest.approx([0.15])


def test_vectorised_walk_equals_a_plain_walk_on_deep_random_trees() -> None:
    rng = np.random.default_rng(3)

    def random_tree(depth: int) -> dict[str, Any]:
        nodes: dict[str, list[Any]] = {k: [] for k in ("feature", "threshold", "left", "right",
                                                        "value")}

        def grow(level: int) -> int:
            index = len(nodes["feature"])
            for values in nodes.values():
                values.append(0)
            nodes["value"][index] = float(rng.normal())
            if level == depth or rng.random() < 0.2:
                nodes["feature"][index] = -1
                return index
            nodes["feature"][index] = int(rng.integers(len(FEATURE_NAMES)))
            nodes["threshold"][index] = float(rng.normal(0, 2))
            nodes["left"][index] = grow(level + 1)
            nodes["right"][index] = grow(level + 1)
            return index

        grow(0)
        return {"weight": float(rng.uniform(0.1, 1)), "depth": depth, **nodes}

    trees = [random_tree(int(rng.integers(1, 7))) for _ in range(25)]
    scorer = Scorer.from_json(model_json("gbt", trees=trees), Path("m"))
    x = rng.normal(0, 2, size=(300, len(FEATURE_NAMES)))

    def plain(features: np.ndarray) -> float:
        margin = 0.0
        for tree in trees:
            node = 0
            while tree["feature"][node] >= 0:
                go_left = features[tree["feature"][node]] <= tree["threshold"][node]
                node = tree["left"][node] if go_left else tree["right"][node]
            margin += tree["weight"] * tree["value"][node]
        return 1 / (1 + math.exp(-2 * margin))

    assert scorer.score(x) == pytest.approx([plain(r) for r in x], abs=1e-12)


def test_reasons_name_the_features_that_raised_the_score() -> None:
    trees = [stump("amount", 1000.0, -0.5, 0.8), stump("count_1m", 3.0, -0.2, 0.6)]
    scorer = Scorer.from_json(model_json("gbt", trees=trees), Path("m"))
    reasons = scorer.explain(row(amount=4210.0, count_1m=6))
    assert reasons == ["amount 4,210.00 (+0.65)", "transactions in 1 min 6 (+0.40)"]
    linear = Scorer.from_json(model_json(
        "logistic_regression", coefficients=[0.0] * (len(FEATURE_NAMES) - 1) + [1.5],
        intercept=0.0, means=[0.0] * len(FEATURE_NAMES)), Path("m"))
    assert linear.explain(row(**{FEATURE_NAMES[-1]: 1.0}))[0].startswith(
        f"{FEATURES[-1].label} (+1.50)")


@pytest.mark.parametrize(("content", "words"), [
    ("{not json", "unreadable"),
    (json.dumps({"format": "other"}), "not a fraudstream-model/1 file"),
    (json.dumps({**model_json(), "feature_set": "old/0"}), "trained on other features"),
    (json.dumps({**model_json(), "features": ["amount"]}), "trained on other features"),
    (json.dumps(model_json("svm")), "unknown algorithm"),
    (json.dumps(model_json("gbt", trees=[])), "no trees"),
    (json.dumps(model_json("gbt", trees=[{**stump("amount", 1, 0, 1), "left": [7, 0, 0]}])),
     "points outside its tree"),
    (json.dumps(model_json("gbt", trees=[{**stump("amount", 1, 0, 1), "value": [1]}])),
     "differ in length"),
    (json.dumps(model_json("logistic_regression", coefficients=[1.0], intercept=0, means=[0])),
     "coefficients do not match"),
])
def test_a_bad_model_file_is_refused_with_its_reason(tmp_path: Path, content: str,
                                                     words: str) -> None:
    folder = write_model(tmp_path, "v1", content)
    with pytest.raises(ModelError, match=words):
        Scorer.load(folder)


def test_missing_folder_and_missing_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        Scorer.load(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelError, match=r"model\.json is missing"):
        Scorer.load(tmp_path / "half")


def test_the_newest_usable_version_wins_and_a_new_one_is_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fraudstream.model")
    source = ModelSource(tmp_path / "models", check_seconds=0)
    assert source.current() is None
    assert "rules alone" in source.status
    models = tmp_path / "models"
    write_model(models, "20261201T000000Z", model_json(trees=[stump("amount", 1, 0, 1)]))
    assert source.current() is not None and source.current().path.name == "20261201T000000Z"
    write_model(models, "20261202T000000Z", "{broken")
    (models / ".20261203T000000Z.tmp").mkdir()  # being written: ignored
    assert source.current().path.name == "20261201T000000Z"
    assert any("model not used" in r.message and "unreadable" in r.message
               for r in caplog.records)
    write_model(models, "20261204T000000Z", model_json(trees=[stump("amount", 1, 0, 1)]))
    assert source.current().path.name == "20261204T000000Z"
    assert "scoring with model" in source.status
    scorer, problems = newest_model(models)
    assert scorer is not None and scorer.path.name == "20261204T000000Z" and problems == []


def test_the_engine_scores_new_transactions_and_ml_score_fires_on_its_own() -> None:
    scorer = Scorer.from_json(model_json(trees=[stump("count_1m", 2.0, -2.0, 2.0)]), Path("m"))
    rules = RuleSet.of([definition_from_dict({
        "rule_id": "ml_score", "kind": "ml_score", "version": 1, "enabled": True,
        "params": {"threshold": 0.9}, "updated_at": "2026-12-01T10:00:00.000Z",
        "updated_by": "test"})])
    bucket = BucketState(ruleset=rules)
    burst = [tx(s, f"t{s}") for s in (0, 10, 20)]
    alerts, _ = bucket.process({"u1": burst}, scorer=scorer)
    # count_1m: 1, 2, 3 -> only the third is above 2: p = 1/(1+e^-4) = 0.982
    assert [a.trigger.transaction_id for a in alerts] == ["t20"]
    assert alerts[0].risk_score == pytest.approx(1 / (1 + math.exp(-4)))
    assert alerts[0].score_reasons == ("transactions in 1 min 3 (+2.00)",)
    assert alerts[0].reason == "risk score 0.98 at or above 0.9"
    # No model: ml_score is silent and nothing carries a score.
    silent, _ = BucketState(ruleset=rules).process({"u1": burst})
    assert silent == []


def test_versions_sort_by_time_then_by_same_second_number(tmp_path: Path) -> None:
    from fraudstream.model import model_versions

    for name in ("20261202T000000Z-10", "20261202T000000Z", "20261202T000000Z-2",
                 "20261201T235959Z", ".20261203T000000Z.tmp"):
        (tmp_path / name).mkdir()
    assert [p.name for p in model_versions(tmp_path)] == [
        "20261201T235959Z", "20261202T000000Z", "20261202T000000Z-2", "20261202T000000Z-10"]
