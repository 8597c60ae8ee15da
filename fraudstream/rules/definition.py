"""A rule definition: the JSON record of one rule on the ``fraud-rules`` topic.

::

    {"rule_id": "velocity", "kind": "velocity", "version": 2, "enabled": true,
     "params": {"count": 5, "window_seconds": 60},
     "updated_at": "2026-12-01T10:00:00.000Z", "updated_by": "analyst name"}

``parse_definition`` turns the bytes of a record into a ``RuleDefinition`` or raises
``DefinitionError`` with a reason a person can act on. Everything that accepts definitions (the
detector's state step, the rules CLI, the dashboard, the backtest) parses them here, so they
agree on what is valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from fraudstream.rules.kinds import KINDS, ParamError, RuleKind, SpanKind, TransactionKind
from fraudstream.schemas import format_timestamp, parse_timestamp, utc_now

__all__ = [
    "DEFINITION_FIELDS",
    "DefinitionError",
    "RuleDefinition",
    "default_definitions",
    "definition_from_dict",
    "parse_definition",
]

#: The fields of a definition, in the order they are written.
DEFINITION_FIELDS: Final = ("rule_id", "kind", "version", "enabled", "params", "updated_at",
                            "updated_by")
RULE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_UPDATED_BY: Final = 200
#: A record larger than this is not a rule definition.
MAX_DEFINITION_BYTES: Final = 64 * 1024
DEFAULTS_AUTHOR: Final = "fraudstream (defaults)"


class DefinitionError(ValueError):
    """A definition that cannot be applied; ``reason`` says why, ``rule_id`` whose it is."""

    def __init__(self, reason: str, rule_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule_id = rule_id


@dataclass(frozen=True)
class RuleDefinition:
    """One rule in force (or proposed): validated, params typed by its kind."""

    rule_id: str
    kind: str
    version: int
    enabled: bool
    params: Mapping[str, int | float]
    updated_at: str
    updated_by: str

    @property
    def impl(self) -> RuleKind:
        return KINDS[self.kind]

    @property
    def windowed(self) -> bool:
        return isinstance(self.impl, SpanKind)

    @property
    def per_transaction(self) -> bool:
        return isinstance(self.impl, TransactionKind)

    @property
    def window_us(self) -> int:
        return self.impl.window_us(self.params)

    @property
    def episode_key(self) -> str:
        """Episodes belong to one version: a change closes the open ones."""
        return f"{self.rule_id}#{self.version}"

    def summary(self) -> str:
        return self.impl.summary(self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "kind": self.kind, "version": self.version,
                "enabled": self.enabled, "params": dict(self.params),
                "updated_at": self.updated_at, "updated_by": self.updated_by}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def changed(self, *, version: int, updated_by: str, updated_at: datetime | None = None,
                **changes: Any) -> RuleDefinition:
        """The next definition of this rule (validated like any record)."""
        data = {**self.to_dict(), **changes, "version": version, "updated_by": updated_by,
                "updated_at": format_timestamp(updated_at or utc_now())}
        return definition_from_dict(data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_definition(key: bytes | str | None, value: bytes | str | None
                     ) -> RuleDefinition | None:
    """The definition in one ``fraud-rules`` record; None for a tombstone (the rule is deleted).

    Raises DefinitionError for anything that is not a valid definition, including a key that
    differs from the value's ``rule_id``.
    """
    key_text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    if value is None:
        if not key_text:
            raise DefinitionError("a deletion (null value) needs the rule_id as its key")
        return None
    if len(value) > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"definition larger than {MAX_DEFINITION_BYTES} bytes", key_text)
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        data = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DefinitionError(f"not valid JSON: {exc}", key_text) from None
    definition = definition_from_dict(data, key_text)
    if key_text and key_text != definition.rule_id:
        raise DefinitionError(f"record key {key_text!r} differs from rule_id "
                              f"{definition.rule_id!r}", key_text)
    return definition


def definition_from_dict(data: Any, rule_id_hint: str | None = None) -> RuleDefinition:
    """Validate a decoded definition object (from a record, a file or a form)."""
    if not isinstance(data, Mapping):
        raise DefinitionError("a definition must be a JSON object", rule_id_hint)
    rule_id = data.get("rule_id")
    hint = rule_id if isinstance(rule_id, str) else rule_id_hint

    def fail(reason: str) -> DefinitionError:
        return DefinitionError(reason, hint)

    missing = [name for name in DEFINITION_FIELDS if name not in data]
    if missing:
        raise fail(f"missing field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    unknown = sorted(set(data) - set(DEFINITION_FIELDS))
    if unknown:
        raise fail(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    if not isinstance(rule_id, str) or not RULE_ID_PATTERN.match(rule_id):
        raise fail("rule_id: expected 1-64 letters, digits, '_', '.' or '-', starting with a "
                   f"letter or digit, got {rule_id!r}")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise fail(f"kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fail(f"version: expected a whole number >= 1, got {version!r}")
    enabled = data["enabled"]
    if not isinstance(enabled, bool):
        raise fail(f"enabled: expected true or false, got {enabled!r}")
    try:
        params = KINDS[kind].validate(data["params"])
    except ParamError as exc:
        raise fail(str(exc)) from None
    updated_at = data["updated_at"]
    try:
        updated_at = format_timestamp(parse_timestamp(updated_at))
    except (TypeError, ValueError):
        raise fail(f"updated_at: expected an ISO-8601 time with a zone, got {updated_at!r}"
                   ) from None
    updated_by = data["updated_by"]
    if not isinstance(updated_by, str) or not updated_by.strip():
        raise fail("updated_by: expected the name of who made the change")
    if len(updated_by) > MAX_UPDATED_BY:
        raise fail(f"updated_by: longer than {MAX_UPDATED_BY} characters")
    return RuleDefinition(rule_id=rule_id, kind=kind, version=version, enabled=enabled,
                          params=params, updated_at=updated_at, updated_by=updated_by.strip())


def default_definitions(overrides: Mapping[str, Mapping[str, int | float]] | None = None,
                        updated_at: datetime | None = None) -> list[RuleDefinition]:
    """Version 1 of the default rule of every kind (rule_id = kind), with ``overrides``
    (kind -> params) from settings."""
    stamp = format_timestamp(updated_at or utc_now())
    out = []
    for name, kind in KINDS.items():
        if not kind.published_by_default:
            continue
        params = {**kind.defaults, **(overrides or {}).get(name, {})}
        out.append(definition_from_dict({
            "rule_id": name, "kind": name, "version": 1, "enabled": True, "params": params,
            "updated_at": stamp, "updated_by": DEFAULTS_AUTHOR}))
    return out
