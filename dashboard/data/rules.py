"""The rules on the ``fraud-rules`` topic, for the Rules page: what is in force, how each rule
got there, what was refused and why, and publishing changes.

The topic is folded with ``RulesTopic.state`` (``RuleSet.apply``, the detector's own step), so
"in force" here means what the detector applies. The topic is compacted, so older records and
refused ones that a later record of the same key replaced disappear from it; the detector's log
of every record it read (Parquet ``rule_changes/``) keeps them, and the history shown is both,
deduplicated.

Every change is validated with the rule core before anything is written (``definition_from_dict``
for the params, ``RuleSet.check`` for the version and the retention horizon), so the page refuses
with the detector's reason instead of publishing a record the detector would refuse. A change is
based on the version the analyst saw: if someone else changed the rule meanwhile, publishing is
refused rather than silently overwriting their change.

No Streamlit in here: ``resources`` keeps one ``RulesStore`` per process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
from confluent_kafka import KafkaException

from dashboard.data.expiring import Expiring
from dashboard.data.kafka import QUIET
from dashboard.data.parquet import DatasetCache
from fraudstream.datasets import RULE_CHANGES_SCHEMA
from fraudstream.rules.definition import DefinitionError, RuleDefinition, definition_from_dict
from fraudstream.rules.kinds import MICROS
from fraudstream.rules.ruleset import DELETED, REFUSED, RuleChange, RuleSet
from fraudstream.rules.store import RulesTopic
from fraudstream.schemas import RULE_CHANGES_DATASET, format_timestamp, utc_now

__all__ = [
    "HISTORY_COLUMNS",
    "REFUSED_COLUMNS",
    "RULE_COLUMNS",
    "RulePublishError",
    "RulesSnapshot",
    "RulesStore",
    "change_rows",
    "history",
    "refused",
    "rules_in_force",
]

#: Columns of the "rules in force" table.
RULE_COLUMNS: Final = ("rule_id", "kind", "version", "enabled", "summary", "updated_by",
                       "updated_at")
#: Columns of one rule's history, newest first.
HISTORY_COLUMNS: Final = ("offset", "status", "version", "updated_by", "updated_at",
                          "old_params", "new_params", "enabled", "reason", "seen_in")
#: Columns of the refused definitions.
REFUSED_COLUMNS: Final = ("offset", "rule_id", "version", "reason", "updated_by", "updated_at",
                          "raw", "seen_in")
TOPIC: Final = "topic"
DETECTOR_LOG: Final = "detector log"
#: What identifies one record in both sources (offsets alone are not enough: a topic recreated
#: on a new broker starts its offsets again, while the Parquet log keeps the old ones).
_RECORD_KEY: Final = ("offset", "rule_id", "status", "version", "previous_version", "params",
                      "updated_at", "updated_by", "raw")
_RAW_SHOWN: Final = 300


class RulePublishError(Exception):
    """A change that was not published (or not applied); ``reason`` says why, for the analyst."""

    def __init__(self, reason: str, rule_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule_id = rule_id


@dataclass(frozen=True)
class RulesSnapshot:
    """The rules topic as last read."""

    ruleset: RuleSet
    #: What each record still on the topic did, in offset order.
    changes: tuple[RuleChange, ...]
    read_at: datetime | None
    #: Why the last read failed (the snapshot then holds the last good read, if any).
    error: str | None = None


class RulesStore:
    """One rules topic and the detector's log of it; shared by every session, thread-safe.

    Reads are cached for ``max_age`` seconds, because folding the topic costs a consumer and a
    read to its end (about half a second on the embedded broker) and every widget interaction
    reruns the page. Publishing always reads afresh first.
    """

    def __init__(self, client_config: Mapping[str, str], topic: str, parquet_dir: Path | str,
                 retention_seconds: float, max_age: float = 3.0, timeout: float = 5.0) -> None:
        self.topic = RulesTopic({**client_config, **QUIET}, topic, timeout=timeout)
        self.horizon_us = round(retention_seconds * MICROS)
        self._log = DatasetCache(parquet_dir, RULE_CHANGES_DATASET, RULE_CHANGES_SCHEMA)
        self._snapshot = Expiring(self._read, RulesSnapshot(RuleSet(), (), None, "not read yet"),
                                  max_age)

    @property
    def topic_name(self) -> str:
        return self.topic.topic

    def snapshot(self, refresh: bool = False) -> RulesSnapshot:
        """The rules in force and the topic's records; re-read when older than ``max_age``."""
        return self._snapshot.get(refresh)

    def _read(self, previous: RulesSnapshot) -> RulesSnapshot:
        try:
            ruleset, changes = self.topic.state(self.horizon_us)
        except (RuntimeError, KafkaException) as exc:
            # Keep showing the last good read: the rules in force did not vanish with the broker.
            return RulesSnapshot(previous.ruleset, previous.changes, previous.read_at,
                                 str(exc.args[0]) if exc.args else str(exc))
        return RulesSnapshot(ruleset, tuple(changes), utc_now())

    def detector_log(self) -> pa.Table:
        """Every rules record the detector read and what it did with it (may be empty)."""
        table, _ = self._log.refresh()
        return table

    # --- publishing ---------------------------------------------------------------------------

    def update(self, rule_id: str, *, base_version: int, analyst: str,
               params: Mapping[str, Any] | None = None, enabled: bool | None = None
               ) -> RuleDefinition:
        """Publish the next version of ``rule_id`` with new ``params`` and/or ``enabled``.

        ``base_version`` is the version the analyst edited; if another version is in force by
        now, nothing is published. Returns the definition as applied.
        """
        ruleset = self._fresh_ruleset()
        current = ruleset.rules.get(rule_id)
        if current is None:
            raise RulePublishError(f"rule {rule_id} is no longer in force (it was deleted); "
                                   "add it again instead", rule_id)
        if current.version != base_version:
            raise RulePublishError(
                f"rule {rule_id} changed meanwhile: version {current.version} by "
                f"{current.updated_by} is in force now, not version {base_version}; review it "
                "and publish again", rule_id)
        changes: dict[str, Any] = {}
        if params is not None:
            changes["params"] = dict(params)
        if enabled is not None:
            changes["enabled"] = enabled
        try:
            definition = current.changed(version=current.version + 1,
                                         updated_by=_analyst(analyst), **changes)
        except DefinitionError as exc:
            raise RulePublishError(exc.reason, rule_id) from None
        return self._publish(ruleset, definition)

    def create(self, rule_id: str, kind: str, params: Mapping[str, Any], *, analyst: str,
               enabled: bool = True) -> RuleDefinition:
        """Publish a new rule. A rule deleted earlier continues its version numbering."""
        rule_id = rule_id.strip()
        ruleset = self._fresh_ruleset()
        current = ruleset.rules.get(rule_id)
        if current is not None:
            raise RulePublishError(f"rule {rule_id} already exists (version {current.version}); "
                                   "edit it instead", rule_id)
        try:
            definition = definition_from_dict({
                "rule_id": rule_id, "kind": kind, "version": ruleset.retired.get(rule_id, 0) + 1,
                "enabled": enabled, "params": dict(params),
                "updated_at": format_timestamp(utc_now()), "updated_by": _analyst(analyst)})
        except DefinitionError as exc:
            raise RulePublishError(exc.reason, rule_id or None) from None
        return self._publish(ruleset, definition)

    def delete(self, rule_id: str, *, base_version: int) -> int:
        """Delete ``rule_id`` (a tombstone) if ``base_version`` is still in force; returns the
        offset of the tombstone."""
        ruleset = self._fresh_ruleset()
        current = ruleset.rules.get(rule_id)
        if current is None:
            raise RulePublishError(f"rule {rule_id} is not in force: nothing to delete", rule_id)
        if current.version != base_version:
            raise RulePublishError(
                f"rule {rule_id} changed meanwhile: version {current.version} by "
                f"{current.updated_by} is in force now; review it before deleting", rule_id)
        offset = self._write(rule_id, lambda: self.topic.delete(rule_id))
        change = self._applied_at(offset)
        if change is not None and change.status != DELETED:
            raise RulePublishError(f"the deletion of {rule_id} was refused: {change.reason}",
                                   rule_id)
        return offset

    def _fresh_ruleset(self) -> RuleSet:
        snapshot = self.snapshot(refresh=True)
        if snapshot.error is not None:
            raise RulePublishError(f"cannot read the rules topic {self.topic_name!r}, so the "
                                   f"version to publish is unknown: {snapshot.error}")
        return snapshot.ruleset

    def _publish(self, ruleset: RuleSet, definition: RuleDefinition) -> RuleDefinition:
        try:
            ruleset.check(definition, self.horizon_us)
        except DefinitionError as exc:
            raise RulePublishError(exc.reason, definition.rule_id) from None
        offset = self._write(definition.rule_id, lambda: self.topic.publish(definition))
        change = self._applied_at(offset)
        if change is not None and change.status == REFUSED:
            # Someone published between our read and our write: ours is the stale one.
            raise RulePublishError(f"version {definition.version} of {definition.rule_id} was "
                                   f"published but refused: {change.reason}", definition.rule_id)
        return definition

    def _write(self, rule_id: str, write: Callable[[], int]) -> int:
        try:
            return int(write())
        except (RuntimeError, KafkaException) as exc:
            raise RulePublishError(f"publishing to {self.topic_name!r} failed: {exc}",
                                   rule_id) from None

    def _applied_at(self, offset: int) -> RuleChange | None:
        """What the fold made of the record at ``offset`` (None if the read did not get it)."""
        snapshot = self.snapshot(refresh=True)
        return next((c for c in snapshot.changes if c.offset == offset), None)


def _analyst(name: str) -> str:
    if not name or not name.strip():
        raise RulePublishError("enter your name as analyst (sidebar) first: every change "
                               "records who made it")
    return name.strip()


# --- shaping for the page (pure) ----------------------------------------------------------------


def rules_in_force(ruleset: RuleSet) -> pd.DataFrame:
    """One row per rule (enabled or not), by rule_id."""
    rows = [{"rule_id": d.rule_id, "kind": d.kind, "version": d.version, "enabled": d.enabled,
             "summary": d.summary(), "updated_by": d.updated_by, "updated_at": d.updated_at}
            for _, d in sorted(ruleset.rules.items())]
    return pd.DataFrame(rows, columns=list(RULE_COLUMNS))


def change_rows(changes: Iterable[RuleChange], log: pa.Table) -> pd.DataFrame:
    """The topic's records and the detector's log as one frame of ``RuleChange.to_record`` rows
    with ``seen_in``: a record in both is one row. Newest (highest offset) first."""
    names = [name for name in RULE_CHANGES_SCHEMA.names if name != "applied_at"]
    # Plain Python values (object columns), so an offset reads the same from either source.
    records = [{**c.to_record(), "seen_in": TOPIC} for c in changes]
    records += [{**row, "seen_in": DETECTOR_LOG} for row in log.select(names).to_pylist()]
    if not records:
        return pd.DataFrame(columns=[*names, "seen_in"], dtype=object)
    both = pd.DataFrame(records, columns=[*names, "seen_in"], dtype=object)
    both = both.where(both.notna(), None)
    key = both[list(_RECORD_KEY)].map(lambda v: "" if v is None else str(v)).agg("\x1f".join,
                                                                                 axis=1)
    sources = both.groupby(key, sort=False)["seen_in"].agg(lambda s: " + ".join(dict.fromkeys(s)))
    merged = both.loc[~key.duplicated()].copy()
    merged["seen_in"] = key[~key.duplicated()].map(sources)
    merged["_order"] = merged["offset"].map(lambda v: -1 if v is None else int(v))
    return merged.sort_values("_order", ascending=False, kind="stable") \
        .drop(columns="_order").reset_index(drop=True)


def history(rows: pd.DataFrame, rule_id: str) -> pd.DataFrame:
    """Who changed ``rule_id`` when, from which params to which, and what became of it."""
    mine = rows[rows["rule_id"] == rule_id]
    return pd.DataFrame({
        "offset": mine["offset"], "status": mine["status"],
        "version": [_versions(p, v) for p, v in zip(mine["previous_version"], mine["version"],
                                                      strict=True)],
        "updated_by": mine["updated_by"], "updated_at": mine["updated_at"],
        "old_params": mine["previous_params"].map(_params_text),
        "new_params": mine["params"].map(_params_text),
        "enabled": mine["enabled"], "reason": mine["reason"].map(_text),
        "seen_in": mine["seen_in"],
    }, columns=list(HISTORY_COLUMNS)).reset_index(drop=True)


def refused(rows: pd.DataFrame) -> pd.DataFrame:
    """The refused records, newest first, with the reason each was refused."""
    mine = rows[rows["status"] == REFUSED]
    return pd.DataFrame({
        "offset": mine["offset"], "rule_id": mine["rule_id"], "version": mine["version"],
        "reason": mine["reason"].map(_text), "updated_by": mine["updated_by"].map(_text),
        "updated_at": mine["updated_at"].map(_text), "raw": mine["raw"].map(_raw_text),
        "seen_in": mine["seen_in"],
    }, columns=list(REFUSED_COLUMNS)).reset_index(drop=True)


def _versions(previous: Any, version: Any) -> str:
    """``v1 → v2`` for a change, ``v1`` for a new rule, ``v2`` for a deletion of version 2."""
    names = [f"v{int(v)}" for v in (previous, version) if v is not None]
    return " → ".join(names)


def _params_text(params: Any) -> str:
    """``{"count": 5, "window_seconds": 60.0}`` as ``count=5, window_seconds=60``."""
    if params is None:
        return ""
    try:
        data = json.loads(params)
    except (TypeError, ValueError):
        return str(params)
    if not isinstance(data, dict):
        return str(params)
    return ", ".join(f"{k}={_number(v)}" for k, v in data.items())


def _number(value: Any) -> str:
    """Whole floats without a trailing ``.0`` (JSON may carry ``60`` or ``60.0`` alike)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _text(value: Any) -> str:
    """Text cells read blank, not "None", where a record has no such field."""
    return "" if value is None else str(value)


def _raw_text(raw: Any) -> str:
    """A refused record's value, cut short: the reason says what is wrong with it."""
    text = _text(raw)
    return text if len(text) <= _RAW_SHOWN else text[:_RAW_SHOWN] + "…"
