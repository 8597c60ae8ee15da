"""Train the fraud model: ``python -m spark_job.train`` (``fraudstream-train``).

Why a model next to the rules: the four rules are exact and explainable, but they see one signal
each and the traffic is built to fool them (hard negatives trip them, evading fraud stays under
their limits; docs/traffic.md). A classifier over the same per-user history sees all the signals
at once — spend against the user's usual amount, new devices and merchants, counts over several
windows — and ranks transactions by a fraud probability the detector attaches to every alert
(``risk_score``) and that an ``ml_score`` rule can fire on.

What one run does, and why each step is the way it is:

1. **Read** the bronze history ``PARQUET_DIR/transactions/`` (every epoch, each transaction
   once; ``--from``/``--to`` bound the event times trained on, and up to ``HISTORY_SECONDS``
   before ``--from`` are read as history only, so the first transactions' features see what
   the live detector would have seen).
2. **Label** each transaction with the generator's ``is_fraud``, overridden by analysts'
   verdicts (``fraud`` -> 1, ``legit`` -> 0 for every transaction of the alert; the newest
   ``decided_at`` wins when a transaction is in several alerts; ``unsure`` says nothing).
   Transactions with neither are history only: they count in their user's features, and are
   not trained or measured on.
3. **Features** come from ``fraudstream.features.batch_features`` and nothing else — the very
   function the detector calls in its state step — over each user's transactions sorted by
   (event time, id). It runs in Spark, ``groupBy(hash bucket of user_id).applyInPandas``, so
   both cores compute features and the rows stay in Spark (cached) for training. A second
   implementation (SQL windows, say) would be faster and would sooner or later disagree with
   the detector: training/serving skew is the classic way a model that looks good offline
   fails live.
4. **Hold-out by time**: the newest ``holdout_fraction`` of the labelled transactions (by event
   time) is kept out of training. A random split would leak: one fraud episode's transactions
   (or one user's habits) would land on both sides. Training needs both classes on both sides
   and ``min_transactions`` labelled rows, else the run refuses (exit 2) and saves nothing.
5. **Train** with Spark MLlib: ``auto`` fits gradient-boosted trees and logistic regression
   and keeps the one with the better hold-out AUC; ``gbt``, ``random_forest`` and
   ``logistic_regression`` fit just that one.
6. **Measure** on the hold-out: AUC, precision at recall 0.9 with the threshold reaching it,
   a score histogram per class, and the rules in force on the same transactions (the rule
   core's oracle over the hold-out, with the preceding window as context; a transaction is
   flagged when it is evidence of an alert), any rule and per rule. Then a comparison at the
   rules' recall R, kept honest by tuning on one part and reporting on another: the hold-out
   is split in time into an earlier and a later half; on the earlier half the model's
   threshold (model alone) and the (veto, add) pair of rules + model are chosen as the most
   precise with recall >= R; all three — rules alone, model alone, rules + model — are then
   measured on the later half, which chose nothing. "rules + model" flags a transaction when a
   rule flags it and its score is at least ``veto``, or when its score is at least ``add``.
7. **Save** a new version ``MODELS_DIR/<UTC %Y%m%dT%H%M%SZ>/`` (``-2``, ``-3`` … if taken),
   written as ``MODELS_DIR/.<version>.tmp/`` and renamed into place, so the detector never sees
   half a version and no version is ever overwritten: ``mllib/`` (the model as MLlib saves
   it), ``metrics.json``, and ``model.json`` (the same model as plain arrays, exported from the
   saved ``mllib/`` Parquet; what the detector scores with, see ``fraudstream.model``). Before
   saving, the exported model scores the hold-out and must agree with MLlib's ``transform``
   (else the run fails and nothing is saved).

``--every-hours N`` (``TRAIN_EVERY_HOURS``) repeats this forever, N hours apart (the trainer
service); a round that fails (not enough data yet) is logged and retried next round; SIGTERM or
SIGINT stops the loop at once with exit status 0.

Exit status: 0 saved; 1 the run failed (Spark, the file system, the verdict database); 2 refused
input (settings, range, empty history, too few labelled rows, a class missing).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraudstream.datasets import ALERTS_SCHEMA, read_dataset
from fraudstream.features import FEATURE_NAMES, FEATURE_SET, HISTORY_SECONDS, batch_features
from fraudstream.logs import setup_logging
from fraudstream.model import (
    GBT,
    LOGISTIC_REGRESSION,
    METRICS_FILE,
    MLLIB_FOLDER,
    MODEL_FILE,
    MODEL_FORMAT,
    RANDOM_FOREST,
    Scorer,
)
from fraudstream.rules.definition import RuleDefinition, default_definitions
from fraudstream.rules.kinds import MlScore, SpanKind, Tx
from fraudstream.rules.oracle import expected_alerts
from fraudstream.schemas import ALERTS_DATASET, TRANSACTIONS_DATASET, format_timestamp, utc_now
from fraudstream.settings import TrainSettings, load_settings, run_entry_point
from spark_job.backtest import (
    BacktestError,
    Progress,
    TimeRange,
    live_definitions,
    parse_moment,
    read_history,
)

log = logging.getLogger(__name__)

PROG: Final = "python -m spark_job.train"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
AUTO: Final = "auto"
#: What ``auto`` fits, in order; the better hold-out AUC is kept.
AUTO_CANDIDATES: Final = (GBT, LOGISTIC_REGRESSION)
#: MLlib parameters per algorithm. GBT: on 1M generated transactions (800k training rows, the
#: 2-core machine, shared and loaded: times +-20 %) depth 5 x 40 trees at step 0.1 fitted in
#: 140-150 s for AUC 0.9914 and precision 0.743 at recall 0.9; depth 7 x 20 trees at step 0.2
#: in ~100 s for 0.9945 / 0.804. Deeper still gained little for more time (depth 8: 0.9950 /
#: 0.817, depth 10: 0.9954 / 0.826, each ~180 s); shallower lost quality (depth 4 x 40:
#: 0.9879 / 0.705). Random forest, 40 trees of depth 8: 74 s, 0.9878 / 0.689; logistic
#: regression: 28 s, 0.9612 / 0.444.
DEFAULT_PARAMS: Final[Mapping[str, Mapping[str, Any]]] = {
    GBT: {"maxDepth": 7, "maxIter": 20, "stepSize": 0.2, "maxBins": 32},
    RANDOM_FOREST: {"numTrees": 40, "maxDepth": 8, "maxBins": 32},
    LOGISTIC_REGRESSION: {"maxIter": 100, "regParam": 0.0001, "elasticNetParam": 0.0},
}
#: The recall at which the model's precision is reported.
RECALL_TARGET: Final = 0.9
#: After a refused round (e.g. too little labelled history yet) the schedule looks again this
#: soon, not a whole period later.
REFUSED_RETRY_SECONDS: Final = 900.0
#: Hash buckets of user_id the features are computed in (spread over the shuffle partitions).
FEATURE_BUCKETS: Final = 64
HISTOGRAM_BINS: Final = 20
#: The exported model.json must reproduce MLlib's probabilities within this.
EXPORT_TOLERANCE: Final = 1e-9
#: Score quantiles tried as thresholds when choosing the (veto, add) pair.
PAIR_GRID: Final = 200

_TS: Final = pa.timestamp("us", tz="UTC")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
#: The bronze columns training reads: what the features and the rules read, and the labels.
TRAIN_SCHEMA: Final = pa.schema([
    ("transaction_id", pa.string()), ("user_id", pa.string()), ("amount", pa.float64()),
    ("event_time", _TS), ("location", pa.string()), ("payment_method", pa.string()),
    ("merchant_id", pa.string()), ("device_ip", pa.string()), ("is_fraud", pa.bool_()),
])
#: The rows handed to the feature step (one per transaction; ``label`` null = history only).
FEATURE_INPUT_COLUMNS: Final = ("user_id", "transaction_id", "event_us", "amount", "location",
                                "payment_method", "merchant_id", "device_ip", "label")
#: The feature step's output: one row per labelled transaction.
FEATURES_DDL: Final = ", ".join(
    ["user_id string", "transaction_id string", "event_us long", "label double",
     *(f"{name} double" for name in FEATURE_NAMES)])


class TrainError(Exception):
    """Input training refuses (exit 2) or a step that failed (exit 1); one line for people."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Stopped(BaseException):
    """SIGTERM/SIGINT while a scheduled round runs: leave now (nothing half-saved stays)."""


@dataclass(frozen=True)
class TrainOptions:
    parquet_dir: Any  # a local Path, or an object-store location (fraudstream.storage)
    models_dir: Path
    verdicts_url: str
    algorithm: str = AUTO
    holdout_fraction: float = 0.2
    min_transactions: int = 1000
    seed: int = 7
    time_range: TimeRange = field(default_factory=TimeRange)
    #: MLlib parameters per algorithm (tests use small models).
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: DEFAULT_PARAMS)

    @classmethod
    def of(cls, settings: TrainSettings, **changes: Any) -> TrainOptions:
        base = {"parquet_dir": settings.parquet_dir, "models_dir": Path(settings.models_dir),
                "verdicts_url": settings.verdicts_url, "algorithm": settings.algorithm,
                "holdout_fraction": settings.holdout_fraction,
                "min_transactions": settings.min_transactions, "seed": settings.seed}
        return cls(**{**base, **changes})

    def candidates(self) -> tuple[str, ...]:
        return AUTO_CANDIDATES if self.algorithm == AUTO else (self.algorithm,)


class TrainProgress(Progress):
    """The backtest's progress lines, under this program's name. With ``stop``, every phase
    starts by checking it: a stop requested while the driver works (no Spark job to cancel)
    ends the run at the next phase."""

    def __init__(self, quiet: bool = False, stop: threading.Event | None = None) -> None:
        super().__init__(quiet=quiet)
        self.stop = stop

    def say(self, message: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("stop requested")
        if not self.quiet:
            print(f"{PROG}: {message}", file=self.stream, flush=True)


# --- reading the history ----------------------------------------------------------------------


def read_transactions(parquet_dir: Any, time_range: TimeRange) -> tuple[pa.Table, pa.Array]:
    """Bronze transactions within the range plus up to ``HISTORY_SECONDS`` before it (history
    for the features), each once, with an ``event_us`` column; and a boolean array saying
    which rows lie in the range (may be labelled). TrainError if the range holds none."""
    reach = TimeRange(time_range.start - timedelta(seconds=HISTORY_SECONDS)
                      if time_range.start else None, time_range.end)
    table = read_dataset(parquet_dir, TRANSACTIONS_DATASET, TRAIN_SCHEMA,
                         reach.expression("event_time"))
    table = table.append_column("event_us", pc.cast(table["event_time"], pa.int64()))
    if time_range.start is None:
        inside = pa.array(np.ones(table.num_rows, dtype=bool))
    else:
        inside = pc.greater_equal(table["event_time"], pa.scalar(time_range.start, _TS))
    if table.num_rows and pc.any(inside).as_py():
        return table, inside
    try:  # says what the history holds, or that there is none
        read_history(parquet_dir, time_range)
    except BacktestError as exc:
        raise TrainError(f"nothing to train on: {exc.message}") from None
    raise TrainError(f"nothing to train on under {parquet_dir}/{TRANSACTIONS_DATASET}/ "
                     f"{time_range.describe()}")


# --- labels -----------------------------------------------------------------------------------


@dataclass
class VerdictLabels:
    """Labels analysts' verdicts give, per transaction id, and where they came from."""

    labels: dict[str, float] = field(default_factory=dict)
    status: str = "read"  # read | no database
    detail: str | None = None
    verdicts: int = 0  # fraud/legit verdicts in force
    alerts_found: int = 0  # of those, alerts found under PARQUET_DIR/alerts/

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, "verdicts": self.verdicts,
                "alerts_found": self.alerts_found, "transactions": len(self.labels)}


def verdict_labels(parquet_dir: Any, url: str) -> VerdictLabels:
    """Transaction labels from the verdicts in force: ``fraud`` -> 1.0 and ``legit`` -> 0.0 for
    every transaction of the alert (``transaction_ids`` from the alerts dataset); a transaction
    in several judged alerts takes the newest verdict (``decided_at``, then recording order);
    ``unsure`` is ignored. A SQLite file that does not exist means no verdicts; a database that
    cannot be read fails the run (training without the analysts' corrections would silently
    learn what they corrected)."""
    from fraudstream.verdicts.model import check_store_url
    from fraudstream.verdicts.store import VerdictStore, VerdictStoreError, sqlite_file

    try:
        check_store_url(url)
    except ValueError as exc:
        raise TrainError(f"VERDICTS_URL: {exc}") from None
    database_file = sqlite_file(url)
    if database_file is not None and not database_file.is_file():
        return VerdictLabels(status="no database",
                             detail=f"{database_file} does not exist: no verdicts")
    try:
        with VerdictStore(url) as store:
            found = store.latest()
    except VerdictStoreError as exc:
        raise TrainError(f"cannot read the verdicts: {exc}", EXIT_FAILED) from None
    decided = {alert_id: v for alert_id, v in found.items() if v.verdict in ("fraud", "legit")}
    result = VerdictLabels(verdicts=len(decided))
    if not decided:
        return result
    alerts = read_dataset(parquet_dir, ALERTS_DATASET,
                          pa.schema([ALERTS_SCHEMA.field("alert_id"),
                                     ALERTS_SCHEMA.field("transaction_ids")]))
    alerts = alerts.filter(pc.is_in(alerts["alert_id"], pa.array(sorted(decided), pa.string())))
    newest: dict[str, tuple[datetime, int, float]] = {}
    seen = set()
    for alert_id, ids in zip(alerts["alert_id"].to_pylist(),
                             alerts["transaction_ids"].to_pylist(), strict=True):
        seen.add(alert_id)
        verdict = decided[alert_id]
        key = (verdict.decided_at, verdict.id, 1.0 if verdict.verdict == "fraud" else 0.0)
        for transaction_id in ids or ():
            if transaction_id not in newest or key[:2] > newest[transaction_id][:2]:
                newest[transaction_id] = key
    result.labels = {tid: key[2] for tid, key in newest.items()}
    result.alerts_found = len(seen)
    return result


def label_column(history: pa.Table, inside: pa.Array, verdicts: Mapping[str, float]
                 ) -> tuple[pa.Array, int]:
    """Each row's label (1.0 fraud, 0.0 legit, null none: history only), and how many labels a
    verdict gave. Rows outside the range (history for the features) get none."""
    base = pc.cast(history["is_fraud"], pa.float64())
    from_verdicts = 0
    if verdicts:
        keys = pa.array(list(verdicts), pa.string())
        values = pa.array(list(verdicts.values()), pa.float64())
        index = pc.index_in(history["transaction_id"], value_set=keys)
        override = pc.if_else(pc.and_(inside, pc.is_valid(index)),
                              pc.take(values, index), pa.scalar(None, pa.float64()))
        from_verdicts = len(override) - override.null_count
        base = pc.coalesce(override, base)
    label = pc.if_else(inside, base, pa.scalar(None, pa.float64()))
    return label.combine_chunks() if isinstance(label, pa.ChunkedArray) else label, from_verdicts


# --- the hold-out -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """The time-based split of the labelled rows: hold-out = event time >= ``cutoff_us``."""

    cutoff_us: int
    train_rows: int
    holdout_rows: int
    train_fraud: int
    holdout_fraud: int

    @property
    def holdout_from(self) -> str:
        return _format_us(self.cutoff_us)


def split_by_time(event_us: np.ndarray, labels: np.ndarray, fraction: float,
                  min_transactions: int) -> Split:
    """The cutoff leaving the newest ``fraction`` of the labelled rows for the hold-out, or
    TrainError naming what is missing (too few rows, a class absent on one side)."""
    labelled = ~np.isnan(labels)
    times, y = event_us[labelled], labels[labelled]
    count = len(times)
    if count < min_transactions:
        raise TrainError(
            f"only {count:,} labelled transactions, fewer than the {min_transactions:,} "
            f"required (TRAIN_MIN_TRANSACTIONS / --min-transactions): let the history grow "
            f"(or lower the minimum)")
    fraud = int(y.sum())
    if fraud == 0 or fraud == count:
        only = "legit" if fraud == 0 else "fraud"
        raise TrainError(f"all {count:,} labelled transactions are {only}: a classifier "
                         f"needs both fraud and legit examples")
    ordered = np.sort(times)
    holdout_size = max(1, round(count * fraction))
    cutoff = int(ordered[count - holdout_size])
    in_holdout = times >= cutoff
    split = Split(cutoff_us=cutoff, train_rows=int((~in_holdout).sum()),
                  holdout_rows=int(in_holdout.sum()),
                  train_fraud=int(y[~in_holdout].sum()), holdout_fraud=int(y[in_holdout].sum()))
    for side, rows, positives in (("training part", split.train_rows, split.train_fraud),
                                  ("hold-out", split.holdout_rows, split.holdout_fraud)):
        if positives == 0 or positives == rows:
            missing = "fraud" if positives == 0 else "legit"
            raise TrainError(
                f"the {side} ({rows:,} labelled transactions; hold-out = the newest "
                f"{fraction:.0%}, from {split.holdout_from}) holds no {missing}: both classes "
                f"are needed on both sides of the split; train on a longer history or change "
                f"TRAIN_HOLDOUT_FRACTION")
    return split


# --- features ---------------------------------------------------------------------------------


def feature_input(history: pa.Table, label: pa.Array) -> pa.Table:
    """The rows handed to the feature step."""
    columns = {name: history[name] for name in FEATURE_INPUT_COLUMNS if name != "label"}
    columns["label"] = label
    return pa.table({name: columns[name] for name in FEATURE_INPUT_COLUMNS})


def bucket_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The feature rows of the labelled transactions of every user in ``frame`` (one hash
    bucket): each user's transactions sorted by (event time, id), then the features of that
    buffer with the detector's own feature code."""
    users: dict[str, list[tuple[Tx, float]]] = {}
    for user, tid, event_us, amount, place, method, merchant, device, label in zip(
            *(frame[name].tolist() for name in FEATURE_INPUT_COLUMNS), strict=True):
        tx = Tx(int(event_us), tid, float(amount), place, method, 0, merchant or "",
                device or "")
        users.setdefault(user, []).append((tx, label))
    groups, out_users, out_ids, out_times, out_labels = [], [], [], [], []
    for user, items in users.items():
        items.sort(key=lambda item: item[0])
        buffer = [tx for tx, _ in items]
        groups.append((buffer, buffer))
        for tx, label in items:
            out_users.append(user)
            out_ids.append(tx.transaction_id)
            out_times.append(tx.event_us)
            out_labels.append(np.nan if label is None else float(label))
    matrix = batch_features(groups).reshape(-1, len(FEATURE_NAMES))
    labels = np.asarray(out_labels, dtype=np.float64)
    labelled = ~np.isnan(labels)  # an unlabelled transaction is history, not a sample
    matrix = matrix[labelled]
    out_users, out_ids, out_times = (
        [value for value, keep in zip(column, labelled, strict=True) if keep]
        for column in (out_users, out_ids, out_times))
    out_labels = labels[labelled]
    result = pd.DataFrame({"user_id": out_users, "transaction_id": out_ids,
                           "event_us": np.asarray(out_times, dtype=np.int64),
                           "label": np.asarray(out_labels, dtype=np.float64)})
    for index, name in enumerate(FEATURE_NAMES):
        result[name] = matrix[:, index]
    return result


def feature_frame(spark: Any, rows: pa.Table) -> Any:
    """The feature table (``FEATURES_DDL``) of ``rows`` (``feature_input``) as a Spark
    DataFrame: grouped by a hash bucket of user_id so every user's transactions meet in one
    ``bucket_features`` call, the buckets spread over the shuffle partitions (the cores)."""
    from pyspark.sql import functions as F

    frame = spark.createDataFrame(rows)
    bucket = F.pmod(F.hash("user_id"), F.lit(FEATURE_BUCKETS))
    return (frame.withColumn("bucket", bucket).groupBy("bucket")
            .applyInPandas(bucket_features, schema=FEATURES_DDL))


# --- training ---------------------------------------------------------------------------------


def _vectors(frame: Any) -> Any:
    from pyspark.ml.feature import VectorAssembler

    return VectorAssembler(inputCols=list(FEATURE_NAMES), outputCol="features").transform(frame)


def fit(algorithm: str, train: Any, seed: int, params: Mapping[str, Any]) -> Any:
    """An MLlib model of ``algorithm`` fitted on ``train`` (label, features)."""
    from pyspark.ml.classification import (
        GBTClassifier,
        LogisticRegression,
        RandomForestClassifier,
    )

    if algorithm == GBT:
        estimator = GBTClassifier(seed=seed, **params)
    elif algorithm == RANDOM_FOREST:
        estimator = RandomForestClassifier(seed=seed, **params)
    elif algorithm == LOGISTIC_REGRESSION:
        estimator = LogisticRegression(**params)
    else:
        raise TrainError(f"unknown algorithm {algorithm!r}")
    return estimator.fit(train)


def scored_holdout(model: Any, holdout: Any) -> tuple[Any, pa.Table]:
    """The hold-out scored by ``model`` (a DataFrame, for the evaluator) and collected:
    transaction_id, event_us, label, score (probability of fraud) and the features, ordered
    by (event time, id)."""
    from pyspark.ml.functions import vector_to_array

    scored = model.transform(holdout)
    table = scored.select("transaction_id", "event_us", "label",
                          vector_to_array("probability")[1].alias("score"),
                          *FEATURE_NAMES).toArrow()
    return scored, table.sort_by([("event_us", "ascending"), ("transaction_id", "ascending")])


def holdout_auc(scored: Any) -> float:
    from pyspark.ml.evaluation import BinaryClassificationEvaluator

    evaluator = BinaryClassificationEvaluator(labelCol="label", metricName="areaUnderROC",
                                              numBins=0)
    return float(evaluator.evaluate(scored))


# --- measuring ----------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def flag_quality(flags: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Precision and recall of boolean ``flags`` against 0/1 ``labels``."""
    hits = int((flags & (labels == 1)).sum())
    return {"precision": _ratio(hits, int(flags.sum())),
            "recall": _ratio(hits, int((labels == 1).sum())), "flagged": int(flags.sum())}


def precision_at_recall(scores: np.ndarray, labels: np.ndarray, target: float
                        ) -> dict[str, float] | None:
    """The most precise threshold t (flag score >= t) whose recall is at least ``target``:
    its precision, recall and t (ties: the higher t). None without any fraud."""
    positives = float((labels == 1).sum())
    if not positives:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, y = scores[order], labels[order]
    hits = np.cumsum(y == 1)
    flagged = np.arange(1, len(y) + 1)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # each distinct score's last row
    hits, flagged, thresholds = hits[last], flagged[last], ranked[last]
    recall = hits / positives
    precision = hits / flagged
    reach = np.flatnonzero(recall >= target - 1e-12)
    best = reach[np.argmax(precision[reach])]  # argmax: the first, i.e. the higher threshold
    return {"precision": float(precision[best]), "recall": float(recall[best]),
            "threshold": float(thresholds[best])}


def best_pair(scores: np.ndarray, labels: np.ndarray, rules: np.ndarray, target: float
              ) -> tuple[float, float | None] | None:
    """The (veto, add) pair of "rules + model" (flag when a rule flags and score >= veto, or
    score >= add) with the best precision among those of recall >= ``target`` on these rows
    (ties: higher recall, then the higher thresholds). ``add`` None = never add. Thresholds
    tried: 0 and score quantiles; None if no pair reaches the recall."""
    positives = float((labels == 1).sum())
    if not positives:
        return None
    grid = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, PAIR_GRID + 1)))
    vetoes = np.unique(np.r_[0.0, grid])
    adds = np.r_[grid, np.inf]
    best: tuple[float, float, float, float] | None = None
    choice: tuple[float, float | None] | None = None
    for veto in vetoes:
        kept = rules & (scores >= veto)
        kept_hits, kept_count = int((kept & (labels == 1)).sum()), int(kept.sum())
        rest = ~kept
        order = np.argsort(scores[rest], kind="stable")
        rest_scores, rest_fraud = scores[rest][order], (labels[rest][order] == 1)
        cumulative = np.r_[0, np.cumsum(rest_fraud)]
        start = np.searchsorted(rest_scores, adds, side="left")
        hits = kept_hits + cumulative[-1] - cumulative[start]
        flagged = kept_count + len(rest_scores) - start
        recall = hits / positives
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(flagged > 0, hits / np.maximum(flagged, 1), 0.0)
        for index in np.flatnonzero(recall >= target - 1e-12):
            key = (float(precision[index]), float(recall[index]), float(veto),
                   float(adds[index]))
            if best is None or key > best:
                best = key
                add = float(adds[index])
                choice = (float(veto), None if math.isinf(add) else add)
    return choice


def pair_flags(scores: np.ndarray, rules: np.ndarray, veto: float, add: float | None
               ) -> np.ndarray:
    flags = rules & (scores >= veto)
    return flags | (scores >= add) if add is not None else flags


def score_histogram(scores: np.ndarray, labels: np.ndarray) -> dict[str, list[Any]]:
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    fraud, _ = np.histogram(scores[labels == 1], bins=edges)
    legit, _ = np.histogram(scores[labels == 0], bins=edges)
    return {"edges": [round(float(e), 10) for e in edges], "fraud": fraud.tolist(),
            "legit": legit.tolist()}


# --- the rules on the hold-out ------------------------------------------------------------------


def rules_for_comparison(parquet_dir: Any) -> tuple[list[RuleDefinition], str]:
    """The enabled rules in force at the end of the detector's rule history (the four defaults
    when it holds none), without ``ml_score`` rules (they are the model, not the rules it is
    compared with); and where they came from."""
    live = list(live_definitions(parquet_dir).values())
    source = "rules in force (PARQUET_DIR/rule_changes/)"
    if not live:
        live, source = default_definitions(), "the default rules (no rule history)"
    rules = [d for d in live if d.enabled and d.kind != MlScore.name]
    return rules, source


def rule_flags(history: pa.Table, holdout_ids: Sequence[str], cutoff_us: int,
               definitions: Sequence[RuleDefinition]) -> dict[str, set[str]]:
    """Per rule, the hold-out transactions that are evidence of one of its alerts, from the
    rule core's oracle over the hold-out's transactions (labelled or not) and, as context, the
    two longest windows before it (so an episode already open at the cutoff is not raised
    again, and a window straddling it sees its earlier members)."""
    widest = max((d.window_us for d in definitions if isinstance(d.impl, SpanKind)), default=0)
    since = cutoff_us - 2 * widest
    recent = history.filter(pc.greater_equal(history["event_us"], since))
    records = recent.select(["transaction_id", "user_id", "amount", "location",
                             "payment_method"]).to_pylist()
    for record, moment in zip(records, recent["event_time"].to_pylist(), strict=True):
        record["timestamp"] = moment
    wanted = set(holdout_ids)
    flags: dict[str, set[str]] = {d.rule_id: set() for d in definitions}
    for alert in expected_alerts(records, definitions):
        flags[alert["rule"]].update(i for i in alert["transaction_ids"] if i in wanted)
    return flags


# --- exporting the model ------------------------------------------------------------------------


def export_trees(mllib_dir: Path, algorithm: str, weights: Sequence[float]) -> list[dict]:
    """The trees of a saved MLlib ensemble (``mllib/data/`` Parquet: one row per node, with
    MLlib's preorder node ids) as ``model.json`` trees: per-tree arrays indexed from 0 (the
    root), a leaf's feature -1. ``value`` is the node's prediction (gbt: regression trees) or
    its fraction of fraud among the training rows (random forest: impurityStats)."""
    table = pq.read_table(mllib_dir / "data")
    by_tree: dict[int, list[dict[str, Any]]] = {}
    for tree_id, node in zip(table["treeID"].to_pylist(), table["nodeData"].to_pylist(),
                             strict=True):
        by_tree.setdefault(int(tree_id), []).append(node)
    if sorted(by_tree) != list(range(len(weights))):
        raise TrainError(f"{mllib_dir}: {len(by_tree)} trees saved, {len(weights)} weights",
                         EXIT_FAILED)
    trees = []
    for tree_id, weight in enumerate(weights):
        nodes = {node["id"]: node for node in by_tree[tree_id]}
        children = {c for n in nodes.values() for c in (n["leftChild"], n["rightChild"])}
        roots = [node_id for node_id in nodes if node_id not in children]
        if len(roots) != 1:
            raise TrainError(f"{mllib_dir}: tree {tree_id} has {len(roots)} roots", EXIT_FAILED)
        order: list[int] = []  # preorder from the root: index 0 is the root
        depth = 0
        stack = [(roots[0], 0)]
        while stack:
            node_id, level = stack.pop()
            order.append(node_id)
            depth = max(depth, level)
            node = nodes[node_id]
            if node["leftChild"] >= 0:
                stack.append((node["rightChild"], level + 1))
                stack.append((node["leftChild"], level + 1))
        index = {node_id: i for i, node_id in enumerate(order)}
        arrays: dict[str, list[Any]] = {k: [] for k in
                                        ("feature", "threshold", "left", "right", "value")}
        for node_id in order:
            node = nodes[node_id]
            inner = node["leftChild"] >= 0
            split = node["split"] or {}
            if inner and (split.get("numCategories", -1) != -1
                          or len(split.get("leftCategoriesOrThreshold") or ()) != 1):
                raise TrainError(f"{mllib_dir}: a categorical split (tree {tree_id}); every "
                                 f"feature is continuous", EXIT_FAILED)
            arrays["feature"].append(int(split["featureIndex"]) if inner else -1)
            arrays["threshold"].append(float(split["leftCategoriesOrThreshold"][0])
                                       if inner else 0.0)
            arrays["left"].append(index[node["leftChild"]] if inner else -1)
            arrays["right"].append(index[node["rightChild"]] if inner else -1)
            if algorithm == GBT:
                arrays["value"].append(float(node["prediction"]))
            else:
                stats = [float(s) for s in node["impurityStats"]]
                total = sum(stats)
                arrays["value"].append(stats[1] / total if total > 0 and len(stats) > 1
                                       else 0.0)
        trees.append({"weight": float(weight), "depth": depth, **arrays})
    return trees


def export_model(model: Any, algorithm: str, mllib_dir: Path, means: Sequence[float],
                 version: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``model.json`` of a saved MLlib model (format: ``fraudstream.model``)."""
    data: dict[str, Any] = {"format": MODEL_FORMAT, "version": version, "algorithm": algorithm,
                            "feature_set": FEATURE_SET, "features": list(FEATURE_NAMES)}
    if algorithm == LOGISTIC_REGRESSION:
        data.update(coefficients=[float(c) for c in model.coefficients.toArray()],
                    intercept=float(model.intercept), means=[float(m) for m in means])
    else:
        data["trees"] = export_trees(mllib_dir, algorithm, list(model.treeWeights))
    data["metrics"] = dict(metrics)
    return data


# --- saving a version ---------------------------------------------------------------------------


def save_version(models_dir: Path, write: Callable[[Path, str], None]) -> Path:
    """A new version folder ``models_dir/<UTC %Y%m%dT%H%M%SZ>[-n]``: ``write(folder, version)``
    fills ``models_dir/.<version>.tmp/``, which is then renamed into place. An existing version
    is never touched; on any failure the temporary folder is removed."""
    models_dir.mkdir(parents=True, exist_ok=True)
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    for number in itertools.count(1):
        version = stamp if number == 1 else f"{stamp}-{number}"
        final, temporary = models_dir / version, models_dir / f".{version}.tmp"
        if final.exists():
            continue
        try:
            temporary.mkdir()
        except FileExistsError:  # another trainer is writing this one
            continue
        break
    try:
        write(temporary, version)
        if final.exists():
            raise TrainError(f"{final} appeared while this version was written", EXIT_FAILED)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")


# --- the whole run ------------------------------------------------------------------------------


def _from_us(event_us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(event_us))


def _format_us(event_us: int) -> str:
    return format_timestamp(_from_us(event_us))


@contextlib.contextmanager
def _spark_session(settings_master: str, driver_memory: str, quiet: bool,
                   given: Any = None) -> Iterator[Any]:
    """``given``, the session already running in this process (tests), or a new one (stopped
    at the end)."""
    from pyspark.sql import SparkSession

    from spark_job.session import build_spark_session

    existing = given or SparkSession.getActiveSession()
    if existing is not None:
        yield existing
        return
    spark = build_spark_session(settings_master, app_name="fraudstream-train",
                                shuffle_partitions=2, driver_memory=driver_memory,
                                log_level="ERROR" if quiet else "WARN")
    try:
        yield spark
    finally:
        spark.stop()


@dataclass
class _Candidate:
    algorithm: str
    model: Any
    auc: float
    at_recall: dict[str, float] | None
    table: pa.Table
    fit_seconds: float


def run_training(options: TrainOptions, progress: Progress | None = None, spark: Any = None,
                 *, spark_master: str = "local[2]", driver_memory: str = "2g",
                 on_session: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Read, label, split, compute features, train, measure and save one version; returns its
    metrics (with ``path``). TrainError for refused input (nothing is saved then). Without
    ``spark``, a session is started once the input is known to be good, and stopped at the
    end (one already running in this process is used as it is); ``on_session`` is called with
    the session once it runs."""
    progress = progress or TrainProgress(quiet=True)
    run = _Run(options, progress, time.monotonic())
    progress.say(f"reading history under {options.parquet_dir}/{TRANSACTIONS_DATASET}/ "
                 f"({options.time_range.describe()}) ...")
    mark = time.monotonic()
    run.history, run.inside = read_transactions(options.parquet_dir, options.time_range)
    run.verdicts = verdict_labels(options.parquet_dir, options.verdicts_url)
    run.label, run.from_verdicts = label_column(run.history, run.inside, run.verdicts.labels)
    labels = run.label.to_numpy(zero_copy_only=False).astype(np.float64)
    run.timing["read_seconds"] = time.monotonic() - mark
    run.labelled = int((~np.isnan(labels)).sum())
    progress.say(f"reading history: {run.transactions:,} transactions, {run.labelled:,} "
                 f"labelled ({run.from_verdicts:,} by analysts' verdicts; verdicts: "
                 f"{run.verdicts.status}) ({run.timing['read_seconds']:.1f} s)")
    run.split = split_by_time(run.history["event_us"].to_numpy(), labels,
                              options.holdout_fraction, options.min_transactions)
    progress.say(f"hold-out: the newest {run.split.holdout_rows:,} labelled transactions, "
                 f"from {run.split.holdout_from}; training on {run.split.train_rows:,}")
    mark = time.monotonic()
    if spark is None and not _active_session():
        progress.say("starting Spark ...")
    with _spark_session(spark_master, driver_memory, progress.quiet, spark) as session:
        run.timing["spark_start_seconds"] = time.monotonic() - mark
        if on_session is not None:
            on_session(session)
        _train_candidates(run, session)
        _measure_rules(run)
        path = _save(run)
    return {**run.metrics, "path": str(path)}


def _active_session() -> bool:
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession() is not None


@dataclass
class _Run:
    """What one training run has learnt so far."""

    options: TrainOptions
    progress: Progress
    started: float
    timing: dict[str, float] = field(default_factory=dict)
    history: Any = None  # pa.Table, once read
    inside: Any = None  # pa.Array: the rows within the range
    label: Any = None  # pa.Array
    verdicts: VerdictLabels = field(default_factory=VerdictLabels)
    from_verdicts: int = 0
    labelled: int = 0
    split: Any = None  # Split
    candidates: list[_Candidate] = field(default_factory=list)
    chosen: Any = None  # _Candidate
    means: list[float] = field(default_factory=lambda: [0.0] * len(FEATURE_NAMES))
    rules: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def transactions(self) -> int:
        return int(pc.sum(pc.cast(self.inside, pa.int64())).as_py() or 0)


def _train_candidates(run: _Run, session: Any) -> None:
    """Features (cached in Spark), then each candidate fitted and scored on the hold-out."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from spark_job.session import session_conf

    progress, options, split, timing = run.progress, run.options, run.split, run.timing
    progress.say(f"features: the detector's feature code over {run.history.num_rows:,} "
                 f"transactions ({FEATURE_BUCKETS} user buckets) ...")
    mark = time.monotonic()
    features = feature_frame(session, feature_input(run.history, run.label))
    features = features.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        # Adaptive execution would merge the small shuffle partitions into one task, leaving
        # a core idle (as in the backtest).
        with session_conf(session, {"spark.sql.adaptive.enabled": "false"}):
            feature_rows = features.count()
        timing["features_seconds"] = time.monotonic() - mark
        progress.say(f"features: {feature_rows:,} rows ({timing['features_seconds']:.1f} s)")
        cutoff = F.col("event_us") >= F.lit(split.cutoff_us)
        train = _vectors(features.where(~cutoff))
        holdout = _vectors(features.where(cutoff))
        for algorithm in options.candidates():
            progress.say(f"training {algorithm} on {split.train_rows:,} rows ...")
            mark = time.monotonic()
            model = fit(algorithm, train, options.seed, options.params[algorithm])
            fit_seconds = time.monotonic() - mark
            timing[f"train_{algorithm}_seconds"] = fit_seconds
            mark = time.monotonic()
            scored, table = scored_holdout(model, holdout)
            auc = holdout_auc(scored)
            at_recall = precision_at_recall(table["score"].to_numpy(),
                                            table["label"].to_numpy(), RECALL_TARGET)
            timing[f"evaluate_{algorithm}_seconds"] = time.monotonic() - mark
            run.candidates.append(_Candidate(algorithm, model, auc, at_recall, table,
                                             fit_seconds))
            progress.say(f"training {algorithm}: {fit_seconds:.1f} s; hold-out AUC {auc:.4f}, "
                         f"precision {_show(at_recall, 'precision')} at recall "
                         f"{RECALL_TARGET:g} ({timing[f'evaluate_{algorithm}_seconds']:.1f} s "
                         f"to evaluate)")
        run.chosen = max(run.candidates, key=lambda c: c.auc)  # ties: the first listed
        if run.chosen.algorithm == LOGISTIC_REGRESSION:
            row = train.agg(*(F.avg(name).alias(name) for name in FEATURE_NAMES)).first()
            run.means = [float(row[name]) for name in FEATURE_NAMES]
    finally:
        features.unpersist()


def _measure_rules(run: _Run) -> None:
    """The rules in force on the hold-out, and the comparison at their recall."""
    run.progress.say("evaluating: the rules in force on the hold-out ...")
    mark = time.monotonic()
    table = run.chosen.table
    scores, y = table["score"].to_numpy(), table["label"].to_numpy()
    definitions, source = rules_for_comparison(run.options.parquet_dir)
    holdout_ids = table["transaction_id"].to_pylist()
    per_rule = rule_flags(run.history, holdout_ids, run.split.cutoff_us, definitions)

    def flags_of(ids: set[str]) -> np.ndarray:
        return np.fromiter((i in ids for i in holdout_ids), bool, len(holdout_ids))

    any_rule = flags_of(set().union(*per_rule.values()))
    quality = flag_quality(any_rule, y)
    run.rules = {**quality, "source": source,
                 "per_rule": {rule_id: flag_quality(flags_of(ids), y)
                              for rule_id, ids in per_rule.items()}}
    run.comparison = compare(scores, y, any_rule, table["event_us"].to_numpy(),
                             quality["recall"] or 0.0)
    run.timing["rules_seconds"] = time.monotonic() - mark
    run.progress.say(f"evaluating: rules precision {_show(quality, 'precision')}, recall "
                     f"{_show(quality, 'recall')} ({run.timing['rules_seconds']:.1f} s)")


def _save(run: _Run) -> Path:
    """The chosen model as a new version (see ``save_version``); fills ``run.metrics``."""
    chosen, timing = run.chosen, run.timing
    table = chosen.table
    scores, y = table["score"].to_numpy(), table["label"].to_numpy()
    features = np.column_stack([table[name].to_numpy() for name in FEATURE_NAMES])
    run.progress.say(f"saving {chosen.algorithm} under {run.options.models_dir}/ ...")
    mark = time.monotonic()

    def write(folder: Path, version: str) -> None:
        mllib_dir = folder / MLLIB_FOLDER
        chosen.model.save(str(mllib_dir))
        data = export_model(chosen.model, chosen.algorithm, mllib_dir, run.means, version, {})
        exported = Scorer.from_json(data, folder).score(features)
        difference = float(np.max(np.abs(exported - scores))) if len(scores) else 0.0
        if not difference <= EXPORT_TOLERANCE:
            raise TrainError(f"the exported model.json disagrees with MLlib by {difference:.3g} "
                             f"on the hold-out; nothing saved", EXIT_FAILED)
        timing["save_seconds"] = time.monotonic() - mark
        timing["wall_seconds"] = time.monotonic() - run.started
        run.metrics = build_metrics(run, version, scores, y)
        run.metrics["export_max_difference"] = difference
        data["metrics"] = run.metrics
        _write_json(folder / METRICS_FILE, run.metrics)
        _write_json(folder / MODEL_FILE, data)  # last: a folder without it is unfinished

    path = save_version(run.options.models_dir, write)
    run.progress.say(f"saved version {path.name} ({time.monotonic() - mark:.1f} s)")
    return path


def compare(scores: np.ndarray, labels: np.ndarray, rules: np.ndarray, event_us: np.ndarray,
            recall: float) -> dict[str, Any]:
    """Rules alone, model alone and rules + model at the rules' recall ``recall`` (see the
    module docstring): thresholds chosen on the earlier half of the hold-out (rows ordered by
    event time), every figure measured on the later half."""
    half = len(scores) // 2
    early, late = slice(0, half), slice(half, None)
    result: dict[str, Any] = {
        "recall": recall,
        "tuned_on": {"rows": half,
                     "from": _format_us(event_us[0]) if half else None},
        "evaluated_on": {"rows": len(scores) - half,
                         "from": _format_us(event_us[half]) if len(scores) > half else None},
        "rules_alone": _pr(flag_quality(rules[late], labels[late])),
    }
    alone = precision_at_recall(scores[early], labels[early], recall)
    if alone is None:
        result["model_alone"] = {"precision": None, "recall": None, "threshold": None}
    else:
        flags = scores[late] >= alone["threshold"]
        result["model_alone"] = {**_pr(flag_quality(flags, labels[late])),
                                 "threshold": alone["threshold"]}
    pair = best_pair(scores[early], labels[early], rules[early], recall)
    if pair is None:
        result["rules_plus_model"] = {"precision": None, "recall": None,
                                      "veto_threshold": None, "add_threshold": None}
    else:
        veto, add = pair
        flags = pair_flags(scores[late], rules[late], veto, add)
        result["rules_plus_model"] = {**_pr(flag_quality(flags, labels[late])),
                                      "veto_threshold": veto, "add_threshold": add}
    return result


def _pr(quality: Mapping[str, Any]) -> dict[str, Any]:
    return {"precision": quality["precision"], "recall": quality["recall"]}


def build_metrics(run: _Run, version: str, scores: np.ndarray, labels: np.ndarray
                  ) -> dict[str, Any]:
    """metrics.json (also ``model.json["metrics"]``)."""
    options, chosen, split = run.options, run.chosen, run.split
    times = pc.min_max(pc.filter(run.history["event_time"], run.inside)).as_py()
    at = chosen.at_recall or {}
    return {
        "version": version,
        "algorithm": chosen.algorithm,
        "trained_at": format_timestamp(utc_now()),
        "training_seconds": round(run.timing["wall_seconds"], 3),
        "data": {
            "from": format_timestamp(times["min"]), "to": format_timestamp(times["max"]),
            "range": options.time_range.to_json(),
            "transactions": run.transactions, "labelled": run.labelled,
            "train_rows": split.train_rows, "holdout_rows": split.holdout_rows,
            "holdout_from": split.holdout_from,
            "fraud_share_train": split.train_fraud / split.train_rows,
            "fraud_share_holdout": split.holdout_fraud / split.holdout_rows,
            "labels_from_verdicts": run.from_verdicts, "verdicts": run.verdicts.to_json(),
        },
        "auc": chosen.auc,
        "precision_at_recall_0_9": at.get("precision"),
        "threshold_at_recall_0_9": at.get("threshold"),
        "recall_at_threshold_0_9": at.get("recall"),
        "candidates": {c.algorithm: {"auc": c.auc,
                                     "precision_at_recall_0_9":
                                         (c.at_recall or {}).get("precision"),
                                     "train_seconds": round(c.fit_seconds, 3)}
                       for c in run.candidates},
        "rules": run.rules,
        "comparison": run.comparison,
        "score_histogram": score_histogram(scores, labels),
        "params": {"seed": options.seed, "holdout_fraction": options.holdout_fraction,
                   **options.params[chosen.algorithm]},
        "feature_set": FEATURE_SET,
        "features": list(FEATURE_NAMES),
        "timing": {k: round(v, 3) for k, v in run.timing.items()},
    }


# --- output for people --------------------------------------------------------------------------


def _show(values: Mapping[str, Any] | None, key: str, digits: int = 3) -> str:
    value = (values or {}).get(key)
    return "-" if value is None else f"{value:.{digits}f}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """The run's figures as a short table."""
    data, rules, comparison = metrics["data"], metrics["rules"], metrics["comparison"]
    lines = [
        f"model {metrics['version']} ({metrics['algorithm']}) saved to {metrics.get('path')}",
        f"data: {data['transactions']:,} transactions from {data['from']} to {data['to']}, "
        f"{data['labelled']:,} labelled ({data['labels_from_verdicts']:,} by verdicts); "
        f"train {data['train_rows']:,} ({data['fraud_share_train']:.1%} fraud), hold-out "
        f"{data['holdout_rows']:,} from {data['holdout_from']} "
        f"({data['fraud_share_holdout']:.1%} fraud)",
        "",
        f"{'candidate':<22}{'AUC':>8}{'prec@0.9':>10}",
        *(f"{name:<22}{c['auc']:>8.4f}{_show(c, 'precision_at_recall_0_9'):>10}"
          + ("  <- kept" if name == metrics["algorithm"] else "")
          for name, c in metrics["candidates"].items()),
        "",
        f"hold-out{'':<22}{'precision':>10}{'recall':>8}{'flagged':>9}",
        f"{'model at recall 0.9':<30}{_show(metrics, 'precision_at_recall_0_9'):>10}"
        f"{_show(metrics, 'recall_at_threshold_0_9'):>8}{'':>9}  score >= "
        f"{_show(metrics, 'threshold_at_recall_0_9', 4)}",
        f"{'rules (any)':<30}{_show(rules, 'precision'):>10}{_show(rules, 'recall'):>8}"
        f"{rules['flagged']:>9,}",
        *(f"{'  ' + rule_id:<30}{_show(q, 'precision'):>10}{_show(q, 'recall'):>8}"
          f"{q['flagged']:>9,}" for rule_id, q in rules["per_rule"].items()),
        "",
        f"at the rules' recall {comparison['recall']:.3f} (thresholds chosen on the earlier "
        f"half of the hold-out, figures on the later {comparison['evaluated_on']['rows']:,}):",
        f"{'  rules alone':<30}{_show(comparison['rules_alone'], 'precision'):>10}"
        f"{_show(comparison['rules_alone'], 'recall'):>8}",
        f"{'  model alone':<30}{_show(comparison['model_alone'], 'precision'):>10}"
        f"{_show(comparison['model_alone'], 'recall'):>8}  score >= "
        f"{_show(comparison['model_alone'], 'threshold', 4)}",
        f"{'  rules + model':<30}{_show(comparison['rules_plus_model'], 'precision'):>10}"
        f"{_show(comparison['rules_plus_model'], 'recall'):>8}  veto < "
        f"{_show(comparison['rules_plus_model'], 'veto_threshold', 4)}, add >= "
        f"{_show(comparison['rules_plus_model'], 'add_threshold', 4)}",
        "",
        "time: " + ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f} s"
                             for k, v in metrics["timing"].items()),
    ]
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.prog = PROG
    group = parser.add_argument_group("training")
    group.add_argument("--from", dest="start", metavar="TIME", default=None,
                       help="first event time trained on (ISO-8601, inclusive; default: the "
                            "history's start)")
    group.add_argument("--to", dest="end", metavar="TIME", default=None,
                       help="event time where training data stops (ISO-8601, exclusive; "
                            "default: the history's end)")
    group.add_argument("--verdicts-url", default=None,
                       help="verdict database (default: $VERDICTS_URL); a missing SQLite file "
                            "means no verdicts. Prefer VERDICTS_URL for a URL with a password")
    group.add_argument("--json", action="store_true", default=False,
                       help="print the metrics as JSON instead of the table")
    group.add_argument("--quiet", action="store_true", default=False,
                       help="no progress on stderr")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _report(metrics: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=1, allow_nan=False), flush=True)
    else:
        print(format_metrics(metrics), flush=True)


def train_once(options: TrainOptions, settings: TrainSettings, progress: Progress,
               as_json: bool) -> int:
    try:
        metrics = run_training(options, progress, spark_master=settings.spark_master,
                               driver_memory=settings.driver_memory)
    except TrainError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # Spark or the file system: one line, details in the log
        log.debug("training failed", exc_info=True)
        print(f"{PROG}: failed: {_one_line(exc)} (LOG_LEVEL=DEBUG shows the details)",
              file=sys.stderr)
        return EXIT_FAILED
    _report(metrics, as_json)
    return EXIT_OK


def _cancel_spark_jobs() -> None:
    """Cancel what the running session is doing (from a thread of its own: the main thread
    may be inside a call to the JVM)."""
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is not None:
        with contextlib.suppress(Exception):
            context.cancelAllJobs()


def serve(options: TrainOptions, settings: TrainSettings, progress: TrainProgress,
          as_json: bool) -> int:
    """Train every ``settings.every_hours`` hours until SIGTERM/SIGINT (exit 0). A failed round
    is logged and the next one tries again. A stop during a round cancels its Spark jobs (the
    round then fails at once, saving nothing: a version is renamed into place whole or not at
    all) and ends the loop.

    Python runs a signal handler only when the main thread runs Python code, and during a
    round the main thread may wait minutes inside one call to the JVM (``fit``). So the
    signal is also written to a wakeup fd (``signal.set_wakeup_fd``, done by the C-level
    handler in whichever thread received it) that a watcher thread reads to cancel the jobs
    at once."""
    stop = threading.Event()
    in_round = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    def install(_session: Any = None) -> None:
        # Also after each session starts: PySpark installs its own SIGINT handler then.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)

    def watch(fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            if {signal.SIGTERM, signal.SIGINT} & set(data):
                stop.set()
                # Again and again until the round ends: a model's fit runs many short jobs,
                # and a cancel between two of them would cancel nothing.
                while in_round.is_set():
                    _cancel_spark_jobs()
                    time.sleep(0.2)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, args=(read_fd,), name="train-stop", daemon=True).start()
    install()
    round_progress = TrainProgress(quiet=progress.quiet, stop=stop)
    pause = settings.every_hours * 3600.0
    try:
        for number in itertools.count(1):
            progress.say(f"round {number}: training (every {settings.every_hours:g} h)")
            saved = refused = False
            in_round.set()
            try:
                metrics = run_training(options, round_progress, on_session=install,
                                       spark_master=settings.spark_master,
                                       driver_memory=settings.driver_memory)
                saved = True
                in_round.clear()
                _report(metrics, as_json)
            except Stopped:
                pass
            except TrainError as exc:
                refused = True
                if not stop.is_set():
                    log.warning("round %d saved no model: %s", number, exc.message)
                    progress.say(f"round {number} saved no model: {exc.message}")
            except Exception as exc:
                if not stop.is_set():
                    log.warning("round %d failed: %s", number, _one_line(exc),
                                exc_info=log.isEnabledFor(logging.DEBUG))
                    progress.say(f"round {number} failed: {_one_line(exc)}")
            in_round.clear()
            if stop.is_set():
                progress.say(f"stopped during round {number}"
                             + ("" if saved else ": it saved nothing"))
                break
            if refused and pause > REFUSED_RETRY_SECONDS:
                # Typically too little history yet (a fresh pipeline): look again soon rather
                # than leaving the detector without a model for a whole period.
                wait = REFUSED_RETRY_SECONDS
                progress.say(f"next round in {wait / 60:g} min (this one was refused)")
            else:
                wait = pause
                progress.say(f"next round in {settings.every_hours:g} h")
            stop.wait(wait)
            if stop.is_set():
                progress.say("stopped")
                break
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_fd)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    def run() -> int:
        settings, namespace = load_settings(TrainSettings, argv, extra_args=_add_flags)
        setup_logging("train", os.environ.get("LOG_LEVEL", "WARNING"))
        progress = TrainProgress(quiet=namespace.quiet)
        try:
            time_range = TimeRange(
                parse_moment(namespace.start, "--from") if namespace.start else None,
                parse_moment(namespace.end, "--to") if namespace.end else None)
        except BacktestError as exc:
            print(f"{PROG}: {exc.message}", file=sys.stderr)
            return EXIT_INVALID
        options = TrainOptions.of(settings, time_range=time_range,
                                  verdicts_url=namespace.verdicts_url or settings.verdicts_url)
        if settings.every_hours > 0:
            return serve(options, settings, progress, namespace.json)
        return train_once(options, settings, progress, namespace.json)

    run_entry_point(PROG, run)


__all__ = ["TrainError", "TrainOptions", "main", "run_training"]


if __name__ == "__main__":
    main()
