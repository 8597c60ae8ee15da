"""The fraud model where the features are: load a trained version, score, explain.

Training (``spark_job.train``) fits a Spark MLlib classifier and saves each version in its own
folder, ``<MODELS_DIR>/<version>/``, never overwriting one::

    models/20261202T061500Z/
        mllib/        the MLlib model as MLlib saves it (``*ClassificationModel.load``)
        model.json    the same model as plain arrays: what the detector evaluates
        metrics.json  hold-out AUC, precision at recall 0.9, the rules on the same hold-out,
                      the data range and row counts

``model.json`` is written last, so a folder without it is a version still being written (or
abandoned) and is skipped. The detector evaluates ``model.json`` inside its per-user state
step, in numpy, where the features already are: no round trip through the JVM per batch.
``tests/integration/test_train.py`` shows its probabilities equal MLlib's ``transform`` on the
same features to 1e-9.

How each algorithm turns features into a fraud probability:

- ``gbt`` (gradient-boosted trees, log loss): margin m = sum of weight_i * leaf value_i over
  the trees; probability 1 / (1 + exp(-2 m)) — MLlib's own link.
- ``random_forest``: each leaf holds the fraction of fraud among its training rows; the
  probability is their mean over the trees.
- ``logistic_regression``: 1 / (1 + exp(-(w . x + b))).

Reasons (``score_reasons``): the features that moved this transaction's score most. For trees,
each split on the path from root to leaf moves the node value; the move is credited to the
split's feature (Saabas' path attribution) — in probability for a forest, in margin for boosted
trees. For logistic regression a feature's credit is w_i * (x_i - its training mean). The
features with the largest upward credit are named, with their value, e.g. ``transactions in
1 min 6 (+0.31)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np

from fraudstream.features import FEATURE_NAMES, FEATURE_SET, describe

__all__ = [
    "ALGORITHMS",
    "METRICS_FILE",
    "MLLIB_FOLDER",
    "MODEL_FILE",
    "MODEL_FORMAT",
    "ModelError",
    "ModelSource",
    "Scorer",
    "model_versions",
    "newest_model",
]

log = logging.getLogger(__name__)

MODEL_FORMAT: Final = "fraudstream-model/1"
MODEL_FILE: Final = "model.json"
METRICS_FILE: Final = "metrics.json"
MLLIB_FOLDER: Final = "mllib"
GBT: Final = "gbt"
RANDOM_FOREST: Final = "random_forest"
LOGISTIC_REGRESSION: Final = "logistic_regression"
ALGORITHMS: Final = (GBT, RANDOM_FOREST, LOGISTIC_REGRESSION)
#: How many reasons an alert carries.
TOP_REASONS: Final = 3


class ModelError(ValueError):
    """A model folder that cannot be used: missing, unreadable, or made for other features."""


@dataclass(frozen=True)
class _Trees:
    """Every tree's nodes in flat arrays; node ``roots[t]`` is tree t's root. A leaf has
    ``feature == -1`` and points to itself, so walking past it stays there."""

    roots: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    weights: np.ndarray
    depth: int

    @cached_property
    def split_feature(self) -> np.ndarray:
        """``feature`` with a leaf's -1 read as 0: any column will do, it goes nowhere."""
        return np.maximum(self.feature, 0)

    @cached_property
    def children(self) -> np.ndarray:
        """``[left, right]`` of each node, flat: node n's child is ``children[2n + right]``."""
        return np.column_stack([self.left, self.right]).ravel()


@dataclass(frozen=True)
class Scorer:
    """One trained model version, ready to score feature rows (``FEATURE_NAMES`` order)."""

    version: str
    algorithm: str
    path: Path
    trees: _Trees | None = None
    coefficients: np.ndarray | None = None
    intercept: float = 0.0
    means: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path | str) -> Scorer:
        """The model in ``folder``; ModelError says what is wrong with it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        source = folder / MODEL_FILE
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{source} is missing (a version still being written, or not a "
                             "model folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{source} is unreadable: {exc}") from None
        return cls.from_json(data, folder)

    @classmethod
    def from_json(cls, data: Any, folder: Path) -> Scorer:
        where = folder / MODEL_FILE
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise ModelError(f"{where}: not a {MODEL_FORMAT} file")
        if data.get("feature_set") != FEATURE_SET or tuple(data.get("features", ())) != \
                FEATURE_NAMES:
            raise ModelError(
                f"{where}: trained on other features ({data.get('feature_set')!r}, "
                f"{len(data.get('features', ()))} columns); this detector computes "
                f"{FEATURE_SET!r} ({len(FEATURE_NAMES)} columns) — retrain with "
                "python -m spark_job.train")
        algorithm = data.get("algorithm")
        if algorithm not in ALGORITHMS:
            raise ModelError(f"{where}: unknown algorithm {algorithm!r}")
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        common = {"version": str(data.get("version") or folder.name), "algorithm": algorithm,
                  "path": folder, "metrics": metrics}
        try:
            if algorithm == LOGISTIC_REGRESSION:
                coefficients = np.asarray(data["coefficients"], dtype=np.float64)
                means = np.asarray(data["means"], dtype=np.float64)
                if coefficients.shape != (len(FEATURE_NAMES),) or means.shape != \
                        coefficients.shape:
                    raise ModelError(f"{where}: coefficients do not match the features")
                return cls(coefficients=coefficients, intercept=float(data["intercept"]),
                           means=means, **common)
            return cls(trees=_pack_trees(data["trees"], where), **common)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None

    # --- scoring --------------------------------------------------------------------------

    def score(self, rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
        """Fraud probabilities of feature rows."""
        x = np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
        if self.trees is None:
            assert self.coefficients is not None
            return _sigmoid(x @ self.coefficients + self.intercept)
        leaves = self._leaves(x)
        values = self.trees.value[leaves]
        if self.algorithm == GBT:
            return _sigmoid(2.0 * (values @ self.trees.weights))
        return values.mean(axis=1)

    def _leaves(self, x: np.ndarray) -> np.ndarray:
        """The leaf each row reaches in each tree, shape (rows, trees): all trees walked at
        once, one numpy step per level, on flat arrays (``take`` is the cheapest gather).
        A row goes left when ``x[feature] <= threshold``, as MLlib's trees do."""
        trees = self.trees
        assert trees is not None
        width = x.shape[1]
        flat = np.ascontiguousarray(x).ravel()
        nodes = np.broadcast_to(trees.roots, (len(x), len(trees.roots))).copy()
        row_start = (np.arange(len(x)) * width)[:, None]
        for _ in range(trees.depth):
            values = flat.take(row_start + trees.split_feature.take(nodes))
            right = ~(values <= trees.threshold.take(nodes))
            nodes = trees.children.take(2 * nodes + right)
        return nodes

    def explain(self, row: Sequence[float], top: int = TOP_REASONS) -> list[str]:
        """The ``top`` features that raised this row's score most, in words."""
        return self.explain_many([row], top)[0]

    def explain_many(self, rows: Sequence[Sequence[float]] | np.ndarray,
                     top: int = TOP_REASONS) -> list[list[str]]:
        """``explain`` for many rows at once (the credits of all rows in one tree walk)."""
        x = np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))
        credits = self._credit(x)
        out = []
        for values, credit in zip(x, credits, strict=True):
            order = np.argsort(-credit, kind="stable")
            chosen = [i for i in order[:top] if credit[i] > 0] or [int(order[0])]
            out.append([f"{describe(FEATURE_NAMES[i], float(values[i]))} ({credit[i]:+.2f})"
                        for i in chosen])
        return out

    def _credit(self, x: np.ndarray) -> np.ndarray:
        """Each row's credit per feature, shape (rows, features)."""
        if self.trees is None:
            assert self.coefficients is not None and self.means is not None
            return self.coefficients * (x - self.means)
        trees = self.trees
        weights = (np.full(len(trees.roots), 1.0 / len(trees.roots))
                   if self.algorithm == RANDOM_FOREST else trees.weights)
        credit = np.zeros_like(x)
        nodes = np.broadcast_to(trees.roots, (len(x), len(trees.roots))).copy()
        rows = np.broadcast_to(np.arange(len(x))[:, None], nodes.shape)
        for _ in range(trees.depth):
            feature = trees.feature[nodes]
            inner = feature >= 0
            if not inner.any():
                break
            split_on = np.where(inner, feature, 0)
            children = np.where(x[rows, split_on] <= trees.threshold[nodes], trees.left[nodes],
                                trees.right[nodes])
            # A leaf is its own child: it moves nothing.
            np.add.at(credit, (rows, split_on),
                      (trees.value[children] - trees.value[nodes]) * weights)
            nodes = children
        return credit

    @property
    def summary(self) -> str:
        """One line for logs and status: version, algorithm, hold-out AUC."""
        auc = self.metrics.get("auc")
        quality = f", hold-out AUC {auc:.3f}" if isinstance(auc, int | float) else ""
        return f"model {self.version} ({self.algorithm}{quality})"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _pack_trees(raw: Any, where: Path) -> _Trees:
    if not isinstance(raw, list) or not raw:
        raise ModelError(f"{where}: no trees")
    roots, weights, depth = [], [], 0
    columns: dict[str, list[Any]] = {name: [] for name in
                                     ("feature", "threshold", "left", "right", "value")}
    for tree in raw:
        offset = len(columns["feature"])
        size = len(tree["feature"])
        if size == 0 or any(len(tree[name]) != size for name in columns):
            raise ModelError(f"{where}: a tree's node arrays differ in length")
        roots.append(offset)
        weights.append(float(tree.get("weight", 1.0)))
        for index, feature in enumerate(tree["feature"]):
            feature = int(feature)
            if feature >= len(FEATURE_NAMES):
                raise ModelError(f"{where}: a split on feature {feature}, beyond the "
                                 f"{len(FEATURE_NAMES)} features")
            left, right = (int(tree["left"][index]), int(tree["right"][index]))
            if feature >= 0 and not (0 <= left < size and 0 <= right < size):
                raise ModelError(f"{where}: a split points outside its tree")
            columns["feature"].append(feature)
            columns["threshold"].append(float(tree["threshold"][index]))
            columns["left"].append(offset + (left if feature >= 0 else index))
            columns["right"].append(offset + (right if feature >= 0 else index))
            columns["value"].append(float(tree["value"][index]))
        depth = max(depth, int(tree.get("depth", size)))
    return _Trees(
        roots=np.asarray(roots, dtype=np.int64),
        feature=np.asarray(columns["feature"], dtype=np.int64),
        threshold=np.asarray(columns["threshold"], dtype=np.float64),
        left=np.asarray(columns["left"], dtype=np.int64),
        right=np.asarray(columns["right"], dtype=np.int64),
        value=np.asarray(columns["value"], dtype=np.float64),
        weights=np.asarray(weights, dtype=np.float64),
        depth=depth,
    )


# --- versions -------------------------------------------------------------------------------


def model_versions(models_dir: Path | str) -> list[Path]:
    """Version folders under ``models_dir``, oldest first (names sort by training time);
    folders being written (``.``-prefixed) are left out."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=_version_order)


def _version_order(folder: Path) -> tuple[str, int, str]:
    """Training time first, then the number of a same-second suffix (``-2`` < ``-10``)."""
    base, _, suffix = folder.name.partition("-")
    return (base, int(suffix), "") if suffix.isdigit() else (base, 0, suffix)


def newest_model(models_dir: Path | str) -> tuple[Scorer | None, list[str]]:
    """The newest usable version and, for each newer one that is not usable, why."""
    problems: list[str] = []
    for folder in reversed(model_versions(models_dir)):
        try:
            return Scorer.load(folder), problems
        except ModelError as exc:
            problems.append(str(exc))
    return None, problems


class ModelSource:
    """The model the detector scores with: the newest usable version under ``models_dir``,
    looked up again at most every ``check_seconds`` so a newly trained version is taken
    between batches, without a restart. Each change, and each unusable version, is logged
    once; with no usable model the detector runs on rules alone and ``status`` says so."""

    def __init__(self, models_dir: Path | str | None, check_seconds: float = 10.0) -> None:
        self.models_dir = Path(models_dir) if models_dir else None
        self.check_seconds = check_seconds
        self._scorer: Scorer | None = None
        self._checked = -math.inf
        self._stamp: tuple[Any, ...] | None = None
        self._reported: set[str] = set()

    def current(self) -> Scorer | None:
        now = time.monotonic()
        if self.models_dir is not None and now - self._checked >= self.check_seconds:
            self._checked = now
            self._refresh()
        return self._scorer

    def _refresh(self) -> None:
        assert self.models_dir is not None
        try:
            stamp = tuple((entry.name, entry.stat().st_mtime_ns)
                          for entry in os.scandir(self.models_dir))
        except OSError:
            stamp = ()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        scorer, problems = newest_model(self.models_dir)
        for problem in problems:
            if problem not in self._reported:
                self._reported.add(problem)
                log.warning("model not used: %s", problem)
        previous = self._scorer
        if scorer is None:
            if previous is not None or "none" not in self._reported:
                self._reported.add("none")
                log.warning("no usable model under %s: alerts carry no risk score and "
                            "ml_score rules do not fire (rules alone)", self.models_dir)
        elif previous is None or scorer.path != previous.path:
            log.info("scoring with %s from %s", scorer.summary, scorer.path)
        self._scorer = scorer

    @property
    def status(self) -> str:
        scorer = self.current()
        if scorer is not None:
            return f"scoring with {scorer.summary}"
        where = self.models_dir or "(MODELS_DIR not set)"
        return f"no usable model under {where}: rules alone"
