"""Trained model versions for the dashboard: what ``python -m spark_job.train`` left under
``MODELS_DIR`` (one folder per version, names sorting by training time), each version's
``metrics.json`` read tolerantly, and the figures the quality page draws from it.

A version folder without ``model.json`` is still being written (or was abandoned): the detector
skips it, and so does "the newest model" here. ``metrics.json`` is the trainer's; any key may be
missing (an older or newer trainer), so every figure is read with a fallback and shown as
``n/a`` rather than failing the page.

No Streamlit and no Spark here: ``resources`` keeps one ``ModelCatalog`` per folder per process;
the shaping functions are plain pandas, testable alone.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pandas as pd

from dashboard.data.expiring import Expiring
from fraudstream.model import METRICS_FILE, MODEL_FILE, model_versions
from fraudstream.quality import format_ratio

__all__ = [
    "COMPARISON_COLUMNS",
    "HISTOGRAM_COLUMNS",
    "TRAIN_COMMAND",
    "ModelCatalog",
    "ModelVersion",
    "ModelsSnapshot",
    "candidates_table",
    "comparison_table",
    "histogram_frame",
    "holdout_text",
    "model_text",
    "number",
    "per_rule_table",
    "ratio_text",
    "score_text",
    "versions_table",
]

#: How a model is trained (the message pages show when there is none).
TRAIN_COMMAND: Final = "python -m spark_job.train"
COMPARISON_COLUMNS: Final = ("approach", "precision", "recall", "threshold")
HISTOGRAM_COLUMNS: Final = ("start", "end", "bin", "group", "count", "share")
#: The hold-out histogram's groups, in drawing order.
FRAUD: Final = "fraud"
LEGIT: Final = "legit"


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersion:
    """One version folder."""

    name: str
    path: Path
    #: ``model.json`` is there: the version is complete (the detector can load it).
    complete: bool
    #: ``metrics.json`` as read; empty when missing or unreadable.
    metrics: Mapping[str, Any]
    #: Why the metrics could not be read (None when they were).
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.complete and self.problem is None

    @property
    def state(self) -> str:
        if not self.complete:
            return f"being written (no {MODEL_FILE} yet)"
        return self.problem or "complete"


@dataclass(frozen=True)
class ModelsSnapshot:
    models_dir: Path
    #: Every version folder, newest first.
    versions: tuple[ModelVersion, ...] = ()

    @property
    def newest(self) -> ModelVersion | None:
        """The newest complete version whose metrics could be read."""
        return next((v for v in self.versions if v.usable), None)

    @property
    def skipped(self) -> list[ModelVersion]:
        """Versions newer than ``newest`` that are not usable (being written, or broken)."""
        out = []
        for version in self.versions:
            if version.usable:
                break
            out.append(version)
        return out


_Stamp = tuple[int, int] | None


def _stamp(path: Path) -> _Stamp:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def read_metrics(path: Path) -> tuple[dict[str, Any], str | None]:
    """A ``metrics.json``: its object and None, or ``{}`` and why it cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"no {path.name}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {}, f"{path.name} unreadable: {exc}"
    if not isinstance(data, dict):
        return {}, f"{path.name} is not a JSON object"
    return data, None


class ModelCatalog:
    """The version folders of one ``MODELS_DIR``, listed again at most every ``max_age``
    seconds; a ``metrics.json`` is read again only when it changed. Thread-safe, shared by
    every session."""

    def __init__(self, models_dir: Path | str, max_age: float = 5.0) -> None:
        self.models_dir = Path(models_dir)
        self._metrics: dict[Path, tuple[_Stamp, dict[str, Any], str | None]] = {}
        self._lock = threading.Lock()
        self._snapshot = Expiring(self._read, ModelsSnapshot(self.models_dir), max_age,
                                  self._lock)

    def snapshot(self, refresh: bool = False) -> ModelsSnapshot:
        return self._snapshot.get(refresh)

    def _read(self, previous: ModelsSnapshot) -> ModelsSnapshot:
        """(Called with the lock held.)"""
        try:
            folders = model_versions(self.models_dir)
        except OSError:
            folders = []
        versions = []
        seen: dict[Path, tuple[_Stamp, dict[str, Any], str | None]] = {}
        for folder in reversed(folders):
            source = folder / METRICS_FILE
            stamp = _stamp(source)
            known = self._metrics.get(source)
            if known is not None and known[0] == stamp and stamp is not None:
                metrics, problem = known[1], known[2]
            else:
                metrics, problem = read_metrics(source)
            seen[source] = (stamp, metrics, problem)
            versions.append(ModelVersion(folder.name, folder, (folder / MODEL_FILE).is_file(),
                                         metrics, problem))
        self._metrics = seen
        return ModelsSnapshot(self.models_dir, tuple(versions))


# --- reading figures tolerantly -------------------------------------------------------------------


def number(value: Any) -> float | None:
    """A finite number, or None (missing, null, text, NaN, a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _section(metrics: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    """A nested object of the metrics, ``{}`` where any step is missing or not an object."""
    node: Any = metrics
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def ratio_text(value: Any) -> str:
    """A precision or recall as ``81.2%``; ``n/a`` when missing."""
    found = number(value)
    return format_ratio(float("nan") if found is None else found)


def score_text(value: Any) -> str:
    """A score, AUC or threshold as ``0.95``; ``n/a`` when missing."""
    found = number(value)
    return "n/a" if found is None else f"{found:.2f}"


def _count(value: Any) -> str:
    found = number(value)
    return "?" if found is None else f"{found:,.0f}"


def _text(value: Any, fallback: str = "?") -> str:
    return fallback if value is None or value == "" else str(value)


# --- shaping for the quality page -----------------------------------------------------------------


def model_text(version: ModelVersion) -> str:
    """One line naming the version: what, when, how long, on how much."""
    metrics = version.metrics
    data = _section(metrics, "data")
    line = (f"Model {_text(metrics.get('version'), version.name)} "
            f"({_text(metrics.get('algorithm'), 'algorithm unknown')})")
    trained = []
    if metrics.get("trained_at"):
        trained.append(f"at {metrics['trained_at']}")
    seconds = number(metrics.get("training_seconds"))
    if seconds is not None:
        trained.append(f"in {seconds:,.0f} s")
    if number(data.get("train_rows")) is not None:
        trained.append(f"on {_count(data.get('train_rows'))} rows")
    if trained:
        line += ", trained " + " ".join(trained)
    labels = number(data.get("labels_from_verdicts"))
    if labels:
        line += f" ({labels:,.0f} labels from analysts' verdicts)"
    return line + "."


def holdout_text(metrics: Mapping[str, Any]) -> str:
    """The hold-out: its range of event time, its size and its share of fraud."""
    data = _section(metrics, "data")
    start = _text(data.get("holdout_from"))
    end = _text(data.get("to"))
    share = number(data.get("fraud_share_holdout"))
    fraud = f", {share:.2%} fraud" if share is not None else ""
    return (f"Hold-out: {_count(data.get('holdout_rows'))} transactions from {start} to "
            f"{end}{fraud} (the newest part of the history, kept out of training).")


def comparison_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Rules alone, the model alone and rules + model on the hold-out, at the rules' recall:
    precision, recall and the thresholds that reach it."""
    comparison = _section(metrics, "comparison")
    rules = _section(comparison, "rules_alone")
    model = _section(comparison, "model_alone")
    both = _section(comparison, "rules_plus_model")
    model_threshold = number(model.get("threshold"))
    veto, add = number(both.get("veto_threshold")), number(both.get("add_threshold"))
    combined = []
    if veto is not None:
        combined.append(f"drop rule alerts scored below {veto:.2f}")
    if add is not None:
        combined.append(f"add transactions scored at or above {add:.2f}")
    rows = [
        ("rules alone", rules, "the rules in force"),
        ("model alone", model, f"score at or above {model_threshold:.2f}"
         if model_threshold is not None else "n/a"),
        ("rules + model", both, "; ".join(combined) or "n/a"),
    ]
    return pd.DataFrame(
        [{"approach": name, "precision": ratio_text(section.get("precision")),
          "recall": ratio_text(section.get("recall")), "threshold": threshold}
         for name, section, threshold in rows], columns=list(COMPARISON_COLUMNS))


def comparison_recall(metrics: Mapping[str, Any]) -> str:
    """The recall the comparison is made at (the rules' on the hold-out)."""
    comparison = _section(metrics, "comparison")
    recall = comparison.get("recall", _section(comparison, "rules_alone").get("recall"))
    return ratio_text(recall)


def histogram_frame(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The hold-out's score histogram, fraud vs legit: one row per bin and group with the
    count and the share of the group. Empty when the histogram is missing or inconsistent."""
    histogram = _section(metrics, "score_histogram")
    edges = histogram.get("edges")
    groups = {FRAUD: histogram.get(FRAUD), LEGIT: histogram.get(LEGIT)}
    empty = pd.DataFrame(columns=list(HISTOGRAM_COLUMNS))
    if not isinstance(edges, Sequence) or isinstance(edges, str) or len(edges) < 2:
        return empty
    bounds = [number(e) for e in edges]
    if any(b is None for b in bounds):
        return empty
    bins = len(bounds) - 1
    rows = []
    for group, counts in groups.items():
        if not isinstance(counts, Sequence) or isinstance(counts, str) or len(counts) != bins:
            return empty
        values = [number(c) for c in counts]
        if any(v is None or v < 0 for v in values):
            return empty
        total = sum(v for v in values if v is not None)
        for index, value in enumerate(values):
            start, end = bounds[index], bounds[index + 1]
            assert start is not None and end is not None and value is not None
            rows.append({"start": start, "end": end, "bin": f"{start:.2f}-{end:.2f}",
                         "group": group, "count": int(value),
                         "share": value / total if total else 0.0})
    return pd.DataFrame(rows, columns=list(HISTOGRAM_COLUMNS))


def candidates_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """Each algorithm tried on the hold-out (``auto`` trains more than one)."""
    chosen = metrics.get("algorithm")
    rows = [{"algorithm": str(name), "auc": score_text(figures.get("auc")),
             "precision_at_recall_0_9": ratio_text(figures.get("precision_at_recall_0_9")),
             "kept": "yes" if name == chosen else "no"}
            for name, figures in _section(metrics, "candidates").items()
            if isinstance(figures, Mapping)]
    return pd.DataFrame(rows, columns=["algorithm", "auc", "precision_at_recall_0_9", "kept"])


def per_rule_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The rules on the same hold-out: precision, recall and transactions flagged, per rule."""
    rows = [{"rule": str(rule), "precision": ratio_text(figures.get("precision")),
             "recall": ratio_text(figures.get("recall")),
             "flagged": int(flagged) if (flagged := number(figures.get("flagged"))) is not None
             else None}
            for rule, figures in sorted(_section(metrics, "rules", "per_rule").items())
            if isinstance(figures, Mapping)]
    frame = pd.DataFrame(rows, columns=["rule", "precision", "recall", "flagged"])
    frame["flagged"] = frame["flagged"].astype("Int64")
    return frame


def versions_table(snapshot: ModelsSnapshot) -> pd.DataFrame:
    """Every version folder, newest first, with its headline figures and state."""
    newest = snapshot.newest
    rows = []
    for version in snapshot.versions:
        metrics = version.metrics
        state = version.state
        if newest is not None and version.path == newest.path:
            state = "newest complete version"
        rows.append({"version": version.name,
                     "algorithm": _text(metrics.get("algorithm"), ""),
                     "trained_at": _text(metrics.get("trained_at"), ""),
                     "auc": score_text(metrics.get("auc")),
                     "precision_at_recall_0_9": ratio_text(metrics.get("precision_at_recall_0_9")),
                     "state": state})
    return pd.DataFrame(rows, columns=["version", "algorithm", "trained_at", "auc",
                                       "precision_at_recall_0_9", "state"])
