"""The rules in force: an immutable set of definitions, changed one record at a time.

A ``RuleSet`` is what a state bucket of the detector holds next to its users (the rules reach
every bucket like Flink's broadcast state): each ``fraud-rules`` record read in a micro-batch is
applied in offset order with ``RuleSet.apply``, which returns the new set and a ``RuleChange``
saying what happened. A record that is not a valid definition, or that cannot be applied
(a stale version, a window beyond the retention horizon), changes nothing: the previous version
stays in force and the change is ``refused`` with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from fraudstream.rules.definition import (
    DefinitionError,
    RuleDefinition,
    definition_from_dict,
    parse_definition,
)
from fraudstream.rules.kinds import MICROS

__all__ = ["APPLIED", "DELETED", "REFUSED", "RuleChange", "RuleSet", "rules_in_force"]

APPLIED: Final = "applied"
DELETED: Final = "deleted"
REFUSED: Final = "refused"


@dataclass(frozen=True)
class RuleChange:
    """What applying one ``fraud-rules`` record did (one row of the rule history)."""

    rule_id: str | None
    status: str  # applied | deleted | refused
    reason: str | None = None
    #: The definition applied (or refused, when it parsed); None for deletions.
    definition: RuleDefinition | None = None
    #: The definition in force before this record (None for a new rule).
    previous: RuleDefinition | None = None
    #: The raw record value for a refused record that did not parse (truncated).
    raw: str | None = None
    offset: int | None = None

    def describe(self) -> str:
        """One log line."""
        who = self.definition.updated_by if self.definition else None
        if self.status == REFUSED:
            version = f" v{self.definition.version}" if self.definition else ""
            return f"rule {self.rule_id or '?'}{version} refused: {self.reason}"
        if self.status == DELETED:
            return f"rule {self.rule_id} deleted (was v{self.previous.version})" if \
                self.previous else f"rule {self.rule_id} deleted"
        assert self.definition is not None
        state = "" if self.definition.enabled else " (disabled)"
        before = f" (was v{self.previous.version}: {self.previous.summary()})" \
            if self.previous else " (new)"
        return (f"rule {self.rule_id} v{self.definition.version} applied by {who}{state}: "
                f"{self.definition.summary()}{before}")

    def to_record(self) -> dict[str, Any]:
        """A flat record (Parquet row / JSON) of this change."""
        definition, previous = self.definition, self.previous
        return {
            "rule_id": self.rule_id,
            "status": self.status,
            "reason": self.reason,
            "version": definition.version if definition else None,
            "kind": definition.kind if definition else (previous.kind if previous else None),
            "enabled": definition.enabled if definition else None,
            "params": json.dumps(dict(definition.params)) if definition else None,
            "previous_version": previous.version if previous else None,
            "previous_params": json.dumps(dict(previous.params)) if previous else None,
            "updated_at": definition.updated_at if definition else None,
            "updated_by": definition.updated_by if definition else None,
            "raw": self.raw,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class RuleSet:
    """Definitions by rule_id (enabled or not), and the last version of deleted rules (a rule
    created again continues its numbering, so a version names one definition forever)."""

    rules: Mapping[str, RuleDefinition] = field(default_factory=dict)
    retired: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, definitions: Iterable[RuleDefinition]) -> RuleSet:
        return cls({d.rule_id: d for d in definitions})

    @cached_property
    def active(self) -> tuple[RuleDefinition, ...]:
        """Enabled rules, by rule_id."""
        return tuple(d for _, d in sorted(self.rules.items()) if d.enabled)

    @cached_property
    def windowed(self) -> tuple[RuleDefinition, ...]:
        return tuple(d for d in self.active if d.windowed)

    @cached_property
    def per_transaction(self) -> tuple[RuleDefinition, ...]:
        return tuple(d for d in self.active if d.per_transaction)

    @cached_property
    def episode_keys(self) -> frozenset[str]:
        return frozenset(d.episode_key for d in self.windowed)

    @cached_property
    def max_window_us(self) -> int:
        return max((d.window_us for d in self.windowed), default=0)

    def __len__(self) -> int:
        return len(self.rules)

    def check(self, definition: RuleDefinition, horizon_us: int) -> None:
        """Raise DefinitionError if ``definition`` cannot replace what is in force."""
        current = self.rules.get(definition.rule_id)
        last = current.version if current else self.retired.get(definition.rule_id, 0)
        if definition.version <= last:
            state = "in force" if current else "was the last before it was deleted"
            raise DefinitionError(f"stale version {definition.version}: version {last} {state}; "
                                  f"publish version {last + 1}", definition.rule_id)
        if definition.window_us > horizon_us:
            raise DefinitionError(
                f"window of {definition.window_us / MICROS:g} s exceeds the retention horizon "
                f"of {horizon_us / MICROS:g} s (RETENTION_SECONDS)", definition.rule_id)

    def apply(self, key: bytes | str | None, value: bytes | str | None, horizon_us: int,
              offset: int | None = None) -> tuple[RuleSet, RuleChange]:
        """Apply one ``fraud-rules`` record; refused records return this set unchanged."""
        try:
            definition = parse_definition(key, value)
        except DefinitionError as exc:
            raw = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            return self, RuleChange(exc.rule_id, REFUSED, exc.reason, raw=(raw or "")[:2000],
                                    offset=offset)
        if definition is None:
            rule_id = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            current = self.rules.get(rule_id)
            if current is None:
                return self, RuleChange(rule_id, REFUSED, "no such rule to delete",
                                        offset=offset)
            rules = {k: v for k, v in self.rules.items() if k != rule_id}
            retired = {**self.retired, rule_id: current.version}
            return RuleSet(rules, retired), RuleChange(rule_id, DELETED, previous=current,
                                                       offset=offset)
        return self.put(definition, horizon_us, offset)

    def put(self, definition: RuleDefinition, horizon_us: int, offset: int | None = None
            ) -> tuple[RuleSet, RuleChange]:
        """Apply a parsed definition (refused if ``check`` fails)."""
        previous = self.rules.get(definition.rule_id)
        try:
            self.check(definition, horizon_us)
        except DefinitionError as exc:
            return self, RuleChange(definition.rule_id, REFUSED, exc.reason, definition,
                                    previous, offset=offset)
        rules = {**self.rules, definition.rule_id: definition}
        retired = {k: v for k, v in self.retired.items() if k != definition.rule_id}
        return RuleSet(rules, retired), RuleChange(definition.rule_id, APPLIED, None,
                                                   definition, previous, offset=offset)

    # A compact JSON form, kept in each state bucket of the detector's checkpoint.
    def to_json(self) -> dict[str, Any]:
        return {"rules": [d.to_dict() for _, d in sorted(self.rules.items())],
                "retired": dict(self.retired)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RuleSet:
        if not data:
            return cls()
        return cls({d.rule_id: d for d in map(definition_from_dict, data["rules"])},
                   dict(data.get("retired", {})))


def rules_in_force(history: Iterable[Mapping[str, Any]]) -> list[RuleDefinition]:
    """The definitions in force at the end of a rule history (``RuleChange.to_record`` rows in
    the order applied, e.g. the detector's ``rule_changes`` Parquet across epochs). Refused
    rows changed nothing; a row that no longer validates is skipped."""
    rules: dict[str, RuleDefinition] = {}
    for row in history:
        rule_id = row.get("rule_id")
        if row.get("status") == DELETED and rule_id:
            rules.pop(rule_id, None)
        elif row.get("status") == APPLIED and rule_id:
            try:
                rules[rule_id] = definition_from_dict({
                    "rule_id": rule_id, "kind": row.get("kind"), "version": row.get("version"),
                    "enabled": row.get("enabled"), "params": json.loads(row.get("params") or "{}"),
                    "updated_at": row.get("updated_at"), "updated_by": row.get("updated_by")})
            except (DefinitionError, ValueError):
                continue
    return list(rules.values())
