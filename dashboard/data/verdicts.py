"""Analysts' verdicts for the dashboard: the newest verdict per alert, one alert's audit trail,
and recording a verdict through ``fraudstream.verdicts.service.decide`` (stored first, then
published to the verdicts topic), the same path every other client takes.

The database may be unreachable (a PostgreSQL server down, a locked SQLite file). That makes
verdicts read-only, never the dashboard unusable: reads keep the last good read and say why,
recording is refused with the reason, and the database is tried again after a pause (so a
server that does not answer costs one connection timeout per pause, not one per page refresh).

No Streamlit here: ``resources`` keeps one ``VerdictDesk`` per database and topic per process,
and the shaping functions below are plain pandas/pyarrow so the numbers can be tested alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Final

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaException

from dashboard.data.expiring import Expiring
from dashboard.data.kafka import QUIET
from fraudstream.schemas import utc_now
from fraudstream.verdicts.model import FRAUD, VERDICTS, Verdict, VerdictError, make_verdict
from fraudstream.verdicts.publish import VerdictPublisher, VerdictPublishError
from fraudstream.verdicts.service import decide
from fraudstream.verdicts.store import (
    RecordedVerdict,
    VerdictStore,
    VerdictStoreError,
    store_url_for_display,
)

__all__ = [
    "ANALYST_COLUMNS",
    "QUEUE_COLUMNS",
    "QUEUE_VERDICTS",
    "TRAIL_COLUMNS",
    "UNREVIEWED",
    "VerdictDesk",
    "VerdictNotPublished",
    "VerdictNotRecorded",
    "VerdictsSnapshot",
    "analyst_precision",
    "next_unreviewed",
    "queue_table",
    "review_queue",
    "trail_table",
    "verdict_labels",
]

#: The state of an alert nobody has given a verdict yet (a filter value beside the verdicts).
UNREVIEWED: Final = "unreviewed"
#: The choices of the review queue's verdict filter.
QUEUE_VERDICTS: Final = (UNREVIEWED, *VERDICTS)
#: Columns of the review queue table.
QUEUE_COLUMNS: Final = ("verdict", "risk_score", "detected_at", "rule", "rule_version",
                        "user_id", "total_amount", "reason", "analyst", "decided_at",
                        "alert_id")
#: Columns of one alert's audit trail.
TRAIL_COLUMNS: Final = ("decided_at", "analyst", "verdict", "note", "recorded_at")
#: Columns the detection-quality page adds per rule.
ANALYST_COLUMNS: Final = ("reviewed", "confirmed_fraud", "analyst_precision")


class VerdictNotRecorded(Exception):
    """Nothing was stored; ``reason`` says why, in words the analyst can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerdictNotPublished(Exception):
    """The verdict is stored (it counts) but did not reach the verdicts topic."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(reason)
        self.verdict = verdict
        self.reason = reason


@dataclass(frozen=True)
class VerdictsSnapshot:
    """The newest verdict per alert, as last read."""

    latest: Mapping[str, RecordedVerdict]
    #: When the database was last read successfully; None if it never was (then ``latest`` is
    #: empty for want of a read, not because nothing was reviewed).
    read_at: datetime | None
    #: Why the database cannot be used right now; verdicts are read-only while it is set.
    error: str | None = None

    @property
    def read_only(self) -> bool:
        return self.error is not None


class VerdictDesk:
    """One verdict database and verdicts topic, shared by every browser session; thread-safe.

    The newest-verdict read is cached for ``max_age`` seconds because the live page reruns on
    every refresh and every widget interaction; recording a verdict drops that cache, so the
    page drawn right after a decision already shows it.
    """

    def __init__(self, url: str, client_config: Mapping[str, str], topic: str, *,
                 max_age: float = 3.0, retry_seconds: float = 15.0, timeout: float = 5.0,
                 publish_timeout: float = 10.0) -> None:
        self.url = url
        self.display_url = store_url_for_display(url)
        self.topic = topic
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.publish_timeout = publish_timeout
        self._client_config = {**client_config, **QUIET}
        self._store: VerdictStore | None = None
        self._publisher: VerdictPublisher | None = None
        self._error: str | None = None
        self._failed_at: float | None = None
        self._lock = threading.Lock()
        self._snapshot = Expiring(self._read, VerdictsSnapshot({}, None), max_age, self._lock)

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self, refresh: bool = False) -> VerdictsSnapshot:
        """The newest verdict per alert; re-read when older than ``max_age``."""
        return self._snapshot.get(refresh)

    def _read(self, previous: VerdictsSnapshot) -> VerdictsSnapshot:
        """(Called with the lock held.)"""
        store = self._open()
        if store is not None:
            try:
                return VerdictsSnapshot(store.latest(), utc_now())
            except VerdictStoreError as exc:
                self._fail(exc)
        # Keep showing the last good read: the verdicts did not vanish with the database.
        return replace(previous, error=self._error)

    def trail(self, alert_id: str) -> tuple[list[RecordedVerdict], str | None]:
        """Every verdict recorded on ``alert_id``, oldest first, and why it could not be read
        (None when it was)."""
        with self._lock:
            store = self._open()
            if store is None:
                return [], self._error
            try:
                return store.history(alert_id), None
            except VerdictStoreError as exc:
                self._fail(exc)
                return [], self._error

    # --- recording ----------------------------------------------------------------------------

    def record(self, alert_id: str, verdict: str, analyst: str, note: str,
               known: Callable[[str], bool]) -> RecordedVerdict:
        """Store the verdict, then publish it. ``known`` says whether an alert id is one the
        dashboard has loaded: a verdict on anything else is refused.

        Raises ``VerdictNotRecorded`` when nothing was stored, ``VerdictNotPublished`` when the
        verdict is stored but the topic did not take it.
        """
        try:
            decision = make_verdict(alert_id, verdict, analyst, note)
        except VerdictError as exc:
            raise VerdictNotRecorded(str(exc)) from None
        with self._lock:
            store = self._open()
            if store is None:
                raise VerdictNotRecorded(f"verdicts are read-only: {self._error}")
            try:
                publisher = self._publisher_for()
            except (KafkaException, VerdictPublishError) as exc:
                raise VerdictNotRecorded(f"cannot publish to {self.topic!r}: {exc}") from None
        # Outside the lock: publishing may wait for the broker, and other sessions keep reading.
        try:
            return decide(store, decision, known=known, publisher=publisher)
        except VerdictStoreError as exc:
            with self._lock:
                self._fail(exc)
                reason = self._error
            raise VerdictNotRecorded(f"verdicts are read-only: {reason}") from None
        except VerdictPublishError as exc:
            raise VerdictNotPublished(decision, str(exc)) from None
        except VerdictError as exc:  # an alert id the dashboard never loaded, ...
            raise VerdictNotRecorded(str(exc)) from None
        finally:
            with self._lock:
                # Even a failed attempt may have stored something: read afresh next time.
                self._snapshot.expire()

    # --- the database and the topic -----------------------------------------------------------

    def _open(self) -> VerdictStore | None:
        """The store, or None while the database is failing (caller holds the lock)."""
        if self._failed_at is not None and \
                time.monotonic() - self._failed_at < self.retry_seconds:
            return None
        if self._store is None:
            try:
                store = VerdictStore(self.url, timeout=self.timeout)
            except VerdictStoreError as exc:
                self._fail(exc)
                return None
            try:
                store.migrate()
            except VerdictStoreError as exc:
                store.close()
                self._fail(exc)
                return None
            self._store = store
        # Past the pause: try the database again (the next call that fails sets it back).
        self._failed_at = None
        self._error = None
        return self._store

    def _fail(self, exc: VerdictStoreError) -> None:
        self._error = str(exc) or type(exc).__name__
        self._failed_at = time.monotonic()

    def _publisher_for(self) -> VerdictPublisher:
        if self._publisher is None:
            self._publisher = VerdictPublisher(self._client_config, self.topic,
                                               timeout=self.publish_timeout)
        return self._publisher


# --- shaping for the pages (pure) ---------------------------------------------------------------


def verdict_labels(alert_ids: pd.Series, snapshot: VerdictsSnapshot) -> pd.Series:
    """Each alert's newest verdict, ``unreviewed`` where it has none, and None for every alert
    while the database has never been read (unknown is not the same as unreviewed)."""
    if snapshot.read_at is None:
        return pd.Series(None, index=alert_ids.index, dtype=object)
    latest = snapshot.latest
    return alert_ids.map(lambda i: latest[i].verdict if i in latest else UNREVIEWED) \
        .astype(object)


def review_queue(alerts: pd.DataFrame, latest: Mapping[str, RecordedVerdict], *,
                 rules: Sequence[str] = (), verdicts: Sequence[str] = (),
                 analysts: Sequence[str] = (), by_risk: bool = False) -> pd.DataFrame:
    """The alerts to work, with ``verdict``, ``analyst`` and ``decided_at`` of their newest
    verdict: unreviewed first, then newest first; with ``by_risk``, highest ``risk_score``
    first (alerts without one after every scored alert), then newest first. Empty filters
    keep everything; ``verdicts`` may hold ``unreviewed``."""
    ids = alerts["alert_id"]
    queue = alerts.assign(
        verdict=ids.map(lambda i: latest[i].verdict if i in latest else UNREVIEWED)
        .astype(object),
        analyst=ids.map(lambda i: latest[i].analyst if i in latest else None).astype(object),
        decided_at=pd.to_datetime(
            ids.map(lambda i: latest[i].decided_at if i in latest else None), utc=True),
    )
    keep = pd.Series(True, index=queue.index)
    if rules:
        keep &= queue["rule"].isin(list(rules))
    if verdicts:
        keep &= queue["verdict"].isin(list(verdicts))
    if analysts:
        keep &= queue["analyst"].isin(list(analysts))
    queue = queue[keep].assign(_reviewed=lambda q: q["verdict"] != UNREVIEWED)
    keys, ascending = ["_reviewed"], [True]
    if by_risk:
        scores = (pd.to_numeric(queue["risk_score"], errors="coerce")
                  if "risk_score" in queue.columns else pd.Series(float("nan"), queue.index))
        # Sorted as a key of its own (scored first), so "nulls last" holds whatever the
        # direction of the score itself.
        queue = queue.assign(_unscored=scores.isna(), _risk=scores.fillna(0.0))
        keys += ["_unscored", "_risk"]
        ascending += [True, False]
    keys += ["detected_at", "alert_id"]
    ascending += [False, False]
    queue = queue.sort_values(keys, ascending=ascending, na_position="last", kind="stable")
    return queue.drop(columns=[k for k in keys if k.startswith("_")]).reset_index(drop=True)


def queue_table(queue: pd.DataFrame) -> pd.DataFrame:
    """The queue's columns people read (``risk_score`` empty where an alert has none)."""
    table = queue.reindex(columns=list(QUEUE_COLUMNS))
    table["rule_version"] = pd.to_numeric(table["rule_version"], errors="coerce").astype("Int64")
    table["risk_score"] = pd.to_numeric(table["risk_score"], errors="coerce").astype("Float64")
    return table


def next_unreviewed(queue: pd.DataFrame, current: str | None) -> str | None:
    """The unreviewed alert to show once ``current`` is decided: the next one after it in the
    queue's order, wrapping round to the top; None when no other is left."""
    order = list(queue["alert_id"])
    unreviewed = set(queue.loc[queue["verdict"] == UNREVIEWED, "alert_id"])
    start = order.index(current) + 1 if current in order else 0
    for alert_id in order[start:] + order[:start]:
        if alert_id in unreviewed and alert_id != current:
            return str(alert_id)
    return None


def trail_table(history: Sequence[RecordedVerdict]) -> pd.DataFrame:
    """One alert's verdicts, oldest first: who decided what, when, and why."""
    rows = [{"decided_at": v.decided_at, "analyst": v.analyst, "verdict": v.verdict,
             "note": v.note, "recorded_at": v.recorded_at} for v in history]
    return pd.DataFrame(rows, columns=list(TRAIL_COLUMNS))


def analyst_precision(alerts: pa.Table, latest: Mapping[str, RecordedVerdict]
                      ) -> tuple[pd.DataFrame, int]:
    """Per rule, of the alerts in ``alerts`` with a verdict: how many were reviewed, how many of
    those the newest verdict confirms as fraud, and that share (the analysts' precision, NaN
    with nothing reviewed). Also how many verdicts concern alerts not in ``alerts``."""
    wanted = pa.array(sorted(latest), pa.string())
    found = alerts.select(["alert_id", "rule"]) \
        .filter(pc.is_in(alerts["alert_id"], value_set=wanted)).to_pandas() \
        .drop_duplicates("alert_id")
    if found.empty:
        frame = pd.DataFrame(columns=list(ANALYST_COLUMNS), index=pd.Index([], name="rule"))
        return frame.astype({"reviewed": "int64", "confirmed_fraud": "int64",
                             "analyst_precision": "float64"}), len(latest)
    found["fraud"] = found["alert_id"].map(lambda i: latest[i].verdict == FRAUD)
    grouped = found.groupby("rule")
    frame = pd.DataFrame({"reviewed": grouped.size(),
                          "confirmed_fraud": grouped["fraud"].sum().astype("int64")})
    frame["analyst_precision"] = frame["confirmed_fraud"] / frame["reviewed"]
    frame.index.name = "rule"
    return frame, len(latest) - len(found)
